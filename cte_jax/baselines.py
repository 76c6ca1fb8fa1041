"""Baseline transferability estimators beside CTE: prediction confidence, entropy, MC-dropout
variance (unsupervised, scored by the engine) and CCFV (supervised: needs target labels).

The three unsupervised baselines are what a user would try before CTE. Each is a pure function
of probability maps with the engine's convention: ``(score, valid)``, higher score = expected to
transfer better, an undefined score is 0.0 with ``valid=False`` (never NaN). The engine computes
them in the same compiled program as the CTE metrics (metric names ``confidence``, ``entropy``,
``mcdropout``).

CCFV (Yang et al. 2023) follows ``SPEC.md`` "Baseline: CCFV": Gaussian fits of class features,
pairwise Wasserstein distances between images (class consistency W) and the spread of image
mean features (variety V), ``CCFV = mean over layers of log(V / W)``. The statistics are pure
JAX functions; :func:`ccfv` extracts the features of one grey-box model on a labelled target.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy

from cte_jax import backend
from cte_jax.arch import UNetSpec

Array = jax.Array

#: Pixels sampled per image and class for each CCFV layer, from the bottleneck (deepest) to the
#: last decoder step (full resolution); the reference's 100/200/400/800. A network with fewer
#: layers uses the last ones (the full-resolution layer always gets the largest sample).
CCFV_SAMPLES = (100, 200, 400, 800)


# -- shared helpers -----------------------------------------------------------------------------
def _check_map(p: Array, mask: Array | None) -> tuple[Array, Array]:
    p = jnp.asarray(p)
    if p.ndim < 2:
        raise ValueError(f"p must have shape (..., h, w), got {p.shape}")
    if mask is None:
        return p, jnp.ones(p.shape, bool)
    try:
        counted = jnp.broadcast_to(jnp.asarray(mask).astype(bool), p.shape)
    except ValueError:
        raise ValueError(f"mask of shape {jnp.shape(mask)} does not broadcast to {p.shape}") from None
    return p, counted


def _ratio(num: Array, den: Array) -> tuple[Array, Array]:
    """``(num / den, den > 0)`` as float32, 0 where den == 0."""
    valid = den > 0
    return jnp.where(valid, num / jnp.where(valid, den, 1), 0.0).astype(jnp.float32), valid


# -- unsupervised baselines (engine metrics) ------------------------------------------------------
def mean_foreground_confidence(p: Array, *, mask: Array | None = None,
                               threshold: float = 0.5) -> tuple[Array, Array]:
    """Mean confidence of the clean prediction over its predicted foreground.

    ``score = mean over R of max(p, 1 - p)`` with ``R = {p > threshold} AND mask``. The
    restriction to the predicted foreground is deliberate: in microscopy most pixels are
    confidently predicted background, and a mean over the whole image would mostly measure how
    much background there is. Invalid when nothing is predicted foreground.

    Args:
      p: float (..., h, w) clean foreground probabilities.
      mask: optional bool, broadcastable to (..., h, w): pixels that count (padding excluded).
      threshold: probabilities strictly above it are foreground.

    Returns:
      ``(score, valid)``: float32 (...,) in [0.5, 1] where valid, and bool (...,).

    References:
      D. Hendrycks and K. Gimpel (2017), "A baseline for detecting misclassified and
      out-of-distribution examples in neural networks", ICLR (maximum softmax probability).
    """
    p, counted = _check_map(p, mask)
    p = p.astype(jnp.float32)
    region = (p > threshold) & counted
    conf = jnp.maximum(p, 1.0 - p)
    return _ratio(jnp.sum(jnp.where(region, conf, 0.0), axis=(-2, -1)),
                  jnp.sum(region, axis=(-2, -1)).astype(jnp.float32))


def one_minus_mean_entropy(p: Array, *, mask: Array | None = None) -> tuple[Array, Array]:
    """One minus the mean binary entropy (in bits) of the clean prediction over the image.

    ``H(p) = -(p log2 p + (1 - p) log2 (1 - p))`` with ``0 log 0 = 0``, so ``H`` is in [0, 1]
    and ``score = 1 - mean over counted pixels of H(p)`` is 1 for a fully confident map. Unlike
    :func:`mean_foreground_confidence` it counts every pixel, background included, as a user
    computing "mean predictive entropy" would. Invalid when no pixel counts.

    Args:
      p: float (..., h, w) clean foreground probabilities in [0, 1].
      mask: optional bool, broadcastable to (..., h, w): pixels that count.

    Returns:
      ``(score, valid)``: float32 (...,) in [0, 1], bool (...,).

    References:
      C. E. Shannon (1948), "A mathematical theory of communication", Bell Syst. Tech. J. 27.
    """
    p, counted = _check_map(p, mask)
    p = jnp.clip(p.astype(jnp.float32), 0.0, 1.0)
    h = -(xlogy(p, p) + xlogy(1.0 - p, 1.0 - p)) / jnp.log(2.0)
    n = jnp.sum(counted, axis=(-2, -1)).astype(jnp.float32)
    s, valid = _ratio(jnp.sum(jnp.where(counted, h, 0.0), axis=(-2, -1)), n)
    return jnp.where(valid, 1.0 - s, 0.0).astype(jnp.float32), valid


def mc_variance_consistency(p: Array, draws: Array, *, mask: Array | None = None,
                            threshold: float = 0.5) -> tuple[Array, Array]:
    """MC-dropout agreement: one minus the normalised predictive variance over K perturbed draws.

    With draws ``q_1 .. q_K`` (K passes under the perturbation, e.g. bottleneck dropout with K
    independent masks), ``var = (1/K) sum_k (q_k - mean_k q_k)^2`` per pixel (population
    variance, at most 1/4 for values in [0, 1]) and ``score = 1 - 4 mean over U of var``, where
    ``U = ({p > t} OR any_k {q_k > t}) AND mask`` is the union of every hard mask, clean
    included, as CTE restricts to its union: background that all passes agree on would
    otherwise dominate. Invalid when U is empty.

    Args:
      p: float (..., h, w) clean probabilities (they define U, not the variance).
      draws: float (K, ..., h, w) perturbed probabilities, K >= 2.
      mask: optional bool, broadcastable to (..., h, w): pixels that count.
      threshold: probabilities strictly above it are foreground.

    Returns:
      ``(score, valid)``: float32 (...,) in [0, 1], bool (...,).

    References:
      Y. Gal and Z. Ghahramani (2016), "Dropout as a Bayesian approximation: representing model
      uncertainty in deep learning", ICML.
    """
    p, counted = _check_map(p, mask)
    draws = jnp.asarray(draws)
    if draws.ndim != p.ndim + 1 or draws.shape[1:] != p.shape or draws.shape[0] < 2:
        raise ValueError(f"draws must have shape (K>=2,) + {p.shape}, got {draws.shape}")
    q = draws.astype(jnp.float32)
    var = jnp.mean(jnp.square(q - jnp.mean(q, axis=0)), axis=0)
    union = ((p > threshold) | jnp.any(q > threshold, axis=0)) & counted
    s, valid = _ratio(jnp.sum(jnp.where(union, var, 0.0), axis=(-2, -1)),
                      jnp.sum(union, axis=(-2, -1)).astype(jnp.float32))
    return jnp.where(valid, jnp.clip(1.0 - 4.0 * s, 0.0, 1.0), 0.0).astype(jnp.float32), valid


# -- CCFV: Gaussian statistics ----------------------------------------------------------------------
def fit_gaussians(samples: Array, sample_mask: Array, *, eps: float = 1e-6) -> tuple[Array, Array, Array]:
    """Mean and regularised covariance of each image's sampled class features.

    ``mu = (1/m) sum x``, ``cov = (1/(m-1)) sum (x - mu)(x - mu)^T + eps I`` over the m samples
    where ``sample_mask`` is True (the unbiased estimate, as ``numpy.cov`` and ``torch.cov``).

    Args:
      samples: float (n, k, c) features of up to k sampled pixels per image.
      sample_mask: bool (n, k), which samples exist.
      eps: ridge added to the diagonal.

    Returns:
      ``(mu (n c), cov (n c c), valid (n,))``; valid needs m >= 2 (else mu = 0, cov = eps I).
    """
    x = jnp.asarray(samples, jnp.float32)
    m = jnp.asarray(sample_mask, bool)
    if x.ndim != 3 or m.shape != x.shape[:2]:
        raise ValueError(f"samples must be (n, k, c) and sample_mask (n, k), got {x.shape} and {m.shape}")
    return _fit_gaussians(x, m, eps)


@jax.jit
def _fit_gaussians(x, m, eps):
    w = m.astype(jnp.float32)[..., None]
    count = jnp.sum(w, axis=1)  # (n 1)
    mu = jnp.sum(w * x, axis=1) / jnp.maximum(count, 1.0)
    d = (x - mu[:, None]) * w
    cov = jnp.einsum("nki,nkj->nij", d, d, precision="highest") / jnp.maximum(count - 1.0, 1.0)[..., None]
    valid = count[:, 0] >= 2
    cov = jnp.where(valid[:, None, None], cov, 0.0) + eps * jnp.eye(x.shape[-1], dtype=jnp.float32)
    return jnp.where(valid[:, None], mu, 0.0), cov, valid


def psd_sqrt(cov: Array) -> Array:
    """Symmetric square root of symmetric PSD matrices (..., c, c): ``V diag(sqrt(max(l, 0))) V^T``."""
    lam, vec = jnp.linalg.eigh(cov)
    return jnp.einsum("...ij,...j,...kj->...ik", vec, jnp.sqrt(jnp.maximum(lam, 0.0)), vec, precision="highest")


def _w_from_roots(mu1, cov1, root1, mu2, cov2, root2):
    # tr sqrtm(S1 S2) = sum of the singular values of S1^1/2 S2^1/2: S1 S2 is similar to
    # (R1 R2)(R1 R2)^T, whose eigenvalues are the squared singular values of R1 R2. The SVD keeps
    # small terms accurate in float32, where square roots of tiny eigenvalues would not be.
    nuclear = jnp.sum(jnp.linalg.svd(jnp.matmul(root1, root2, precision="highest"), compute_uv=False), axis=-1)
    d2 = jnp.sum(jnp.square(mu1 - mu2), axis=-1)
    tr = jnp.trace(cov1, axis1=-2, axis2=-1) + jnp.trace(cov2, axis1=-2, axis2=-1)
    return jnp.sqrt(jnp.abs(d2 + tr - 2.0 * nuclear))


def gaussian_wasserstein(mu1: Array, cov1: Array, mu2: Array, cov2: Array) -> Array:
    """2-Wasserstein distance between Gaussians, as CCFV writes it.

    ``W = sqrt| ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2) |`` (the absolute value
    absorbs rounding below 0). Leading axes broadcast.

    Args:
      mu1, mu2: float (..., c) means.
      cov1, cov2: float (..., c, c) symmetric positive semi-definite covariances.

    Returns:
      float32 (...,) distances.

    References:
      D. C. Dowson and B. V. Landau (1982), "The Frechet distance between multivariate normal
      distributions", J. Multivariate Anal. 12(3).
    """
    mu1, mu2 = jnp.asarray(mu1, jnp.float32), jnp.asarray(mu2, jnp.float32)
    cov1, cov2 = jnp.asarray(cov1, jnp.float32), jnp.asarray(cov2, jnp.float32)
    if cov1.shape[-2:] != (mu1.shape[-1],) * 2 or cov2.shape[-2:] != (mu2.shape[-1],) * 2:
        raise ValueError(f"covariances {cov1.shape}, {cov2.shape} do not match means {mu1.shape}, {mu2.shape}")
    return _w_from_roots(mu1, cov1, psd_sqrt(cov1), mu2, cov2, psd_sqrt(cov2))


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, 1)


def class_distance(mu: Array, cov: Array, valid: Array, *, pair_batch: int = 16) -> tuple[Array, Array]:
    """CCFV class term: ``W = sum over image pairs i < j (both valid) of gaussian_wasserstein``.

    Args:
      mu: float (n, c) per-image class means; cov: (n, c, c); valid: bool (n,).
      pair_batch: pairs per vectorised step (bounds memory: pair_batch c^2 floats at a time).

    Returns:
      ``(W, defined)``: float32 scalar and bool (at least one valid pair).
    """
    mu, cov, valid = jnp.asarray(mu, jnp.float32), jnp.asarray(cov, jnp.float32), jnp.asarray(valid, bool)
    n = mu.shape[0]
    if n < 2:
        return jnp.float32(0.0), jnp.bool_(False)
    i, j = _pairs(n)
    roots = psd_sqrt(cov)

    def one(ij):
        a, b = ij
        return _w_from_roots(mu[a], cov[a], roots[a], mu[b], cov[b], roots[b])

    w = jax.lax.map(one, (jnp.asarray(i), jnp.asarray(j)), batch_size=pair_batch)
    keep = valid[i] & valid[j]
    return jnp.sum(jnp.where(keep, w, 0.0)), jnp.any(keep)


def feature_variety(g: Array, *, eps: float = 1e-3) -> tuple[Array, Array]:
    """CCFV variety term: ``V = mean over image pairs i < j of 1 / sqrt(||g_i - g_j||^2 + eps)``.

    Args:
      g: float (n, c) per-image mean features.
      eps: added under the square root.

    Returns:
      ``(V, defined)``: float32 scalar and bool (n >= 2).
    """
    g = jnp.asarray(g, jnp.float32)
    n = g.shape[0]
    if n < 2:
        return jnp.float32(0.0), jnp.bool_(False)
    i, j = _pairs(n)
    d2 = jnp.sum(jnp.square(g[i] - g[j]), axis=-1)
    return jnp.mean(1.0 / jnp.sqrt(d2 + eps)), jnp.bool_(True)


@jax.jit
def ccfv_layer_score(mu: Array, cov: Array, valid: Array, g: Array) -> tuple[Array, Array]:
    """``log(V / W)`` of one layer (see :func:`class_distance`, :func:`feature_variety`).

    Returns:
      ``(score, defined)``: defined needs a valid image pair and ``W > 0``.
    """
    w, w_ok = class_distance(mu, cov, valid)
    v, v_ok = feature_variety(g)
    ok = w_ok & v_ok & (w > 0) & (v > 0)
    return jnp.where(ok, jnp.log(jnp.where(ok, v, 1.0)) - jnp.log(jnp.where(ok, w, 1.0)), 0.0), ok


@jax.jit
def _layer_ccfv(samples, mask, g, eps):
    mu, cov, valid = _fit_gaussians(samples, mask, eps)
    s, ok = ccfv_layer_score(mu, cov, valid, g)
    return s, ok, valid


# -- CCFV: features of a model on a labelled target -------------------------------------------------
def ccfv_layer_names(spec: UNetSpec) -> list[str]:
    """Flax submodules whose outputs are CCFV's layers: the bottleneck (last encoder level), then
    every decoder step, deepest first."""
    return [f"encoders_{spec.levels - 1}"] + [f"decoders_{j}" for j in range(spec.levels - 1)]


def layer_samples(spec: UNetSpec, samples: Sequence[int] = CCFV_SAMPLES) -> list[int]:
    """Pixels to sample per image for each layer of ``ccfv_layer_names(spec)``."""
    n = spec.levels
    samples = [int(s) for s in samples]
    if not samples or min(samples) < 2:
        raise ValueError(f"samples must be a non-empty list of counts >= 2, got {samples}")
    if len(samples) >= n:
        return samples[len(samples) - n:]
    return [samples[0]] * (n - len(samples)) + samples


def sample_foreground_pixels(label: np.ndarray, *, n: int, seed: int, image_id: int) -> np.ndarray:
    """Flat indices of ``min(n, |F|)`` foreground pixels (``label != 0``), uniformly without
    replacement and in random order, so any prefix is itself a uniform sample.

    The generator is seeded by ``(seed, image_id)``: an image gets the same pixels whatever
    else is in the target. Returns int64 (k,).
    """
    lab = np.asarray(label)
    if lab.ndim == 3 and lab.shape[-1] == 1:
        lab = lab[..., 0]
    if lab.ndim != 2:
        raise ValueError(f"label must be (h, w) or (h, w, 1), got {lab.shape}")
    fg = np.flatnonzero(lab.reshape(-1) != 0)
    rng = np.random.default_rng([int(seed), int(image_id)])
    return rng.choice(fg, size=min(int(n), fg.size), replace=False).astype(np.int64)


@functools.lru_cache(maxsize=None)
def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (at most two) source indices and weights of each output position of PyTorch-style
    bilinear resizing (``networks._linear_matrix``), and the matrix itself."""
    from cte_jax.networks import _linear_matrix

    m = _linear_matrix(n_in, n_out)
    idx = np.argsort(-m, axis=1, kind="stable")[:, :2]
    return idx.astype(np.int32), np.take_along_axis(m, idx, 1).astype(np.float32), m


def _upsampled_at(f: Array, size: tuple[int, int], ys: Array, xs: Array, box: Array) -> tuple[Array, Array]:
    """Features f (h w c) bilinearly upsampled to ``size`` (as ``networks.resize``), read at
    the points (ys, xs) (k,), and the upsampled map's sum over ``box`` (y0 y1 x0 x1), without
    building the upsampled map."""
    (h, w), (H, W) = f.shape[:2], size
    ty, wy, my = _taps(h, H)
    tx, wx, mx = _taps(w, W)
    iy, ay = jnp.asarray(ty)[ys], jnp.asarray(wy)[ys]  # (k 2)
    ix, ax = jnp.asarray(tx)[xs], jnp.asarray(wx)[xs]
    vals = sum(ay[:, a, None] * ax[:, b, None] * f[iy[:, a], ix[:, b]] for a in range(2) for b in range(2))
    rows = ((jnp.arange(H) >= box[0]) & (jnp.arange(H) < box[1])).astype(jnp.float32)
    cols = ((jnp.arange(W) >= box[2]) & (jnp.arange(W) < box[3])).astype(jnp.float32)
    rh = jnp.matmul(rows, jnp.asarray(my), precision="highest")  # (h,) weight of each source row
    rw = jnp.matmul(cols, jnp.asarray(mx), precision="highest")
    total = jnp.einsum("a,abc,b->c", rh, f, rw, precision="highest")
    return vals, total


@functools.lru_cache(maxsize=None)
def _layer_sampler(spec: UNetSpec):
    """jit: (variables, x (1 H W c), ys, xs (k,), box (4,)) -> per layer (samples (k c_l), sum (c_l))."""
    from cte_jax.networks import UNet

    names = tuple(ccfv_layer_names(spec))
    net = UNet(spec)

    def run(variables, x, ys, xs, box):
        _, state = net.apply(variables, x, mutable=["intermediates"],
                             capture_intermediates=lambda mdl, method: method == "__call__" and mdl.name in names)
        inter = state["intermediates"]
        return [_upsampled_at(inter[n]["__call__"][0][0].astype(jnp.float32), x.shape[1:3], ys, xs, box)
                for n in names]

    return backend.jit(run)


def ccfv_statistics(model: Any, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], *,
                    image_ids: Sequence[int], samples: Sequence[int] = CCFV_SAMPLES, seed: int = 0,
                    tile: int = 256, halo: int = 32, tile_above: int = 1024) -> list[dict[str, np.ndarray]]:
    """Sampled foreground features and mean features of every image, per CCFV layer.

    Each image is normalised and cut into network inputs as for prediction (whole, or 256x256
    tiles with a halo for large images); each layer's output is bilinearly upsampled to the input
    size and read at the sampled foreground pixels; ``g`` is the mean of the upsampled layer
    over the image's pixels.

    Returns:
      One dict per layer (``ccfv_layer_names`` order): ``samples`` float32 (n k c),
      ``mask`` bool (n k), ``g`` float32 (n c).
    """
    from cte_jax import preprocess, tiling

    spec = model.spec
    counts = layer_samples(spec, samples)
    k = max(counts)
    fn = _layer_sampler(spec)
    norm = preprocess.Normalization.from_dict(model.normalization)
    multiple = spec.size_multiple
    per_layer: list[dict[str, list]] = [{"samples": [], "mask": [], "g": []} for _ in counts]
    for img, lab, uid in zip(images, labels, image_ids):
        x = preprocess.normalize(img, norm)
        h, w = x.shape[:2]
        lab = np.asarray(lab).reshape(h, w) if np.asarray(lab).size == h * w else None
        if lab is None:
            raise ValueError(f"label shape does not match image {x.shape[:2]}")
        idx = sample_foreground_pixels(lab, n=k, seed=seed, image_id=uid)
        n_idx = idx.size
        py, px = np.zeros(k, np.int64), np.zeros(k, np.int64)
        py[:n_idx], px[:n_idx] = idx // w, idx % w
        got = [np.zeros((k, 0), np.float32) for _ in counts]
        sums = [None for _ in counts]
        patches = tiling.plan_patches(h, w, tile=tile, halo=halo, tile_above=tile_above, multiple=multiple,
                                      bucket=max(32, multiple))
        for p in patches:
            y0, y1, x0, x1 = p.image_box
            inside = (np.arange(k) < n_idx) & (py >= y0) & (py < y1) & (px >= x0) & (px < x1)
            ly = np.where(inside, py - p.y0, 0).astype(np.int32)
            lx = np.where(inside, px - p.x0, 0).astype(np.int32)
            patch = tiling.extract_patch(x, p)[None]
            outs = fn(model.variables, patch, ly, lx, np.asarray(p.valid, np.int32))
            for li, (vals, total) in enumerate(outs):
                vals, total = np.asarray(vals), np.asarray(total)
                if got[li].shape[1] == 0:
                    got[li] = np.zeros((k, vals.shape[1]), np.float32)
                    sums[li] = np.zeros(vals.shape[1], np.float64)
                got[li][inside] = vals[inside]
                sums[li] += total
        for li, n_l in enumerate(counts):
            per_layer[li]["samples"].append(got[li][:n_l])
            per_layer[li]["mask"].append(np.arange(n_l) < min(n_idx, n_l))
            per_layer[li]["g"].append((sums[li] / (h * w)).astype(np.float32))
    return [{key: np.stack(v) for key, v in layer.items()} for layer in per_layer]


def ccfv(model: Any, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], *,
         image_ids: Sequence[int] | None = None, samples: Sequence[int] = CCFV_SAMPLES, seed: int = 0,
         eps: float = 1e-6, tile: int = 256, halo: int = 32, tile_above: int = 1024) -> dict[str, Any]:
    """CCFV of one grey-box model on a labelled target (SPEC "Baseline: CCFV").

    Per layer l (bottleneck and decoder steps): per image, up to ``samples[l]`` foreground pixels
    (``label != 0``) are sampled (seeded by ``seed`` and the image id), a Gaussian is fitted to
    their upsampled features (:func:`fit_gaussians`), ``W_l`` sums the Wasserstein distances of
    all pairs of images with at least 2 foreground samples, ``V_l`` is the variety of the image
    mean features, and ``CCFV = mean_l log(V_l / W_l)``. The binary tasks here have one
    foreground class. Higher is better.

    Args:
      model: a grey-box :class:`cte_jax.modelio.Model`.
      images: raw images (h w c); labels: matching (h w) or (h w 1) label images, 0 = background.
      image_ids: per-image seeds for sampling (default 0..n-1).
      samples: pixels per layer, deepest first (see :func:`layer_samples`).
      seed: sampling seed (the reference's 0).
      eps: covariance ridge.

    Returns:
      ``{"score": float | None, "layers": [float | None], "n_images": n,
      "n_foreground_images": images with >= 2 foreground pixels}``; score is None when a layer
      is undefined (fewer than two images with foreground, or a black-box model).
    """
    images = list(images)
    labels = list(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    out: dict[str, Any] = {"score": None, "layers": [], "n_images": len(images), "n_foreground_images": 0}
    if getattr(model, "spec", None) is None or len(images) < 2:
        return out
    ids = list(range(len(images))) if image_ids is None else list(image_ids)
    stats = ccfv_statistics(model, images, labels, image_ids=ids, samples=samples, seed=seed, tile=tile,
                            halo=halo, tile_above=tile_above)
    values = []
    for layer in stats:
        s, ok, valid = _layer_ccfv(layer["samples"], layer["mask"], layer["g"], eps)
        out["n_foreground_images"] = int(np.sum(np.asarray(valid)))
        values.append(float(s) if bool(ok) else None)
    out["layers"] = values
    if values and all(v is not None for v in values):
        out["score"] = float(np.mean(values))
    return out
