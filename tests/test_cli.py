"""The command line: one-line errors with exit code 2 and no partial files; outputs on success."""

import csv
import io
import json

import jax
import numpy as np
import pytest
import tifffile
from PIL import Image

from cte_jax.arch import UNetSpec
from cte_jax.cli import main
from cte_jax.modelio import Model, save_model
from cte_jax.networks import UNet, init_variables
from cte_jax.preprocess import Normalization, normalize

NORM = Normalization(kind="percentile", lo=5, hi=98).to_dict()
SPEC = UNetSpec(features=(4, 8, 16), layer_order="cr")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for i in range(2):
        v = init_variables(SPEC, jax.random.key(i))
        save_model(Model(name=f"m{i}", normalization=NORM, spec=SPEC, variables=v), root / "bank" / f"m{i}")
    (root / "target").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((36, 40)) * 255).astype(np.uint8)).save(root / "target" / f"t{i}.png")
    return root


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_rank_writes_json_and_csv(setup, capsys, tmp_path):
    code, out, err = _run(capsys, "rank", "--bank", setup / "bank", "--target", setup / "target", "--quiet",
                          "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv")
    assert code == 0, err
    doc = json.loads((tmp_path / "r.json").read_text())
    recs = doc["records"]
    assert {r["model"] for r in recs} == {"m0", "m1"} and {r["rank"] for r in recs} == {1, 2}
    # the file says how it was made
    assert doc["settings"]["seed"] == 0 and doc["settings"]["aggregate"] == "median"
    assert doc["settings"]["perturbations"] == ["dropout:0.1"] and doc["settings"]["target"] == str(setup / "target")
    assert "m0" in out and "CTE-NHD under dropout:0.1" in out and "baseline" not in out
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("model,perturbation,metric,score,rank")
    # The first model's share of resamples above the second is printed beside its score, and written.
    first = next(r for r in recs if r["rank"] == 1)
    row = next(line for line in out.splitlines() if line.split()[:2] == ["1", first["model"]])
    assert row.split()[3] == f"{first['order_support']:.2f}" and "vs next" in out
    assert next(r for r in recs if r["rank"] == 2)["order_support"] is None
    assert "order_support" in (tmp_path / "r.csv").read_text().splitlines()[0]
    # two images: every record says so, and the table warns that they are too few
    assert {r["n_images"] for r in recs} == {2} and "the scores rest on 2 images" in out


def test_vs_next_is_explained_only_when_shown():
    from cte_jax.cli import _table

    rec = {"model": "a", "perturbation": "dropout:0.1", "metric": "nhd", "score": 0.9, "rank": 1, "n_scored": 1,
           "n_skipped": 0, "n_images": 1, "order_support": None}
    assert "vs next: share" not in _table([rec, {**rec, "model": "b", "score": 0.8, "rank": 2}])
    assert "vs next: share" in _table([{**rec, "order_support": 0.9}, {**rec, "model": "b", "score": 0.8, "rank": 2}])


def test_a_flagged_first_place_names_the_best_unflagged_model():
    from cte_jax.cli import _table

    rec = {"model": "a", "perturbation": "dropout:0.1", "metric": "nhd", "score": 0.99, "rank": 1, "n_scored": 30,
           "n_skipped": 0, "n_images": 30, "foreground_fraction": 0.95, "high_foreground": True}
    b = {**rec, "model": "b", "score": 0.97, "rank": 2, "foreground_fraction": 0.3, "high_foreground": False}
    c = {**rec, "model": "c", "score": 0.95, "rank": 3, "foreground_fraction": 0.2, "high_foreground": False}
    assert "the best-ranked unflagged model is b, rank 2" in _table([rec, b, c])
    assert "unflagged" not in _table([b, c])
    assert "every ranked model is flagged" in _table([rec, {**b, "high_foreground": True}])


def test_unscored_models_are_explained():
    from cte_jax.cli import _unscored_note

    recs = [{"model": "a", "score": None, "n_skipped": 4}, {"model": "b", "score": 0.9, "n_skipped": 0},
            {"model": "bb", "score": None, "n_skipped": 0, "note": "black-box model: ..."}]
    text = " ".join(_unscored_note(recs))
    assert "1 model (a)" in text and "both predictions were empty" in text and "bb" not in text
    assert _unscored_note(recs[1:]) == []


def test_labelled_domain_as_target_points_at_its_images(tmp_path):
    from cte_jax.data import open_target
    from cte_jax.errors import CTEError

    (tmp_path / "dom" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "dom" / "images" / "a.png")
    with pytest.raises(CTEError, match="its images are in .*dom/images"):
        open_target(tmp_path / "dom")


def test_small_target_note_counts_images_not_tiles():
    from cte_jax.cli import SMALL_TARGET, _small_target_note

    rec = {"score": 0.9, "n_scored": 60, "n_images": SMALL_TARGET - 1}
    unscored = {**rec, "score": None, "n_images": 0}
    assert f"rest on {SMALL_TARGET - 1} images" in " ".join(_small_target_note([rec, unscored]))
    assert _small_target_note([{**rec, "n_images": SMALL_TARGET}]) == []
    assert _small_target_note([{**rec, "score": None}]) == []


def test_rank_prints_baselines_once_after_cte(setup, capsys, tmp_path):
    code, out, err = _run(capsys, "rank", "--bank", setup / "bank", "--target", setup / "target", "--quiet",
                          "--metric", "entropy", "nhd", "confidence", "--perturbation", "dropout:0.1", "noise:0.1",
                          "--json", tmp_path / "r.json")
    assert code == 0, err
    recs = json.loads((tmp_path / "r.json").read_text())["records"]
    titles = [line for line in out.splitlines() if line.startswith(("CTE-", "baseline:"))]
    assert titles == ["CTE-NHD under dropout:0.1", "CTE-NHD under noise:0.1",
                      "baseline: 1 - mean entropy (clean pass; for comparison)",
                      "baseline: mean confidence (clean pass; for comparison)"]
    for metric in ("entropy", "confidence"):
        by_pert = {}
        for r in recs:
            if r["metric"] == metric:
                by_pert.setdefault(r["perturbation"], {})[r["model"]] = r["score"]
        assert set(by_pert) == {None} and len(by_pert[None]) == 2  # clean pass only: once per model
        assert sum(r["metric"] == metric for r in recs) == 2
    # The printed entropy table lists the models best first.
    block = out.split("baseline: 1 - mean entropy")[1].split("baseline:")[0].splitlines()[2:4]
    printed = [float(line.split()[2]) for line in block]
    assert printed == sorted(printed, reverse=True)
    assert "or baseline score" in next(line for line in out.splitlines() if line.startswith("score:"))
    assert out.count("score: median per-image") == 1
    code, out, err = _run(capsys, "rank", "--bank", setup / "bank", "--target", setup / "target", "--quiet",
                          "--aggregate", "mean")
    assert code == 0, err
    assert "score: mean per-image consistency" in out and "score: median" not in out


@pytest.mark.parametrize("args,expect", [
    (["--perturbation", "blur:2"], "unknown perturbation 'blur'"),
    (["--perturbation", "dropout:x"], "bad perturbation"),
    (["--metric", "dice"], None),  # argparse choices: usage error, exit 2
    (["--target", "MISSING"], "missing: no such file"),
    (["--target", "EMPTY"], "no images"),
    (["--target", "BADCH"], "bad.tif"),
    (["--bank", "MISSING"], "not found"),
    (["--target", "NAN"], "nan.tif: image contains 3 NaN or infinite pixels"),
    (["--metric", "nhd", "nhd"], "a metric is given twice"),
    (["--perturbation", "contrast:0"], "contrast factor must be > 0"),
    (["--perturbation", "dropout:0.1", "dropout:0"], "dropout:0 leaves every image as it is"),
    (["--perturbation", "noise:0"], "noise:0 leaves every image as it is"),
    (["--perturbation", "contrast:1.0"], "contrast:1.0 leaves every image as it is"),
    (["--perturbation", "gamma:1"], "gamma:1 leaves every image as it is"),
    (["--perturbation", "brightness:0.0"], "brightness:0.0 leaves every image as it is"),
    (["--threshold", "1.5"], "threshold must lie between 0 and 1"),
    (["--threshold", "0"], "threshold must lie between 0 and 1"),
    (["--batch-size", "0"], "batch size must be at least 1"),
    (["--seed", "99999999999999999999"], "seed must be a whole number"),
    (["--csv", "/proc/r.csv"], "cannot write in the output folder"),
    (["--resume", "--overwrite"], "give one of them"),
])
def test_bad_input_one_line_exit_2_no_output(setup, capsys, tmp_path, args, expect):
    (tmp_path / "empty").mkdir()
    (tmp_path / "badch").mkdir()
    tifffile.imwrite(tmp_path / "badch" / "bad.tif", np.zeros((5, 32, 32, 5), np.uint8))
    (tmp_path / "nan").mkdir()
    bad = np.ones((32, 32), np.float32)
    bad[3, :2], bad[5, 5] = np.nan, np.inf
    tifffile.imwrite(tmp_path / "nan" / "nan.tif", bad)
    subst = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty"), "BADCH": str(tmp_path / "badch"),
             "NAN": str(tmp_path / "nan")}
    args = [subst.get(a, a) for a in args]
    base = {"--bank": str(setup / "bank"), "--target": str(setup / "target")}
    for flag in base:
        if flag not in args:
            args = [flag, base[flag]] + args
    out_json = tmp_path / "r.json"
    with pytest.raises(SystemExit) if expect is None else _nullcontext():
        code, out, err = _run(capsys, "rank", "--quiet", "--json", out_json, *args)
        assert code == 2
        lines = [l for l in err.splitlines() if l.strip()]
        assert len(lines) == 1 and expect in lines[0] and "Traceback" not in err
    assert not out_json.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.json")] == []


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_mismatched_bank_names_the_model(setup, capsys, tmp_path):
    import shutil

    shutil.copytree(setup / "bank", tmp_path / "bank")
    d = json.loads((tmp_path / "bank" / "m1" / "model.json").read_text())
    d["architecture"]["features"] = [4, 8, 32]
    (tmp_path / "bank" / "m1" / "model.json").write_text(json.dumps(d))
    code, out, err = _run(capsys, "rank", "--bank", tmp_path / "bank", "--target", setup / "target", "--quiet")
    assert code == 2 and "m1" in err and "do not match" in err


def test_predict_npy_equals_network(setup, capsys, tmp_path):
    code, out, err = _run(capsys, "predict", "--model", setup / "bank" / "m0", "--input", setup / "target",
                          "--out", tmp_path / "p.npy", "--quiet")
    assert code == 0, err
    probs = np.load(tmp_path / "p.npy")
    assert probs.shape == (2, 1, 36, 40)
    assert "one row per image in this order: t0, t1" in out
    from cte_jax.modelio import load_model

    m = load_model(setup / "bank" / "m0")
    x = normalize(np.asarray(Image.open(setup / "target" / "t0.png"))[..., None], Normalization.from_dict(NORM))
    x = np.pad(x, ((0, 64 - 36), (0, 64 - 40), (0, 0)), mode="reflect")
    ref = np.asarray(UNet(SPEC).apply(m.variables, x[None]))[0, :36, :40, 0]
    np.testing.assert_allclose(probs[0, 0], ref, atol=1e-6)


def test_predict_of_a_logit_network_writes_probabilities(setup, capsys, tmp_path):
    """A network without a final activation outputs logits; predict (and evaluate, which thresholds
    its maps at 0.5) must see the probabilities that ranking sees: the sigmoid of the logits."""
    import dataclasses

    from cte_jax.modelio import load_model

    spec = dataclasses.replace(SPEC, final_activation=None)
    m = load_model(setup / "bank" / "m0")
    save_model(Model(name="raw", normalization=NORM, spec=spec, variables=m.variables), tmp_path / "raw")
    code, out, err = _run(capsys, "predict", "--model", tmp_path / "raw", "--input", setup / "target",
                          "--out", tmp_path / "p.npy", "--quiet")
    assert code == 0, err
    x = normalize(np.asarray(Image.open(setup / "target" / "t0.png"))[..., None], Normalization.from_dict(NORM))
    x = np.pad(x, ((0, 64 - 36), (0, 64 - 40), (0, 0)), mode="reflect")
    logits = np.asarray(UNet(spec).apply(m.variables, x[None]), np.float64)[0, :36, :40, 0]
    assert logits.min() < 0 or logits.max() > 1  # the raw output is not already in [0, 1]
    np.testing.assert_allclose(np.load(tmp_path / "p.npy")[0, 0], 1 / (1 + np.exp(-logits)), atol=1e-6)


def test_outputs_and_model_directories_follow_the_umask(setup, capsys, tmp_path):
    """Written through private temporaries, outputs must still end up as open() / mkdir() would
    have made them: readable by the group and others under umask 022."""
    import os
    import stat

    from cte_jax.modelio import load_model

    old = os.umask(0o022)
    try:
        code, out, err = _run(capsys, "rank", "--bank", setup / "bank", "--target", setup / "target", "--quiet",
                              "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv")
        assert code == 0, err
        code, out, err = _run(capsys, "predict", "--model", setup / "bank" / "m0", "--input", setup / "target",
                              "--out", tmp_path / "p.npy", "--quiet")
        assert code == 0, err
        save_model(load_model(setup / "bank" / "m0"), tmp_path / "copy")
    finally:
        os.umask(old)
    for name, mode in [("r.json", 0o644), ("r.csv", 0o644), ("p.npy", 0o644), ("copy", 0o755)]:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_predict_mixed_sizes_refused_before_predicting_unless_npz(setup, capsys, tmp_path, monkeypatch):
    from cte_jax import predict

    (tmp_path / "mixed").mkdir()
    for name, shape in [("a", (36, 40)), ("b", (20, 24))]:
        Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / "mixed" / f"{name}.png")
    calls = []
    real = predict.predict_image
    monkeypatch.setattr(predict, "predict_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, out, err = _run(capsys, "predict", "--model", setup / "bank" / "m0", "--input", tmp_path / "mixed",
                          "--out", tmp_path / "p.npy", "--quiet")
    assert code == 2 and "different sizes" in err and ".npz" in err
    assert not calls and not (tmp_path / "p.npy").exists()
    code, out, err = _run(capsys, "predict", "--model", setup / "bank" / "m0", "--input", tmp_path / "mixed",
                          "--out", tmp_path / "p.npz", "--quiet")
    assert code == 0, err
    assert {k: v.shape for k, v in np.load(tmp_path / "p.npz").items()} == {"a": (1, 36, 40), "b": (1, 20, 24)}


def test_predict_batch_size_below_one_is_refused(setup, capsys, tmp_path):
    code, out, err = _run(capsys, "predict", "--model", setup / "bank" / "m0", "--input", setup / "target",
                          "--out", tmp_path / "p.npy", "--batch-size", "0")
    assert code == 2 and "batch size must be at least 1" in err and not (tmp_path / "p.npy").exists()


def test_predict_bad_suffix(setup, capsys, tmp_path):
    code, out, err = _run(capsys, "predict", "--model", setup / "bank" / "m0", "--input", setup / "target",
                          "--out", tmp_path / "p.png")
    assert code == 2 and "p.png" in err and not (tmp_path / "p.png").exists()


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["rank", "--help"])
    out = capsys.readouterr().out
    assert "dropout:0.1" in out and "examples" in out


def test_rank_notes_mixed_architectures_under_feature_perturbations(setup, capsys, tmp_path):
    # The fixture's bank is one architecture: no note.
    code, out, err = _run(capsys, "rank", "--bank", setup / "bank", "--target", setup / "target", "--quiet")
    assert code == 0, err
    assert "not equally strong" not in out
    # Add a 4-level model: the note names both architectures, once, under the feature table.
    bank = tmp_path / "bank"
    deep = UNetSpec(features=(4, 8, 16, 32), layer_order="cr")
    for name, spec in (("m0", SPEC), ("m1", SPEC), ("deep", deep)):
        save_model(Model(name=name, normalization=NORM, spec=spec, variables=init_variables(spec, jax.random.key(5))),
                   bank / name)
    code, out, err = _run(capsys, "rank", "--bank", bank, "--target", setup / "target", "--quiet",
                          "--metric", "nhd", "ei", "--csv", tmp_path / "r.csv")
    assert code == 0, err
    assert out.count("not equally strong") == 1
    assert "4-8-16 (2), 4-8-16-32 (1)" in " ".join(out.split())
    assert out.index("not equally strong") > out.index("CTE-EI under dropout:0.1")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert sorted({r["architecture"] for r in rows}) == ["4-8-16", "4-8-16-32"]
    # Input perturbations alone: the bottleneck is not perturbed, no note.
    code, out, err = _run(capsys, "rank", "--bank", bank, "--target", setup / "target", "--quiet",
                          "--perturbation", "noise:0.05")
    assert code == 0, err
    assert "not equally strong" not in out


def test_rank_warns_when_most_of_the_bank_is_flagged(setup, capsys, tmp_path):
    # Two of three models segment everything (final bias +30): the bank was not made for the target.
    bank = tmp_path / "bank"
    for i, bias in enumerate((0.0, 30.0, 30.0)):
        v = init_variables(SPEC, jax.random.key(0))
        v["params"]["final"]["bias"] = v["params"]["final"]["bias"] + bias
        save_model(Model(name=f"m{i}", normalization=NORM, spec=SPEC, variables=v), bank / f"m{i}")
    code, out, err = _run(capsys, "rank", "--bank", bank, "--target", setup / "target", "--quiet",
                          "--json", tmp_path / "r.json")
    assert code == 0, err
    recs = json.loads((tmp_path / "r.json").read_text())["records"]
    assert sorted(r["model"] for r in recs if r["high_foreground"]) == ["m1", "m2"]
    assert out.count("2 of 3 models are flagged") == 1
    # The fixture's own bank has no flagged model: no warning.
    code, out, err = _run(capsys, "rank", "--bank", setup / "bank", "--target", setup / "target", "--quiet")
    assert code == 0 and "models are flagged" not in out


def test_rank_warns_before_the_run_when_the_target_holds_label_masks(setup, capsys, tmp_path):
    masks = tmp_path / "labels"
    masks.mkdir()
    yy, xx = np.mgrid[:36, :40]
    for i in range(2):  # two touching objects per image: ids change only where they meet
        lab = np.zeros((36, 40), np.uint16)
        lab[(yy - 12) ** 2 + (xx - 12) ** 2 < 64] = 1
        lab[(yy - 12) ** 2 + (xx - 26) ** 2 < 64] = 2
        Image.fromarray(lab).save(masks / f"t{i}.png")
    code, out, err = _run(capsys, "rank", "--bank", setup / "bank", "--target", masks, "--quiet")
    assert code == 0, err
    said = " ".join(err.split())  # unwrapped
    assert "these images look like label masks" in said and str(masks) in said and "m0" in out
    # The fixture's noise images (raw-like) get no such warning.
    code, out, err = _run(capsys, "rank", "--bank", setup / "bank", "--target", setup / "target", "--quiet")
    assert code == 0 and "label masks" not in err
