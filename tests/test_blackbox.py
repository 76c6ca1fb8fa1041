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


def test_fixed_shape_graph_pads_loops_and_refuses_larger(tmp_path):
    predict = onnx_predictor(_graph(tmp_path, shape=(1, 1, 16, 16)), {}, raw=True)
    x = _images(b=3, h=10, w=12, seed=2)
    np.testing.assert_allclose(predict(x), _oracle(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="larger"):
        predict(_images(b=1, h=17, w=16))


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
