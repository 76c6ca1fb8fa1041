"""The scoring engine and rank(): compile once, sweeps share work, scores match plain computations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cte_jax import engine
from cte_jax.arch import UNetSpec
from cte_jax.errors import CTEError
from cte_jax.modelio import Model, save_model
from cte_jax.networks import UNet, init_variables
from cte_jax.perturbations import parse_perturbation
from cte_jax.preprocess import Normalization, normalize
from cte_jax.ranking import order_support, rank

NORM = Normalization(kind="percentile", lo=5, hi=98).to_dict()
SPEC = UNetSpec(features=(4, 8, 16), layer_order="cr")


def _models(n=3, spec=SPEC):
    out = []
    for i in range(n):
        v = init_variables(spec, jax.random.key(i))
        # Shift the final bias so the models predict a fair amount of foreground.
        v["params"]["final"]["bias"] = v["params"]["final"]["bias"] + 0.05 * i
        out.append(Model(name=f"m{i}", normalization=NORM, spec=spec, variables=v))
    return out


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    d = tmp_path_factory.mktemp("target")
    rng = np.random.default_rng(0)
    for i in range(5):
        img = (rng.random((40 + 8 * i, 48)) * 60).astype(np.uint8)
        yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
        for _ in range(4):
            cy, cx = rng.integers(5, 35, 2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] += 150
        Image.fromarray(img).save(d / f"img{i}.png")
    return d


def _oracle_nhd(model, target_dir, pert_text):
    """Per-image NHD by plain Flax calls + numpy, without the engine: deterministic perturbations only."""
    pert = parse_perturbation(pert_text)
    net = UNet(model.spec)
    norm = Normalization.from_dict(model.normalization)
    scores = []
    for f in sorted(target_dir.glob("*.png")):
        x = normalize(np.asarray(Image.open(f))[..., None], norm)
        h, w = x.shape[:2]
        H, W = -(-h // 32) * 32, -(-w // 32) * 32
        x = np.pad(x, ((0, H - h), (0, W - w), (0, 0)), mode="reflect")
        if pert.kind == "brightness":
            xp = x + pert.lo
        elif pert.kind == "contrast":
            m = x[:h, :w].mean()
            xp = m + pert.lo * (x - m)
        else:
            xp = np.sign(x) * np.abs(x) ** pert.lo
        p = np.asarray(net.apply(model.variables, x[None]))[0, :h, :w, 0] > 0.5
        q = np.asarray(net.apply(model.variables, xp[None]))[0, :h, :w, 0] > 0.5
        union = (p | q).sum()
        if union:
            scores.append(1 - (p ^ q).sum() / union)
    return float(np.median(scores))


@pytest.mark.parametrize("pert", ["brightness:0.3", "contrast:0.6", "gamma:1.3"])
def test_deterministic_perturbations_match_plain_computation(target, pert):
    models = _models(2)
    recs = rank(models, target, perturbations=[pert], metrics=["nhd"], progress=False, batch_size=2)
    for r in recs:
        m = next(m for m in models if m.name == r["model"])
        assert r["score"] == pytest.approx(_oracle_nhd(m, target, pert), abs=1e-5)


def test_sweep_equals_separate_runs_and_strategies_agree(target):
    models = _models(3)
    perts = ["dropout:0.1", "dropout:0.3", "noise:0.05-0.1"]
    sweep = rank(models, target, perturbations=perts, metrics=["nhd", "ei"], progress=False, seed=3)
    for p in perts:
        alone = rank(models, target, perturbations=[p], metrics=["nhd", "ei"], progress=False, seed=3)
        for r in alone:
            twin = next(s for s in sweep if (s["model"], s["perturbation"], s["metric"]) == (r["model"], p, r["metric"]))
            assert twin["score"] == pytest.approx(r["score"], abs=1e-6)
    vm = rank(models, target, perturbations=perts[:1], metrics=["nhd"], progress=False, seed=3, strategy="vmap")
    mp = rank(models, target, perturbations=perts[:1], metrics=["nhd"], progress=False, seed=3, strategy="map")
    assert [r["score"] for r in vm] == pytest.approx([r["score"] for r in mp], abs=1e-5)


def test_batch_size_does_not_change_scores(target):
    models = _models(2)
    a = rank(models, target, metrics=["nhd", "vrand"], progress=False, batch_size=1)
    b = rank(models, target, metrics=["nhd", "vrand"], progress=False, batch_size=4)
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-6)


def test_scores_do_not_depend_on_model_names_and_copies_tie(target):
    """Every model sees the same random draws: a copy of a model under another name scores exactly
    as the original, and renaming a model leaves its scores alone."""
    m0, m1 = _models(2)
    kw = dict(perturbations=["dropout:0.3", "noise:0.05-0.2"], metrics=["nhd", "ei"], progress=False)
    copy = dataclasses.replace(m0, name="zz_copy")
    by = lambda recs: {(r["model"], r["perturbation"], r["metric"]): r["score"] for r in recs}
    a = by(rank([m0, m1, copy], target, **kw))
    for pert in kw["perturbations"]:
        for metric in kw["metrics"]:
            assert a[("zz_copy", pert, metric)] == a[(m0.name, pert, metric)]
            assert a[(m0.name, pert, metric)] != a[(m1.name, pert, metric)]
    b = by(rank([m0, dataclasses.replace(m1, name="renamed")], target, **kw))
    for (name, pert, metric), score in b.items():
        assert score == a[(m1.name if name == "renamed" else name, pert, metric)]


def test_zero_dropout_is_perfectly_consistent(target):
    recs = rank(_models(2), target, perturbations=["dropout:0"], metrics=["nhd", "ei", "vrand"], progress=False)
    for r in recs:
        if r["metric"] == "ei":
            assert 0 < r["score"] <= 1
        else:
            assert r["score"] == pytest.approx(1.0)


def test_second_batch_does_not_recompile():
    models = _models(2)
    plan = engine.Plan(spec=SPEC, perturbations=(parse_perturbation("dropout:0.2"),), metrics=("nhd", "vrand"))
    fn = engine.compiled_scorer(plan)
    variables = engine.stack_variables([m.variables for m in models])
    args = (np.zeros(2, np.int32), np.zeros(2, np.int32))
    boxes = np.array([[0, 32, 0, 32]] * 3, np.int32)
    for seed in range(3):
        x = np.random.default_rng(seed).normal(size=(1, 3, 32, 32, 1)).astype(np.float32)
        s, v, fg = fn(variables, *args, x, boxes, np.arange(3, dtype=np.int32) + seed, jax.random.key(0))
        assert s.shape == (2, 1, 2, 3) and fg.shape == (2, 3)
        p0 = np.asarray(UNet(SPEC).apply(models[0].variables, x[0]))[..., 0]
        np.testing.assert_allclose(fg[0], (p0 > 0.5).mean(axis=(1, 2)), atol=1e-6)
    assert fn._cache_size() == 1


@pytest.mark.parametrize("chunk_pixels", [32 * 32, 2 * 32 * 32, 5 * 32 * 32])
def test_image_sub_batches_give_the_per_image_results_of_one_call(chunk_pixels):
    models = _models(2)
    perts = (parse_perturbation("noise:0.1"), parse_perturbation("dropout:0.2"))
    variables = engine.stack_variables([m.variables for m in models])
    args = (np.zeros(2, np.int32), np.zeros(2, np.int32))
    x = np.random.default_rng(4).normal(size=(1, 6, 32, 32, 1)).astype(np.float32)
    boxes = np.array([[0, 32, 0, 32]] * 5 + [[0, 20, 0, 25]], np.int32)
    units = np.arange(6, dtype=np.int32) + 10
    whole = engine.Plan(spec=SPEC, perturbations=perts, metrics=("nhd", "ei", "vrand"), chunk_pixels=0)
    split = dataclasses.replace(whole, chunk_pixels=chunk_pixels)
    assert engine.chunk_size(6, 32, 32, chunk_pixels) in (1, 2, 3)
    a = engine.compiled_scorer(whole)(variables, *args, x, boxes, units, jax.random.key(1))
    b = engine.compiled_scorer(split)(variables, *args, x, boxes, units, jax.random.key(1))
    for u, v in zip(a, b):
        assert u.shape == v.shape
        np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32), atol=1e-5)
    assert np.asarray(a[1]).any()


def test_chunk_pixels_default_and_override(monkeypatch):
    monkeypatch.delenv("CTE_JAX_CHUNK_PIXELS", raising=False)
    assert engine.default_chunk_pixels() == (engine.CPU_CHUNK_PIXELS if jax.default_backend() == "cpu" else 0)
    monkeypatch.setenv("CTE_JAX_CHUNK_PIXELS", "0")
    assert engine.default_chunk_pixels() == 0
    monkeypatch.setenv("CTE_JAX_CHUNK_PIXELS", "lots")
    with pytest.raises(CTEError, match="CTE_JAX_CHUNK_PIXELS"):
        engine.default_chunk_pixels()


@pytest.mark.parametrize("var", ["CTE_JAX_CPU_KERNELS", "CTE_JAX_CHUNK_PIXELS"])
def test_bad_environment_is_refused_before_any_work(var, monkeypatch, tmp_path):
    monkeypatch.setenv(var, "nonsense")
    with pytest.raises(CTEError, match=var):  # checked before the (missing) target is opened
        rank(_models(1), tmp_path / "no_such_target", progress=False)


def test_chunk_size_is_the_largest_divisor_that_fits():
    assert engine.chunk_size(8, 128, 128, 0) == 8
    assert engine.chunk_size(8, 128, 128, 2 * 128 * 128) == 2
    assert engine.chunk_size(8, 128, 128, 3 * 128 * 128) == 2
    assert engine.chunk_size(6, 128, 128, 3 * 128 * 128) == 3
    assert engine.chunk_size(7, 320, 320, 2 * 128 * 128) == 1
    assert engine.chunk_size(8, 16, 16, 10**9) == 8


def test_black_box_member_scores_like_its_grey_box_twin(target):
    models = _models(2)
    net = UNet(SPEC)
    apply = jax.jit(net.apply)
    twin = Model(name="m1", normalization=NORM, predict=lambda x: np.asarray(apply(models[1].variables, jnp.asarray(x))))
    grey = rank(models[1:], target, perturbations=["noise:0.05", "dropout:0.1"], progress=False)
    black = rank([twin], target, perturbations=["noise:0.05", "dropout:0.1"], progress=False)
    g = {r["perturbation"]: r for r in grey}
    b = {r["perturbation"]: r for r in black}
    assert b["noise:0.05"]["score"] == pytest.approx(g["noise:0.05"]["score"], abs=1e-5)
    assert b["dropout:0.1"]["score"] is None and "black-box" in b["dropout:0.1"]["note"]


def test_black_box_gets_clean_baselines_under_a_feature_perturbation(target):
    """Confidence and entropy need only the clean pass: a black box is scored for them even when the
    only perturbation is bottleneck dropout, exactly as its grey-box twin; CTE-NHD is left unscored
    (not skipped), with the note."""
    models = _models(2)
    apply = jax.jit(UNet(SPEC).apply)
    twin = Model(name="m1", normalization=NORM, predict=lambda x: np.asarray(apply(models[1].variables, jnp.asarray(x))))
    kw = dict(perturbations=["dropout:0.1"], metrics=["nhd", "confidence", "entropy"], progress=False)
    g = {r["metric"]: r for r in rank(models[1:], target, **kw)}
    b = {r["metric"]: r for r in rank([twin], target, **kw)}
    for metric in ("confidence", "entropy"):
        assert b[metric]["score"] == pytest.approx(g[metric]["score"], abs=1e-5)
        assert b[metric]["n_scored"] == g[metric]["n_scored"] == 5 and b[metric]["n_images"] == 5
        assert not b[metric].get("note")
    assert b["nhd"]["score"] is None and "black-box" in b["nhd"]["note"]
    assert (b["nhd"]["n_scored"], b["nhd"]["n_skipped"]) == (0, 0)
    with pytest.raises(CTEError, match="every model of the bank is a black box.*noise"):
        rank([twin], target, perturbations=["dropout:0.1"], metrics=["nhd"], progress=False)


def test_ranks_and_records(target, tmp_path):
    for m in _models(3):
        save_model(m, tmp_path / "bank" / m.name)
    recs = rank(tmp_path / "bank", target, progress=False)
    assert sorted(r["rank"] for r in recs) == [1, 2, 3]
    assert [r["score"] for r in recs] == sorted((r["score"] for r in recs), reverse=True)
    assert set(recs[0]) >= {"model", "perturbation", "metric", "score", "rank", "n_scored", "n_skipped"}
    assert all(r["n_scored"] + r["n_skipped"] == 5 for r in recs)


def test_order_support_is_the_bootstrap_of_each_model_against_the_next(target):
    # Per-unit scores as the engine hands them out (on_scores), paired by unit name here.
    seen = {}

    def keep(model, pert, metric, names, scores, valid):
        for n, s, ok in zip(names, np.asarray(scores), np.asarray(valid)):
            if ok:
                seen.setdefault((model, pert, metric), {})[n] = float(s)

    recs = rank(_models(3), target, perturbations=["dropout:0.3"], metrics=["nhd", "ei"], progress=False,
                on_scores=keep, seed=3)
    for metric in ("nhd", "ei"):
        rs = sorted((r for r in recs if r["metric"] == metric), key=lambda r: r["rank"])
        assert rs[-1]["order_support"] is None
        for upper, lower in zip(rs, rs[1:]):
            a, b = seen[(upper["model"], "dropout:0.3", metric)], seen[(lower["model"], "dropout:0.3", metric)]
            units = sorted(set(a) & set(b))
            want = order_support(np.array([a[u] for u in units], np.float32), np.array([b[u] for u in units], np.float32),
                                 seed=3)
            assert upper["order_support"] == pytest.approx(want)


def test_near_empty_model_is_flagged(target):
    # Two ordinary models (copies of m0), one predicting nothing, one predicting everything.
    models = [_models(1)[0] for _ in range(4)]
    for i, m in enumerate(models):
        m.name = f"m{i}"
    models[2].variables["params"]["final"]["bias"] = models[2].variables["params"]["final"]["bias"] - 30.0
    models[3].variables["params"]["final"]["bias"] = models[3].variables["params"]["final"]["bias"] + 30.0
    recs = {r["model"]: r for r in rank(models, target, progress=False)}
    assert recs["m2"]["low_foreground"] and recs["m2"]["foreground_fraction"] == 0.0
    assert recs["m3"]["high_foreground"] and recs["m3"]["foreground_fraction"] == 1.0
    assert not recs["m0"]["low_foreground"] and not recs["m0"]["high_foreground"]
    assert recs["m0"]["foreground_fraction"] > 0


def test_majority_of_wrong_polarity_is_still_flagged(target):
    # Three of five models segment (nearly) the whole image, as 7 of our 10 fluorescence models did
    # on stained tissue. The bank's typical fraction is that of the two ordinary ones, so the three
    # are flagged high, and the ordinary ones are not flagged low against the inverted majority.
    models = [_models(1)[0] for _ in range(5)]
    for i, m in enumerate(models):
        m.name = f"m{i}"
        if i >= 2:
            m.variables["params"]["final"]["bias"] = m.variables["params"]["final"]["bias"] + 30.0
    recs = {r["model"]: r for r in rank(models, target, progress=False)}
    ordinary = recs["m0"]["foreground_fraction"]
    assert 0 < ordinary <= 0.5 and all(recs[f"m{i}"]["foreground_fraction"] == 1.0 for i in (2, 3, 4))
    assert [n for n, r in sorted(recs.items()) if r["high_foreground"]] == ["m2", "m3", "m4"]
    assert not any(r["low_foreground"] for r in recs.values())


def test_a_bank_wholly_of_the_wrong_polarity_is_flagged(target, capsys):
    # Every model segments (nearly) the whole image: there is no plausible model to compare with,
    # and a relative rule alone flagged none of them (a review's bank on stained tissue, fg
    # 0.63-1.00). Every one is flagged high, and the table says the bank does not fit the target.
    from cte_jax.cli import _table

    models = [_models(1)[0] for _ in range(3)]
    for i, m in enumerate(models):
        m.name = f"m{i}"
        m.variables["params"]["final"]["bias"] = m.variables["params"]["final"]["bias"] + 30.0 + i
    recs = rank(models, target, progress=False)
    assert all(r["foreground_fraction"] == 1.0 and r["high_foreground"] for r in recs)
    assert "3 of 3 models are flagged" in " ".join(_table(recs).split())


def test_reference_foreground_is_the_median_of_plausible_models():
    from cte_jax.ranking import HIGH_FOREGROUND_MIN, HIGH_FOREGROUND_RATIO, reference_foreground

    assert reference_foreground([0.3, 0.84, 0.92, 0.28, 0.85]) == pytest.approx(0.29)
    assert reference_foreground([0.1, 0.2, 0.5]) == pytest.approx(0.2)  # half the image still counts
    # none plausible: a reference at which every model is above the high flag's threshold
    ref = reference_foreground([0.7, 0.9, 0.51])
    assert HIGH_FOREGROUND_RATIO * ref <= HIGH_FOREGROUND_MIN < 0.51
    assert reference_foreground([]) == 0.0
