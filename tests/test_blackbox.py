"""cte_jax.blackbox.onnx_predictor on small hand-built ONNX graphs; the oracle is NumPy."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from cte_jax.errors import CTEError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cte_jax.blackbox import onnx_predictor  # noqa: E402

W = np.array([[1.5], [-2.0], [0.25]], np.float32)  # 1x1 conv, 1 -> 3 channels
B = np.array([0.1, -0.3, 0.7], np.float32)


def _graph(tmp_path, shape=("b", 1, "h", "w"), name="g.onnx"):
    """y = conv1x1(x) with W, B: (b 1 h w) -> (b 3 h w)."""
    out_shape = [shape[0], 3, shape[2], shape[3]]
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], kernel_shape=[1, 1])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(W.reshape(3, 1, 1, 1), "W"), numpy_helper.from_array(B, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _oracle(x_bhw1):
    return x_bhw1 @ W.T + B  # (b h w 3)


def _images(b=2, h=9, w=7, seed=0):
    return np.random.default_rng(seed).standard_normal((b, h, w, 1)).astype(np.float32)


def test_dynamic_graph_matches_numpy(tmp_path):
    predict = onnx_predictor(_graph(tmp_path), {"onnx_io": {"axes": "bcyx"}}, raw=True)
    x = _images()
    y = predict(x)
    assert y.shape == (2, 9, 7, 3) and y.dtype == np.float32
    np.testing.assert_allclose(y, _oracle(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("post", ["sigmoid", "softmax"])
def test_postprocessing(tmp_path, post):
    predict = onnx_predictor(_graph(tmp_path), {"postprocessing": post})
    x = _images(seed=1)
    z = _oracle(x).astype(np.float64)
    if post == "sigmoid":
        ref = 1.0 / (1.0 + np.exp(-z))
    else:
        ref = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    np.testing.assert_allclose(predict(x), ref, rtol=1e-5, atol=1e-6)


def _conv3x3_graph(tmp_path, side):
    """y = conv3x3(x), zero padding 1, on a fixed (1 1 side side) input."""
    k = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3) / 10 - 0.3
    node = helper.make_node("Conv", ["x", "K"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "g3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, side, side])], [numpy_helper.from_array(k, "K")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "g3.onnx")
    return tmp_path / "g3.onnx", k[0, 0]


def test_fixed_shape_graph_pads_smaller_and_slides_over_larger_images(tmp_path):
    predict = onnx_predictor(_graph(tmp_path, shape=(1, 1, 16, 16)), {}, raw=True)
    x = _images(b=3, h=10, w=12, seed=2)
    np.testing.assert_allclose(predict(x), _oracle(x), rtol=1e-6, atol=1e-6)
    x = _images(b=2, h=37, w=9, seed=3)  # taller than the graph's input, narrower
    np.testing.assert_allclose(predict(x), _oracle(x), rtol=1e-6, atol=1e-6)
    predict = onnx_predictor(_graph(tmp_path, shape=(2, 1, "h", "w"), name="b2.onnx"), {}, raw=True)
    x = _images(b=5, h=8, w=8, seed=5)  # batches of exactly 2: the last one is filled up
    np.testing.assert_allclose(predict(x), _oracle(x), rtol=1e-6, atol=1e-6)
    # A 3x3 convolution needs one pixel of context: windows with a halo give the whole-image result.
    from scipy import ndimage

    path, k = _conv3x3_graph(tmp_path, 16)
    predict = onnx_predictor(path, {}, raw=True)
    x = _images(b=2, h=45, w=50, seed=4)
    want = np.stack([ndimage.correlate(img[..., 0], k, mode="constant") for img in x])[..., None]
    np.testing.assert_allclose(predict(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,size", [(16, 16), (17, 16), (45, 16), (100, 64), (1000, 256), (257, 256)])
def test_sliding_windows_cover_the_axis_with_context(n, size):
    from cte_jax.blackbox import sliding_windows

    wins = sliding_windows(n, size)
    halo = min(32, size // 4)
    covered = np.zeros(n, int)
    for start, lo, hi in wins:
        assert 0 <= start and start + size <= n and start <= lo < hi <= start + size
        assert lo == 0 or lo - start >= halo  # context before every kept pixel, or the image border
        assert hi == n or start + size - hi >= halo
        covered[lo:hi] += 1
    assert covered.min() >= 1


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(CTEError, match="not found"):
        onnx_predictor(tmp_path / "missing.onnx", {})
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CTEError, match="cannot load"):
        onnx_predictor(bad, {})
    with pytest.raises(CTEError, match="postprocessing"):
        onnx_predictor(_graph(tmp_path), {"postprocessing": "tanh"})
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(CTEError, match="onnxruntime"):
        onnx_predictor(_graph(tmp_path, name="h.onnx"), {})


def test_black_box_model_directory_loads(tmp_path):
    from converters._common import write_black_box
    from cte_jax.modelio import load_bank, load_model

    onnx_file = _graph(tmp_path)
    desc = {"task": "foreground", "channel": 2, "preprocessing": {"kind": "zscore", "in_channels": 1},
            "provenance": {"test": True}, "postprocessing": "sigmoid", "onnx_io": {"axes": "bcyx"}}
    out = write_black_box(out=tmp_path / "bank" / "bb", onnx_file=onnx_file, description=desc)
    assert json.loads((out / "model.json").read_text())["onnx"] == "model.onnx"
    m = load_model(out)
    assert m.is_black_box and m.channel == 2
    x = _images(seed=3)
    np.testing.assert_allclose(m.predict(x), 1 / (1 + np.exp(-_oracle(x).astype(np.float64))), rtol=1e-5, atol=1e-6)
    assert [b.name for b in load_bank(tmp_path / "bank")] == ["bb"]
    with pytest.raises(CTEError, match="already exists"):
        write_black_box(out=out, onnx_file=onnx_file, description=desc)
