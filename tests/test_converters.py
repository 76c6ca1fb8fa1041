"""converters.pytorch_3dunet, converters.torch_em and the dispatcher: parity with PyTorch.

Oracle: independently written PyTorch modules (tests/torch_reference.py) with random weights,
saved with torch.save, converted, and run through our Flax UNet: outputs agree to 1e-4.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import converters
from converters import pytorch_3dunet, torch_em, torch_pickle
from cte_jax.errors import CTEError

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent))
from torch_reference import UNet2D3dunet, UNet2dTorchEm, randomize_  # noqa: E402

TOL = 1e-4
torch.set_num_threads(1)


def flax_forward(spec, variables, x_nchw: np.ndarray) -> np.ndarray:
    """Our network on NCHW input. Eager op-by-op (its compiled ops are shared between cases of
    equal shapes) except with GroupNorm, whose many small ops compile faster as one program."""
    import jax

    from cte_jax.networks import UNet

    apply = UNet(spec).apply
    if "g" in spec.layer_order:
        apply = jax.jit(apply)
    y = apply(variables, np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)))
    return np.asarray(y).transpose(0, 3, 1, 2)


def torch_forward(model, x_nchw: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x_nchw)).numpy()


def _image(hw, channels=1, seed=0):
    return np.random.default_rng(seed).standard_normal((2, channels, *hw)).astype(np.float32)


# -- the parameter product, covered pairwise (odd and even image sizes are one of its axes) -------
AXES = {
    "order": ["gcr", "bcr", "cr", "cbr", "cgr"],
    "act": ["r", "l", "e"],
    "levels": [2, 3],
    "fmaps": ["int", "list"],
    "upsample": ["default", "deconv"],
    "out": [1, 3],
    "size": [(35, 33), (32, 32)],
}


def _pairwise_cases() -> list[dict]:
    """A small deterministic set of cases in which every pair of values of two axes occurs."""
    names = list(AXES)
    todo = {(a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in AXES[a] for vb in AXES[b]}
    cases = []
    for _ in range(100):
        if not todo:
            break
        best, best_gain = None, -1
        for combo in itertools.product(*AXES.values()):
            case = dict(zip(names, combo))
            gain = sum((a, case[a], b, case[b]) in todo for a, b in itertools.combinations(names, 2))
            if gain > best_gain:
                best, best_gain = case, gain
        cases.append(best)
        todo -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(names, 2)}
    return cases


CASES = _pairwise_cases()


def _kwargs(case: dict) -> dict:
    order = case["order"].replace("r", case["act"])
    levels = case["levels"]
    if case["fmaps"] == "int":
        f_maps, groups = 4, 2
    else:
        f_maps = ([6, 12, 24] if case["upsample"] == "deconv" else [6, 9, 15])[:levels]
        groups = 3
    kw = {"in_channels": 1, "out_channels": case["out"], "f_maps": f_maps, "layer_order": order,
          "num_groups": groups, "num_levels": levels, "upsample": case["upsample"],
          "final_sigmoid": case["out"] == 1}
    return kw


def test_pairwise_design_covers_every_pair():
    names = list(AXES)
    for a, b in itertools.combinations(names, 2):
        seen = {(c[a], c[b]) for c in CASES}
        assert seen == set(itertools.product(AXES[a], AXES[b]))
    assert len(CASES) <= 20


def _convert_in_memory(model, kwargs, tmp_path, name="m.pt", wrap=True):
    path = tmp_path / name
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3} if wrap else model.state_dict(), path)
    return pytorch_3dunet.from_state_dict(torch_pickle.load_state_dict(path), kwargs, source=path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()).replace(" ", ""))
def test_pytorch_3dunet_parity(case, tmp_path):
    kw = _kwargs(case)
    model = randomize_(UNet2D3dunet(leaky_slope=0.01, **kw), seed=len(tmp_path.name))
    spec, variables = _convert_in_memory(model, kw, tmp_path)
    assert spec.levels == case["levels"]
    x = _image(case["size"])
    ref = torch_forward(model, x)
    got = flax_forward(spec, variables, x)
    assert got.shape == ref.shape
    assert np.max(np.abs(got - ref)) <= TOL


@pytest.mark.parametrize("extra", [
    {"upsample": "bilinear", "layer_order": "cbr"},
    {"conv_upscale": 1, "layer_order": "gcl", "num_groups": 2},
    {"is_segmentation": False, "layer_order": "bcrd"},
    {"layer_order": "cr", "final_sigmoid": False, "out_channels": 2},
], ids=["bilinear", "upscale1-leaky", "regression-dropout", "softmax"])
def test_pytorch_3dunet_other_options(extra, tmp_path):
    kw = {"in_channels": 1, "out_channels": 1, "f_maps": 4, "num_levels": 3, "num_groups": 2, **extra}
    ref_kw = {k: v for k, v in kw.items()}
    model = randomize_(UNet2D3dunet(leaky_slope=0.01, **ref_kw), seed=1)
    spec, variables = _convert_in_memory(model, kw, tmp_path)
    x = _image((35, 33))
    assert np.max(np.abs(flax_forward(spec, variables, x) - torch_forward(model, x))) <= TOL


def test_pytorch_3dunet_old_conv3d_layout(tmp_path):
    """Old pytorch-3dunet built UNet2D from Conv3d (1, 3, 3): 5-D weights, LeakyReLU(0.1)."""
    kw = {"in_channels": 1, "out_channels": 2, "f_maps": 4, "num_levels": 3, "layer_order": "gcl", "num_groups": 2}
    model = randomize_(UNet2D3dunet(leaky_slope=0.1, conv3d=True, **kw), seed=2)
    spec, variables = _convert_in_memory(model, kw, tmp_path)
    assert spec.leaky_slope == 0.1
    x = _image((35, 33))
    with torch.no_grad():
        ref = model(torch.from_numpy(x[:, :, None])).numpy()[:, :, 0]
    assert np.max(np.abs(flax_forward(spec, variables, x) - ref)) <= TOL


def test_convert_writes_a_model_directory_that_loads(tmp_path):
    """module. prefixes, arch as a YAML file, --bank, then load_model and run."""
    from cte_jax.modelio import load_bank, load_model

    kw = {"in_channels": 1, "out_channels": 1, "f_maps": 4, "num_levels": 2, "layer_order": "bcr"}
    model = randomize_(UNet2D3dunet(**kw), seed=3)
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"model_state_dict": sd}, tmp_path / "best_checkpoint.pytorch")
    arch = tmp_path / "arch.yaml"
    arch.write_text("f_maps: 4\nnum_levels: 2\nlayer_order: bcr\n")
    bank = tmp_path / "bank"
    out = converters.convert(tmp_path / "best_checkpoint.pytorch", format="pytorch-3dunet", arch=arch,
                             normalize="percentile:1,99.5", out="plantseg", bank=bank)
    assert out == bank / "plantseg"
    m = load_model(out)
    assert m.normalization["kind"] == "percentile" and m.normalization["hi"] == 99.5
    assert m.provenance["sha256"] and m.provenance["arch_kwargs"]["f_maps"] == 4
    x = _image((32, 32))
    assert np.max(np.abs(flax_forward(m.spec, m.variables, x) - torch_forward(model, x))) <= TOL
    assert [b.name for b in load_bank(bank)] == ["plantseg"]
    with pytest.raises(CTEError, match="already exists"):
        converters.convert(tmp_path / "best_checkpoint.pytorch", format="pytorch-3dunet", arch=arch,
                           out="plantseg", bank=bank)
    # inline JSON and overwrite
    again = converters.convert(tmp_path / "best_checkpoint.pytorch", format="pytorch-3dunet",
                               arch=json.dumps({"f_maps": 4, "num_levels": 2, "layer_order": "bcr"}),
                               out=out, overwrite=True)
    assert load_model(again).normalization["kind"] == "zscore"


def _no_leftovers(folder: Path, name: str):
    assert not (folder / name).exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(f".{name}.")]


def test_state_dict_that_does_not_fit_names_the_keys(tmp_path):
    kw = {"in_channels": 1, "out_channels": 1, "f_maps": 4, "num_levels": 3, "layer_order": "gcr", "num_groups": 2}
    model = randomize_(UNet2D3dunet(**kw), seed=4)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "out"
    # wrong widths: mis-shaped keys named with both shapes
    with pytest.raises(CTEError, match=r"encoders\.0\.basic_module\.SingleConv1\.conv\.weight has shape") as e:
        converters.convert(path, format="pytorch-3dunet", arch={**kw, "f_maps": 8}, out=out)
    assert str(path) in str(e.value)
    _no_leftovers(tmp_path, "out")
    # too few levels: unexpected keys named
    with pytest.raises(CTEError, match=r"unexpected keys: .*encoders\.2\."):
        converters.convert(path, format="pytorch-3dunet", arch={**kw, "num_levels": 2}, out=out)
    # a norm the weights do not have: missing keys named
    with pytest.raises(CTEError, match=r"missing keys: .*batchnorm"):
        converters.convert(path, format="pytorch-3dunet", arch={**kw, "layer_order": "bcr"}, out=out)
    # unknown kwargs and unsupported values
    with pytest.raises(CTEError, match="unknown UNet2D argument 'fmaps'"):
        converters.convert(path, format="pytorch-3dunet", arch={"fmaps": 4}, out=out)
    with pytest.raises(CTEError, match="conv_kernel_size"):
        converters.convert(path, format="pytorch-3dunet", arch={**kw, "conv_kernel_size": 5}, out=out)
    with pytest.raises(CTEError, match="not valid JSON/YAML"):
        converters.convert(path, format="pytorch-3dunet", arch="{f_maps: [4,", out=out)
    _no_leftovers(tmp_path, "out")


def test_bad_files_leave_nothing_behind(tmp_path):
    kw = {"in_channels": 1, "out_channels": 1, "f_maps": 4, "num_levels": 2, "layer_order": "cr"}
    model = randomize_(UNet2D3dunet(**kw), seed=5)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(CTEError) as e:
        converters.convert(cut, format="pytorch-3dunet", arch=kw, out=tmp_path / "out")
    assert str(cut) in str(e.value)
    _no_leftovers(tmp_path, "out")
    # a pickle that names a non-tensor global
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(CTEError, match=r"refusing to unpickle global (__builtin__|builtins)\.print"):
        converters.convert(evil, format="pytorch-3dunet", arch=kw, out=tmp_path / "out")
    _no_leftovers(tmp_path, "out")
    # a whole pytorch-3dunet training config as --arch: its model section is used
    cfg = tmp_path / "train_config.yml"
    cfg.write_text("model:\n  name: UNet2D\n  in_channels: 1\n  out_channels: 1\n  f_maps: 4\n"
                   "  num_levels: 2\n  layer_order: cr\ntrainer:\n  max_num_epochs: 10\n")
    assert converters.convert(path, format="pytorch-3dunet", arch=cfg, out=tmp_path / "cfg").is_dir()
    with pytest.raises(CTEError, match="unknown --format"):
        converters.convert(path, format="keras", out=tmp_path / "out")
    with pytest.raises(CTEError, match="1 or 3"):
        m2 = randomize_(UNet2D3dunet(**{**kw, "in_channels": 2}), seed=5)
        torch.save(m2.state_dict(), tmp_path / "two.pt")
        converters.convert(tmp_path / "two.pt", format="pytorch-3dunet", arch={**kw, "in_channels": 2},
                           out=tmp_path / "out")
    _no_leftovers(tmp_path, "out")


# -- torch-em ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm, depth, final, out", [
    (None, 2, None, 1),
    ("InstanceNorm", 2, "Sigmoid", 1),
    ("GroupNorm", 3, None, 2),
    ("BatchNorm", 1, "Softmax", 3),
    ("InstanceNormTrackStats", 2, "Sigmoid", 1),
])
def test_torch_em_parity(norm, depth, final, out, tmp_path):
    model = randomize_(UNet2dTorchEm(1, out, depth=depth, initial_features=4, final_activation=final, norm=norm),
                       seed=depth)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    kwargs = {"in_channels": 1, "out_channels": out, "depth": depth, "initial_features": 4, "final_activation": final}
    spec, variables = torch_em.from_state_dict(torch_pickle.load_state_dict(path), kwargs, source=path)
    x = _image((32, 32))
    assert np.max(np.abs(flax_forward(spec, variables, x) - torch_forward(model, x))) <= TOL


def test_torch_em_convert_and_errors(tmp_path):
    from cte_jax.modelio import load_model

    model = randomize_(UNet2dTorchEm(1, 1, depth=2, initial_features=4, norm="InstanceNorm"), seed=7)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    out = converters.convert(path, format="torch-em", arch='{"depth": 2, "initial_features": 4}', out=tmp_path / "te")
    m = load_model(out)
    x = _image((32, 32))
    assert np.max(np.abs(flax_forward(m.spec, m.variables, x) - torch_forward(model, x))) <= TOL
    with pytest.raises(CTEError, match=r"mis-shaped: encoder\.blocks\.0\.block\.1\.weight"):
        converters.convert(path, format="torch-em", arch={"depth": 2, "initial_features": 8}, out=tmp_path / "x")
    with pytest.raises(CTEError, match="unknown UNet2d argument"):
        converters.convert(path, format="torch-em", arch={"depht": 2}, out=tmp_path / "x")
    with pytest.raises(CTEError, match="gain"):
        converters.convert(path, format="torch-em", arch={"depth": 2, "initial_features": 4, "gain": 3},
                           out=tmp_path / "x")
    _no_leftovers(tmp_path, "x")


def test_wrong_format_errors_name_the_right_one(tmp_path):
    """A file given with the wrong --format, or a network the converter does not know, gets a
    one-line error saying what the file is and which route to take; nothing is written."""
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
    sd = tmp_path / "own.pt"
    torch.save(plain.state_dict(), sd)
    for fmt, family in [("torch-em", "torch-em UNet2d"), ("pytorch-3dunet", "pytorch-3dunet UNet2D")]:
        with pytest.raises(CTEError) as e:
            converters.convert(sd, format=fmt, out=tmp_path / "out")
        assert f"not a {family}" in str(e.value) and "'0.weight'" in str(e.value)
        assert "torch.onnx.export" in str(e.value) and "--arch:" not in str(e.value)
    scripted = tmp_path / "scripted.pt"
    torch.jit.script(plain).save(str(scripted))
    with pytest.raises(CTEError, match="TorchScript archive.*--format onnx"):
        converters.convert(scripted, format="torch-em", out=tmp_path / "out")
    fake_onnx = tmp_path / "m.onnx"
    fake_onnx.write_bytes(b"\x08\x07\x12\x07pytorch")  # an ONNX protobuf's first bytes
    with pytest.raises(CTEError, match=r"an ONNX file\? use --format onnx"):
        converters.convert(fake_onnx, format="torch-em", out=tmp_path / "out")
    with pytest.raises(CTEError) as e:
        converters.convert(sd, format="bioimageio", out=tmp_path / "out")
    assert str(sd) in str(e.value) and "--format torch-em" in str(e.value) and "cte_bioimageio_" not in str(e.value)
    with pytest.raises(CTEError, match=r"a PyTorch file\? use --format torch-em"):
        converters.convert(sd, format="onnx", out=tmp_path / "out")
    with pytest.raises(CTEError, match="is an ONNX graph, not a bioimage.io package: convert it with --format onnx"):
        converters.convert(fake_onnx, format="bioimageio", out=tmp_path / "out")
    # a torch-em UNet2d built with other settings than the defaults: say --arch before the key list
    small = tmp_path / "small.pt"
    torch.save(UNet2dTorchEm(1, 1, depth=2, initial_features=4).state_dict(), small)
    with pytest.raises(CTEError, match="do not fit the default architecture; give the settings .* in --arch"):
        converters.convert(small, format="torch-em", out=tmp_path / "out")
    _no_leftovers(tmp_path, "out")
    assert converters.convert(small, format="torch-em", arch={"depth": 2, "initial_features": 4},
                              out=tmp_path / "out").is_dir()
