"""bioimage.io model packages (folder or zip; spec 0.4 and 0.5) -> cte_jax model directories.

The description (``rdf.yaml``, ``bioimageio.yaml`` or ``*.bioimageio.yaml``) gives the input axes
and channels, the input preprocessing (mapped onto a :class:`cte_jax.preprocess.Normalization`),
the output postprocessing (``sigmoid`` / ``softmax`` become the network's final activation) and
the weights. Weight formats, in the order tried: ``pytorch_state_dict`` (when its file is in the
package), ``torchscript`` (parameters read from the archive by the restricted unpickler; no
TorchScript code is run), ``onnx`` (initializers read with the ``onnx`` package). The weight
names decide the U-Net family (:mod:`converters._families`); the description's architecture
kwargs are used when they belong to that family. Every weight file's sha256 is checked against
the description. An ONNX graph that is not a recognised U-Net (or ``black_box=True``) becomes a
black-box model.

Preprocessing mapped (anything else is a CTEError naming the step): ``zero_mean_unit_variance``
per sample -> zscore (eps from the description, default 1e-6); ``scale_range`` per sample ->
percentile (min/max percentile, eps default 1e-6); ``scale_linear`` with gain 1 and offset 0;
``ensure_dtype`` (ignored). Statistics are over all channels, so per-channel statistics are only
accepted for one-channel inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from converters import _common as C
from converters import _families, torch_pickle
from cte_jax.errors import CTEError

FORMAT = "bioimageio"
WEIGHT_ORDER = ("pytorch_state_dict", "torchscript", "onnx")
_WEIGHT_ALIASES = {"pytorch_script": "torchscript"}


@dataclasses.dataclass
class Package:
    """A bioimage.io model description, normalised across spec versions 0.4 and 0.5.

    Attributes:
      root: folder holding the package's files (a temporary extraction for a zip).
      rdf_path: the description file.
      rdf: the raw description.
      version: (major, minor) of ``format_version``.
      name: the model's name.
      input_axes / output_axes: axis letters (``b``, ``c``, ``y``, ``x``, ``z``, ``t``, ``i``).
      in_channels: channels of the input.
      preprocessing / postprocessing: ``[(op, kwargs), ...]``.
      weights: format -> ``{"source", "sha256", "callable", "kwargs"}``.
      test_input / test_output: the test tensors when the description names them: a path in the
        package (which may be missing), or the address of a remote file (a str, not downloaded).
    """

    root: Path
    rdf_path: Path
    rdf: dict
    version: tuple[int, int]
    name: str
    input_axes: str
    output_axes: str
    in_channels: int
    preprocessing: list
    postprocessing: list
    weights: dict
    test_input: Path | str | None
    test_output: Path | str | None


def _find_rdf(folder: Path) -> Path:
    for name in ("bioimageio.yaml", "rdf.yaml"):
        if (folder / name).is_file():
            return folder / name
    hits = sorted(folder.glob("*.bioimageio.yaml"))
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise CTEError(f"several descriptions {[h.name for h in hits]}; keep one", folder)
    raise CTEError("no bioimage.io description (rdf.yaml, bioimageio.yaml or *.bioimageio.yaml)", folder)


def _safe_extract(zf: zipfile.ZipFile, dest: Path, source: Path) -> None:
    dest_r = dest.resolve()
    for info in zf.infolist():
        target = (dest / info.filename).resolve()
        if dest_r not in target.parents and target != dest_r:
            raise CTEError(f"zip member {info.filename!r} points outside the package", source)
    zf.extractall(dest)


@contextlib.contextmanager
def open_package(source: str | os.PathLike) -> Iterator[Package]:
    """The package at ``source`` (folder, description file, or zip) for the ``with`` block."""
    source = Path(source)
    if not source.exists():
        raise CTEError("bioimage.io package not found", source)
    if source.is_file() and zipfile.is_zipfile(source):
        with tempfile.TemporaryDirectory(prefix="cte_bioimageio_") as tmp:
            try:
                with zipfile.ZipFile(source) as zf:
                    _safe_extract(zf, Path(tmp), source)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise CTEError(f"unreadable zip package: {e}", source) from None
            root = Path(tmp)
            subdirs = [p for p in root.iterdir()]
            if not any(p.name.endswith(("rdf.yaml", "bioimageio.yaml")) for p in subdirs) and len(subdirs) == 1 \
                    and subdirs[0].is_dir():
                root = subdirs[0]
            try:
                rdf = _find_rdf(root)
            except CTEError as e:  # name the zip, not its temporary extraction
                hint = " (a PyTorch checkpoint? use --format torch-em or pytorch-3dunet)" if source.suffix.lower() in (
                    ".pt", ".pth", ".pytorch") else ""
                raise CTEError(f"{e.problem} in the zip{hint}", source) from None
            yield _read(rdf, source)
        return
    if source.is_file():
        yield _read(source, source)
        return
    yield _read(_find_rdf(source), source)


def _ops(steps: Any, where) -> list:
    out = []
    for step in steps or []:
        if not isinstance(step, dict):
            raise CTEError(f"bad processing step {step!r}", where)
        op = step.get("id", step.get("name"))
        out.append((str(op), dict(step.get("kwargs") or {})))
    return out


def _axes_v05(axes: list, where) -> tuple[str, int | None]:
    letters, channels = "", None
    for ax in axes:
        if isinstance(ax, str):
            letters += ax
            continue
        kind = ax.get("type")
        if kind == "batch":
            letters += "b"
        elif kind == "channel":
            letters += "c"
            names = ax.get("channel_names")
            channels = len(names) if isinstance(names, list) else channels
        elif kind == "space":
            letters += str(ax.get("id", "x"))[0]
        elif kind == "time":
            letters += "t"
        elif kind == "index":
            letters += "i"
        else:
            raise CTEError(f"unknown axis type {kind!r}", where)
    return letters, channels


def _read(rdf_path: Path, source: Path) -> Package:
    import yaml

    if rdf_path.suffix.lower() == ".onnx":
        raise CTEError("is an ONNX graph, not a bioimage.io package: convert it with --format onnx", rdf_path)
    if rdf_path.suffix.lower() in (".pt", ".pth", ".pytorch", ".ckpt"):
        raise CTEError("is a PyTorch checkpoint, not a bioimage.io package: convert it with --format "
                       "pytorch-3dunet or torch-em (and --arch)", rdf_path)
    try:
        rdf = yaml.safe_load(rdf_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CTEError(f"unreadable description: {str(e).splitlines()[0]}", rdf_path) from None
    if not isinstance(rdf, dict):
        raise CTEError("the description is not a mapping", rdf_path)
    if rdf.get("type", "model") != "model":
        raise CTEError(f"type {rdf.get('type')!r}: not a model description", rdf_path)
    m = re.match(r"(\d+)\.(\d+)", str(rdf.get("format_version", "")))
    if not m:
        raise CTEError(f"format_version {rdf.get('format_version')!r} not understood", rdf_path)
    version = (int(m.group(1)), int(m.group(2)))
    if version not in ((0, 4), (0, 5)):
        raise CTEError(f"bioimage.io spec {version[0]}.{version[1]}: supported are 0.4 and 0.5", rdf_path)
    inputs, outputs = rdf.get("inputs") or [], rdf.get("outputs") or []
    if len(inputs) != 1 or len(outputs) < 1:
        raise CTEError(f"{len(inputs)} inputs, {len(outputs)} outputs: only single-input models are supported",
                       rdf_path)
    inp, outp = inputs[0], outputs[0]
    root = rdf_path.parent
    if version == (0, 4):
        in_axes, out_axes = str(inp.get("axes", "")), str(outp.get("axes", ""))
        shape = inp.get("shape")
        channels = None
        if "c" in in_axes:
            ci = in_axes.index("c")
            if isinstance(shape, list):
                channels = int(shape[ci])
            elif isinstance(shape, dict) and isinstance(shape.get("min"), list):
                channels = int(shape["min"][ci])
        else:
            channels = 1
        tin = (rdf.get("test_inputs") or [None])[0]
        tout = (rdf.get("test_outputs") or [None])[0]
    else:
        in_axes, channels = _axes_v05(inp.get("axes") or [], rdf_path)
        out_axes, _ = _axes_v05(outp.get("axes") or [], rdf_path)
        if "c" not in in_axes:
            channels = 1
        tin = (inp.get("test_tensor") or {}).get("source")
        tout = (outp.get("test_tensor") or {}).get("source")
    weights = {}
    for fmt, entry in (rdf.get("weights") or {}).items():
        fmt = _WEIGHT_ALIASES.get(fmt, fmt)
        if not isinstance(entry, dict):
            continue
        arch = entry.get("architecture")
        kwargs = entry.get("kwargs") or {}
        callable_name = None
        if isinstance(arch, str):  # 0.4: "file.py:Class" or "package.module.Class"
            callable_name = re.split(r"[:.]", arch)[-1]
        elif isinstance(arch, dict):  # 0.5
            callable_name = arch.get("callable")
            kwargs = arch.get("kwargs") or kwargs
        weights[fmt] = {"source": entry.get("source"), "sha256": entry.get("sha256"), "callable": callable_name,
                        "kwargs": dict(kwargs), "architecture": arch}
    return Package(
        root=root, rdf_path=rdf_path, rdf=rdf, version=version, name=str(rdf.get("name", source.stem)),
        input_axes=in_axes, output_axes=out_axes, in_channels=int(channels or 1),
        preprocessing=_ops(inp.get("preprocessing"), rdf_path), postprocessing=_ops(outp.get("postprocessing"), rdf_path),
        weights=weights, test_input=_tensor_ref(root, tin), test_output=_tensor_ref(root, tout))


def _tensor_ref(root: Path, src: Any) -> Path | str | None:
    """A test tensor's path in the package, or its address when it is remote (never downloaded)."""
    if not src or not isinstance(src, str):
        return None
    return src if re.match(r"^[a-z]+://", src) else (root / src).resolve()


def _local(root: Path, src: Any) -> Path | None:
    if not src or not isinstance(src, str) or re.match(r"^[a-z]+://", src):
        return None
    p = (root / src).resolve()
    return p if p.is_file() else None


# -- preprocessing and postprocessing ------------------------------------------------------------
def _axis_set(value: Any) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, str):
        return set(value)
    return {"c" if str(a) == "channel" else str(a)[0] for a in value}


def normalization_of(pkg: Package) -> dict:
    """The input preprocessing as a :class:`cte_jax.preprocess.Normalization` dict."""
    from cte_jax.preprocess import Normalization

    where = pkg.rdf_path
    chosen = None
    for op, kw in pkg.preprocessing:
        if op == "ensure_dtype":
            continue
        if op == "scale_linear":
            gain, offset = kw.get("gain", 1.0), kw.get("offset", 0.0)
            if np.all(np.asarray(gain, float) == 1.0) and np.all(np.asarray(offset, float) == 0.0):
                continue
            raise CTEError(f"preprocessing scale_linear (gain {gain}, offset {offset}) cannot be represented; "
                           "convert with --normalize to choose one", where)
        if chosen is not None:
            raise CTEError(f"preprocessing {op} after {chosen.kind}: only one normalising step is supported", where)
        mode = kw.get("mode", "per_sample")
        if mode != "per_sample":
            raise CTEError(f"preprocessing {op} with mode {mode!r}: only per_sample statistics are supported", where)
        axes = _axis_set(kw.get("axes"))
        if pkg.in_channels > 1 and axes and "c" not in axes:
            raise CTEError(f"preprocessing {op} per channel on a {pkg.in_channels}-channel input: cte_jax "
                           "normalises all channels together", where)
        if kw.get("reference_tensor") not in (None, pkg.rdf["inputs"][0].get("id", pkg.rdf["inputs"][0].get("name"))):
            raise CTEError(f"preprocessing {op} with a reference tensor is not supported", where)
        eps = float(kw.get("eps", 1e-6))
        if op == "zero_mean_unit_variance":
            chosen = Normalization("zscore", eps=eps, in_channels=_in_ch(pkg))
        elif op == "scale_range":
            chosen = Normalization("percentile", lo=float(kw.get("min_percentile", 0.0)),
                                   hi=float(kw.get("max_percentile", 100.0)), eps=eps, in_channels=_in_ch(pkg))
        else:
            raise CTEError(f"preprocessing {op!r} is not supported (supported: zero_mean_unit_variance, "
                           "scale_range, scale_linear identity, ensure_dtype); convert with --normalize", where)
    if chosen is None:
        chosen = Normalization("none", in_channels=_in_ch(pkg))
    return chosen.to_dict()


def _in_ch(pkg: Package) -> int:
    if pkg.in_channels not in (1, 3):
        raise CTEError(f"the model takes {pkg.in_channels} input channels; cte_jax models take 1 or 3", pkg.rdf_path)
    return pkg.in_channels


def output_activation(pkg: Package) -> str | None:
    """``sigmoid`` / ``softmax`` from the output postprocessing, or None."""
    act = None
    for op, kw in pkg.postprocessing:
        if op == "ensure_dtype":
            continue
        if op in ("sigmoid", "softmax") and act is None:
            if op == "softmax" and kw.get("axis", "channel") not in ("channel", "c"):
                raise CTEError(f"softmax over axis {kw.get('axis')!r}: only over channels", pkg.rdf_path)
            act = op
            continue
        raise CTEError(f"output postprocessing {op!r} is not supported (only sigmoid / softmax)", pkg.rdf_path)
    return act


# -- weights -------------------------------------------------------------------------------------
def _weight_file(pkg: Package, fmt: str) -> Path:
    entry = pkg.weights[fmt]
    src = entry.get("source")
    path = _local(pkg.root, src)
    if path is None:
        raise CTEError(f"{fmt} weights {src!r} are not in the package (remote files are not downloaded)", pkg.rdf_path)
    C.verify_sha256(path, entry.get("sha256"))
    return path


def _kwargs_family(entry: dict | None) -> str | None:
    if not entry:
        return None
    name, kw = entry.get("callable"), entry.get("kwargs") or {}
    arch = entry.get("architecture")
    text = str(arch.get("import_from", "")) if isinstance(arch, dict) else str(arch or "")
    if name == "UNet2D" or "pytorch3dunet" in text:
        return "pytorch-3dunet"
    if "torch_em" in text or {"depth", "initial_features"} & set(kw):
        return "torch-em"
    if name == "UNet2d" and set(kw) <= {"input_channels", "output_channels"}:
        return "unet2d-example"
    return None


def _final_from_script(root) -> str | None | bool:
    """Sigmoid/Softmax module of a scripted pytorch-3dunet / torch-em net; False if unknown."""
    fa = getattr(root, "final_activation", False)
    if fa is False:
        return False
    if fa is None:
        return None
    q = getattr(fa, "qualname", "")
    if q.endswith(".Sigmoid"):
        return "sigmoid"
    if q.endswith((".Softmax", ".Softmax2d")):
        return "softmax"
    return False


def _combine(network_final: str | None, post: str | None, where) -> str | None:
    if network_final and post:
        raise CTEError(f"the network ends in {network_final} and the description adds {post}", where)
    return network_final or post


def _grey_box(pkg: Package, fmt: str) -> tuple[Any, dict, dict]:
    """(spec, variables, info) from one weight format; CTEError if it cannot be used."""
    dc = dataclasses
    path = _weight_file(pkg, fmt)
    post = output_activation(pkg)
    sd_entry = pkg.weights.get("pytorch_state_dict")
    info = {"weights_format": fmt, "weights_file": path.name, "weights_sha256": C.sha256_of(path)}
    if fmt == "onnx":
        from converters import onnx_model

        state_family = _families.detect(onnx_model.initializers(onnx_model.load(path)))
        kwargs = sd_entry["kwargs"] if sd_entry and _kwargs_family(sd_entry) == state_family and state_family != \
            "unet2d-example" else None
        try:
            spec, variables, extra = onnx_model.from_onnx(path, kwargs=kwargs)
        except onnx_model.NotRecognised as e:
            raise _Unrecognised(str(e)) from None
        spec = dc.replace(spec, final_activation=_combine(spec.final_activation, post, pkg.rdf_path))
        info.update(extra)
        return spec, variables, info
    if fmt == "torchscript":
        root = torch_pickle.load_torchscript(path)
        state = torch_pickle.script_parameters(root)
        script_final = _final_from_script(root)
    elif fmt == "pytorch_state_dict":
        state = torch_pickle.load_state_dict(path)
        script_final = False
    else:
        raise CTEError(f"weight format {fmt!r} is not supported (supported: {', '.join(WEIGHT_ORDER)})", pkg.rdf_path)
    family = _families.detect(state)
    if family is None:
        raise _Unrecognised(f"{fmt} weight names are not those of a known U-Net (first: {sorted(state)[:4]})")
    kwargs = sd_entry["kwargs"] if sd_entry and _kwargs_family(sd_entry) == family and family != "unet2d-example" else None
    inner = False  # bioimage.io's example unet2d.py: conv, conv, ReLU
    if fmt == "torchscript" and family == "unet2d-example":
        kinds = [getattr(getattr(getattr(root, "encoders", None), "0", None), str(i), None) for i in range(3)]
        names = [getattr(k, "qualname", "").rsplit(".", 1)[-1] for k in kinds]
        if names[:2] != ["Conv2d", "Conv2d"]:
            inner = True
            if names[:3] != ["Conv2d", "ReLU", "Conv2d"]:
                raise _Unrecognised(f"unet2d encoder blocks made of {names}")
    spec, variables = _families.build(family, state, kwargs, source=path, inner_activation=inner)
    net_final = spec.final_activation
    if script_final is not False and kwargs is None:
        net_final = script_final
    spec = dc.replace(spec, final_activation=_combine(net_final, post, pkg.rdf_path))
    info["family"] = family
    return spec, variables, info


class _Unrecognised(Exception):
    pass


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return s or "model"


def _as_byxc(a: np.ndarray, axes: str, where) -> np.ndarray:
    """A test tensor with axis letters ``axes`` (b, c, y, x) as (b y x c)."""
    if a.ndim != len(axes) or set(axes) - set("bcyx"):
        raise CTEError(f"test tensor of shape {a.shape} does not fit axes {axes!r}", where)
    for letter in "bc":
        if letter not in axes:
            a, axes = a[None], letter + axes
    return np.moveaxis(a, [axes.index(c) for c in "byxc"], range(4)).astype(np.float32)


def check_test_output(pkg: Package, model, provenance: dict, *, normalize_given: bool) -> None:
    """Run the package's test input through the converted ``model`` (its normalisation, then the
    network with the description's postprocessing) and compare with the package's test output.

    Records ``test_output_max_abs_diff`` (or why there was no check) in ``provenance``.

    Raises:
      CTEError: the difference exceeds the tolerance of :mod:`converters.onnx_model` (relative
        to the output's scale): the converted model does not compute what the package does.
    """
    import jax
    import jax.numpy as jnp

    from converters.onnx_model import VERIFY_TOLERANCE
    from cte_jax.preprocess import Normalization, normalize

    if normalize_given:
        provenance["test_output_check"] = "skipped: --normalize replaces the package's preprocessing"
        return
    if pkg.test_input is None or pkg.test_output is None:
        provenance["test_output_check"] = "skipped: the package has no test tensors"
        return
    for f in (pkg.test_input, pkg.test_output):
        if isinstance(f, str):
            provenance["test_output_check"] = f"skipped: the test tensor {f} is remote and is not downloaded"
            return
        if not f.is_file():
            provenance["test_output_check"] = (f"skipped: the test tensor {f.name} named in the description is "
                                               f"not in the package")
            return
    try:
        x = _as_byxc(np.load(pkg.test_input), pkg.input_axes, pkg.test_input)
        ref = _as_byxc(np.load(pkg.test_output), pkg.output_axes, pkg.test_output)
    except ValueError as e:  # not an .npy file
        raise CTEError(f"unreadable test tensor: {e}", pkg.test_input) from None
    norm = Normalization.from_dict(model.normalization)
    x = np.stack([normalize(img, norm) for img in x])
    if model.is_black_box:
        y = probs = model.predict(x)
    else:  # one forward pass: the network's output for the comparison, probabilities for the share below
        from cte_jax.networks import UNet, activate, probabilities

        logits = jax.jit(lambda v, a: UNet(model.spec).apply(v, a, method=UNet.logits))(model.variables, x)
        logits = logits.astype(jnp.float32)
        y, probs = np.asarray(activate(model.spec, logits)), np.asarray(probabilities(model.spec, logits))
    if y.shape != ref.shape:
        raise CTEError(f"the converted model outputs {y.shape} (b y x c) for the test input, the package's "
                       f"test output is {ref.shape}", pkg.test_output)
    diff = float(np.max(np.abs(y - ref)))
    tol = VERIFY_TOLERANCE * max(1.0, float(np.max(np.abs(ref))))
    if not diff <= tol:
        raise CTEError(f"the converted model does not reproduce the package's test output: max abs difference "
                       f"{diff:.3g} (tolerance {tol:.3g}); nothing was written", pkg.test_output)
    provenance["test_output_max_abs_diff"] = diff
    # What the ranking will see: the share of the test input called foreground in the scored channel.
    provenance["test_output_foreground_fraction"] = float(np.mean(probs[..., model.channel] > 0.5))


def convert(source: str | os.PathLike, *, normalize: Any = None, out: str | os.PathLike | None,
            bank: str | os.PathLike | None = None, overwrite: bool = False, black_box: bool = False,
            weights: str | None = None, task: str = "foreground", channel: int = 0) -> Path:
    """Convert a bioimage.io model package to a model directory.

    Args:
      source: package folder, its description file, or a ``.zip``.
      normalize: override the description's preprocessing (``percentile:LO,HI`` | ``zscore`` |
        ``minmax:A,B`` | ``none``).
      out, bank, overwrite, task, channel: as :func:`converters.convert`.
      black_box: use the package's ONNX weights as a black-box model.
      weights: the weight format to use (``pytorch_state_dict``, ``torchscript``, ``onnx``);
        default: the first of those that is in the package and a recognised U-Net.

    Raises:
      CTEError: unreadable package, sha256 mismatch, unsupported preprocessing or weights.
    """
    source = Path(source)
    with open_package(source) as pkg:
        target = C.resolve_out(out, bank, _slug(pkg.name))
        if target.exists() and not overwrite:
            raise CTEError("already exists (choose another --out, remove it, or pass --overwrite)", target)
        if pkg.input_axes.replace("b", "") not in ("cyx", "yx") or pkg.output_axes.replace("b", "") not in ("cyx", "yx"):
            raise CTEError(f"axes {pkg.input_axes!r} -> {pkg.output_axes!r}: only 2D (b)(c)yx models are supported",
                           pkg.rdf_path)
        if weights is not None:
            weights = _WEIGHT_ALIASES.get(weights, weights)
            if weights not in pkg.weights:
                raise CTEError(f"no {weights} weights in the package (it has {sorted(pkg.weights)})", pkg.rdf_path)
        norm = normalization_of(pkg) if normalize is None else C.normalization_dict(
            normalize, default=None, in_channels=_in_ch(pkg), source=source)
        provenance: dict[str, Any] = {
            "converter": f"converters.bioimageio ({FORMAT})", "source": str(source.resolve()),
            "description": pkg.rdf_path.name, "format_version": str(pkg.rdf.get("format_version")),
            "bioimageio_name": pkg.name, "license": pkg.rdf.get("license"),
            "normalization_from": "--normalize" if normalize is not None else "description preprocessing"}
        if black_box:
            return _black_box(pkg, target, norm, provenance, overwrite, task, channel, "--black-box",
                              normalize_given=normalize is not None)
        order = [weights] if weights else [f for f in WEIGHT_ORDER if f in pkg.weights]
        unsupported = sorted(set(pkg.weights) - set(WEIGHT_ORDER))
        if not order:
            raise CTEError(f"no supported weights: the package has {sorted(pkg.weights)}, supported are "
                           f"{', '.join(WEIGHT_ORDER)}", pkg.rdf_path)
        reasons = []
        for fmt in order:
            try:
                spec, variables, info = _grey_box(pkg, fmt)
            except _Unrecognised as e:
                reasons.append(f"{fmt}: {e}")
                continue
            except CTEError as e:
                if weights or fmt == order[-1] and not reasons:
                    raise
                reasons.append(f"{fmt}: {e}")
                continue
            provenance.update(info)
            if reasons:
                provenance["skipped_weights"] = reasons
            from cte_jax.modelio import Model

            model = Model(name=pkg.name, normalization=norm, spec=spec, variables=variables)
            check_test_output(pkg, model, provenance, normalize_given=normalize is not None)
            return C.write_grey_box(out=target, spec=spec, variables=variables, normalization=norm,
                                    provenance=provenance, task=task, channel=channel, overwrite=overwrite)
        if "onnx" in pkg.weights and (weights in (None, "onnx")):
            return _black_box(pkg, target, norm, provenance, overwrite, task, channel, "; ".join(reasons),
                              normalize_given=normalize is not None)
        extra = f" (also unsupported: {unsupported})" if unsupported else ""
        raise CTEError("no usable weights: " + "; ".join(reasons) + extra, pkg.rdf_path)


def _black_box(pkg: Package, target: Path, norm: dict, provenance: dict, overwrite: bool, task: str, channel: int,
               reason: str, *, normalize_given: bool) -> Path:
    from converters import onnx_model
    from cte_jax.blackbox import onnx_predictor
    from cte_jax.modelio import Model

    if "onnx" not in pkg.weights:
        raise CTEError(f"a black-box model needs onnx weights; the package has {sorted(pkg.weights)}", pkg.rdf_path)
    path = _weight_file(pkg, "onnx")
    post = output_activation(pkg)
    axes = pkg.input_axes if "b" in pkg.input_axes else "b" + pkg.input_axes
    if "c" not in axes:
        raise CTEError("black-box models need an input with a channel axis", pkg.rdf_path)
    provenance = {**provenance, "weights_format": "onnx", "weights_file": path.name,
                  "weights_sha256": C.sha256_of(path), "black_box_reason": reason}
    graph = onnx_model.load(path)
    desc = onnx_model.black_box_description(path, final_activation=post, normalization=norm, task=task,
                                            channel=channel, provenance=provenance, axes=axes, model=graph)
    # checked as the package computes it: graph, then the description's postprocessing
    raw = Model(name=pkg.name, normalization=norm, predict=onnx_predictor(path, desc, raw=True))
    check_test_output(pkg, raw, provenance, normalize_given=normalize_given)
    graph_final = onnx_model.output_activation(graph)
    provenance["graph_final_activation"] = graph_final
    if post is None and graph_final is None:  # logits: the sigmoid a grey-box network would get
        desc["postprocessing"] = "sigmoid"
    return C.write_black_box(out=target, onnx_file=path, description=desc, overwrite=overwrite)
