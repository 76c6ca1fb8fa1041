"""converters.onnx_model: ONNX graphs exported from PyTorch U-Nets become grey-box models when
recognised (parity with PyTorch), black-box models otherwise (parity through onnxruntime)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import converters
from converters import onnx_model
from cte_jax.errors import CTEError

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).parent))
from torch_reference import UNet2D3dunet, UNet2dTorchEm, randomize_  # noqa: E402

TOL = 1e-4
torch.set_num_threads(1)


def _export(model, path: Path, side=32, dynamic=True):
    import warnings

    kw = {"dynamic_axes": {"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b", 2: "h", 3: "w"}}} if dynamic else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, model_in(model), side, side), path, dynamo=False,
                          input_names=["x"], output_names=["y"], **kw)
    return path


def model_in(model):
    return next(p for p in model.parameters() if p.ndim == 4).shape[1]


def _predict(model_dir: Path, x_nchw: np.ndarray) -> np.ndarray:
    import jax

    from cte_jax.modelio import load_model
    from cte_jax.networks import UNet

    m = load_model(model_dir)
    x = x_nchw.transpose(0, 2, 3, 1)
    y = m.predict(x) if m.is_black_box else np.asarray(jax.jit(UNet(m.spec).apply)(m.variables, x))
    return y.transpose(0, 3, 1, 2)


def _torch(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("make", [
    lambda: UNet2dTorchEm(1, 2, depth=2, initial_features=4, norm="BatchNorm", final_activation="Sigmoid"),
    lambda: UNet2dTorchEm(1, 1, depth=2, initial_features=4, norm="InstanceNorm"),
    lambda: UNet2D3dunet(1, 1, f_maps=4, num_levels=3, layer_order="bcl", upsample="deconv"),
], ids=["torch-em-bn", "torch-em-in", "3dunet-leaky-deconv"])
def test_recognised_graphs_become_grey_box(make, tmp_path):
    model = randomize_(make(), seed=5)
    path = _export(model, tmp_path / "m.onnx")
    out = converters.convert(path, format="onnx", out=tmp_path / "g")
    desc = json.loads((out / "model.json").read_text())
    assert "architecture" in desc and "onnx" not in desc
    assert desc["provenance"]["verified_max_abs_diff"] <= 1e-3
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)
    assert np.max(np.abs(_predict(out, x) - _torch(model, x))) <= TOL


class _Plain(torch.nn.Module):
    """Not a U-Net of a known family: its graph must become a black box."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return torch.softmax(self.b(torch.relu(self.a(x))), dim=1)


@pytest.mark.parametrize("order", ["cbr", "gcr"])
def test_exports_that_lose_weight_names_fall_back_to_black_box(order, tmp_path):
    """The exporter folds a BatchNorm after a conv into it and inlines GroupNorm parameters,
    renaming weights: such graphs are kept whole, as black boxes, and still predict exactly."""
    model = randomize_(UNet2D3dunet(1, 1, f_maps=4, num_levels=2, layer_order=order, num_groups=2), seed=4)
    out = converters.convert(_export(model, tmp_path / "m.onnx"), format="onnx", out=tmp_path / "bb")
    assert json.loads((out / "model.json").read_text())["onnx"] == "model.onnx"
    x = np.random.default_rng(4).standard_normal((2, 1, 35, 33)).astype(np.float32)
    assert np.max(np.abs(_predict(out, x) - _torch(model, x))) <= TOL


def test_unrecognised_graph_becomes_black_box(tmp_path):
    model = randomize_(_Plain(), seed=1)
    path = _export(model, tmp_path / "plain.onnx")
    out = converters.convert(path, format="onnx", out=tmp_path / "bb", normalize="percentile:1,99")
    desc = json.loads((out / "model.json").read_text())
    assert desc["onnx"] == "model.onnx" and "architecture" not in desc
    assert "known U-Net family" in desc["provenance"]["black_box_reason"]
    assert desc["preprocessing"]["kind"] == "percentile"
    x = np.random.default_rng(1).standard_normal((3, 1, 20, 24)).astype(np.float32)
    assert np.max(np.abs(_predict(out, x) - _torch(model, x))) <= TOL
    # a two-class softmax head scored on channel 0 (usually the background): convert says so
    from cte_jax.cli import _conversion_facts

    assert any("--channel 1" in line for line in _conversion_facts(desc))
    out1 = converters.convert(path, format="onnx", out=tmp_path / "bb1", channel=1)
    assert not any("--channel 1" in line for line in _conversion_facts(json.loads((out1 / "model.json").read_text())))


def test_black_box_on_request_and_errors(tmp_path):
    model = randomize_(UNet2dTorchEm(1, 1, depth=1, initial_features=4, norm=None), seed=2)
    path = _export(model, tmp_path / "m.onnx", dynamic=False)
    out = converters.convert(path, format="onnx", out=tmp_path / "bb", black_box=True)
    desc = json.loads((out / "model.json").read_text())
    assert desc["provenance"]["black_box_reason"] == "--black-box"
    assert desc["onnx_io"]["input_shape"] == [1, 1, 32, 32]
    # The graph ends in a convolution: it outputs logits, and gets the sigmoid that a grey-box
    # network without a final activation gets, so both kinds score the same probabilities.
    assert desc["postprocessing"] == "sigmoid" and desc["provenance"]["graph_final_activation"] is None
    x = np.random.default_rng(2).standard_normal((2, 1, 32, 32)).astype(np.float32)
    logits = _torch(model, x).astype(np.float64)
    assert np.max(np.abs(_predict(out, x) - 1 / (1 + np.exp(-logits)))) <= TOL
    # A model.json that claims probabilities for a logit graph is refused at run time, by name.
    desc["postprocessing"] = None
    (out / "model.json").write_text(json.dumps(desc))
    with pytest.raises(CTEError) as e:
        _predict(out, x)
    assert "model.json" in str(e.value) and "not probabilities" in str(e.value)
    # a damaged file: clear error, nothing written
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CTEError) as e:
        converters.convert(cut, format="onnx", out=tmp_path / "x")
    assert str(cut) in str(e.value)
    assert not (tmp_path / "x").exists()


def test_graph_facts_read_activations(tmp_path):
    model = randomize_(UNet2D3dunet(1, 3, f_maps=4, num_levels=2, layer_order="ce", final_sigmoid=False), seed=3)
    facts = onnx_model.graph_facts(onnx_model.load(_export(model, tmp_path / "m.onnx")))
    assert facts.activation == "e"
    assert facts.final_activation == "softmax"
