"""Tests for cte_jax.instances against scikit-image (label, remove_small_objects, watershed)."""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage import measure, morphology, segmentation
from skimage.metrics import adapted_rand_error

from cte_jax import instances

SHARED = Path(os.environ.get("CTE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
DATA = SHARED / "data"


# -- oracles and helpers --------------------------------------------------------------------------
def _sk_connectivity(connectivity):
    return 1 if connectivity == 4 else 2


def sk_remove_small(labels, min_size):
    """skimage's removal of objects with fewer than ``min_size`` pixels (any skimage version)."""
    if min_size <= 1:
        return labels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "only one label": fine, we pass labels on purpose
        if "max_size" in inspect.signature(morphology.remove_small_objects).parameters:
            return morphology.remove_small_objects(labels, max_size=min_size - 1)
        return morphology.remove_small_objects(labels, min_size=min_size)


def sk_foreground(p, threshold, min_size, connectivity):
    lab = measure.label(p > threshold, connectivity=_sk_connectivity(connectivity))
    return segmentation.relabel_sequential(sk_remove_small(lab, min_size))[0]


def sk_boundary(p, threshold, min_size, connectivity):
    c = _sk_connectivity(connectivity)
    seeds = sk_remove_small(measure.label(p < threshold, connectivity=c), min_size)
    return segmentation.watershed(p, markers=seeds, connectivity=c), seeds


def assert_same_partition(a, b):
    """Same background and a one-to-one correspondence between the ids of a and b."""
    a = np.asarray(a)
    b = np.asarray(b)
    np.testing.assert_array_equal(a == 0, b == 0)
    fg = a != 0
    pairs = np.unique(np.stack([a[fg], b[fg]], 1), axis=0)
    assert len(pairs) == len(np.unique(a[fg])) == len(np.unique(b[fg]))


def smooth_noise(rng, shape, sigma=1.5):
    x = ndimage.gaussian_filter(rng.random(shape), sigma)
    return ((x - x.min()) / (x.max() - x.min() + 1e-12)).astype(np.float32)


def _label_files(task, domain, n):
    files = sorted((DATA / task / domain / "labels").glob("*.png"))[:n]
    if not files:
        pytest.skip(f"real labels not found under {DATA / task / domain}")
    from PIL import Image

    return [np.array(Image.open(f)) for f in files]


# -- foreground_instances ---------------------------------------------------------------------------
@pytest.mark.parametrize("connectivity", [4, 8])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), threshold=st.floats(0.3, 0.7), min_size=st.integers(0, 30))
def test_foreground_matches_skimage_random(connectivity, seed, threshold, min_size):
    rng = np.random.default_rng(seed)
    p = smooth_noise(rng, (40, 48), sigma=float(rng.uniform(0.5, 2.5)))
    # Sequential ids are in raster order of first pixel: exactly skimage's numbering.
    # (Non-sequential ids are checked as a partition on real data below.)
    ours = instances.foreground_instances(p, threshold=threshold, min_size=min_size,
                                          connectivity=connectivity, sequential=True)
    assert ours.dtype == jnp.int32
    np.testing.assert_array_equal(ours, sk_foreground(p, threshold, min_size, connectivity))


def test_foreground_matches_skimage_on_real_nuclei():
    rng = np.random.default_rng(0)
    for gt in _label_files("nuclei", "dsb2018_fluo_256", 3):
        # A probability-like map: smoothed foreground plus noise, so objects touch and split.
        p = ndimage.gaussian_filter((gt > 0).astype(np.float32), 1.5) + 0.15 * rng.standard_normal(gt.shape)
        p = p.astype(np.float32)
        ours = instances.foreground_instances(p)
        ref = sk_foreground(p, 0.5, 50, 8)
        assert_same_partition(ours, ref)
        assert np.unique(ref).size > 1
        # Exact labels in, same objects out (every nucleus in these images has >= 50 pixels?
        # compare with skimage rather than assume).
        exact = instances.foreground_instances((gt > 0).astype(np.float32), min_size=50)
        assert_same_partition(exact, sk_foreground((gt > 0).astype(np.float32), 0.5, 50, 8))


def test_foreground_batch_vmap_jit_and_no_recompile():
    rng = np.random.default_rng(1)
    ps = np.stack([smooth_noise(rng, (40, 48)) for _ in range(4)])
    batched = instances.foreground_instances(ps.reshape(2, 2, 40, 48), min_size=10, sequential=True)
    assert batched.shape == (2, 2, 40, 48)
    for k, p in enumerate(ps):
        np.testing.assert_array_equal(batched.reshape(4, 40, 48)[k], sk_foreground(p, 0.5, 10, 8))
    jv = jax.jit(jax.vmap(lambda p, t: instances.foreground_instances(
        p, threshold=t, min_size=10, sequential=True), in_axes=(0, None)))
    np.testing.assert_array_equal(jv(ps, 0.5), batched.reshape(4, 40, 48))
    # threshold and min_size are traced: new values reuse the compiled function. (min_size 0 is
    # deliberately static, it skips the size count, so it is not among the values tried.) The
    # first call compiles this shape, whatever other tests in this process compiled before.
    instances.foreground_instances(ps[2], threshold=0.5, min_size=10, sequential=True)
    before = instances._foreground_instances._cache_size()
    instances.foreground_instances(ps[0], threshold=0.4, min_size=3, sequential=True)
    instances.foreground_instances(ps[1], threshold=0.6, min_size=7, sequential=True)
    assert instances._foreground_instances._cache_size() == before


def test_foreground_edge_cases_and_errors():
    kw = dict(connectivity=8, sequential=True)  # shape and options compiled above already
    assert not np.any(instances.foreground_instances(np.zeros((40, 48), np.float32), **kw))
    full = instances.foreground_instances(np.ones((40, 48), np.float32), min_size=40 * 48, **kw)
    assert np.all(np.asarray(full) == 1)
    assert not np.any(instances.foreground_instances(np.ones((40, 48), np.float32),
                                                     min_size=40 * 48 + 1, **kw))
    with pytest.raises(ValueError, match="connectivity"):
        instances.foreground_instances(np.zeros((5, 5)), connectivity=6)
    with pytest.raises(ValueError, match="min_size"):
        instances.foreground_instances(np.zeros((5, 5)), min_size=-1)
    with pytest.raises(ValueError, match="shape"):
        instances.foreground_instances(np.zeros(5))


# -- boundary_instances -----------------------------------------------------------------------------
@pytest.mark.parametrize("connectivity", [4, 8])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), threshold=st.floats(0.2, 0.6), min_size=st.integers(0, 6),
       sigma=st.sampled_from([0.0, 1.0, 2.0]))
def test_boundary_equals_skimage_watershed_without_ties(connectivity, seed, threshold, min_size, sigma):
    # Distinct altitudes (continuous random values): minimax flooding and skimage's
    # priority-queue watershed define the same partition, so they must agree exactly.
    rng = np.random.default_rng(seed)
    p = rng.random((36, 40)) if sigma == 0 else smooth_noise(rng, (36, 40), sigma).astype(np.float64)
    p = (p + 1e-9 * rng.random(p.shape)).astype(np.float32)
    if np.unique(p).size != p.size:
        p = np.argsort(np.argsort(p.ravel())).reshape(p.shape).astype(np.float32) / p.size
    ours = instances.boundary_instances(p, threshold=threshold, min_size=min_size,
                                        connectivity=connectivity)
    ref, seeds = sk_boundary(p, threshold, min_size, connectivity)
    if not np.any(seeds):
        assert not np.any(ours)
        return
    assert_same_partition(ours, ref)


def _membrane_maps(domain, n, size=192):
    maps = []
    for i, lab in enumerate(_label_files("membranes_em", domain, n)):
        membrane = (lab[:size, :size] == 1).astype(np.float32)
        # Smoothed labels as a probability-like boundary map; rounding creates plateaus.
        p = ndimage.gaussian_filter(membrane, 1.0 + i % 2)
        maps.append(np.round(p / p.max(), 3).astype(np.float32))
    return maps


@pytest.mark.parametrize("domain", ["isbi2012", "vnc_sstem"])
def test_boundary_agrees_with_skimage_on_real_membranes(domain):
    for p in _membrane_maps(domain, 2):
        ours = np.asarray(instances.boundary_instances(p))
        ref, seeds = sk_boundary(p, 0.5, 0, 4)
        assert np.unique(seeds).size > 5
        # The seeded regions are kept exactly: one id per seed, no seed split or merged.
        assert_same_partition(np.where(seeds > 0, ours, 0), seeds)
        # Every pixel is reached, and the partition matches the watershed up to tie-breaks.
        assert np.all(ours > 0)
        are = adapted_rand_error(ref, ours, ignore_labels=())[0]
        assert are < 0.01, are
        assert np.mean(ours[seeds == 0] == 0) == 0


def test_boundary_largest_to_background_and_min_size():
    p = _membrane_maps("isbi2012", 1)[0]
    ref, _ = sk_boundary(p, 0.5, 0, 4)
    ids, sizes = np.unique(ref, return_counts=True)
    out = np.asarray(instances.boundary_instances(p, largest_to_background=True))
    largest_ref = ref == ids[np.argmax(sizes)]
    # The removed segment is (up to tie-break pixels at its boundary) skimage's largest.
    assert np.mean((out == 0) == largest_ref) > 0.99
    assert np.unique(out).size == np.unique(ref).size  # one id (the largest) became 0
    small = np.asarray(instances.boundary_instances(p, min_size=200))
    ref_small, seeds_small = sk_boundary(p, 0.5, 200, 4)
    assert np.unique(small).size == np.unique(seeds_small[seeds_small > 0]).size
    assert adapted_rand_error(ref_small, small, ignore_labels=())[0] < 0.01


def _row(values, width=6):
    """A 1-row case embedded in a (3, width) map padded with altitude 1.0 (one compiled shape).

    Paths through the padding have level 1.0, above every value of the row, so they never
    change the row's result; ids are sequential and row 0 comes first in raster order.
    """
    p = np.ones((3, width), np.float32)
    p[0, :len(values)] = values
    return p


def _grow(p, **kw):
    return np.asarray(instances.boundary_instances(p, sequential=True, **kw))


def test_boundary_growth_rule_small_cases():
    # Two basins separated by a ridge: the ridge pixel at 0.9 is reached from both sides at
    # level 0.9, and the tie goes to the neighbour flooded first (lower level: left, 0.1).
    np.testing.assert_array_equal(_grow(_row([0.1, 0.9, 0.3, 0.95, 0.95, 0.95]))[0, :3], [1, 1, 2])
    # A wide plateau of 0.8 between seeds is split by distance to each seed (FIFO-like).
    np.testing.assert_array_equal(_grow(_row([0.1, 0.8, 0.8, 0.8, 0.8, 0.2]))[0], [1, 1, 1, 2, 2, 2])
    # A lower pass wins over a shorter but higher path: (0, 2) joins the seed at (0, 3)
    # through nothing higher than 0.6, not the seed at (0, 0) across 0.95.
    p = np.ones((3, 6), np.float32)
    p[:, :4] = [[0.1, 0.95, 0.6, 0.2],
                [0.7, 0.95, 0.95, 0.95],
                [0.9, 0.95, 0.95, 0.95]]
    out = _grow(p)
    assert out[0, 2] == out[0, 3] != out[0, 0] and out[1, 0] == out[0, 0]
    # No seed: nothing to grow. max_iters=0: the seeds only.
    assert not np.any(_grow(np.ones((3, 6), np.float32)))
    np.testing.assert_array_equal(_grow(_row([0.1, 0.9, 0.9, 0.3, 0.9, 0.9]), max_iters=0)[0],
                                  [1, 0, 0, 2, 0, 0])


def test_boundary_batch_and_jit():
    rng = np.random.default_rng(2)
    ps = np.stack([smooth_noise(rng, (36, 40)) for _ in range(4)])
    out = instances.boundary_instances(ps.reshape(2, 2, 36, 40), threshold=0.4)
    assert out.shape == (2, 2, 36, 40) and out.dtype == jnp.int32
    for k in range(4):
        ref, _ = sk_boundary(ps[k], 0.4, 0, 4)
        assert_same_partition(out.reshape(4, 36, 40)[k], ref)
    jt = jax.jit(jax.vmap(lambda q: instances.boundary_instances(q, threshold=0.4)))
    np.testing.assert_array_equal(jt(ps), out.reshape(4, 36, 40))
    with pytest.raises(ValueError, match="max_iters"):
        instances.boundary_instances(ps[0], max_iters=-1)
