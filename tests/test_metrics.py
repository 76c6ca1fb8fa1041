"""Tests of cte_jax.metrics against independent NumPy / SciPy / scikit-image computations."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from scipy.spatial.distance import hamming

from cte_jax.metrics import (
    effective_invariance,
    ei_statistics,
    foreground_rand_score,
    nhd_statistics,
    normalized_hamming_consistency,
    rand_consistency,
)

skm = pytest.importorskip("skimage.measure")
skmetrics = pytest.importorskip("skimage.metrics")

SHARED = Path(os.environ.get("CTE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
NUCLEI_256 = SHARED / "data" / "nuclei" / "dsb2018_fluo_256" / "labels"

CROSS = ndi.generate_binary_structure(2, 1)
SHAPES = [(1, 7), (6, 1), (7, 9), (12, 12)]


# -- oracles ------------------------------------------------------------------------------------
def union_of(p, q, mask, threshold=0.5):
    u = (p > threshold) | (q > threshold)
    return u if mask is None else u & mask


def nhd_oracle(p, q, mask=None, threshold=0.5):
    u = union_of(p, q, mask, threshold)
    if not u.any():
        return None
    return 1.0 - hamming(p[u] > threshold, q[u] > threshold)


def ei_oracle(p, q, mask=None, threshold=0.5):
    # The paper's eq. 4 over the union: sqrt(p p') where the hard labels agree, else 0.
    u = union_of(p, q, mask, threshold)
    if not u.any():
        return None
    agree = (p[u] > threshold) == (q[u] > threshold)
    return float(np.mean(np.where(agree, np.sqrt(p[u].astype(np.float64) * q[u]), 0.0)))


def band_oracle(seg, mask=None):
    if mask is None:  # SPEC's definition with scipy's default border handling
        return ndi.grey_dilation(seg, footprint=CROSS) != ndi.grey_erosion(seg, footprint=CROSS)

    # Uncounted neighbours are NaN and ignored; 'reflect' mirrors a border pixel onto itself.
    def differs(values):
        values = values[~np.isnan(values)]
        return float(values.size > 0 and values.max() != values.min())

    values = np.where(mask, seg, np.nan).astype(np.float64)
    return ndi.generic_filter(values, differs, footprint=CROSS, mode="reflect") > 0


def vrand_oracle(seg, seg_pert, mask=None, alpha=0.5):
    counted = np.ones(seg.shape, bool) if mask is None else mask
    m = ((seg > 0) | (seg_pert > 0)) & counted & ~band_oracle(seg, mask)
    if not (seg[counted] > 0).any() or not m.any():
        return None
    a, b = seg[m].astype(np.int64), seg_pert[m].astype(np.int64)
    # Unique singleton ids for background pixels, then compact ids for the sparse table.
    fresh = max(a.max(), b.max(), 0) + 1 + np.arange(a.size)
    a = np.unique(np.where(a > 0, a, fresh), return_inverse=True)[1]
    b = np.unique(np.where(b > 0, b, fresh), return_inverse=True)[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        err = skmetrics.adapted_rand_error(a, b, ignore_labels=(), alpha=alpha)[0]
    return None if not np.isfinite(err) else 1.0 - float(err)


def instances_oracle(p, mask, threshold, min_size, connectivity):
    fg = p > threshold if mask is None else (p > threshold) & mask
    lab = skm.label(fg, connectivity={4: 1, 8: 2}[connectivity])
    sizes = np.bincount(lab.ravel())
    return np.where((lab > 0) & (sizes[lab] >= min_size), lab, 0)


def check(result, expected, atol=1e-6):
    score, valid = (np.asarray(x) for x in result)
    if expected is None:
        assert not valid and score == 0.0
    else:
        assert valid
        np.testing.assert_allclose(score, expected, atol=atol)


# -- strategies ---------------------------------------------------------------------------------
@st.composite
def probability_pairs(draw):
    shape = draw(st.sampled_from(SHAPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    fg = draw(st.sampled_from([0.0, 0.2, 0.5, 0.9]))
    flip = draw(st.sampled_from([0.0, 0.1, 0.5]))
    y = rng.random(shape) < fg
    y_pert = y ^ (rng.random(shape) < flip)
    # Probabilities on the right side of 0.5 for the drawn hard labels, some exactly at 0.5.
    p = np.where(y, rng.uniform(0.5001, 1, shape), rng.uniform(0, 0.5, shape)).astype(np.float32)
    q = np.where(y_pert, rng.uniform(0.5001, 1, shape), rng.uniform(0, 0.5, shape)).astype(np.float32)
    p[rng.random(shape) < 0.05] = 0.5
    mask = rng.random(shape) < draw(st.sampled_from([1.0, 0.7]))
    return p, q, mask


@st.composite
def label_pairs(draw):
    shape = draw(st.sampled_from(SHAPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    k = draw(st.integers(1, 5))
    # Blocky labels so that objects are bigger than their band.
    cell = draw(st.sampled_from([1, 2, 3]))
    coarse = [-(-s // cell) for s in shape]
    seg = np.kron(rng.integers(0, k + 1, coarse), np.ones((cell, cell), int))[: shape[0], : shape[1]]
    pert = seg.copy()
    change = rng.random(shape) < draw(st.sampled_from([0.0, 0.2, 0.6]))
    pert[change] = rng.integers(0, k + 1, int(change.sum()))
    mask = rng.random(shape) < draw(st.sampled_from([1.0, 0.8]))
    return seg.astype(np.int32), pert.astype(np.int32), mask


# -- CTE-NHD and CTE-EI -------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(data=probability_pairs())
def test_nhd_and_ei_match_oracles(data):
    p, q, mask = data
    check(normalized_hamming_consistency(p, q, mask=mask), nhd_oracle(p, q, mask))
    check(effective_invariance(p, q, mask=mask), ei_oracle(p, q, mask), atol=1e-5)
    for fn in (normalized_hamming_consistency, effective_invariance):
        score, valid = fn(p, q, mask=mask)
        assert 0.0 <= float(score) <= 1.0 and score.dtype == jnp.float32 and valid.dtype == bool


def test_nhd_and_ei_by_hand():
    p = np.array([[0.9, 0.8, 0.2, 0.1, 0.6]], np.float32)
    q = np.array([[0.4, 0.7, 0.6, 0.3, 0.6]], np.float32)
    # y = 1 1 0 0 1, y' = 0 1 1 0 1: union 4 pixels, 2 flips.
    check(normalized_hamming_consistency(p, q), 1 - 2 / 4)
    check(effective_invariance(p, q), (np.sqrt(0.8 * 0.7) + np.sqrt(0.6 * 0.6)) / 4, atol=1e-6)
    d, u = nhd_statistics(p, q)
    assert (int(d), int(u)) == (2, 4)
    s, u = ei_statistics(p, q)
    np.testing.assert_allclose(float(s), np.sqrt(0.56) + 0.6, rtol=1e-6)
    # The threshold is strict: at 0.6, y = 1 1 0 0 0 and y' = 0 1 0 0 0 (0.6 is background).
    check(normalized_hamming_consistency(p, q, threshold=0.6), 1 - 1 / 2)
    # The mask drops the last column (an agreeing pixel).
    mask = np.array([[1, 1, 1, 1, 0]], bool)
    check(normalized_hamming_consistency(p, q, mask=mask), 1 - 2 / 3)


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.75])
def test_threshold_keyword_against_oracles(threshold):
    # Inside U, agreement means both foreground, so the general confidence form of EI (1 - p
    # for background) never differs from the paper's sqrt(p p'): the oracle uses the latter.
    rng = np.random.default_rng(int(threshold * 100))
    p, q = rng.random((2, 7, 9)).astype(np.float32)
    check(normalized_hamming_consistency(p, q, threshold=threshold), nhd_oracle(p, q, None, threshold))
    check(effective_invariance(p, q, threshold=threshold), ei_oracle(p, q, None, threshold), atol=1e-6)


def test_statistics_sum_over_tiles():
    rng = np.random.default_rng(1)
    p, q = (rng.random((2, 16, 24)) ** 2).astype(np.float32)
    tiles = lambda x: x.reshape(2, 8, 3, 8).transpose(0, 2, 1, 3)  # noqa: E731  (6 tiles of 8x8)
    for stats, score in ((nhd_statistics, normalized_hamming_consistency),
                         (ei_statistics, effective_invariance)):
        num, den = stats(tiles(p), tiles(q))
        assert num.shape == den.shape == (2, 3)
        whole_num, whole_den = stats(p, q)
        np.testing.assert_allclose(np.sum(num), whole_num, rtol=1e-5)
        assert int(np.sum(den)) == int(whole_den)
    d, u = nhd_statistics(tiles(p), tiles(q))
    check(normalized_hamming_consistency(p, q), 1 - np.sum(d) / np.sum(u))


# -- CTE-VRand ----------------------------------------------------------------------------------
def test_vrand_by_hand():
    # Two 3x3 objects side by side; the perturbed output merges them. The band is the two
    # touching columns, so M = columns 0, 1 (object 1) and 4, 5 (object 2): 6 + 6 pixels.
    seg = np.array([[1, 1, 1, 2, 2, 2]] * 3, np.int32)
    merged = np.full_like(seg, 7)
    pairs_ab, pairs_a, pairs_b = 2 * 6 * 5, 2 * 6 * 5, 12 * 11
    check(foreground_rand_score(seg, merged), pairs_ab / (0.5 * pairs_a + 0.5 * pairs_b))
    check(foreground_rand_score(seg, merged, alpha=1.0), 1.0)
    check(foreground_rand_score(seg, merged, alpha=0.0), pairs_ab / pairs_b)
    assert vrand_oracle(seg, merged) == pytest.approx(60 / 96)
    # Background of the perturbed output inside M: singletons. Drop object 2 from it: M keeps
    # object 2's 6 pixels as singletons of seg_pert; pairs of seg_pert are only object 1's.
    dropped = np.where(seg == 1, 5, 0).astype(np.int32)
    check(foreground_rand_score(seg, dropped), 30 / (0.5 * 60 + 0.5 * 30))


def test_vrand_max_id_bound():
    seg = np.zeros((6, 8), np.int32)
    seg[:3, :3], seg[3:, 4:] = 40, 7
    pert = np.where(seg > 0, 40, 0).astype(np.int32)
    expected = vrand_oracle(seg, pert)
    check(foreground_rand_score(seg, pert), expected)  # sorting
    check(foreground_rand_score(seg, pert, max_id=40), expected)  # lookup table
    above = np.where(seg == 7, 41, seg).astype(np.int32)
    check(foreground_rand_score(above, pert, max_id=40), None)  # an id above the promise
    # 8- and 16-bit labels are bounded by their dtype: the table ranking is automatic.
    check(foreground_rand_score(seg.astype(np.uint8), pert.astype(np.uint8)), expected)
    with pytest.raises(ValueError, match="max_id"):
        foreground_rand_score(seg, pert, max_id=-1)


@pytest.mark.parametrize("cell", [4, 9])
def test_vrand_dense_and_sparse_components_match_skimage(cell):
    # Blocks of 3x3 on a grid of cell x cell: with cell 4 there are so many components that
    # K_a K_b > h w and the joint pairs must be sorted; with cell 9 they fit the counting table.
    h = w = 36
    seg = np.zeros((h, w), np.int32)
    pert = np.zeros((h, w), np.int32)
    k = 0
    for i in range(0, h - 3, cell):
        for j in range(0, w - 3, cell):
            k += 1
            seg[i:i + 3, j:j + 3] = k
            pert[i + 1:i + 4, j:j + 3] = 1 + (k * 7) % 50  # shifted, ids merged in groups
    n_a, n_b = len(np.unique(seg)) - 1, len(np.unique(pert)) - 1
    assert (n_a * n_b > h * w) == (cell == 4)
    expected = vrand_oracle(seg, pert)
    assert expected is not None and 0 < expected < 1
    check(foreground_rand_score(seg, pert), expected)
    check(foreground_rand_score(seg, pert, max_id=h * w), expected)


def test_vrand_invalid_cases():
    empty = np.zeros((4, 4), np.int32)
    some = np.pad(np.ones((2, 2), np.int32), 1)
    check(foreground_rand_score(empty, some), None)  # seg empty
    checker = np.array([[1, 2], [2, 1]], np.int32)
    check(foreground_rand_score(checker, checker), None)  # everything is band: M empty
    one = np.ones((1, 1), np.int32)
    check(foreground_rand_score(one, one), None)  # a single pixel in M: no pairs at all
    assert vrand_oracle(empty, some) is None and vrand_oracle(checker, checker) is None
    assert vrand_oracle(one, one) is None
    # seg's foreground outside the mask does not count.
    check(foreground_rand_score(some, some, mask=some == 0), None)


@settings(max_examples=25, deadline=None)
@given(data=label_pairs())
def test_vrand_matches_skimage_with_mask(data):
    seg, pert, mask = data
    check(foreground_rand_score(seg, pert, mask=mask), vrand_oracle(seg, pert, mask))


@settings(max_examples=20, deadline=None)
@given(data=label_pairs(), alpha=st.sampled_from([0.0, 0.5, 1.0]))
def test_vrand_matches_skimage_full_mask(data, alpha):
    # An all-True mask against SPEC's band (scipy grey dilation/erosion, default borders).
    seg, pert, _ = data
    got = foreground_rand_score(seg, pert, mask=np.ones(seg.shape, bool), alpha=alpha)
    check(got, vrand_oracle(seg, pert, alpha=alpha))


@settings(max_examples=25, deadline=None)
@given(data=label_pairs(), seed=st.integers(0, 2**31 - 1))
def test_vrand_invariant_to_label_permutation_and_bounded(data, seed):
    seg, pert, mask = data
    rng = np.random.default_rng(seed)
    ids = np.concatenate([[0], rng.permutation(np.arange(1, 6)) * 1000 + 7])
    score, valid = foreground_rand_score(seg, pert, mask=mask)
    score2, valid2 = foreground_rand_score(ids[seg].astype(np.int32), ids[pert].astype(np.int32), mask=mask)
    assert bool(valid) == bool(valid2)
    np.testing.assert_allclose(score, score2, atol=1e-6)
    assert 0.0 <= float(score) <= 1.0


def smooth_probabilities(rng, shape, n=2):
    x = ndi.gaussian_filter(rng.standard_normal((n,) + shape), sigma=(0, 1.5, 1.5))
    return (1 / (1 + np.exp(-4 * x / x.std()))).astype(np.float32)


# One batch shape (B, 16, 16) with a mask for most batched tests, so compilations are shared.
B, H, W = 5, 16, 16
PAD = (slice(0, 11), slice(0, 13))  # image 0: a padded 11x13 image


def shared_batch(seed=7):
    rng = np.random.default_rng(seed)
    p = smooth_probabilities(rng, (H, W), n=B)
    q = np.clip(p + rng.normal(0, 0.15, p.shape), 0, 1).astype(np.float32)
    mask = rng.random(p.shape) < 0.9
    mask[0] = False
    mask[0][PAD] = True
    mask[1] = True
    # Anything may sit in the padding: it must not matter.
    p[0][~mask[0]], q[0][~mask[0]] = rng.random((2, int((~mask[0]).sum())))
    return p, q, mask


def batch_oracles(p, q, mask, min_size=0, connectivity=8):
    """Per-image oracle scores; image 0 is compared on its crop, without a mask."""
    out = {name: [] for name in ("nhd", "ei", "vrand")}
    for i in range(len(p)):
        pi, qi, mi = (p[i][PAD], q[i][PAD], None) if i == 0 else (p[i], q[i], mask[i])
        out["nhd"].append(nhd_oracle(pi, qi, mi))
        out["ei"].append(ei_oracle(pi, qi, mi))
        s = instances_oracle(pi, mi, 0.5, min_size, connectivity)
        t = instances_oracle(qi, mi, 0.5, min_size, connectivity)
        out["vrand"].append(vrand_oracle(s, t, mi))
    return out


def check_batch(result, expected, atol=1e-5):
    score, valid = result
    assert score.shape == valid.shape == (len(expected),)
    assert score.dtype == jnp.float32 and valid.dtype == bool
    for i, e in enumerate(expected):
        check((score[i], valid[i]), e, atol=atol)


def test_batch_with_padding_and_random_masks():
    p, q, mask = shared_batch()
    expected = batch_oracles(p, q, mask)
    check_batch(normalized_hamming_consistency(p, q, mask=mask), expected["nhd"])
    check_batch(effective_invariance(p, q, mask=mask), expected["ei"])
    check_batch(rand_consistency(p, q, mask=mask), expected["vrand"])
    # foreground_rand_score on skimage instances; garbage ids in the padding of image 0.
    seg = np.stack([instances_oracle(x, m, 0.5, 0, 8) for x, m in zip(p, mask)]).astype(np.int32)
    pert = np.stack([instances_oracle(x, m, 0.5, 0, 8) for x, m in zip(q, mask)]).astype(np.int32)
    seg[0][~mask[0]] = 99
    check_batch(foreground_rand_score(seg, pert, mask=mask), expected["vrand"])


def test_jit_and_vmap_over_batch():
    p, q, mask = shared_batch(seed=8)
    expected = batch_oracles(p, q, mask)
    for fn, key in ((normalized_hamming_consistency, "nhd"), (effective_invariance, "ei"),
                    (rand_consistency, "vrand")):
        mapped = jax.jit(jax.vmap(lambda a, b, m: fn(a, b, mask=m)))(p, q, mask)  # noqa: B023
        check_batch(mapped, expected[key])
    # A mask of shape (h, w) broadcasts over the batch.
    full = np.broadcast_to(mask[2], p.shape)
    np.testing.assert_allclose(normalized_hamming_consistency(p, q, mask=mask[2])[0],
                               normalized_hamming_consistency(p, q, mask=full)[0])
    # Half precision in, float32 out (sums over many pixels would drift in float16).
    half = effective_invariance(p.astype(np.float16), q.astype(np.float16), mask=mask)[0]
    assert half.dtype == jnp.float32


@pytest.mark.parametrize("connectivity,min_size", [(4, 0), (8, 5)])
def test_rand_consistency_options_match_skimage(connectivity, min_size):
    p, q, mask = shared_batch(seed=connectivity + min_size)
    q = np.where(np.random.default_rng(0).random(q.shape) < 0.1, 1 - q, q).astype(np.float32)
    expected = batch_oracles(p, q, mask, min_size=min_size, connectivity=connectivity)
    check_batch(rand_consistency(p, q, mask=mask, min_size=min_size, connectivity=connectivity),
                expected["vrand"])


def test_identical_and_empty_inputs():
    p, _, mask = shared_batch(seed=9)
    ones = np.ones_like(mask)
    check_batch(normalized_hamming_consistency(p, p, mask=ones), [1.0] * B)
    binary = (p > 0.5).astype(np.float32)
    check_batch(effective_invariance(binary, binary, mask=ones), [1.0] * B)
    check_batch(rand_consistency(p, p, mask=mask), [1.0] * B)
    seg = np.stack([skm.label(x > 0.3) for x in p]).astype(np.int32)
    check_batch(foreground_rand_score(seg, seg, mask=ones), [1.0] * B)
    zeros = np.zeros_like(p)
    for fn in (normalized_hamming_consistency, effective_invariance, rand_consistency):
        check_batch(fn(zeros, zeros, mask=ones), [None] * B)
        # All pixels masked out: empty union too.
        check_batch(fn(p, p, mask=np.zeros_like(mask)), [None] * B)


def test_joint_pair_count_paths_agree():
    # Images above 2**16 pixels fall back to a two-key sort when packed keys could overflow;
    # both paths must count sum_ij n_ij (n_ij - 1) over pairs of positive ranks.
    from cte_jax.metrics import _joint_pairs_packed, _joint_pairs_two_keys

    rng = np.random.default_rng(11)
    ra, rb = rng.integers(0, 6, (2, 500)).astype(np.int32)
    both = (ra > 0) & (rb > 0)
    _, counts = np.unique(np.stack([ra[both], rb[both]]), axis=1, return_counts=True)
    expected = float(np.sum(counts * (counts - 1)))
    assert float(_joint_pairs_packed(ra, rb, jnp.int32(rb.max()))) == expected
    assert float(_joint_pairs_two_keys(ra, rb)) == expected


def test_large_counts_do_not_overflow():
    # 300x300 with two halves vs one object: pair counts ~ 8e9, beyond int32.
    seg = np.ones((300, 300), np.int32)
    seg[:, 150:] = 2
    merged = np.ones_like(seg)
    check(foreground_rand_score(seg, merged), vrand_oracle(seg, merged), atol=1e-6)
    check(foreground_rand_score(merged, merged), 1.0)


def test_bad_arguments_raise():
    p = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="same shape"):
        normalized_hamming_consistency(p, np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="broadcast"):
        effective_invariance(p, p, mask=np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="alpha"):
        foreground_rand_score(p.astype(np.int32), p.astype(np.int32), alpha=1.5)
    with pytest.raises(ValueError, match="integer"):
        foreground_rand_score(p, p)
    with pytest.raises(ValueError, match="min_size"):
        rand_consistency(p, p, min_size=-1)


# -- real nuclei labels -------------------------------------------------------------------------
def real_labels(count=3):
    files = sorted(NUCLEI_256.glob("*.png"))[:count] if NUCLEI_256.is_dir() else []
    if not files:
        pytest.skip(f"no real data at {NUCLEI_256}")
    from PIL import Image

    return [np.asarray(Image.open(f)).astype(np.int32) for f in files]


def test_real_labels_against_skimage():
    for lab in real_labels():
        assert lab.shape == (256, 256)
        ids = np.unique(lab[lab > 0])
        removed = np.where(lab == ids[len(ids) // 2], 0, lab)
        merged = np.where(lab == ids[1], ids[0], lab)
        shifted = np.roll(lab, 2, axis=1)
        shifted[:, :2] = 0
        relabelled = skm.label(lab > 0).astype(np.int32)  # touching nuclei merge
        perm = np.concatenate([[0], np.random.default_rng(0).permutation(lab.max()) + 1])[lab]
        others = np.stack([lab, removed, merged, shifted, relabelled, perm.astype(np.int32)])
        score, valid = foreground_rand_score(np.broadcast_to(lab, others.shape), others)
        score_rev, valid_rev = foreground_rand_score(others, np.broadcast_to(lab, others.shape))
        for i, other in enumerate(others):
            check((score[i], valid[i]), vrand_oracle(lab, other))
            check((score_rev[i], valid_rev[i]), vrand_oracle(other, lab))
        assert score[0] == score[5] == 1.0
        assert np.all(np.asarray(score[1:4]) < 1.0) and np.all(valid)
        # Hard consistency of the shifted foreground vs scipy's Hamming distance.
        fg, fg_shift = (lab > 0).astype(np.float32), (shifted > 0).astype(np.float32)
        check(normalized_hamming_consistency(fg, fg_shift), nhd_oracle(fg, fg_shift))
