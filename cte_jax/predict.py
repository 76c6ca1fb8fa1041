"""Clean inference of one model: whole images in, probability maps out (tiled and stitched)."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

from cte_jax import backend
from cte_jax.arch import UNetSpec
from cte_jax.errors import CTEError
from cte_jax.modelio import Model, load_model
from cte_jax.networks import UNet, probabilities


@functools.lru_cache(maxsize=None)
def _forward(spec: UNetSpec):
    """Probabilities of a batch, by the same rule as ranking (:func:`cte_jax.networks.probabilities`)."""
    net = UNet(spec)
    return backend.jit(lambda v, x: probabilities(spec, net.apply(v, x, method=UNet.logits)))


def predict_image(model: Model, image: np.ndarray, *, tile: int = 256, halo: int = 32,
                  tile_above: int = 1024, batch_size: int = 4) -> np.ndarray:
    """Probabilities (h w c_out) of ``model`` for one raw image (h w c), normalised as the model says."""
    from cte_jax import preprocess, tiling

    norm = preprocess.Normalization.from_dict(model.normalization)
    x = preprocess.normalize(image, norm)
    h, w = x.shape[:2]
    multiple = model.spec.size_multiple if model.spec is not None else 16
    patches = tiling.plan_patches(h, w, tile=tile, halo=halo, tile_above=tile_above, multiple=multiple,
                                  bucket=max(32, multiple))
    outs = []
    for i in range(0, len(patches), batch_size):
        chunk = np.stack([tiling.extract_patch(x, p) for p in patches[i:i + batch_size]])
        if model.is_black_box:
            outs.extend(np.asarray(model.predict(chunk)))
        else:
            outs.extend(np.asarray(_forward(model.spec)(model.variables, chunk)))
    return tiling.stitch(patches, outs, (h, w))


def predict_to_file(model_dir, input_path, out, *, batch_size: int = 4, dataset: str | None = None,
                    progress: bool = True) -> tuple[Path, list[str]]:
    """Write the clean probabilities of every input image to ``out``: .npy/.tif hold (n c h w)
    when all images share a size; .npz holds one (c h w) array per image name.

    Returns:
      ``out`` and the image names, in the order of the rows."""
    from cte_jax import data
    from cte_jax.cli import _atomic_write

    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".npy", ".tif", ".tiff", ".npz"):
        raise CTEError("output must end in .npy, .tif or .npz", out)
    if not out.parent.exists():
        raise CTEError("output folder does not exist", out.parent)
    if batch_size < 1:
        raise CTEError(f"batch size must be at least 1, got {batch_size}")
    model = load_model(model_dir)
    target = data.open_target(input_path, dataset=dataset)
    if len(target) == 0:
        raise CTEError("no images", input_path)
    sizes = {target.shape(i)[:2] for i in range(len(target))}  # from the headers: refuse before predicting
    if suffix != ".npz" and len(sizes) > 1:
        raise CTEError(f"images have different sizes {sorted(sizes)}; write .npz instead", out)
    from tqdm.auto import tqdm

    maps = {}
    for i, name in enumerate(tqdm(target.names, desc="predict", disable=not progress, leave=False)):
        img = target.read(i)
        if model.spec is not None:
            try:
                from cte_jax.networks import check_size

                check_size(model.spec, *img.shape[:2])
            except ValueError as e:
                raise CTEError(str(e), f"{input_path} [{name}]") from None
        maps[name] = np.moveaxis(predict_image(model, img, batch_size=batch_size), -1, 0).astype(np.float32)

    def write(tmp: Path):
        if suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, **maps)
        elif suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, np.stack(list(maps.values())))
        else:
            import tifffile

            tifffile.imwrite(tmp, np.stack(list(maps.values())), metadata={"axes": "QCYX"})

    _atomic_write(out, write, binary_path=True)
    return out, list(maps)
