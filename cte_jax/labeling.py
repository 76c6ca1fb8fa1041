"""Connected-components labelling and relabelling of masks, on the device and under jit/vmap."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

_INT32_MAX = int(np.iinfo(np.int32).max)


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")


def _shifted(x: Array, dy: int, dx: int, fill) -> Array:
    """``y[i, j] = x[i + dy, j + dx]`` for |dy|, |dx| <= 1, ``fill`` outside ``x``."""
    h, w = x.shape
    pad = jnp.pad(x, 1, constant_values=fill)
    return pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


# Neighbour offsets (dy, dx) in raster order.
_NEIGHBOURS = {4: ((-1, 0), (0, -1), (0, 1), (1, 0)),
               8: ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))}


def _neighbour_views(a: Array, fill, connectivity: int) -> list[Array]:
    """The 4 or 8 neighbours of every pixel of ``a`` (h, w), in raster order; outside = ``fill``."""
    return [_shifted(a, dy, dx, fill) for dy, dx in _NEIGHBOURS[connectivity]]


def _neighbour_min(lab: Array, *, connectivity: int, fill: int) -> Array:
    """Minimum of ``lab`` (h w) over each pixel and its 4- or 8-neighbours; outside = ``fill``."""
    out = lab
    for view in _neighbour_views(lab, fill, connectivity):
        out = jnp.minimum(out, view)
    return out


def _compress(parent: Array) -> Array:
    """Pointer jumping ``parent = parent[parent]`` until every node points at a root."""

    def cond(state):
        return state[1]

    def body(state):
        p, _ = state
        q = p[p]
        return q, jnp.any(q != p)

    p, _ = lax.while_loop(cond, body, (parent[parent], jnp.bool_(True)))
    return p


def _hook_until_stable(parent: Array, neighbour_min, active: Array) -> Array:
    """Run hook-and-compress rounds on a forest ``parent`` (n + 1,) until nothing changes.

    ``parent[:n]`` covers the nodes of an (H W) grid, ``parent[n]`` is the sentinel that inactive
    nodes point at. Invariant: every node points at itself (a root) or at a node of smaller index
    in its component. ``neighbour_min`` maps the (H W) grid of current labels to the smallest label among
    each node's connected neighbours (the sentinel where there is none).
    """
    n = parent.shape[0] - 1
    shape = active.shape
    sentinel = n

    def cond(state):
        return state[1]

    def body(state):
        parent, _ = state
        lab = parent[:n].reshape(shape)
        m = jnp.where(active, neighbour_min(lab), sentinel).reshape(-1)
        # Hook: each node's parent adopts the smallest label seen next to the node.
        new = parent.at[parent[:n]].min(m)
        new = _compress(jnp.concatenate([jnp.minimum(new[:n], m), new[n:]]))
        return new, jnp.any(new != parent)

    parent, _ = lax.while_loop(cond, body, (parent, jnp.bool_(True)))
    return parent


def _run_starts(active: Array, joined_left: Array) -> Array:
    """Forest (n + 1,) in which every active node of an (H W) grid points at the first node of its
    horizontal run (``joined_left``: the node is connected to its left neighbour); inactive nodes
    point at the sentinel ``n``. Exact within rows, so rounds only have to join rows."""
    h, w = active.shape
    n = h * w
    idx = jnp.arange(n, dtype=jnp.int32).reshape(h, w)
    run_start = lax.cummax(jnp.where(active & ~joined_left, idx, -1), axis=1)
    lab0 = jnp.where(active, run_start, n)
    return jnp.concatenate([lab0.reshape(-1), jnp.array([n], jnp.int32)])


def _components_pixels(mask: Array, connectivity: int) -> Array:
    """Labels (h w) int32 of one bool mask (h w), one graph node per pixel (any connectivity)."""
    h, w = mask.shape
    n = h * w
    left = jnp.pad(mask[:, :-1], ((0, 0), (1, 0)), constant_values=False)
    parent = _hook_until_stable(
        _run_starts(mask, left),
        lambda lab: _neighbour_min(lab, connectivity=connectivity, fill=n), mask)
    return jnp.where(mask, parent[:n].reshape(h, w) + 1, 0).astype(jnp.int32)


def _components_blocks(mask: Array) -> Array:
    """8-connected labels (h w) int32 of one bool mask, one graph node per 2x2 block of pixels.

    Under 8-connectivity the foreground pixels of a 2x2 block all touch one another, so a block
    is one node and the graph has a quarter of the pixels' nodes (the block-based labelling of
    Grana et al. 2010). Two neighbouring blocks are joined when a foreground pixel of one touches
    a foreground pixel of the other: for side neighbours, when both facing pixel pairs hold
    foreground (the two rows or columns of a block are within one pixel of each other); for
    corner neighbours, when the two facing corner pixels do. Rounds of hooking then work on the
    (h/2 w/2) block grid; the block labels are mapped back to pixels, and each component takes
    the smallest flat index of its pixels, so ids are those of the pixel algorithm.
    """
    h, w = mask.shape
    bh, bw = (h + 1) // 2, (w + 1) // 2
    nb = bh * bw
    m = jnp.pad(mask, ((0, 2 * bh - h), (0, 2 * bw - w)))
    tl, tr, bl, br = m[0::2, 0::2], m[0::2, 1::2], m[1::2, 0::2], m[1::2, 1::2]
    active = tl | tr | bl | br
    left_col, right_col, top_row, bottom_row = tl | bl, tr | br, tl | tr, bl | br
    # Joins, stored at the upper / left block of each pair.
    join_right = jnp.pad(right_col[:, :-1] & left_col[:, 1:], ((0, 0), (0, 1)))   # (i, j)-(i, j+1)
    join_down = jnp.pad(bottom_row[:-1] & top_row[1:], ((0, 1), (0, 0)))          # (i, j)-(i+1, j)
    join_down_right = jnp.pad(br[:-1, :-1] & tl[1:, 1:], ((0, 1), (0, 1)))        # (i, j)-(i+1, j+1)
    join_down_left = jnp.pad(bl[:-1, 1:] & tr[1:, :-1], ((0, 1), (0, 1)))         # (i, j+1)-(i+1, j)
    # For every block: whether it is joined to its neighbour at offset (dy, dx).
    gates = (
        (join_right, 0, 1), (_shifted(join_right, 0, -1, False), 0, -1),
        (join_down, 1, 0), (_shifted(join_down, -1, 0, False), -1, 0),
        (join_down_right, 1, 1), (_shifted(join_down_right, -1, -1, False), -1, -1),
        (_shifted(join_down_left, 0, -1, False), 1, -1), (_shifted(join_down_left, -1, 0, False), -1, 1),
    )

    def neighbour_min(lab):
        out = lab
        for gate, dy, dx in gates:
            out = jnp.minimum(out, jnp.where(gate, _shifted(lab, dy, dx, nb), nb))
        return out

    parent = _hook_until_stable(_run_starts(active, gates[1][0]), neighbour_min, active)
    root = parent[:nb].reshape(bh, bw)
    pixel_root = jnp.repeat(jnp.repeat(root, 2, axis=0), 2, axis=1)[:h, :w].reshape(-1)
    fg = mask.reshape(-1)
    n = h * w
    # Smallest flat pixel index per component (scatter-min keyed by the block root).
    first = jnp.full((nb + 1,), n, jnp.int32).at[jnp.where(fg, pixel_root, nb)].min(
        jnp.arange(n, dtype=jnp.int32))
    return jnp.where(fg, first[pixel_root] + 1, 0).reshape(h, w).astype(jnp.int32)


def _components_2d(mask: Array, connectivity: int) -> Array:
    """Labels (h w) int32 of one bool mask (h w): 1 + smallest flat index of the component."""
    if connectivity == 8:
        return _components_blocks(mask)
    return _components_pixels(mask, connectivity)


def connected_components(mask: Array, *, connectivity: int = 8) -> Array:
    """Label the connected components of a binary mask (jit- and vmap-compatible).

    Every foreground pixel gets the id ``1 + r * w + c`` of the first pixel ``(r, c)`` of its
    component in row-major order (its smallest flat index), background gets 0. Ids are thus
    deterministic, positive, unique per component and increase with the component's first
    appearance in a raster scan, but are not consecutive; ``relabel_sequential`` maps them to
    ``1..K`` in the same order. The partition equals ``skimage.measure.label(mask,
    connectivity=1 or 2)``.

    Algorithm (label equivalence with hooking and pointer jumping, all in ``lax.while_loop``):
    every node starts pointing at the first node of its horizontal run; each round, every
    node takes the minimum label among its connected neighbours, hooks its root onto that label
    (scatter-min), and all pointers are compressed (``parent = parent[parent]``) until they
    point at roots. Rounds stop when nothing changes; for typical masks this takes a few
    rounds, far fewer than the component diameter (measured on the pixel graph of 320x320
    masks: 2-3 rounds for one-pixel snakes and spirals, 4-6 for random masks near the
    percolation threshold). With 4-connectivity the nodes are pixels. With 8-connectivity they
    are 2x2 blocks of pixels, whose foreground pixels always touch one another (block-based
    labelling): the graph has a quarter of the nodes, which made labelling 2.4x faster on CPU
    (16 masks of 128x128 at 40 % foreground: 9.7 -> 4.0 ms).
    Shapes are static throughout.

    Args:
      mask: bool (..., h, w); leading axes are a batch. Nonzero values count as foreground.
      connectivity: 4 (edge neighbours) or 8 (edge and corner neighbours, skimage's default
        ``connectivity=2`` in 2D).

    Returns:
      int32 (..., h, w) labels, 0 = background.

    References:
      K. Hawick, A. Leist, D. Playne (2010), "Parallel graph component labelling with GPUs and
      CUDA", Parallel Computing 36(12). C. Grana, D. Borghesani, R. Cucchiara (2010), "Optimized
      block-based connected components labeling with decision trees", IEEE Trans. Image
      Process. 19(6). Y. Shiloach, U. Vishkin (1982), "An O(log n) parallel
      connectivity algorithm", J. Algorithms 3(1).
    """
    _check_connectivity(connectivity)
    mask = jnp.asarray(mask)
    if mask.ndim < 2:
        raise ValueError(f"mask must have shape (..., h, w), got {mask.shape}")
    h, w = mask.shape[-2:]
    if h < 1 or w < 1:
        raise ValueError(f"mask must have h, w >= 1, got {mask.shape}")
    if h * w >= _INT32_MAX:
        raise ValueError(f"image of {h}x{w} pixels is too large for int32 labels")
    return _components_jit(mask.astype(bool), connectivity=connectivity)


@partial(jax.jit, static_argnames=("connectivity",))
def _components_jit(mask: Array, *, connectivity: int) -> Array:
    # Jitted once per (shape, connectivity): eager calls would retrace the while loops.
    h, w = mask.shape[-2:]
    labels = jax.vmap(lambda m: _components_2d(m, connectivity))(mask.reshape((-1, h, w)))
    return labels.reshape(mask.shape)


def _dense_ranks(keys: Array) -> tuple[Array, Array, Array]:
    """Dense ranks of the positive values of ``keys`` (n,) int: 1 for the smallest, 0 for <= 0.

    Returns ``(sorted_keys, ranks, count)``: the keys sorted ascending (n,), the rank of each
    entry (n,) int32, and the number of distinct positive values (int32 scalar). One
    single-operand sort (XLA's fast path on CPU, several times faster than a sort carrying a
    permutation) plus a binary search of every entry in the sorted keys.
    """
    keys = jnp.where(keys > 0, keys, 0)
    sorted_keys = jnp.sort(keys)
    prev = jnp.concatenate([jnp.zeros((1,), sorted_keys.dtype), sorted_keys[:-1]])
    is_new = (sorted_keys > 0) & (sorted_keys != prev)
    rank_sorted = jnp.cumsum(is_new, dtype=jnp.int32)
    first = jnp.searchsorted(sorted_keys, keys, side="left", method="scan")
    ranks = jnp.where(keys > 0, rank_sorted[first], 0)
    return sorted_keys, ranks, rank_sorted[-1]


def _relabel_flat(flat: Array, max_labels: int | None) -> tuple[Array, Array]:
    """Sequential ids for one flattened label image (n,); see ``relabel_sequential``."""
    _, ranks, num_labels = _dense_ranks(flat)
    if max_labels is not None:
        ranks = jnp.where(ranks <= max_labels, ranks, 0)
    return ranks, num_labels


def relabel_sequential(labels: Array, *, max_labels: int | None = None) -> tuple[Array, Array]:
    """Map the positive ids of a label image to ``1..K`` in increasing order of id.

    Ids are ranked by value: the smallest positive id becomes 1, the next 2, and so on; 0 and
    negative values become 0 (background). For the ids of ``connected_components`` (1 + the
    component's smallest flat index), increasing id is the order of first appearance in a
    row-major scan, so the result matches ``skimage.measure.label`` id for id. One sort of the
    h * w pixels and a binary search per pixel; static shapes, jit- and vmap-compatible.

    Args:
      labels: int (..., h, w) label images; leading axes are a batch, relabelled independently.
      max_labels: optional static bound; ids ranked above it become 0 (so every output id is
        in ``0..max_labels``, e.g. for a one-hot of static size). ``num_labels`` still counts
        them, so ``num_labels > max_labels`` reveals the truncation.

    Returns:
      ``(relabelled, num_labels)``: int32 (..., h, w) with ids in ``0..K``, and int32 (...,)
      the number K of distinct positive ids of each image.
    """
    labels = jnp.asarray(labels)
    if labels.ndim < 2:
        raise ValueError(f"labels must have shape (..., h, w), got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be an integer array, got dtype {labels.dtype}")
    if max_labels is not None and (int(max_labels) != max_labels or max_labels < 0):
        raise ValueError(f"max_labels must be a non-negative int or None, got {max_labels!r}")
    return _relabel_jit(labels, max_labels=None if max_labels is None else int(max_labels))


@partial(jax.jit, static_argnames=("max_labels",))
def _relabel_jit(labels: Array, *, max_labels: int | None) -> tuple[Array, Array]:
    h, w = labels.shape[-2:]
    batch = labels.shape[:-2]
    flat = labels.reshape((-1, h * w)).astype(jnp.int32)
    out, count = jax.vmap(lambda f: _relabel_flat(f, max_labels))(flat)
    return out.reshape(batch + (h, w)), count.reshape(batch)
