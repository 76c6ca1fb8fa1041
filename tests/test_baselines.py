"""Baselines: confidence / entropy / MC variance against NumPy, CCFV against SciPy and NumPy,
and their wiring into the engine (same compiled program, paper metrics unchanged)."""

import jax
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cte_jax import baselines as B
from cte_jax import engine
from cte_jax.arch import UNetSpec
from cte_jax.modelio import Model
from cte_jax.networks import UNet, abstract_variables
from cte_jax.perturbations import parse_perturbation
from cte_jax.preprocess import Normalization, normalize

NORM = Normalization(kind="percentile", lo=5, hi=98).to_dict()
SPEC = UNetSpec(features=(4, 8, 16), layer_order="cr")


def init_vars(seed: int, spec: UNetSpec = SPEC) -> dict:
    """Random weights (LeCun-normal kernels, zero biases) drawn with NumPy into the network's
    variable shapes: Flax's own init compiles every op and is slow on a shared CPU."""
    rng = np.random.default_rng(seed)

    def fill(path, a):
        if jax.tree_util.keystr(path).endswith("['kernel']"):
            return (rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]))).astype(np.float32)
        return np.zeros(a.shape, np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract_variables(spec))

probs = hnp.arrays(np.float32, (2, 6, 7), elements=st.floats(0, 1, width=32))
masks = hnp.arrays(bool, (2, 6, 7))


# -- unsupervised baselines vs NumPy ------------------------------------------------------------
def _np_confidence(p, m, t=0.5):
    out = []
    for pi, mi in zip(p, m):
        r = (pi > t) & mi
        out.append((np.maximum(pi, 1 - pi)[r].mean(), True) if r.any() else (0.0, False))
    return out


def _np_entropy(p, m):
    out = []
    for pi, mi in zip(p, m):
        q = pi[mi].astype(np.float64)
        if q.size == 0:
            out.append((0.0, False))
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -(np.where(q > 0, q * np.log2(q), 0) + np.where(q < 1, (1 - q) * np.log2(1 - q), 0))
        out.append((1 - h.mean(), True))
    return out


def _np_mc(p, draws, m, t=0.5):
    out = []
    for i in range(p.shape[0]):
        d = draws[:, i].astype(np.float64)
        u = ((p[i] > t) | (d > t).any(0)) & m[i]
        if not u.any():
            out.append((0.0, False))
            continue
        var = d.var(axis=0)  # population variance over draws
        out.append((1 - 4 * var[u].mean(), True))
    return out


def _compare(got, want, atol=1e-5):
    s, v = (np.asarray(a) for a in got)
    for i, (ws, wv) in enumerate(want):
        assert bool(v[i]) == wv
        assert s[i] == pytest.approx(ws, abs=atol) if wv else s[i] == 0.0


@settings(max_examples=25, deadline=None)
@given(probs, masks)
def test_confidence_and_entropy_match_numpy(p, m):
    _compare(B.mean_foreground_confidence(p, mask=m), _np_confidence(p, m))
    _compare(B.one_minus_mean_entropy(p, mask=m), _np_entropy(p, m))
    s, v = B.one_minus_mean_entropy(p, mask=m)
    assert np.all((np.asarray(s) >= 0) & (np.asarray(s) <= 1 + 1e-6))


@settings(max_examples=25, deadline=None)
@given(probs, hnp.arrays(np.float32, (3, 2, 6, 7), elements=st.floats(0, 1, width=32)), masks)
def test_mc_variance_matches_numpy_and_is_bounded(p, draws, m):
    got = B.mc_variance_consistency(p, draws, mask=m)
    _compare(got, _np_mc(p, draws, m))
    assert np.all((np.asarray(got[0]) >= 0) & (np.asarray(got[0]) <= 1))
    # Identical draws have no variance: perfect agreement wherever the union is non-empty.
    same = B.mc_variance_consistency(p, np.stack([p, p, p]), mask=m)
    assert np.all(np.where(np.asarray(same[1]), np.asarray(same[0]), 1.0) == pytest.approx(1.0))


def test_confident_maps_and_empty_inputs():
    p = np.zeros((1, 4, 4), np.float32)
    p[0, :2] = 1.0
    s, v = B.mean_foreground_confidence(p)
    assert float(s[0]) == 1.0 and bool(v[0])
    s, v = B.one_minus_mean_entropy(p)
    assert float(s[0]) == pytest.approx(1.0)
    s, v = B.mean_foreground_confidence(np.zeros((1, 4, 4), np.float32))  # nothing predicted foreground
    assert not bool(v[0]) and float(s[0]) == 0.0
    s, v = B.one_minus_mean_entropy(np.full((1, 4, 4), 0.5, np.float32), mask=np.zeros((1, 4, 4), bool))
    assert not bool(v[0])
    s, v = B.one_minus_mean_entropy(np.full((1, 4, 4), 0.5, np.float32))
    assert float(s[0]) == pytest.approx(0.0, abs=1e-6)  # maximal entropy
    with pytest.raises(ValueError, match="draws"):
        B.mc_variance_consistency(p, p[None], mask=None)  # K = 1


# -- CCFV pieces vs SciPy / NumPy --------------------------------------------------------------------
def _random_cov(rng, c, rank=None):
    a = rng.normal(size=(c, rank or 2 * c))
    return a @ a.T / a.shape[1]


def _np_w(mu1, s1, mu2, s2):
    cross = scipy.linalg.sqrtm(s1 @ s2)
    return np.sqrt(abs(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross).real))


@pytest.mark.parametrize("c,rank", [(3, None), (10, None), (16, 4), (24, None)])
def test_wasserstein_matches_scipy_sqrtm(c, rank):
    rng = np.random.default_rng(c)
    for _ in range(3):
        mu1, mu2 = rng.normal(size=c), rng.normal(size=c) * 0.3
        s1 = _random_cov(rng, c, rank) + 1e-6 * np.eye(c)
        s2 = _random_cov(rng, c, rank) + 1e-6 * np.eye(c)
        want = _np_w(mu1, s1, mu2, s2)
        assert float(B.gaussian_wasserstein(mu1, s1, mu2, s2)) == pytest.approx(want, rel=2e-3, abs=2e-3)
        # Symmetric, and zero (up to rounding) between a Gaussian and itself.
        assert float(B.gaussian_wasserstein(mu2, s2, mu1, s1)) == pytest.approx(want, rel=2e-3, abs=2e-3)
        assert float(B.gaussian_wasserstein(mu1, s1, mu1, s1)) < 0.05 * np.sqrt(np.trace(s1))


def test_fit_gaussians_matches_numpy_cov():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 20, 5)).astype(np.float32)
    m = np.zeros((3, 20), bool)
    m[0, :20], m[1, :7], m[2, :1] = True, True, True
    mu, cov, valid = (np.asarray(a) for a in B.fit_gaussians(x, m, eps=1e-6))
    assert valid.tolist() == [True, True, False]
    for i, k in ((0, 20), (1, 7)):
        np.testing.assert_allclose(mu[i], x[i, :k].mean(0), atol=1e-5)
        np.testing.assert_allclose(cov[i], np.cov(x[i, :k], rowvar=False) + 1e-6 * np.eye(5), atol=1e-5)


def test_class_distance_and_variety_match_loops():
    rng = np.random.default_rng(1)
    n, c = 5, 6
    mu = rng.normal(size=(n, c)).astype(np.float32)
    cov = np.stack([_random_cov(rng, c) + 1e-6 * np.eye(c) for _ in range(n)]).astype(np.float32)
    valid = np.array([True, True, False, True, True])
    g = rng.normal(size=(n, c)).astype(np.float32)
    w_want = sum(_np_w(mu[i], cov[i], mu[j], cov[j]) for i in range(n) for j in range(i + 1, n)
                 if valid[i] and valid[j])
    v_want = np.mean([1 / np.sqrt(np.sum((g[i] - g[j]) ** 2) + 1e-3) for i in range(n) for j in range(i + 1, n)])
    w, ok = B.class_distance(mu, cov, valid, pair_batch=3)
    assert bool(ok) and float(w) == pytest.approx(w_want, rel=1e-3)
    v, ok = B.feature_variety(g)
    assert bool(ok) and float(v) == pytest.approx(v_want, rel=1e-5)
    s, ok = B.ccfv_layer_score(mu, cov, valid, g)
    assert bool(ok) and float(s) == pytest.approx(np.log(v_want / w_want), abs=1e-3)
    _, ok = B.ccfv_layer_score(mu, cov, np.array([True, False, False, False, False]), g)
    assert not bool(ok)  # no valid pair


def test_sampling_is_uniform_foreground_and_seeded():
    rng = np.random.default_rng(0)
    lab = (rng.random((30, 40)) > 0.8).astype(np.uint16) * rng.integers(1, 5, (30, 40)).astype(np.uint16)
    fg = set(np.flatnonzero(lab.reshape(-1)))
    a = B.sample_foreground_pixels(lab, n=100, seed=0, image_id=7)
    assert len(a) == 100 and len(set(a.tolist())) == 100 and set(a.tolist()) <= fg
    np.testing.assert_array_equal(a, B.sample_foreground_pixels(lab[..., None], n=100, seed=0, image_id=7))
    assert not np.array_equal(a, B.sample_foreground_pixels(lab, n=100, seed=0, image_id=8))
    everything = B.sample_foreground_pixels(lab, n=10 ** 6, seed=0, image_id=7)
    assert set(everything.tolist()) == fg
    assert B.sample_foreground_pixels(np.zeros((5, 5)), n=10, seed=0, image_id=0).size == 0


def test_layer_samples_by_resolution():
    assert B.layer_samples(UNetSpec(features=(4, 8, 16, 32))) == [100, 200, 400, 800]
    assert B.layer_samples(UNetSpec(features=(4, 8, 16))) == [200, 400, 800]
    assert B.layer_samples(UNetSpec(features=(4, 8, 16, 32, 64))) == [100, 100, 200, 400, 800]


# -- CCFV of a model vs an independent NumPy computation ------------------------------------------
def _np_bilinear(f, size):
    """Half-pixel bilinear upsampling with the source index clamped at 0 (PyTorch, align_corners=False)."""
    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo
    (h, w), (H, W) = f.shape[:2], size
    y0, y1, wy = axis(h, H)
    x0, x1, wx = axis(w, W)
    rows = f[y0] * (1 - wy)[:, None, None] + f[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def _np_ccfv(model, images, labels, ids, counts):
    net = UNet(model.spec)
    names = B.ccfv_layer_names(model.spec)
    per_layer = [([], []) for _ in names]  # (gaussians, mean features)
    for img, lab, uid in zip(images, labels, ids):
        x = normalize(img, Normalization.from_dict(model.normalization))
        h, w = x.shape[:2]
        H, W = -(-h // 32) * 32, -(-w // 32) * 32
        xp = np.pad(x, ((0, H - h), (0, W - w), (0, 0)), mode="reflect")
        _, state = net.apply(model.variables, xp[None], mutable=["intermediates"],
                             capture_intermediates=lambda mdl, meth: mdl.name in names and meth == "__call__")
        idx = B.sample_foreground_pixels(lab, n=max(counts), seed=0, image_id=uid)
        for li, name in enumerate(names):
            f = np.asarray(state["intermediates"][name]["__call__"][0][0], np.float64)
            up = _np_bilinear(f, (H, W))[:h, :w]
            feats = up.reshape(h * w, -1)[idx[:counts[li]]]
            if len(feats) >= 2:
                per_layer[li][0].append((feats.mean(0), np.cov(feats, rowvar=False) + 1e-6 * np.eye(f.shape[-1])))
            per_layer[li][1].append(up.reshape(h * w, -1).mean(0))
    scores = []
    for gauss, g in per_layer:
        wsum = sum(_np_w(*gauss[i], *gauss[j]) for i in range(len(gauss)) for j in range(i + 1, len(gauss)))
        v = np.mean([1 / np.sqrt(np.sum((g[i] - g[j]) ** 2) + 1e-3) for i in range(len(g)) for j in range(i + 1, len(g))])
        scores.append(np.log(v / wsum))
    return float(np.mean(scores)), scores


@pytest.fixture(scope="module")
def labelled():
    rng = np.random.default_rng(3)
    images, labels = [], []
    for i in range(4):
        h, w = 40 + 8 * (i % 2), 48
        img = rng.random((h, w, 1)) * 50
        lab = np.zeros((h, w), np.uint16)
        yy, xx = np.mgrid[:h, :w]
        for k in range(3):
            cy, cx = rng.integers(6, h - 6), rng.integers(6, w - 6)
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 < 30
            img[disk, 0] += 150
            lab[disk] = k + 1
        images.append(img.astype(np.uint8))
        labels.append(lab)
    labels[3][:] = 0  # an image without foreground: no Gaussian, still in the variety term
    labels[3][5, 5] = 1  # a single pixel: fewer than 2 samples
    return images, labels


def test_ccfv_matches_independent_numpy(labelled):
    images, labels = labelled
    v = init_vars(0)
    model = Model(name="m", normalization=NORM, spec=SPEC, variables=v)
    counts = (30, 60, 120)
    got = B.ccfv(model, images, labels, image_ids=[11, 12, 13, 14], samples=counts)
    want, layers = _np_ccfv(model, images, labels, [11, 12, 13, 14], counts)
    assert got["n_foreground_images"] == 3 and got["n_images"] == 4
    assert got["layers"] == pytest.approx(layers, abs=2e-3)
    assert got["score"] == pytest.approx(want, abs=2e-3)


def test_ccfv_tiles_like_whole_images_for_pointwise_features(labelled):
    """With 1x1-like features (center taps only) tiling cannot change them: the per-patch
    gather and merge must give the whole image's samples and means."""
    images, labels = labelled
    v = jax.tree.map(lambda a: np.zeros_like(a), init_vars(0))
    for name in ("encoders_0", "decoders_1"):
        for unit in ("unit_0", "unit_1"):
            v["params"][name][unit]["conv"]["kernel"][1, 1, 0, 0] = 1.0
            v["params"][name][unit]["conv"]["bias"][:] = 0.1
    model = Model(name="m", normalization=NORM, spec=SPEC, variables=v)
    whole = B.ccfv_statistics(model, images, labels, image_ids=[0, 1, 2, 3], samples=(20, 40, 80))
    tiled = B.ccfv_statistics(model, images, labels, image_ids=[0, 1, 2, 3], samples=(20, 40, 80),
                              tile=16, halo=8, tile_above=32)
    for a, b in zip(whole, tiled):
        np.testing.assert_array_equal(a["mask"], b["mask"])
        np.testing.assert_allclose(a["samples"], b["samples"], atol=1e-5)
        np.testing.assert_allclose(a["g"], b["g"], atol=1e-5)
    assert whole[-1]["samples"][0, :, 0].max() > 0.5  # the full-resolution layer carries the image


def test_ccfv_undefined_cases(labelled):
    images, labels = labelled
    model = Model(name="bb", normalization=NORM, predict=lambda x: x)
    assert B.ccfv(model, images, labels)["score"] is None  # black box: no features
    grey = Model(name="m", normalization=NORM, spec=SPEC, variables=init_vars(1))
    assert B.ccfv(grey, images[:1], labels[:1])["score"] is None  # one image: no pair


# -- engine wiring --------------------------------------------------------------------------------
def _engine_scores(plan, models, x, boxes):
    fn = engine.compiled_scorer(plan)
    variables = engine.stack_variables([m.variables for m in models])
    n = len(models)
    s, v, fg = fn(variables, np.zeros(n, np.int32), np.zeros(n, np.int32), x[None], boxes,
                  np.arange(x.shape[0], dtype=np.int32), jax.random.key(0))
    return np.asarray(s), np.asarray(v)


def test_engine_baselines_same_program_paper_scores_unchanged():
    models = []
    for i in range(2):
        v = init_vars(i)
        v["params"]["final"]["bias"] = v["params"]["final"]["bias"] + 0.05 * i
        models.append(Model(name=f"m{i}", normalization=NORM, spec=SPEC, variables=v))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 32, 32, 1)).astype(np.float32)
    boxes = np.array([[0, 32, 0, 32], [0, 28, 0, 30], [0, 32, 0, 32]], np.int32)
    perts = tuple(parse_perturbation(p) for p in ("dropout:0.3", "brightness:0.2"))
    metrics = ("nhd", "confidence", "entropy", "mcdropout")
    s, v = _engine_scores(engine.Plan(spec=SPEC, perturbations=perts, metrics=metrics, mc_samples=3), models, x, boxes)
    s_paper, v_paper = _engine_scores(engine.Plan(spec=SPEC, perturbations=perts, metrics=("nhd",)), models, x, boxes)
    # The paper's metric is the same with or without the extra draws (draw 0 keeps its key).
    np.testing.assert_allclose(s[:, :, 0], s_paper[:, :, 0], atol=1e-6)
    # Clean-pass baselines: plain Flax prediction + the NumPy formulas.
    mask = engine.box_mask(boxes, (32, 32))
    for mi, m in enumerate(models):
        p = np.asarray(UNet(SPEC).apply(m.variables, x))[..., 0]
        for pi in range(len(perts)):
            _compare((s[mi, pi, 1], v[mi, pi, 1]), _np_confidence(p, np.asarray(mask)), atol=1e-5)
            _compare((s[mi, pi, 2], v[mi, pi, 2]), _np_entropy(p, np.asarray(mask)), atol=1e-5)
    # A deterministic perturbation (fixed brightness) gives identical draws: score 1.
    ok = v[:, 1, 3]
    assert ok.any() and np.all(s[:, 1, 3][ok] == pytest.approx(1.0, abs=1e-6))
    # Dropout 0.3 draws differ: some variance, scores in [0, 1).
    assert np.all((s[:, 0, 3] >= 0) & (s[:, 0, 3] <= 1)) and np.any(s[:, 0, 3][v[:, 0, 3]] < 1)
    with pytest.raises(ValueError, match="mc_samples"):
        engine.Plan(spec=SPEC, perturbations=perts, metrics=metrics, mc_samples=1)


def test_engine_clean_only_baselines_skip_the_perturbed_passes():
    models = [Model(name=f"m{i}", normalization=NORM, spec=SPEC, variables=init_vars(i)) for i in range(2)]
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 1)).astype(np.float32)
    boxes = np.array([[0, 32, 0, 32], [0, 30, 0, 28]], np.int32)
    perts = tuple(parse_perturbation(p) for p in ("dropout:0.3", "noise:0.2"))
    only = engine.Plan(spec=SPEC, perturbations=perts, metrics=("confidence", "entropy"))
    mixed = engine.Plan(spec=SPEC, perturbations=perts, metrics=("nhd", "confidence", "entropy"))
    assert only.clean_only and not mixed.clean_only
    assert not engine.Plan(spec=SPEC, perturbations=perts, metrics=("entropy", "mcdropout")).clean_only
    s, v = _engine_scores(only, models, x, boxes)
    s_mixed, v_mixed = _engine_scores(mixed, models, x, boxes)
    np.testing.assert_allclose(s, s_mixed[:, :, 1:], atol=1e-6)
    np.testing.assert_array_equal(v, v_mixed[:, :, 1:])

    # The clean-only program runs one forward pass per model: the mixed one runs the noisy images
    # through the encoder as well and decodes the dropped bottleneck once more.
    def n_convs(plan):
        fn = engine.scoring_function(plan)
        variables = engine.stack_variables([m.variables for m in models])
        jaxpr = jax.make_jaxpr(fn)(variables, np.zeros(2, np.int32), np.zeros(2, np.int32), x[None], boxes,
                                   np.arange(2, dtype=np.int32), jax.random.key(0))
        return str(jaxpr).count("conv_general_dilated")

    assert n_convs(only) < n_convs(mixed)


def test_black_box_clean_only_baselines_predict_once():
    calls = []

    def predict(x):
        calls.append(x.shape)
        return 1.0 / (1.0 + np.exp(-x))

    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 16, 16, 1)).astype(np.float32)
    boxes = np.array([[0, 16, 0, 16], [0, 12, 0, 14]], np.int32)
    perts = [parse_perturbation(p) for p in ("noise:0.2", "gamma:1.5")]
    kw = dict(x=x, boxes=boxes, unit_ids=np.arange(2, dtype=np.int32), key=jax.random.key(0),
              threshold=0.5)
    s, v, _ = engine.score_black_box(predict, perts, ("confidence", "entropy"), **kw)
    assert len(calls) == 1  # the clean pass only
    s_mixed, v_mixed, _ = engine.score_black_box(predict, perts, ("nhd", "confidence", "entropy"), **kw)
    assert len(calls) == 1 + 1 + len(perts)
    np.testing.assert_allclose(s, s_mixed[:, 1:], atol=1e-6)
    np.testing.assert_array_equal(v, v_mixed[:, 1:])
    mask = np.asarray(engine.box_mask(boxes, (16, 16)))
    for pi in range(len(perts)):
        _compare((s[pi, 1], v[pi, 1]), _np_entropy(predict(x)[..., 0], mask), atol=1e-5)
