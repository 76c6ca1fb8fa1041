"""Per-image consistency metrics between clean and perturbed predictions (CTE-NHD, -EI, -VRand).

Every score function returns ``(score, valid)``: ``score`` has the batch shape of its inputs
(all axes but the last two), ``valid`` is bool of the same shape, and an invalid score is 0.0,
never NaN, so that invalid images can be counted and left out of a median on the host.
All functions are pure, jit- and vmap-compatible, and take (..., h, w) arrays.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cte_jax.labeling import _dense_ranks, connected_components

Array = jax.Array


# -- shared helpers -----------------------------------------------------------------------------
def _check_pair(a: Array, b: Array, names: tuple[str, str]) -> None:
    if a.ndim < 2:
        raise ValueError(f"{names[0]} must have shape (..., h, w), got {a.shape}")
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, "
                         f"got {a.shape} and {b.shape}")


def _check_mask(mask: Array | None, shape: tuple[int, ...]) -> None:
    if mask is None:
        return
    try:
        ok = jnp.broadcast_shapes(jnp.shape(mask), shape) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"mask of shape {jnp.shape(mask)} does not broadcast to {shape}")


def _check_probabilities(p, p_pert, mask) -> tuple[Array, Array]:
    p, p_pert = jnp.asarray(p), jnp.asarray(p_pert)
    _check_pair(p, p_pert, ("p", "p_pert"))
    _check_mask(mask, p.shape)
    return p, p_pert


def _counted(mask: Array | None, shape: tuple[int, ...]) -> Array:
    """The pixels that count, as bool of ``shape``; ``None`` means all of them."""
    if mask is None:
        return jnp.ones(shape, bool)
    return jnp.broadcast_to(jnp.asarray(mask).astype(bool), shape)


def _check_concrete_range(name: str, value, lo, hi) -> None:
    """Range check of a hyperparameter when it is a concrete number (traced values pass)."""
    if value is None:
        raise ValueError(f"{name} must be a number, got None")
    if isinstance(value, jax.core.Tracer):  # the caller jits over it: nothing to check eagerly
        return
    v = float(value)
    if v < lo or (hi is not None and v > hi):
        bounds = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")


def _float_dtype(*arrays: Array):
    """The inputs' floating dtype, at least float32 (half-precision sums would drift)."""
    dtype = jnp.result_type(*arrays)
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def _safe_ratio(num: Array, den: Array, dtype) -> tuple[Array, Array]:
    """``(num / den, den > 0)`` with 0 where ``den == 0``."""
    valid = den > 0
    ratio = num.astype(dtype) / jnp.where(valid, den, 1).astype(dtype)
    return jnp.where(valid, ratio, 0).astype(dtype), valid


# -- semantic (hard / soft) consistency ---------------------------------------------------------
def nhd_statistics(p: Array, p_pert: Array, *, mask: Array | None = None,
                   threshold: float = 0.5) -> tuple[Array, Array]:
    """Sufficient statistics of CTE-NHD: disagreeing and union pixel counts.

    With hard masks ``y = p > threshold`` and ``y' = p_pert > threshold``, and ``C`` the counted
    pixels (``mask``): ``disagree = |(y XOR y') & C|`` and ``union = |(y OR y') & C|``. Both are
    additive over tiles of one image, so the host can sum them before taking the ratio.

    Args:
      p: float (..., h, w) clean foreground probabilities.
      p_pert: float (..., h, w) perturbed foreground probabilities.
      mask: optional bool, broadcastable to (..., h, w): pixels that count (padding excluded).
      threshold: probabilities strictly above it are foreground.

    Returns:
      ``(disagree_count, union_count)``, both int32 (...,).
    """
    p, p_pert = _check_probabilities(p, p_pert, mask)
    return _nhd_statistics(p, p_pert, mask, threshold)


@jax.jit
def _nhd_statistics(p, p_pert, mask, threshold):
    counted = _counted(mask, p.shape)
    y, y_pert = p > threshold, p_pert > threshold
    disagree = jnp.sum((y ^ y_pert) & counted, axis=(-2, -1), dtype=jnp.int32)
    union = jnp.sum((y | y_pert) & counted, axis=(-2, -1), dtype=jnp.int32)
    return disagree, union


def normalized_hamming_consistency(p: Array, p_pert: Array, *, mask: Array | None = None,
                                   threshold: float = 0.5) -> tuple[Array, Array]:
    """CTE-NHD: one minus the Hamming distance of the hard masks, normalised by their union.

    ``score = 1 - |y XOR y'| / |y OR y'|`` over the counted pixels, which equals IoU(y, y').
    Invalid (score 0) when the union is empty.

    Args:
      p: float (..., h, w) clean foreground probabilities.
      p_pert: float (..., h, w) perturbed foreground probabilities.
      mask: optional bool, broadcastable to (..., h, w): pixels that count.
      threshold: probabilities strictly above it are foreground.

    Returns:
      ``(score, valid)``: score (...,) in [0, 1], float32 (or ``p``'s wider float dtype); valid
      bool (...,).

    References:
      CTE paper, eq. 5 ("hard" consistency); SPEC.md "Per-image consistency".
    """
    p, p_pert = _check_probabilities(p, p_pert, mask)
    return _nhd_score(p, p_pert, mask, threshold)


@jax.jit
def _nhd_score(p, p_pert, mask, threshold):
    disagree, union = _nhd_statistics(p, p_pert, mask, threshold)
    dtype = _float_dtype(p, p_pert)
    ratio, valid = _safe_ratio(disagree, union, dtype)
    return jnp.where(valid, 1 - ratio, 0).astype(dtype), valid


def ei_statistics(p: Array, p_pert: Array, *, mask: Array | None = None,
                  threshold: float = 0.5) -> tuple[Array, Array]:
    """Sufficient statistics of CTE-EI: the summed invariance over the union, and its size.

    ``sum_over_U = sum_{i in U} [y_i == y'_i] * sqrt(conf_i * conf'_i)`` with ``U = (y OR y') & C``
    and ``conf = p`` where ``y`` is foreground, ``1 - p`` elsewhere (confidence of the predicted
    class). Inside U agreement means both foreground, so the term is ``sqrt(p p')`` there.

    Args:
      p: float (..., h, w) clean foreground probabilities in [0, 1].
      p_pert: float (..., h, w) perturbed foreground probabilities in [0, 1].
      mask: optional bool, broadcastable to (..., h, w): pixels that count.
      threshold: probabilities strictly above it are foreground.

    Returns:
      ``(sum_over_U, union_count)``: float32 (or ``p``'s wider float dtype) (...,), int32 (...,).
    """
    p, p_pert = _check_probabilities(p, p_pert, mask)
    return _ei_statistics(p, p_pert, mask, threshold)


@jax.jit
def _ei_statistics(p, p_pert, mask, threshold):
    dtype = _float_dtype(p, p_pert)
    p, p_pert = p.astype(dtype), p_pert.astype(dtype)
    counted = _counted(mask, p.shape)
    y, y_pert = p > threshold, p_pert > threshold
    union = (y | y_pert) & counted
    conf = jnp.where(y, p, 1 - p)
    conf_pert = jnp.where(y_pert, p_pert, 1 - p_pert)
    # max(., 0) keeps a probability a hair outside [0, 1] from producing a NaN.
    term = jnp.sqrt(jnp.maximum(conf * conf_pert, 0))
    term = jnp.where(union & (y == y_pert), term, 0)
    total = jnp.sum(term, axis=(-2, -1), dtype=dtype)
    return total, jnp.sum(union, axis=(-2, -1), dtype=jnp.int32)


def effective_invariance(p: Array, p_pert: Array, *, mask: Array | None = None,
                         threshold: float = 0.5) -> tuple[Array, Array]:
    """CTE-EI: Effective Invariance of the prediction, averaged over the union of the masks.

    ``score = (1 / |U|) * sum_{i in U} [y_i == y'_i] * sqrt(conf_i * conf'_i)``, see
    ``ei_statistics``. Invalid (score 0) when U is empty.

    Args:
      p: float (..., h, w) clean foreground probabilities in [0, 1].
      p_pert: float (..., h, w) perturbed foreground probabilities in [0, 1].
      mask: optional bool, broadcastable to (..., h, w): pixels that count.
      threshold: probabilities strictly above it are foreground.

    Returns:
      ``(score, valid)``: score (...,) in [0, 1], float32 (or ``p``'s wider float dtype); valid
      bool (...,).

    References:
      W. Deng, S. Gould, L. Zheng (2022), "On the Strong Correlation Between Model Invariance
      and Generalization", NeurIPS, arXiv:2207.07065 (Effective Invariance); CTE paper, eq. 4.
    """
    p, p_pert = _check_probabilities(p, p_pert, mask)
    return _ei_score(p, p_pert, mask, threshold)


@jax.jit
def _ei_score(p, p_pert, mask, threshold):
    total, union = _ei_statistics(p, p_pert, mask, threshold)
    return _safe_ratio(total, union, total.dtype)


# -- instance consistency (adapted Rand on the foreground) --------------------------------------
def _inner_band(seg: Array, counted: Array) -> Array:
    """Pixels (h w) of ``seg`` with a counted 4-neighbour of another label.

    Equals ``grey_dilation(seg) != grey_erosion(seg)`` with the 4-connected cross footprint,
    where neighbours outside the image or outside ``counted`` are ignored. With every pixel
    counted this is exactly scipy.ndimage's default ``mode='reflect'`` (for a 3x3 footprint
    the mirrored neighbour of a border pixel is the pixel itself).
    """
    pad_s = jnp.pad(seg, 1)
    pad_c = jnp.pad(counted, 1, constant_values=False)
    h, w = seg.shape
    band = jnp.zeros(seg.shape, bool)
    for di, dj in ((0, 1), (1, 0), (1, 2), (2, 1)):
        nb_s = pad_s[di:di + h, dj:dj + w]
        nb_c = pad_c[di:di + h, dj:dj + w]
        band = band | (nb_c & (nb_s != seg))
    return band


def _exact_sum(terms: Array) -> Array:
    """float32 sum of non-negative int32 ``terms`` (n,), each < 2 n, with exact int32 blocks.

    Blocks are small enough that their int32 sums cannot overflow; only the few block sums
    are added in float32, so the result is accurate to ~1e-7 relative without x64.
    """
    n = terms.shape[0]
    block = max(1, min(n, (2 ** 30) // max(2 * n, 1)))
    n_blocks = -(-n // block)
    terms = jnp.pad(terms, (0, n_blocks * block - n))
    block_sums = jnp.sum(terms.reshape(n_blocks, block), axis=1, dtype=jnp.int32)
    return jnp.sum(block_sums.astype(jnp.float32))


def _run_pairs(sorted_keys: Array, valid: Array) -> Array:
    """sum over runs of equal consecutive keys (n,) of c (c - 1), counting ``valid`` entries.

    ``c (c - 1) = sum_{k < c} 2 k``: each entry adds twice its position inside its run, so no
    run lengths are materialised. Keys must be sorted, and invalid entries must not share a
    run with valid ones (validity is a function of the key everywhere below).
    """
    n = sorted_keys.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)
    start = jnp.concatenate([jnp.ones((1,), bool), sorted_keys[1:] != sorted_keys[:-1]])
    run_start = lax.cummax(jnp.where(start, idx, 0), axis=0)
    return _exact_sum(jnp.where(valid, 2 * (idx - run_start), 0))


def _rank_pairs(ranks: Array) -> Array:
    """sum_k c_k (c_k - 1) over the ranks k >= 1 of ``ranks`` (n,) int32 in [0, n].

    Summed per pixel, ``sum_k c_k (c_k - 1) = sum_{i: rank_i > 0} (c_{rank_i} - 1)``, so every
    term is < n and the int32 blocks of ``_exact_sum`` cannot overflow.
    """
    n = ranks.shape[0]
    counts = jax.ops.segment_sum(jnp.ones((n,), jnp.int32), ranks, num_segments=n + 1)
    return _exact_sum(jnp.where(ranks > 0, counts[ranks] - 1, 0))


def _table_ranks(ids: Array, table_size: int) -> tuple[Array, Array, Array]:
    """Dense ranks of the positive ``ids`` (n,) known to be < ``table_size``, by a lookup table.

    A scatter marks the ids present, a cumulative sum ranks them, a gather reads each pixel's
    rank: O(n + table_size), no sort. Returns ``(ranks, count, in_range)``; ids >= table_size
    make ``in_range`` False (the caller then flags the image invalid).
    """
    positive = ids > 0
    in_range = ~jnp.any(positive & (ids >= table_size))
    ids = jnp.where(positive & (ids < table_size), ids, 0)
    present = jnp.zeros((table_size,), bool).at[ids].set(True).at[0].set(False)
    table = jnp.cumsum(present, dtype=jnp.int32)
    return jnp.where(ids > 0, table[ids], 0), table[-1], in_range


_NO_PAIR = np.uint32(0xFFFFFFFF)


def _joint_pairs_packed(rank_a: Array, rank_b: Array, num_b: Array) -> Array:
    """Joint pair count from one uint32 key ``(rank_a - 1) * K_b + rank_b - 1`` per pixel.

    Exact when ``K_a * K_b <= 2**32 - 1`` (always for images of at most 2**16 pixels: the only
    product of two ranks <= 2**16 above that is 2**16 * 2**16, where every pixel is its own
    pair and the count is 0 either way). Pixels with a rank 0 carry the key ``_NO_PAIR``.
    """
    both = (rank_a > 0) & (rank_b > 0)
    key = (rank_a - 1).astype(jnp.uint32) * num_b.astype(jnp.uint32) + (rank_b - 1).astype(jnp.uint32)
    key = jnp.sort(jnp.where(both, key, _NO_PAIR))
    return _run_pairs(key, key != _NO_PAIR)


def _joint_pairs_two_keys(rank_a: Array, rank_b: Array) -> Array:
    """Joint pair count from a two-operand lexicographic sort (no packing; slower on CPU)."""
    both = (rank_a > 0) & (rank_b > 0)
    ka, kb = lax.sort((jnp.where(both, rank_a, 0), jnp.where(both, rank_b, 0)), num_keys=2)
    # A run of pairs ends where either key changes: pack the pair's change into one key.
    change = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                              ((ka[1:] != ka[:-1]) | (kb[1:] != kb[:-1])).astype(jnp.int32)])
    return _run_pairs(jnp.cumsum(change, dtype=jnp.int32), ka > 0)


def _joint_pairs_table(rank_a: Array, rank_b: Array, num_b: Array) -> Array:
    """Joint pair count by counting the key ``(rank_a - 1) * K_b + rank_b`` in a table of n + 1
    bins (no sort; several times faster on CPU). Exact only when ``K_a * K_b <= n``."""
    both = (rank_a > 0) & (rank_b > 0)
    return _rank_pairs(jnp.where(both, (rank_a - 1) * num_b + rank_b, 0))


def _joint_pairs_sorted(rank_a: Array, rank_b: Array, num_a: Array, num_b: Array) -> Array:
    """Joint pair count by sorting: packed keys up to 2**16 pixels, else as they fit."""
    if rank_a.shape[0] <= 2**16:
        return _joint_pairs_packed(rank_a, rank_b, num_b)
    fits = num_b.astype(jnp.uint32) <= _NO_PAIR // jnp.maximum(num_a, 1).astype(jnp.uint32)
    return lax.cond(fits, _joint_pairs_packed, lambda ra, rb, _: _joint_pairs_two_keys(ra, rb), rank_a, rank_b, num_b)


def _rand_2d(seg: Array, seg_pert: Array, counted: Array, alpha,
             table_size: int | None, joint_table: bool = False) -> tuple[Array, Array]:
    """Foreground Rand F-score of one image pair (h w); see ``foreground_rand_score``.

    ``joint_table``: count the joint pairs in a table when ``K_a K_b <= h w`` (any real pair of
    segmentations), by sorting otherwise; the choice is a ``lax.cond``, so only worth it when
    images are looped (``lax.map``), not vmapped (which runs both branches).
    """
    n = seg.size
    fg, fg_pert = seg > 0, seg_pert > 0
    m = (fg | fg_pert) & counted & ~_inner_band(seg, counted)
    m, a, b = m.reshape(-1), seg.reshape(-1), seg_pert.reshape(-1)
    # Background pixels inside M are singletons: they form no pair, so they only need to stay
    # out of every group. Rank 0 marks them (and pixels outside M); real ids get ranks 1..K.
    a, b = jnp.where(m & (a > 0), a, 0), jnp.where(m & (b > 0), b, 0)
    if table_size is None:
        _, rank_a, num_a = _dense_ranks(a)
        _, rank_b, num_b = _dense_ranks(b)
        in_range = True
    else:
        rank_a, num_a, in_a = _table_ranks(a, table_size)
        rank_b, num_b, in_b = _table_ranks(b, table_size)
        in_range = in_a & in_b
    pairs_a, pairs_b = _rank_pairs(rank_a), _rank_pairs(rank_b)
    if joint_table:
        fits = num_b <= n // jnp.maximum(num_a, 1)  # K_a K_b <= n, without overflow
        pairs_ab = lax.cond(fits, lambda ra, rb, _, nb: _joint_pairs_table(ra, rb, nb), _joint_pairs_sorted,
                            rank_a, rank_b, num_a, num_b)
    else:
        pairs_ab = _joint_pairs_sorted(rank_a, rank_b, num_a, num_b)
    den = alpha * pairs_a + (1 - alpha) * pairs_b
    valid = jnp.any(fg & counted) & jnp.any(m) & (den > 0) & in_range
    score = pairs_ab / jnp.where(valid, den, 1)
    return jnp.where(valid, jnp.minimum(score, 1), 0).astype(jnp.float32), valid


def foreground_rand_score(seg: Array, seg_pert: Array, *, mask: Array | None = None,
                          alpha: float = 0.5, max_id: int | None = None) -> tuple[Array, Array]:
    """CTE-VRand core: adapted Rand F-score of two instance segmentations on their foreground.

    Restriction: ``M = (seg > 0 OR seg_pert > 0) AND mask AND NOT band(seg)``, with
    ``band = grey_dilation(seg) != grey_erosion(seg)`` (one step each, 4-connected cross
    footprint), i.e. the pixels with a 4-neighbour of another label (background included).
    Neighbours outside the image or outside ``mask`` are ignored: for ``mask=None`` this is
    scipy.ndimage's default border handling (``mode='reflect'``), and for a rectangular padding
    mask the score equals that of the cropped images. Inside M, pixels with label <= 0 in either
    segmentation are singletons (a unique id each). With ``n_ij`` the joint counts of
    (seg, seg_pert) over M and ``a_i``, ``b_j`` the marginal counts of seg and seg_pert:

        P_ab = sum_ij n_ij (n_ij - 1),  P_a = sum_i a_i (a_i - 1),  P_b = sum_j b_j (b_j - 1)
        score = P_ab / (alpha * P_a + (1 - alpha) * P_b)

    which is exactly ``1 - skimage.metrics.adapted_rand_error(seg[M], seg_pert[M],
    ignore_labels=(), alpha=alpha)[0]`` (skimage's row marginal, weighted by alpha, is that of
    its first argument). Invalid (score 0) when seg has no foreground among the counted pixels,
    M is empty, or the denominator is 0 (every pixel of M a singleton).

    Counts without a contingency matrix (static shapes, no x64): the ids of each segmentation
    are densely ranked, by a lookup table when they are bounded (``max_id``) or else by a sort
    and a binary search, and counted per rank (P_a, P_b); the pairs of ranks are packed into
    one uint32 key and sorted, and runs of equal keys give P_ab (on CPU, where images are looped,
    the keys are counted in a table instead whenever K_a K_b <= h w). Packing is exact for images up
    to 2**16 pixels; above that a ``lax.cond`` per image falls back to a two-key sort when
    K_a K_b >= 2**32 (K = number of ids; never for real segmentations). Under an outer
    ``jax.vmap`` that cond runs both branches (correct, slower). Pair counts are summed in int32
    blocks, then float32 (relative error ~1e-7).

    Args:
      seg: int (..., h, w) instance labels of the clean prediction, 0 = background. Ids must
        fit int32; they need not be consecutive.
      seg_pert: int (..., h, w) instance labels of the perturbed prediction.
      mask: optional bool, broadcastable to (..., h, w): pixels that count (padding excluded).
      alpha: weight in [0, 1] of seg's marginal in the denominator (may be traced; skimage's
        ``alpha``: 1 gives its "precision" sum_ij n_ij(n_ij-1) / P_a, 0 its "recall").
      max_id: optional static bound on the ids of both segmentations, e.g. ``h * w`` for the
        ids of ``connected_components``; enables the faster table ranking. An image with a
        larger id is reported invalid. Default: the dtype's bound for 8/16-bit labels
        (uint16 label files), else none (sorting).

    Returns:
      ``(score, valid)``: float32 (...,) in [0, 1] and bool (...,).

    References:
      I. Arganda-Carreras et al. (2015), "Crowdsourcing the creation of image segmentation
      algorithms for connectomics", Front. Neuroanat. 9:142 (adapted Rand error, SNEMI3D);
      skimage.metrics.adapted_rand_error; SPEC.md "Per-image consistency".
    """
    seg, seg_pert = jnp.asarray(seg), jnp.asarray(seg_pert)
    _check_pair(seg, seg_pert, ("seg", "seg_pert"))
    for name, s in (("seg", seg), ("seg_pert", seg_pert)):
        if not (jnp.issubdtype(s.dtype, jnp.integer) or s.dtype == bool):
            raise ValueError(f"{name} must hold integer instance labels, got dtype {s.dtype}")
    _check_concrete_range("alpha", alpha, 0.0, 1.0)
    _check_mask(mask, seg.shape)
    if max_id is not None and (int(max_id) != max_id or max_id < 0):
        raise ValueError(f"max_id must be a non-negative int or None, got {max_id!r}")
    if max_id is None:
        # Narrow integer dtypes bound the ids statically (e.g. uint16 label files).
        bounds = [np.iinfo(s.dtype).max if s.dtype != bool else 1 for s in (seg, seg_pert)]
        max_id = max(bounds) if max(bounds) < 2**16 else None
    return _rand_score(seg, seg_pert, mask, alpha, max_id=None if max_id is None else int(max_id))


@partial(jax.jit, static_argnames=("max_id",))
def _rand_score(seg, seg_pert, mask, alpha, *, max_id):
    h, w = seg.shape[-2:]
    batch = seg.shape[:-2]
    counted = _counted(mask, seg.shape).reshape((-1, h, w))
    seg = seg.astype(jnp.int32).reshape((-1, h, w))
    seg_pert = seg_pert.astype(jnp.int32).reshape((-1, h, w))
    args = (seg, seg_pert, counted)
    # A lookup table beats sorting when the ids are bounded by a few times the pixel count.
    table_size = max_id + 1 if max_id is not None and max_id <= 4 * h * w + 2**16 else None
    if jax.default_backend() == "cpu" or h * w > 2**16:
        # lax.map keeps the per-image lax.cond in _rand_2d a real branch (vmap would run both):
        # on CPU the joint pairs are then counted in a table, 10x faster than sorting them.
        score, valid = lax.map(lambda x: _rand_2d(*x, alpha, table_size, joint_table=True), args)
    else:
        score, valid = jax.vmap(lambda s, t, c: _rand_2d(s, t, c, alpha, table_size))(*args)
    return score.reshape(batch), valid.reshape(batch)


def _remove_small(labels: Array, min_size) -> Array:
    """Zero the components (h w) of fewer than ``min_size`` pixels; ids must be <= h * w."""
    h, w = labels.shape
    flat = labels.reshape(-1)
    sizes = jax.ops.segment_sum(jnp.ones_like(flat), flat, num_segments=h * w + 1)
    return jnp.where(sizes[flat] >= min_size, flat, 0).reshape(h, w)


def rand_consistency(p: Array, p_pert: Array, *, mask: Array | None = None,
                     threshold: float = 0.5, min_size: int = 0, connectivity: int = 8,
                     alpha: float = 0.5) -> tuple[Array, Array]:
    """CTE-VRand for foreground (e.g. nuclei) models, from probabilities.

    Instances are the connected components of ``(p > threshold) AND mask`` (padding never
    joins components), components of fewer than ``min_size`` pixels are dropped, and the two
    segmentations are compared by ``foreground_rand_score``.

    Args:
      p: float (..., h, w) clean foreground probabilities.
      p_pert: float (..., h, w) perturbed foreground probabilities.
      mask: optional bool, broadcastable to (..., h, w): pixels that count.
      threshold: probabilities strictly above it are foreground.
      min_size: components smaller than this many pixels become background (0 keeps all;
        SPEC's evaluation default is 50). May be traced.
      connectivity: 4 or 8 (default, as skimage.measure.label).
      alpha: weight of the clean segmentation's marginal, see ``foreground_rand_score``.

    Returns:
      ``(score, valid)``: float32 (...,) in [0, 1] and bool (...,).
    """
    p, p_pert = _check_probabilities(p, p_pert, mask)
    _check_concrete_range("min_size", min_size, 0, None)
    _check_concrete_range("alpha", alpha, 0.0, 1.0)
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    return _rand_consistency(p, p_pert, mask, threshold, min_size, alpha,
                             connectivity=connectivity)


@partial(jax.jit, static_argnames=("connectivity",))
def _rand_consistency(p, p_pert, mask, threshold, min_size, alpha, *, connectivity):
    counted = _counted(mask, p.shape)
    h, w = p.shape[-2:]
    # Both predictions in one call: one while loop labels the pair.
    fg = jnp.stack([(p > threshold) & counted, (p_pert > threshold) & counted])
    labels = connected_components(fg, connectivity=connectivity)
    flat = labels.reshape((-1, h, w))
    labels = jax.vmap(lambda s: _remove_small(s, min_size))(flat).reshape(labels.shape)
    # Component ids are 1 + a flat index, so at most h * w: the table ranking applies.
    return _rand_score(labels[0], labels[1], counted, alpha, max_id=h * w)
