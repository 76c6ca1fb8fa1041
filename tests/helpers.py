"""Small random models for tests, drawn with NumPy (Flax's initialisers compile for seconds on CPU),
and small synthetic targets."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from PIL import Image

from cte_jax.arch import UNetSpec
from cte_jax.modelio import Model
from cte_jax.networks import abstract_variables


def numpy_variables(spec: UNetSpec, seed: int) -> dict:
    """LeCun-normal kernels, unit scales, zero biases and statistics for ``spec``."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            return (rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(leaf.dtype)
        return (np.ones if name.endswith("['scale']") else np.zeros)(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_variables(spec))


def random_models(n: int, spec: UNetSpec, normalization: dict) -> list[Model]:
    """Models m0..m{n-1}, their final biases nudged apart so they differ in foreground."""
    out = []
    for i in range(n):
        v = numpy_variables(spec, i)
        v["params"]["final"]["bias"] = v["params"]["final"]["bias"] + 0.05 * i
        out.append(Model(name=f"m{i}", normalization=normalization, spec=spec, variables=v))
    return out


def write_disc_images(d: Path, n: int, seed: int) -> Path:
    """``n`` 32x32 PNGs img0..img{n-1} in ``d``: dim noise with three bright discs each."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    for i in range(n):
        img = (rng.random((32, 32)) * 60).astype(np.uint8)
        for _ in range(3):
            cy, cx = rng.integers(6, 26, 2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] += 150
        Image.fromarray(img).save(d / f"img{i}.png")
    return d
