"""Shared pieces of the converters: weight layout changes, name-by-name checks, writing models."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from cte_jax.arch import UNetSpec
from cte_jax.errors import CTEError

# What to do with the weights of a network the family converters do not know.
NOT_THIS_NETWORK = ("for a state dict of another network, export the network to ONNX (torch.onnx.export) "
                    "and convert that with --format onnx")
# State-dict entries that carry no weights a network needs in inference.
IGNORED_SUFFIXES = ("num_batches_tracked",)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One of our variables and where it comes from.

    Attributes:
      ours: path in the Flax variable tree, e.g. ``("params", "encoders_0", "unit_0", "conv", "kernel")``.
      key: the source (PyTorch) name, e.g. ``"encoders.0.basic_module.SingleConv1.conv.weight"``;
        ignored for ``kind="zeros"``.
      kind: how to turn the source array into ours:
        ``conv``: OIHW (or O I 1 H W, the old Conv3d layout) -> HWIO;
        ``deconv``: ConvTranspose (I O H W) -> spatially flipped (H W I O);
        ``vec``: a 1-D vector as is;
        ``zeros``: not in the source (a bias PyTorch does not have); filled with zeros.
    """

    ours: tuple[str, ...]
    key: str
    kind: str


def _torch_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "conv":
        kh, kw, i, o = ours
        return (o, i, kh, kw)
    if kind == "deconv":
        kh, kw, i, o = ours
        return (i, o, kh, kw)
    return tuple(ours)


def _transform(kind: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if kind == "conv":
        if a.ndim == 5:  # Conv3d with a (1, kh, kw) kernel: the old pytorch-3dunet 2D layout
            a = a[:, :, 0]
        return np.ascontiguousarray(a.transpose(2, 3, 1, 0))
    if kind == "deconv":
        return np.ascontiguousarray(a[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))
    return a


def _fits(kind: str, have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    if have == want:
        return True
    # Old pytorch-3dunet 2D nets were Conv3d with (1, 3, 3) kernels: weights O I 1 H W.
    return kind == "conv" and len(have) == 5 and have[2] == 1 and have[:2] + have[3:] == want


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def assemble(spec: UNetSpec, state: Mapping[str, np.ndarray], entries: Iterable[Entry],
             source: str | os.PathLike, *, what: str = "architecture") -> dict:
    """Build the Flax variables of ``spec`` from a state dict, checking every name and shape.

    Args:
      spec: the architecture.
      state: source name -> array.
      entries: where each of our variables comes from (must cover all of them).
      source: the file, for error messages.
      what: how to call the architecture in messages.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` as nested dicts of float32 NumPy arrays.

    Raises:
      CTEError: listing missing, unexpected and mis-shaped source keys by name.
    """
    from cte_jax.networks import abstract_variables
    import jax

    abstract = {tuple(getattr(k, "key", str(k)) for k in path): leaf.shape
                for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_variables(spec))}
    entries = list(entries)
    covered = {e.ours for e in entries}
    if covered != set(abstract):  # a converter bug, not a user error
        raise AssertionError(f"converter mapping does not cover the network: missing {sorted(set(abstract) - covered)}, "
                             f"extra {sorted(covered - set(abstract))}")
    missing, shaped = [], []
    used = set()
    out: dict = {}
    for e in entries:
        want = tuple(abstract[e.ours])
        if e.kind == "zeros":
            value = np.zeros(want, np.float32)
        else:
            if e.key not in state:
                missing.append(e.key)
                continue
            used.add(e.key)
            arr = np.asarray(state[e.key])
            need = _torch_shape(e.kind, want)
            if not _fits(e.kind, tuple(arr.shape), need):
                shaped.append(f"{e.key} has shape {tuple(arr.shape)}, needs {need}")
                continue
            if not np.issubdtype(arr.dtype, np.floating):
                shaped.append(f"{e.key} has dtype {arr.dtype}, expected floating point")
                continue
            value = _transform(e.kind, arr)
        node = out
        for part in e.ours[:-1]:
            node = node.setdefault(part, {})
        node[e.ours[-1]] = value
    unexpected = sorted(k for k in state if k not in used and not k.endswith(IGNORED_SUFFIXES))
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shaped:
        problems.append("mis-shaped: " + "; ".join(shaped[:6]) + (" ..." if len(shaped) > 6 else ""))
    if problems:
        raise CTEError(f"weights do not fit the {what}: " + " | ".join(problems), source)
    _check_finite(out, source)
    return out


def _check_finite(tree: dict, source) -> None:
    stack = [("", tree)]
    while stack:
        prefix, node = stack.pop()
        for k, v in node.items():
            if isinstance(v, dict):
                stack.append((f"{prefix}/{k}", v))
            elif not np.isfinite(v).all():
                raise CTEError(f"weight {prefix}/{k} contains NaN or infinite values", source)


def conv_unit_entries(spec: UNetSpec, ours: tuple[str, ...], conv_key: str, norm_key: str | None,
                      *, collection_stats: bool = True) -> list[Entry]:
    """Entries of one conv unit: ``ours`` is e.g. ``("encoders_0", "unit_1")``; ``conv_key`` and
    ``norm_key`` the source module prefixes (without ``.weight``)."""
    es = [Entry(("params", *ours, "conv", "kernel"), conv_key + ".weight", "conv")]
    if spec.conv_bias:
        es.append(Entry(("params", *ours, "conv", "bias"), conv_key + ".bias", "vec"))
    order = spec.layer_order
    if "g" in order or "b" in order:
        if norm_key is None:
            raise AssertionError("a norm layer needs a source key")
        es.append(Entry(("params", *ours, "norm", "scale"), norm_key + ".weight", "vec"))
        es.append(Entry(("params", *ours, "norm", "bias"), norm_key + ".bias", "vec"))
    if "b" in order and collection_stats:
        es.append(Entry(("batch_stats", *ours, "norm", "mean"), norm_key + ".running_mean", "vec"))
        es.append(Entry(("batch_stats", *ours, "norm", "var"), norm_key + ".running_var", "vec"))
    return es


def final_entries(key: str) -> list[Entry]:
    return [Entry(("params", "final", "kernel"), key + ".weight", "conv"),
            Entry(("params", "final", "bias"), key + ".bias", "vec")]


# -- files ----------------------------------------------------------------------------------------
def sha256_of(path: str | os.PathLike) -> str:
    path = Path(path)
    if path.is_dir():
        raise CTEError("is a folder, not a weights file (a bioimage.io package folder is --format bioimageio)", path)
    if not path.is_file():
        raise CTEError("file not found", path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str | None) -> str:
    """The file's sha256; CTEError if ``expected`` is given and differs."""
    got = sha256_of(path)
    # YAML may read an all-digit hash as a number: compare as text, and never skip a given value
    if expected is not None and str(expected).strip() != "" and got.lower() != str(expected).strip().lower():
        raise CTEError(f"sha256 mismatch: the description says {expected}, the file has {got}", path)
    return got


def parse_kwargs_text(text: str | os.PathLike | Mapping | None, what: str = "--arch") -> dict:
    """``--arch`` as a dict, inline JSON/YAML text, or the path of a JSON/YAML file."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    import yaml

    where = None
    s = os.fspath(text) if isinstance(text, os.PathLike) else str(text)
    p = Path(s)
    if not s.lstrip().startswith(("{", "[")) and len(s) < 4096:
        try:
            is_file = p.is_file()
        except OSError:
            is_file = False
        if is_file:
            where = p
            try:
                s = p.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise CTEError(f"cannot read {what} file: {e}", p) from None
        elif s.endswith((".yaml", ".yml", ".json")):
            raise CTEError(f"{what} file not found", p)
    try:
        d = yaml.safe_load(s)
    except yaml.YAMLError as e:
        raise CTEError(f"{what} is not valid JSON/YAML: {str(e).splitlines()[0]}", where) from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise CTEError(f"{what} must be a mapping of keyword arguments, got {type(d).__name__}", where)
    if isinstance(d.get("model"), dict):
        # a whole pytorch-3dunet training config: take its model section
        d = d["model"]
    return d


def normalization_dict(normalize: Any, *, default: Any, in_channels: int, source) -> dict:
    """The model's preprocessing dict from ``--normalize`` (string, dict or Normalization) or the
    format's default."""
    from cte_jax.preprocess import Normalization, parse_normalization

    value = default if normalize is None else normalize
    if in_channels not in (1, 3):
        raise CTEError(f"the network takes {in_channels} input channels; cte_jax models take 1 or 3", source)
    try:
        if isinstance(value, Normalization):
            norm = dataclasses.replace(value, in_channels=in_channels)
        elif isinstance(value, Mapping):
            norm = Normalization.from_dict({**value, "in_channels": in_channels})
        else:
            norm = parse_normalization(str(value), in_channels=in_channels)
    except ValueError as e:
        raise CTEError(f"bad normalisation: {e}") from None
    return norm.to_dict()


def resolve_out(out: str | os.PathLike | None, bank: str | os.PathLike | None, default_name: str) -> Path:
    """Where the model directory goes: ``out``; or, with ``bank``, ``bank/<name of out>``."""
    if bank is None:
        if out is None:
            raise CTEError("no output directory given (--out)")
        return Path(out)
    bank = Path(bank)
    if bank.exists() and not bank.is_dir():
        raise CTEError("bank must be a directory", bank)
    if (bank / "model.json").exists():
        raise CTEError("this is a model directory, not a bank", bank)
    if out is None:
        return bank / default_name
    out = Path(out)
    if out.parent in (Path("."), Path("")) or out.parent.resolve() == bank.resolve():
        return bank / out.name
    raise CTEError(f"with --bank, give --out as a model name or a directory inside the bank, not {out}", out)


def write_grey_box(*, out: Path, spec: UNetSpec, variables: dict, normalization: dict, provenance: dict,
                   task: str = "foreground", channel: int = 0, overwrite: bool = False) -> Path:
    from cte_jax.modelio import Model, save_model

    if not 0 <= channel < spec.out_channels:
        raise CTEError(f"channel {channel} but the network has {spec.out_channels} output channels")
    model = Model(name=out.name, normalization=normalization, spec=spec, variables=variables, task=task,
                  channel=channel, provenance=provenance)
    return save_model(model, out, overwrite=overwrite)


def convert_checkpoint(source: str | os.PathLike, *, from_state_dict, converter: str, default_normalize: str,
                       arch: Any, normalize: Any, out: str | os.PathLike | None, bank: str | os.PathLike | None,
                       overwrite: bool, task: str, channel: int) -> Path:
    """The body of the PyTorch state-dict converters: read the checkpoint's tensors (never its
    code), map them with ``from_state_dict(state, arch, source=...)``, and write a grey-box model
    directory whose provenance names ``converter``, the file, its SHA-256 and the settings used."""
    from converters import torch_pickle

    source = Path(source)
    target = resolve_out(out, bank, source.stem)
    if target.exists() and not overwrite:
        raise CTEError("already exists (choose another --out, remove it, or pass --overwrite)", target)
    state = torch_pickle.load_state_dict(source)
    try:
        spec, variables = from_state_dict(state, arch, source=source)
    except CTEError as e:
        if arch or not e.problem.startswith("weights do not fit"):
            raise
        # Without --arch the family's defaults were assumed: say so before the list of keys.
        raise CTEError("the weights do not fit the default architecture; give the settings the model was built "
                       "with in --arch (see convert --help): " + e.problem, source) from None
    norm = normalization_dict(normalize, default=default_normalize, in_channels=spec.in_channels, source=source)
    provenance = {"converter": converter, "source": str(source.resolve()), "sha256": sha256_of(source),
                  "arch_kwargs": parse_kwargs_text(arch),
                  "normalization_from": "--normalize" if normalize is not None else f"default ({default_normalize})"}
    return write_grey_box(out=target, spec=spec, variables=variables, normalization=norm, provenance=provenance,
                          task=task, channel=channel, overwrite=overwrite)


def write_black_box(*, out: Path, onnx_file: Path, description: dict, overwrite: bool = False) -> Path:
    """Write a black-box model directory (model.json + the ONNX file) atomically."""
    from cte_jax.modelio import FORMAT, MODEL_FILE, write_model_dir

    def fill(tmp: Path) -> None:
        shutil.copyfile(onnx_file, tmp / "model.onnx")
        desc = {"format": FORMAT, "name": out.name, **description, "onnx": "model.onnx"}
        (tmp / MODEL_FILE).write_text(json.dumps(desc, indent=2, sort_keys=True) + "\n")

    return write_model_dir(out, fill, overwrite=overwrite)
