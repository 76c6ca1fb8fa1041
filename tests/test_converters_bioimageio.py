"""converters.bioimageio: published packages reproduce their own test outputs; descriptions map.

Oracles: the packages' test_output.npy (computed by their authors with PyTorch/bioimage.io),
and, for synthetic packages, an independent PyTorch model (tests/torch_reference.py) with the
preprocessing computed here in NumPy.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import converters
from converters import bioimageio
from cte_jax.errors import CTEError

SHARED = Path(os.environ.get("CTE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
MODELS = SHARED / "models"
NUCLEI = MODELS / "bioimageio_unet2d_nuclei_broad"
FIXED = MODELS / "bioimageio_unet2d_fixed_shape"
TOL = 1e-4

needs_shared = pytest.mark.skipif(not (NUCLEI.is_dir() and FIXED.is_dir()), reason="../shared/models not available")


def run_model(model_dir: Path, test_input: np.ndarray) -> np.ndarray:
    """Our prediction path: the model's normalisation on the host, then the Flax network
    (or the black-box predictor). test_input is (b c y x); returns (b c y x)."""
    import jax

    from cte_jax.modelio import load_model
    from cte_jax.preprocess import Normalization, normalize

    m = load_model(model_dir)
    norm = Normalization.from_dict(m.normalization)
    x = np.stack([normalize(img.transpose(1, 2, 0), norm) for img in test_input])
    if m.is_black_box:
        y = m.predict(x)
    else:
        from cte_jax.networks import UNet

        y = np.asarray(jax.jit(UNet(m.spec).apply)(m.variables, x))
    return y.transpose(0, 3, 1, 2)


def _writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


def _no_leftovers(folder: Path, name: str):
    assert not (folder / name).exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(f".{name}.")]


# -- published packages ----------------------------------------------------------------------------
@needs_shared
@pytest.mark.parametrize("weights", ["torchscript", "onnx"])
def test_nuclei_broad_reproduces_test_output(weights, tmp_path):
    if weights == "onnx":
        pytest.importorskip("onnx")
    out = bioimageio.convert(NUCLEI, out=tmp_path / "nuclei", weights=weights)
    from cte_jax.modelio import load_model

    m = load_model(out)
    assert m.spec.final_activation == "sigmoid"  # from the description's postprocessing
    assert m.normalization["kind"] == "zscore"
    assert m.provenance["weights_format"] == weights
    y = run_model(out, np.load(NUCLEI / "test_input.npy"))
    ref = np.load(NUCLEI / "test_output.npy")
    assert y.shape == ref.shape
    assert np.max(np.abs(y - ref)) <= TOL


@needs_shared
def test_fixed_shape_state_dict_reproduces_test_output(tmp_path):
    out = converters.convert(FIXED, format="bioimageio", out=tmp_path / "fixed")
    from cte_jax.modelio import load_model

    m = load_model(out)
    assert m.provenance["weights_format"] == "pytorch_state_dict"
    assert m.provenance["family"] == "torch-em"
    y = run_model(out, np.load(FIXED / "test_input.npy"))
    assert np.max(np.abs(y - np.load(FIXED / "test_output.npy"))) <= TOL
    # the converter ran the same comparison itself and recorded it
    assert 0 <= m.provenance["test_output_max_abs_diff"] <= TOL


@needs_shared
def test_conversion_warns_when_the_scored_channel_is_all_foreground_on_the_test_input(tmp_path):
    """Fixed-shape outputs values in [0.003, 1.24], taken as logits: after the sigmoid every pixel
    of its test input is foreground, which the converter says. nuclei_broad gets no warning."""
    from cte_jax.cli import _conversion_facts

    fixed = json.loads((converters.convert(FIXED, format="bioimageio", out=tmp_path / "f") / "model.json").read_text())
    ref = np.load(FIXED / "test_output.npy")[:, 0]  # logits (no final activation): foreground where > 0
    assert fixed["provenance"]["test_output_foreground_fraction"] == pytest.approx(np.mean(ref > 0), abs=1e-6)
    assert any(line.startswith("warning:") and "100.0%" in line for line in _conversion_facts(fixed))
    nuclei = json.loads((converters.convert(NUCLEI, format="bioimageio", out=tmp_path / "n") / "model.json").read_text())
    want = np.mean(np.load(NUCLEI / "test_output.npy")[:, 0] > 0.5)  # ends in a sigmoid
    assert 0.01 < nuclei["provenance"]["test_output_foreground_fraction"] == pytest.approx(want, abs=1e-3)
    assert not any(line.startswith("warning:") for line in _conversion_facts(nuclei))


@needs_shared
def test_package_whose_test_output_is_not_reproduced_is_refused(tmp_path):
    """The converter runs the package's test input and compares with its test output: a package
    whose output differs (here: replaced by a constant) is refused, with nothing written."""
    pkg = _writable_copy(FIXED, tmp_path / "pkg")
    ref = np.load(pkg / "test_output.npy")
    np.save(pkg / "test_output.npy", np.full_like(ref, 0.5))
    with pytest.raises(CTEError) as e:
        converters.convert(pkg, format="bioimageio", out=tmp_path / "fixed")
    assert "does not reproduce the package's test output" in str(e.value) and "test_output.npy" in str(e.value)
    _no_leftovers(tmp_path, "fixed")
    # --normalize replaces the package's preprocessing, so the comparison no longer applies
    out = converters.convert(pkg, format="bioimageio", out=tmp_path / "fixed", normalize="zscore")
    assert "--normalize" in json.loads((out / "model.json").read_text())["provenance"]["test_output_check"]


@needs_shared
def test_missing_or_remote_test_tensor_is_named_as_the_reason_for_no_check(tmp_path):
    pkg = _writable_copy(FIXED, tmp_path / "pkg")
    (pkg / "test_output.npy").unlink()
    out = converters.convert(pkg, format="bioimageio", out=tmp_path / "a")
    reason = json.loads((out / "model.json").read_text())["provenance"]["test_output_check"]
    assert "test_output.npy" in reason and "not in the package" in reason
    rdf = bioimageio._find_rdf(pkg)
    text = rdf.read_text().replace("test_input.npy", "https://example.org/test_input.npy")
    rdf.write_text(text)
    out = converters.convert(pkg, format="bioimageio", out=tmp_path / "b")
    reason = json.loads((out / "model.json").read_text())["provenance"]["test_output_check"]
    assert "https://example.org/test_input.npy" in reason and "remote" in reason


@needs_shared
def test_nuclei_broad_black_box_reproduces_test_output(tmp_path):
    pytest.importorskip("onnxruntime")
    out = converters.convert(NUCLEI, format="bioimageio", out=tmp_path / "bb", black_box=True)
    from cte_jax.modelio import load_model

    assert load_model(out).is_black_box
    y = run_model(out, np.load(NUCLEI / "test_input.npy"))
    assert np.max(np.abs(y - np.load(NUCLEI / "test_output.npy"))) <= TOL


@needs_shared
def test_zip_package_equals_folder(tmp_path):
    import jax

    from cte_jax.modelio import load_model

    z = tmp_path / "fixed.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in FIXED.iterdir():
            zf.write(f, f.name)
    a = load_model(bioimageio.convert(FIXED, out=tmp_path / "a"))
    b = load_model(bioimageio.convert(z, out=tmp_path / "b"))
    assert a.spec == b.spec and a.normalization == b.normalization
    jax.tree.map(np.testing.assert_array_equal, a.variables, b.variables)


@needs_shared
def test_sha256_mismatch_is_refused(tmp_path):
    pkg = _writable_copy(FIXED, tmp_path / "pkg")
    rdf = pkg / "v0_4.bioimageio.yaml"
    rdf.write_text(rdf.read_text().replace("bcf26f08c26f5ef8f891c08dba2c8812bec7991643fb7c0f7b5d3e7dc321092f", "0" * 64))
    with pytest.raises(CTEError, match="sha256 mismatch") as e:
        bioimageio.convert(pkg, out=tmp_path / "out")
    assert "weights.pt" in str(e.value)
    _no_leftovers(tmp_path, "out")


@needs_shared
def test_truncated_weights_are_refused(tmp_path):
    pkg = _writable_copy(FIXED, tmp_path / "pkg")
    data = (pkg / "weights.pt").read_bytes()
    (pkg / "weights.pt").write_bytes(data[: len(data) // 2])
    rdf = pkg / "v0_4.bioimageio.yaml"
    text = "\n".join(line for line in rdf.read_text().splitlines() if "sha256: bcf26" not in line)
    rdf.write_text(text)
    with pytest.raises(CTEError) as e:
        bioimageio.convert(pkg, out=tmp_path / "out")
    assert "weights.pt" in str(e.value)
    _no_leftovers(tmp_path, "out")


# -- descriptions ------------------------------------------------------------------------------------
RDF_05 = """
format_version: 0.5.3
type: model
name: synthetic
inputs:
  - id: raw
    axes:
      - type: batch
      - type: channel
        channel_names: {channels}
      - id: y
        type: space
        size: 64
      - id: x
        type: space
        size: 64
    preprocessing: {pre}
outputs:
  - id: out
    axes:
      - type: batch
      - type: channel
        channel_names: [a]
      - id: y
        type: space
        size: {{tensor_id: raw, axis_id: y}}
      - id: x
        type: space
        size: {{tensor_id: raw, axis_id: x}}
    postprocessing: {post}
weights: {weights}
"""


def _package(tmp_path: Path, *, channels="[c0]", pre="[]", post="[]", weights="{}", name="pkg") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "rdf.yaml").write_text(RDF_05.format(channels=channels, pre=pre, post=post, weights=weights))
    return folder


@pytest.mark.parametrize("pre, expected", [
    ("[]", {"kind": "none"}),
    ("[{id: ensure_dtype, kwargs: {dtype: float32}}, {id: zero_mean_unit_variance, kwargs: {axes: [x, y]}}]",
     {"kind": "zscore", "eps": 1e-6}),
    ("[{id: scale_range, kwargs: {axes: [y, x], min_percentile: 1, max_percentile: 99.8}}]",
     {"kind": "percentile", "lo": 1.0, "hi": 99.8, "eps": 1e-6}),
    ("[{id: scale_range, kwargs: {max_percentile: 95, eps: 1.0e-10}}]",
     {"kind": "percentile", "lo": 0.0, "hi": 95.0, "eps": 1e-10}),
    ("[{id: scale_linear, kwargs: {gain: 1.0, offset: 0.0}}, {id: zero_mean_unit_variance, kwargs: {eps: 0.001}}]",
     {"kind": "zscore", "eps": 1e-3}),
])
def test_preprocessing_maps_onto_normalization(tmp_path, pre, expected):
    with bioimageio.open_package(_package(tmp_path, pre=pre)) as pkg:
        got = bioimageio.normalization_of(pkg)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v) if isinstance(v, float) else got[k] == v


@pytest.mark.parametrize("pre, channels, message", [
    ("[{id: zero_mean_unit_variance, kwargs: {axes: [x, y]}}]", "[r, g, b]", "per channel"),
    ("[{id: scale_linear, kwargs: {gain: 2.0, offset: 0.5}}]", "[c0]", "scale_linear"),
    ("[{id: clip, kwargs: {min: 0, max: 1}}]", "[c0]", "'clip' is not supported"),
    ("[{id: zero_mean_unit_variance, kwargs: {mode: per_dataset}}]", "[c0]", "per_sample"),
    ("[{id: zero_mean_unit_variance}, {id: scale_range}]", "[c0]", "only one normalising step"),
    ("[]", "[a, b]", "2 input channels"),
])
def test_unmappable_preprocessing_is_an_error(tmp_path, pre, channels, message):
    with bioimageio.open_package(_package(tmp_path, pre=pre, channels=channels)) as pkg:
        with pytest.raises(CTEError, match=message):
            bioimageio.normalization_of(pkg)


def test_postprocessing_and_weight_format_errors(tmp_path):
    folder = _package(tmp_path, post="[{id: binarize, kwargs: {threshold: 0.5}}]",
                      weights="{tensorflow_saved_model_bundle: {source: tf.zip}}")
    with bioimageio.open_package(folder) as pkg:
        with pytest.raises(CTEError, match="binarize"):
            bioimageio.output_activation(pkg)
    with pytest.raises(CTEError, match="no supported weights"):
        bioimageio.convert(folder, out=tmp_path / "out")
    _no_leftovers(tmp_path, "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CTEError, match="no bioimage.io description"):
        bioimageio.convert(empty, out=tmp_path / "o")


def test_synthetic_pytorch_3dunet_package(tmp_path):
    """A 0.5 package with pytorch-3dunet state-dict weights, kwargs, percentile preprocessing and a
    sigmoid postprocessing; compared with PyTorch on NumPy-normalised input."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).parent))
    from torch_reference import UNet2D3dunet, randomize_

    kwargs = {"in_channels": 1, "out_channels": 1, "f_maps": 4, "num_levels": 3, "layer_order": "bcr",
              "is_segmentation": False}
    model = randomize_(UNet2D3dunet(**kwargs), seed=11)
    folder = tmp_path / "pkg"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "weights.pt")
    from converters._common import sha256_of

    weights = ("{pytorch_state_dict: {source: weights.pt, sha256: %s, architecture: {callable: UNet2D, "
               "import_from: pytorch3dunet.unet3d.model, kwargs: %s}}}" % (sha256_of(folder / "weights.pt"), kwargs))
    (folder / "rdf.yaml").write_text(RDF_05.format(
        channels="[c0]", pre="[{id: scale_range, kwargs: {axes: [y, x], min_percentile: 2, max_percentile: 98}}]",
        post="[{id: sigmoid}]", weights=weights))
    out = bioimageio.convert(folder, out=tmp_path / "m")
    img = np.random.default_rng(3).gamma(2.0, 50.0, size=(1, 1, 35, 33)).astype(np.float32)
    lo, hi = np.percentile(img, [2, 98])
    with torch.no_grad():
        x = ((img.astype(np.float64) - lo) / (hi - lo + 1e-6)).astype(np.float32)
        ref = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    assert np.max(np.abs(run_model(out, img) - ref)) <= TOL
