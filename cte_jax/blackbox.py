"""Black-box bank members: an ONNX graph run by onnxruntime on the host, images in, probabilities out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cte_jax.errors import CTEError


PROBABILITY_SLACK = 1e-3  # how far outside [0, 1] float rounding may take a graph's own sigmoid


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), without overflow warnings


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def sliding_windows(n: int, size: int) -> list[tuple[int, int, int]]:
    """Windows of ``size`` pixels covering an axis of ``n >= size``: ``(start, keep_from, keep_to)``.

    Neighbouring windows overlap by twice a halo (a quarter of the window, at most 32 px); each
    keeps its pixels but the halo at an inner edge, so every kept pixel has context on both sides
    (or lies at the image border, where the whole image has none either). The kept ranges cover
    [0, n); where the last window (moved back to end at n) overlaps more, it overwrites.
    """
    if n <= size:
        return [(0, 0, n)]
    halo = min(32, size // 4)
    starts = list(range(0, n - size, size - 2 * halo)) + [n - size]
    return [(s, 0 if i == 0 else s + halo, n if i == len(starts) - 1 else s + size - halo)
            for i, s in enumerate(starts)]


def onnx_predictor(onnx_path: str | os.PathLike, description: dict[str, Any], *, raw: bool = False
                   ) -> Callable[[np.ndarray], np.ndarray]:
    """A host function running an ONNX model on normalised images.

    The returned ``predict(x)`` takes ``x`` (b h w c) float32, already normalised with the model's
    preprocessing, and returns (b h w c_out) float32: the graph's output, in the layout
    ``description["onnx_io"]["axes"]`` says (default ``bcyx``), moved to NHWC, then
    ``description["postprocessing"]`` (``"sigmoid"``, ``"softmax"`` over channels, or None, when the
    graph's output must already be probabilities).
    A graph with a fixed batch size runs image by image; one with a fixed spatial size takes
    smaller images mirror-padded to that size (and cropped back) and refuses larger ones.

    Args:
      onnx_path: the ``.onnx`` file.
      description: the model directory's ``model.json`` contents.
      raw: return whatever the graph (and postprocessing) computes, without the [0, 1] check
        (converters compare it with a package's test output).

    Raises:
      CTEError: onnxruntime missing, or an unreadable graph; from ``predict``, outputs outside
        [0, 1] with no postprocessing.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise CTEError("black-box ONNX models need onnxruntime (pip install 'cte-jax[onnx]')", onnx_path) from None
    path = Path(onnx_path)
    if not path.is_file():
        raise CTEError("ONNX file of the black-box model not found", path)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sess = ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise CTEError(f"onnxruntime cannot load the graph: {type(e).__name__}: {str(e)[:200]}", path) from None
    io = dict(description.get("onnx_io") or {})
    axes = str(io.get("axes", "bcyx"))
    if sorted(axes) != sorted("bcyx"):
        raise CTEError(f"black-box axes {axes!r}: only permutations of 'bcyx' are supported", path)
    inp = sess.get_inputs()[0]
    in_name = io.get("input", inp.name)
    out_name = io.get("output", sess.get_outputs()[0].name)
    fixed = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]
    post = description.get("postprocessing")
    if post not in (None, "sigmoid", "softmax"):
        raise CTEError(f"black-box postprocessing {post!r} is not sigmoid, softmax or null", path)
    to_graph = ["bhwc".index({"b": "b", "c": "c", "y": "h", "x": "w"}[a]) for a in axes]
    from_graph = [axes.index(a) for a in "byxc"]

    def run(x: np.ndarray) -> np.ndarray:
        g = np.ascontiguousarray(x.transpose(to_graph))
        return sess.run([out_name], {in_name: g})[0]

    def run_batch(x: np.ndarray) -> np.ndarray:
        """The graph on (b h w c) images of a size it takes: (b h w c_out) raw outputs."""
        n, fixed_batch = x.shape[0], fixed[axes.index("b")]
        if fixed_batch is None or fixed_batch == n:
            return np.asarray(run(x), np.float32).transpose(from_graph)
        out = []  # batches of exactly fixed_batch images, the last one filled up with copies
        for i in range(0, n, fixed_batch):
            part = x[i:i + fixed_batch]
            fill = np.repeat(part[-1:], fixed_batch - len(part), axis=0)
            y = np.asarray(run(np.concatenate([part, fill])), np.float32).transpose(from_graph)
            out.append(y[:len(part)])
        return np.concatenate(out)

    def predict(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.ndim != 4:
            raise ValueError(f"black-box predict takes (b h w c) images, got shape {x.shape}")
        b, h, w, _ = x.shape
        th = fixed[axes.index("y")] or h
        tw = fixed[axes.index("x")] or w
        if (h, w) != (max(h, th), max(w, tw)):  # smaller than the graph's fixed input: mirror-pad
            x = np.pad(x, ((0, 0), (0, max(h, th) - h), (0, max(w, tw) - w), (0, 0)), mode="symmetric")
        if x.shape[1:3] == (th, tw):
            y = run_batch(x)
        else:  # larger: windows of the fixed input size, each keeping all but a halo at inner edges
            y = None
            for y0, ky0, ky1 in sliding_windows(x.shape[1], th):
                for x0, kx0, kx1 in sliding_windows(x.shape[2], tw):
                    part = run_batch(x[:, y0:y0 + th, x0:x0 + tw])
                    if y is None:
                        y = np.empty(x.shape[:3] + part.shape[3:], np.float32)
                    y[:, ky0:ky1, kx0:kx1] = part[:, ky0 - y0:ky1 - y0, kx0 - x0:kx1 - x0]
        y = y[:, :h, :w, :]
        if post == "sigmoid":
            y = _sigmoid(y)
        elif post == "softmax":
            y = _softmax(y, axis=-1)
        elif not raw and y.size and (y.min() < -PROBABILITY_SLACK or y.max() > 1 + PROBABILITY_SLACK):
            # Thresholding logits at 0.5 would score a different segmentation than the model's.
            raise CTEError(f"the ONNX graph outputs values in [{y.min():.3g}, {y.max():.3g}], not probabilities, "
                           f"and model.json sets no postprocessing: set \"postprocessing\": \"sigmoid\" there if "
                           f"they are logits (cte-jax convert does so for graphs that do not end in a sigmoid)",
                           path.parent / "model.json")
        return np.ascontiguousarray(y, dtype=np.float32)

    return predict
