"""evaluate(): true performance, statistics, failure-mode variants, files and figures, CLI.

The bank is built so that every model's prediction is known without running it: each network
passes the normalised intensity x through centre taps and predicts ``x > tau`` (its bottleneck
path is zero), so F1 and foreground fractions have a NumPy oracle, and the model with a high tau
predicts almost no foreground (the failure mode of item 7).
"""

import csv
import json

import jax
import numpy as np
import pytest
import scipy.stats
from PIL import Image

from cte_jax import cli
from cte_jax import evaluate as ev
from cte_jax.arch import UNetSpec
from cte_jax.errors import CTEError
from cte_jax.modelio import Model
from cte_jax.networks import abstract_variables

SPEC = UNetSpec(features=(4, 8, 16), layer_order="cr")
NORM = {"kind": "percentile", "lo": 5, "hi": 98}
TAUS = {"t0.2": 0.2, "t0.35": 0.35, "t0.5": 0.5, "t0.65": 0.65, "t0.8": 0.8, "t1.1": 1.1}
PERTS = ["noise:0.1", "dropout:0.1", "dropout:0.2"]
BASE = ("confidence", "entropy", "mcdropout")
PNG = b"\x89PNG\r\n\x1a\n"


def threshold_model(name: str, tau: float, gain: float = 20.0, task: str = "foreground") -> Model:
    """p = sigmoid(gain (relu(x) - tau)): foreground exactly where the normalised x > tau."""
    v = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract_variables(SPEC))
    p = v["params"]
    for level in ("encoders_0", f"decoders_{SPEC.levels - 2}"):  # input level in, last decoder out
        for unit in ("unit_0", "unit_1"):
            p[level][unit]["conv"]["kernel"][1, 1, 0, 0] = 1.0  # channel 0 of the skip (skip_first)
    p["final"]["kernel"][0, 0, 0, 0] = gain
    p["final"]["bias"][0] = -gain * tau
    from cte_jax.preprocess import Normalization

    return Model(name=name, normalization=Normalization(**NORM).to_dict(), spec=SPEC, variables=v, task=task)


def make_domain(root, *, n=4, size=48, seed=0):
    """Blurry blobs; labels are the disks of radius 5 (instance ids), split 'test' = all."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    yy, xx = np.mgrid[:size, :size]
    names = []
    for i in range(n):
        img = np.zeros((size, size))
        lab = np.zeros((size, size), np.uint16)
        for k in range(3):
            cy, cx = rng.integers(8, size - 8, 2)
            r2 = (yy - cy) ** 2 + (xx - cx) ** 2
            img += np.exp(-r2 / 50.0)
            lab[(r2 < 25) & (lab == 0)] = k + 1
        img = np.clip((img + rng.normal(0, 0.03, img.shape)) * 200 + 20, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        Image.fromarray(lab).save(root / "labels" / f"im{i}.png")
        names.append(f"im{i}")
    (root / "split.json").write_text(json.dumps({"train": [], "test": names}))
    return root


def oracle(root, tau):
    """Median F1 and median foreground fraction of `x > tau` with x the percentile-normalised image."""
    f1s, fgs = [], []
    for f in sorted((root / "images").glob("*.png")):
        img = np.asarray(Image.open(f), np.float64)
        lab = np.asarray(Image.open(root / "labels" / f.name)) > 0
        lo, hi = np.percentile(img, 5), np.percentile(img, 98)
        pred = (img - lo) / (hi - lo + 1e-10) > tau
        den = pred.sum() + lab.sum()
        f1s.append(2 * (pred & lab).sum() / den if den else 1.0)
        fgs.append(pred.mean())
    return float(np.median(f1s)), float(np.median(fgs))


@pytest.fixture(scope="module")
def bank():
    return [threshold_model(n, t) for n, t in TAUS.items()]


@pytest.fixture(scope="module")
def run(tmp_path_factory, bank):
    root = make_domain(tmp_path_factory.mktemp("dom") / "dom_a")
    out = tmp_path_factory.mktemp("out")
    res = ev.evaluate(bank, root, perturbations=PERTS, metrics=["nhd"], baselines=BASE + ("ccfv",),
                      ccfv_samples=(20, 40, 80), out_dir=out, n_permutations=1000, correction="fg_ratio")
    return root, out, res


def _scores(res, key, variant="scores"):
    return [r[variant][key] for r in res["models"]]


def test_performance_and_foreground_fraction_match_oracle(run):
    root, _, res = run
    assert [r["model"] for r in res["models"]] == list(TAUS)
    for r in res["models"]:
        f1, fg = oracle(root, TAUS[r["model"]])
        assert r["performance"] == pytest.approx(f1, abs=0.01)
        assert r["foreground_fraction"] == pytest.approx(fg, abs=0.01)
    assert res["n_images"] == 4 and res["task"] == "foreground" and res["performance"] == "f1"
    # The model predicting almost nothing is the one flagged (fg below 20% of the bank median).
    fgs = [oracle(root, t)[1] for t in TAUS.values()]
    want = [n for n, f in zip(TAUS, fgs) if f < 0.2 * np.median(fgs)]
    assert res["flagged"] == want == ["t1.1"]


def test_every_estimator_has_scores(run):
    _, _, res = run
    keys = set(res["estimators"])
    assert keys == {"nhd@noise:0.1", "nhd@dropout:0.1", "nhd@dropout:0.2", "confidence", "entropy",
                    "mcdropout@noise:0.1", "mcdropout@dropout:0.1", "mcdropout@dropout:0.2", "ccfv"}
    for key in keys:
        assert all(s is not None for s in _scores(res, key)), key
    # The bottleneck is unused by these models: dropout changes nothing.
    assert _scores(res, "nhd@dropout:0.1") == pytest.approx([1.0] * 6)
    assert _scores(res, "mcdropout@dropout:0.2") == pytest.approx([1.0] * 6)
    assert res["estimators"]["ccfv"]["supervised"] and res["estimators"]["ccfv"]["corrected"] is None


def _scipy_stats(s, q):
    return {"kendall_tau": scipy.stats.kendalltau(s, q).statistic, "spearman_rho": scipy.stats.spearmanr(s, q).statistic,
            "pearson_r": scipy.stats.pearsonr(s, q).statistic}


@pytest.mark.parametrize("key", ["nhd@noise:0.1", "confidence", "entropy", "mcdropout@noise:0.1"])
def test_statistics_match_scipy_in_every_variant(run, key):
    _, _, res = run
    perf = np.array([r["performance"] for r in res["models"]])
    s = np.array(_scores(res, key))
    flagged = np.array([r["low_foreground"] or r["high_foreground"] for r in res["models"]])
    fg = np.array([r["foreground_fraction"] for r in res["models"]])
    corrected = s * np.minimum(1.0, fg / np.median(fg))
    np.testing.assert_allclose(_scores(res, key, "corrected"), corrected, rtol=1e-6)
    e = res["estimators"][key]
    for variant, (x, y) in {"paper": (s, perf), "unflagged": (s[~flagged], perf[~flagged]),
                            "corrected": (corrected, perf)}.items():
        assert e[variant]["n_models"] == len(x)
        for stat, want in _scipy_stats(x, y).items():
            assert e[variant][stat] == pytest.approx(want, abs=1e-9), (variant, stat)
            assert 0 <= e[variant][f"{stat}_pvalue"] <= 1


def test_undefined_statistics_are_none_not_nan(run):
    _, _, res = run
    paper = res["estimators"]["nhd@dropout:0.1"]["paper"]  # constant scores
    assert paper["n_models"] == 6 and paper["spearman_rho"] is None and paper["kendall_tau_pvalue"] is None


def test_files_tables_and_figures(run):
    root, out, res = run
    names = {p.name for p in out.iterdir()}
    assert {"models.csv", "per_image.csv", "per_image_scores.csv", "statistics.csv", "summary.json"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary files left
    with open(out / "models.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == list(TAUS)
    assert float(rows[2]["performance"]) == pytest.approx(res["models"][2]["performance"])
    with open(out / "per_image.csv") as f:
        assert len(list(csv.DictReader(f))) == 6 * 4
    with open(out / "statistics.csv") as f:
        stats_rows = list(csv.DictReader(f))
    assert len(stats_rows) == 8 * 3 + 2  # 8 estimators x 3 variants, CCFV without a corrected variant
    summary = json.loads((out / "summary.json").read_text())  # strict JSON: no NaN
    assert summary["flagged"] == ["t1.1"] and summary["estimators"].keys() == res["estimators"].keys()
    figs = res["figures"]
    assert set(figs) == {f"fig2_{ev._safe(k)}" for k in res["estimators"]} | {"fig3_nhd"}
    for fig in figs.values():
        with open(fig["path"], "rb") as f:
            assert f.read(8) == PNG
        with Image.open(fig["path"]) as im:
            im.verify()
    fig2 = figs["fig2_nhd_noise_0.1"]["series"]
    assert list(fig2) == ["dom_a"] and fig2["dom_a"]["n_points"] == 6
    assert fig2["dom_a"]["highlighted"] == ["t1.1"]
    fig3 = figs["fig3_nhd"]["series"]
    assert list(fig3) == ["p=0.1", "p=0.2"] and all(s["n_points"] == 6 for s in fig3.values())


def test_interrupted_writing_adds_nothing(run, tmp_path, monkeypatch):
    """Ctrl-C while the figures are drawn: no CSV, figure or temporary folder is left behind."""
    import copy

    _, _, res = run

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "_figures", interrupted)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("a user's file")
    with pytest.raises(KeyboardInterrupt):
        ev._write_target(copy.deepcopy(res), {"images": [], "units": []}, tmp_path / "out", plots=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine.txt"]


def test_auto_split_is_the_test_split_only_where_there_is_one(tmp_path):
    """A held-out domain without split.json is evaluated on every image, not refused."""
    (tmp_path / "dom").mkdir()
    spec = ev.LabelledTarget(name="dom", path=tmp_path / "dom")
    assert ev.resolved_split(spec) == "all"
    (tmp_path / "dom" / "split.json").write_text("{}")
    assert ev.resolved_split(spec) == "test"
    assert ev.resolved_split(ev.LabelledTarget(name="dom", path=tmp_path / "dom", split="train")) == "train"
    assert ev.resolved_split(ev.LabelledTarget(name="dom", path=tmp_path, labels=tmp_path)) is None


def test_corrections():
    scores = [0.9, 0.2, 0.95, 0.5]
    flagged = [False, False, True, False]
    out = ev.corrected_scores(scores, [0.3, 0.1, 0.001, 0.2], flagged, correction="flag_last")
    assert int(np.argmin(out)) == 2  # the flagged model is ranked last
    assert [out[i] for i in (0, 1, 3)] == [0.9, 0.2, 0.5]  # the others keep their scores
    fr = ev.corrected_scores([0.8, 0.6, None], [0.2, 0.05, 0.1], [False, True, False], correction="fg_ratio")
    assert fr[0] == pytest.approx(0.8)  # above the median foreground: unchanged
    assert fr[1] == pytest.approx(0.6 * 0.05 / 0.1) and fr[2] is None
    # Unbounded scores (CCFV) have no fg_ratio variant.
    assert ev.corrected_scores([1.0, 2.0], [0.1, 0.2], [False, False], correction="fg_ratio", bounded=False) is None


def test_instance_performance_matches_skimage(run, bank):
    from skimage import measure

    from cte_jax.evaluation import mean_average_precision

    root, _, _ = run
    rng = np.random.default_rng(0)
    p = rng.random((48, 48)).astype(np.float32) * 0.4
    p[5:15, 5:15] = 0.9  # a 100-px object
    p[30:34, 30:34] = 0.9  # a 16-px object, removed with min_size 50
    lab = np.zeros((48, 48), np.uint8)
    lab[4:14, 5:16] = 1
    lab[40:45, 40:45] = 1
    got = ev.image_performance(p, lab, performance="map", task="foreground", min_size=50)
    pred = measure.label(p > 0.5)
    pred[np.bincount(pred.ravel())[pred] < 50] = 0
    want = mean_average_precision(pred, measure.label(lab))
    assert got == pytest.approx(want) and 0 < got < 1
    # The same mask saved as 0/255 (as many tools do) is a mask too, not one instance of id 255.
    assert ev.image_performance(p, lab * 255, performance="map", task="foreground", min_size=50) == pytest.approx(want)
    # Boundary labels: instances are the regions between boundaries, covering the image.
    b = np.zeros((32, 32), np.uint8)
    b[:, 15] = 1
    b[10, :15] = 1
    gt = ev.gt_instances(b, task="boundary")
    assert len(np.unique(gt)) == 3 and gt.min() > 0
    assert ev.image_performance(b.astype(np.float32), b, performance="map", task="boundary", min_size=0) == 1.0


def test_map_run_reuses_the_engine_program(run, bank, tmp_path):
    root, _, res_f1 = run
    res = ev.evaluate(bank, root, perturbations=PERTS, metrics=["nhd"], baselines=BASE, performance="map",
                      min_size=10, plots=False, out_dir=tmp_path, n_permutations=100)
    assert res["performance"] == "map" and "ccfv" not in res["estimators"]
    assert all(0 <= r["performance"] <= 1 for r in res["models"])
    assert res["models"][-1]["performance"] == pytest.approx(0.0, abs=0.05)  # t1.1 finds nothing
    # The scores do not depend on the yardstick.
    assert _scores(res, "nhd@noise:0.1") == _scores(res_f1, "nhd@noise:0.1")
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".png"]


def test_several_targets_with_their_own_models(run, bank, tmp_path):
    root_a, _, res_a = run
    root_b = make_domain(tmp_path / "data" / "dom_b", seed=5)
    # Each target leaves one model out; both keep 6 models (the compiled program is reused).
    extra = threshold_model("t0.3", 0.3)
    targets = [ev.LabelledTarget("dom_a", root_a, exclude=["t0.3"]),
               ev.LabelledTarget("dom_b", root_b, exclude=lambda m: m.name == "t0.2")]
    out = tmp_path / "out"
    res = ev.evaluate_targets(bank + [extra], targets, perturbations=PERTS, metrics=["nhd"], baselines=BASE, out_dir=out,
                              n_permutations=100)
    a, b = res["targets"]["dom_a"], res["targets"]["dom_b"]
    assert [r["model"] for r in a["models"]] == list(TAUS)
    assert [r["model"] for r in b["models"]] == [n for n in TAUS if n != "t0.2"] + ["t0.3"]
    # Same target, same options: the same numbers as the single-target run.
    assert a["estimators"]["nhd@noise:0.1"]["paper"]["spearman_rho"] == \
        pytest.approx(res_a["estimators"]["nhd@noise:0.1"]["paper"]["spearman_rho"])
    for key in ("nhd@noise:0.1", "entropy"):
        for variant in ("paper", "unflagged", "corrected"):
            per = [t["estimators"][key][variant]["spearman_rho"] for t in (a, b)]
            per = [v for v in per if v is not None]
            summ = res["summary"][key][variant]
            assert summ["mean"]["spearman_rho"] == pytest.approx(np.mean(per))
            assert summ["std"]["spearman_rho"] == pytest.approx(np.std(per, ddof=1))
            assert summ["n_targets"]["spearman_rho"] == len(per)
    # Targets evaluated one at a time aggregate the same way.
    assert ev.summarize_targets({"dom_a": a, "dom_b": b})[0] == res["summary"]
    assert (out / "dom_a" / "summary.json").is_file() and (out / "dom_b" / "models.csv").is_file()
    with open(out / "table.csv") as f:
        assert len(list(csv.DictReader(f))) == 8 * 3
    fig = res["figures"]["fig2_nhd_noise_0.1"]["series"]
    assert {k: v["n_points"] for k, v in fig.items()} == {"dom_a": 6, "dom_b": 6}
    json.loads((out / "summary.json").read_text())


def test_bad_inputs_are_user_errors(run, bank, tmp_path):
    root, _, _ = run
    with pytest.raises(CTEError, match="unknown performance"):
        ev.evaluate(bank, root, performance="iou")
    with pytest.raises(CTEError, match="unknown CTE metric"):
        ev.evaluate(bank, root, metrics=["confidence"])
    with pytest.raises(CTEError, match="unknown baseline"):
        ev.evaluate(bank, root, baselines=["oracle"])
    with pytest.raises(CTEError, match="permutations must be at least 1"):
        ev.evaluate(bank, root, n_permutations=0)
    with pytest.raises(CTEError, match="at least 2"):
        ev.evaluate(bank, root, include=["t0.2"])
    with pytest.raises(CTEError, match="unknown models"):
        ev.evaluate(bank, root, exclude=["nope"])
    with pytest.raises(CTEError, match="task"):
        ev.evaluate(bank, root, task="boundary")
    mixed = bank[:2] + [threshold_model("b", 0.5, task="boundary")]
    with pytest.raises(CTEError, match="mix tasks"):
        ev.evaluate(mixed, root)
    bad = make_domain(tmp_path / "bad", n=2)
    Image.fromarray(np.zeros((40, 48), np.uint16)).save(bad / "labels" / "im0.png")
    with pytest.raises(CTEError, match="label of 'im0'"):
        ev.evaluate(bank, bad, baselines=None)
    raw = make_domain(tmp_path / "raw", n=2)
    with pytest.raises(CTEError, match="do not look like label images") as e:
        ev.evaluate(bank, raw / "images", labels=raw / "images", baselines=None)
    assert e.value.path == str(raw / "images")


def test_cli_maps_flags_to_the_api(monkeypatch, tmp_path, capsys):
    calls = {}
    models = [{"model": "m1", "performance": 0.25, "scores": {"nhd@dropout:0.1": 0.91}, "low_foreground": True},
              {"model": "m0", "performance": 0.75, "scores": {"nhd@dropout:0.1": 0.97}}]
    fake = {"target": "dom", "n_images": 2, "models": models, "performance_label": "F1", "flagged": ["m1"],
            "estimators": {"nhd@dropout:0.1": {"paper": {"n_models": 2, "kendall_tau": 1.0, "spearman_rho": 1.0,
                                                         "pearson_r": 0.5, "spearman_rho_pvalue": 0.3125},
                                               "unflagged": {"n_models": 1}, "corrected": None}}}

    def fake_evaluate(bank, target, **kw):
        calls["single"] = (bank, target, kw)
        return fake

    def fake_targets(bank, targets, **kw):
        calls["multi"] = (bank, targets, kw)
        per = {t.name: {**fake, "target": t.name, "models": models[i:]} for i, t in enumerate(targets)}
        return {"targets": per, "summary": {"nhd@dropout:0.1": {"paper": {"mean": {"kendall_tau": 0.5, "spearman_rho": 0.6,
                                                                    "pearson_r": None},
                                                           "std": {"kendall_tau": 0.1, "spearman_rho": None,
                                                                   "pearson_r": None}}}}}

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    monkeypatch.setattr(ev, "evaluate_targets", fake_targets)
    rc = cli.main(["evaluate", "--bank", "B", "--target", "data/dom", "--perturbation", "dropout:0.1", "noise:0.1",
                   "--metric", "nhd", "ei", "--baselines", "ccfv", "--performance", "map", "--correction", "none",
                   "--exclude", "m9", "--exclude-for", "dom=m1,m2", "--out", str(tmp_path), "--quiet", "--no-plots"])
    assert rc == 0
    bank, target, kw = calls["single"]
    assert (bank, target) == ("B", "data/dom")
    assert kw["perturbations"] == ["dropout:0.1", "noise:0.1"] and kw["metrics"] == ["nhd", "ei"]
    assert kw["baselines"] == ["ccfv"] and kw["performance"] == "map" and kw["correction"] is None
    assert kw["exclude"] == ["m9", "m1", "m2"] and kw["plots"] is False and kw["progress"] is False
    assert kw["split"] == "auto" and kw["out_dir"] == str(tmp_path)
    text = capsys.readouterr().out
    assert "nhd@dropout:0.1" in text and "flagged" in text and "+1.000 (0.312)" in text
    assert "the scores rest on 2 images" in text  # a statistic over 2 images deserves the warning
    # the models, best performance first, with their scores and flags
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["m0"], ["m1"])]
    assert rows == [["m0", "0.750", "0.9700"], ["m1", "0.250", "0.9100", "LOW"]]
    assert cli.main(["evaluate", "--bank", "B", "--target", "x/a", "y/b", "--baselines", "none",
                     "--exclude-for", "b=m3"]) == 0
    bank, targets, kw = calls["multi"]
    assert [t.name for t in targets] == ["a", "b"] and targets[1].exclude == ("m3",) and kw["baselines"] == []
    assert kw["correction"] == "flag_last"  # the default variant changes nothing when no model is flagged
    text = capsys.readouterr().out
    assert "+0.500(+0.100)" in text
    # each target's own models and statistics come before the average
    assert text.index("target a: 2 images") < text.index("target b: 2 images") < text.index("mean (std) over")
    assert [line.split()[0] for line in text.splitlines() if line.split()[:1] in (["m0"], ["m1"])] == \
        ["m0", "m1", "m0"]  # target b has only m0
    assert cli.main(["evaluate", "--bank", "B", "--target", "x/a", "--exclude-for", "zzz=m"]) == 2
    calls.clear()
    assert cli.main(["evaluate", "--bank", "B", "--target", "x/a", "--perturbation", "dropout:0.1", "gamma:1"]) == 2
    assert "gamma:1 leaves every image as it is" in capsys.readouterr().err and not calls


def test_cli_reports_missing_bank(tmp_path, capsys):
    assert cli.main(["evaluate", "--bank", str(tmp_path / "none"), "--target", str(tmp_path), "--quiet"]) == 2
    assert "bank not found" in capsys.readouterr().err


def test_high_foreground_model_is_flagged_and_left_out(run):
    """A model that calls nearly everything foreground is flagged HIGH by the rule
    fg > max(HIGH_FOREGROUND_MIN, HIGH_FOREGROUND_RATIO * reference), the reference being the median
    fg of the models predicting at most half the image, computed here from the oracle."""
    from cte_jax.ranking import HIGH_FOREGROUND_MIN, HIGH_FOREGROUND_RATIO

    root = run[0]
    taus = {"t0.3": 0.3, "t0.5": 0.5, "t0.7": 0.7, "all": -1.0}
    res = ev.evaluate([threshold_model(n, t) for n, t in taus.items()], root, perturbations=["dropout:0.1"],
                      metrics=["nhd"], baselines=(), n_permutations=10)
    fg = {n: oracle(root, t)[1] for n, t in taus.items()}
    plausible = [f for f in fg.values() if f <= HIGH_FOREGROUND_MIN] or list(fg.values())
    cut = max(HIGH_FOREGROUND_MIN, HIGH_FOREGROUND_RATIO * float(np.median(plausible)))
    for r in res["models"]:
        assert r["high_foreground"] == (fg[r["model"]] > cut), r["model"]
    assert fg["all"] > cut and res["flagged"] == ["all"]
    assert res["estimators"]["nhd@dropout:0.1"]["unflagged"]["n_models"] == len(taus) - 1
