"""Tests of cte_jax.labeling against scikit-image (independent oracle)."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from cte_jax.labeling import connected_components, relabel_sequential

skm = pytest.importorskip("skimage.measure")
skseg = pytest.importorskip("skimage.segmentation")

SHARED = Path(os.environ.get("CTE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
NUCLEI = SHARED / "data" / "nuclei"

# A few fixed shapes keep compilation cheap while covering odd sizes, 1xN and Nx1.
SHAPES = [(1, 9), (7, 1), (9, 13), (16, 16)]
SK_CONNECTIVITY = {4: 1, 8: 2}


def skimage_ids(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """The documented ids (1 + smallest flat index per component), built from skimage's labels."""
    sk = skm.label(mask, connectivity=SK_CONNECTIVITY[connectivity])
    first = np.full(sk.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, sk.ravel(), np.arange(sk.size))
    return np.where(sk > 0, first[sk] + 1, 0)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when the two label images have the same background and a bijection between ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]], axis=1), axis=0)
    return len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))


@st.composite
def masks(draw):
    shape = draw(st.sampled_from(SHAPES))
    density = draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.6, 0.8, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return np.random.default_rng(seed).random(shape) < density


@pytest.mark.parametrize("connectivity", [4, 8])
@settings(max_examples=25, deadline=None)
@given(mask=masks())
def test_random_masks_match_skimage(mask, connectivity):
    ours = np.asarray(connected_components(mask, connectivity=connectivity))
    sk = skm.label(mask, connectivity=SK_CONNECTIVITY[connectivity])
    assert ours.dtype == np.int32 and ours.shape == mask.shape
    assert same_partition(ours, sk)
    np.testing.assert_array_equal(ours, skimage_ids(mask, connectivity))


def test_single_pixel_images():
    for value in (False, True):
        out = connected_components(np.full((1, 1), value), connectivity=4)
        np.testing.assert_array_equal(np.asarray(out), [[int(value)]])


def test_diagonal_neighbours_depend_on_connectivity():
    mask = np.eye(5, dtype=bool) | np.eye(5, dtype=bool)[::-1]
    assert len(np.unique(connected_components(mask, connectivity=8))) - 1 == 1
    assert len(np.unique(connected_components(mask, connectivity=4))) - 1 == 9


@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (5, 3)])
def test_every_small_mask_matches_scipy(shape):
    """Every mask of the shape: each way two 2x2 blocks can touch (8-connectivity labels blocks),
    and odd sizes, whose last block row or column is half outside the image. The oracle is
    scipy.ndimage.label on the stack, with a structuring element that never joins two masks."""
    h, w = shape
    codes = np.arange(2 ** (h * w), dtype=np.int64)
    masks = ((codes[:, None] >> np.arange(h * w)) & 1).astype(bool).reshape(-1, h, w)
    for connectivity in (4, 8):
        structure = np.zeros((3, 3, 3), bool)
        structure[1] = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
        sp, _ = ndimage.label(masks, structure=structure)
        flat = sp.reshape(len(masks), -1)
        first = np.full(sp.max() + 1, h * w)
        np.minimum.at(first, flat, np.broadcast_to(np.arange(h * w), flat.shape))
        want = np.where(flat > 0, first[flat] + 1, 0).reshape(masks.shape)
        ours = np.asarray(connected_components(masks, connectivity=connectivity))
        bad = np.flatnonzero((ours != want).any(axis=(1, 2)))
        assert bad.size == 0, f"connectivity {connectivity}: first wrong mask\n{masks[bad[0]].astype(int)}"


def snake(h: int, w: int) -> np.ndarray:
    """Boustrophedon path: rows joined alternately at the right and left ends."""
    m = np.zeros((h, w), bool)
    m[::2] = True
    for r in range(1, h, 2):
        m[r, w - 1 if (r // 2) % 2 == 0 else 0] = True
    return m


def spiral(n: int) -> np.ndarray:
    """A one-pixel-wide square spiral (diameter ~ n^2 / 2), walls two pixels apart."""
    m = np.zeros((n, n), bool)
    r, c, dr, dc = 0, 0, 0, 1
    lo_r, hi_r, lo_c, hi_c = 0, n - 1, 0, n - 1
    while lo_r <= hi_r and lo_c <= hi_c:
        m[r, c] = True
        nr, nc = r + dr, c + dc
        if not (lo_r <= nr <= hi_r and lo_c <= nc <= hi_c):
            if dc == 1:
                lo_r += 2
            elif dr == 1:
                hi_c -= 2
            elif dc == -1:
                hi_r -= 2
            else:
                lo_c += 2
            dr, dc = dc, -dr
            nr, nc = r + dr, c + dc
            if not (lo_r - 2 <= nr <= hi_r + 2 and lo_c - 2 <= nc <= hi_c + 2):
                break
        r, c = nr, nc
    return m


@pytest.mark.parametrize("shape_fn", [
    lambda: snake(63, 40), lambda: snake(40, 63).T, lambda: spiral(41),
    lambda: np.pad(spiral(30), 3) | np.pad(snake(12, 36), ((0, 24), (0, 0))),
])
@pytest.mark.parametrize("connectivity", [4, 8])
def test_long_diameter_shapes(shape_fn, connectivity):
    mask = shape_fn()
    ours = np.asarray(connected_components(mask, connectivity=connectivity))
    np.testing.assert_array_equal(ours, skimage_ids(mask, connectivity))


def test_spiral_is_one_long_component():
    mask = spiral(41)
    assert skm.label(mask, connectivity=1).max() == 1
    assert mask.sum() > 800  # long diameter: min-propagation alone would need ~800 rounds
    assert len(np.unique(connected_components(mask, connectivity=4))) == 2


def real_label_files(limit_per_domain: int = 1):
    if not NUCLEI.is_dir():
        return []
    files = []
    for domain in sorted(NUCLEI.iterdir()):
        files += sorted((domain / "labels").glob("*.png"))[:limit_per_domain]
    return files


@pytest.mark.parametrize("connectivity", [4, 8])
def test_real_nuclei_masks(connectivity):
    files = real_label_files()
    if not files:
        pytest.skip(f"no real data at {NUCLEI}")
    from PIL import Image

    # One 256x256 crop per domain, labelled as one batch (one compilation).
    crops = []
    for path in files:
        crop = np.asarray(Image.open(path))[:256, :256] > 0
        crops.append(np.pad(crop, [(0, 256 - crop.shape[0]), (0, 256 - crop.shape[1])]))
    ours = np.asarray(connected_components(np.stack(crops), connectivity=connectivity))
    for path, mask, out in zip(files, crops, ours):
        np.testing.assert_array_equal(out, skimage_ids(mask, connectivity), err_msg=str(path))


def test_jit_and_vmap_over_batch():
    rng = np.random.default_rng(0)
    batch = np.stack([rng.random((12, 17)) < d for d in (0.2, 0.45, 0.6, 0.9)] + [snake(12, 17)])
    f = jax.jit(jax.vmap(lambda m: connected_components(m, connectivity=8)))
    out = np.asarray(f(jnp.asarray(batch)))
    for m, o in zip(batch, out):
        np.testing.assert_array_equal(o, skimage_ids(m, 8))
    # Leading axes are a batch too, and jit of the batched call gives the same result.
    nested = jax.jit(connected_components, static_argnames="connectivity")(
        jnp.asarray(batch[:4].reshape(2, 2, 12, 17)), connectivity=8)
    np.testing.assert_array_equal(np.asarray(nested).reshape(4, 12, 17), out[:4])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="connectivity"):
        connected_components(np.ones((3, 3), bool), connectivity=6)
    with pytest.raises(ValueError, match="shape"):
        connected_components(np.ones(5, bool))
    with pytest.raises(ValueError, match="integer"):
        relabel_sequential(np.ones((3, 3), np.float32))


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1),
       high=st.sampled_from([1, 3, 50, 2**31 - 1]))
def test_relabel_sequential_matches_skimage(shape, seed, high):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, high, shape, endpoint=True).astype(np.int32)
    labels[rng.random(shape) < 0.3] = 0
    ours, count = relabel_sequential(labels)
    expected = skseg.relabel_sequential(labels)[0]
    np.testing.assert_array_equal(np.asarray(ours), expected)
    assert int(count) == len(np.unique(labels[labels > 0]))


def test_relabel_sequential_of_components_is_skimage_label():
    mask = np.pad(spiral(21), 2) | (np.random.default_rng(3).random((25, 25)) < 0.2)
    ours, count = relabel_sequential(connected_components(mask))
    sk = skm.label(mask, connectivity=2)
    np.testing.assert_array_equal(np.asarray(ours), sk)
    assert int(count) == sk.max()


def test_relabel_sequential_max_labels_and_batch():
    labels = np.array([[[0, 9, 9, 4], [7, 7, 0, 4]], [[5, 0, 0, 0], [0, 0, 0, 0]]], np.int32)
    f = jax.jit(relabel_sequential, static_argnames="max_labels")
    out, count = f(labels, max_labels=2)
    np.testing.assert_array_equal(
        np.asarray(out), [[[0, 0, 0, 1], [2, 2, 0, 1]], [[1, 0, 0, 0], [0, 0, 0, 0]]])
    np.testing.assert_array_equal(np.asarray(count), [3, 1])
    out, count = jax.vmap(relabel_sequential)(jnp.asarray(labels))
    np.testing.assert_array_equal(
        np.asarray(out), [[[0, 3, 3, 1], [2, 2, 0, 1]], [[1, 0, 0, 0], [0, 0, 0, 0]]])
