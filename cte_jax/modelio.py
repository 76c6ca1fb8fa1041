"""Models and banks on disk: a model directory = model.json + an orbax checkpoint of its weights."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from cte_jax.arch import UNetSpec
from cte_jax.errors import CTEError
from cte_jax.files import as_if_created

FORMAT = "cte_jax.model/1"
TASKS = ("foreground", "boundary")
MODEL_FILE = "model.json"
CHECKPOINT_DIR = "checkpoint"


@dataclasses.dataclass
class Model:
    """One member of a bank.

    A grey-box model has ``spec`` and ``variables`` (a Flax variable dict); a black-box model has
    only ``predict`` (a host function from normalised images (b h w c) float32 to probabilities
    (b h w c_out)) and is scored with input perturbations only.

    Attributes:
      name: unique name in the bank (the directory name for saved models).
      normalization: a dict as written by :func:`cte_jax.preprocess.Normalization.to_dict`.
      task: ``"foreground"`` (output = foreground probability) or ``"boundary"``.
      channel: which output channel holds the probability that is scored.
      provenance: free-form facts: source data, training command, converter, sha256.
    """

    name: str
    normalization: dict[str, Any]
    spec: UNetSpec | None = None
    variables: Any = None
    predict: Callable[[np.ndarray], np.ndarray] | None = None
    task: str = "foreground"
    channel: int = 0
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    path: Path | None = None

    @property
    def is_black_box(self) -> bool:
        return self.spec is None

    @property
    def in_channels(self) -> int:
        if self.spec is not None:
            return self.spec.in_channels
        return int(self.normalization.get("in_channels", 1))

    def description(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT,
            "name": self.name,
            "task": self.task,
            "channel": self.channel,
            "preprocessing": self.normalization,
            "provenance": self.provenance,
        }
        if self.spec is not None:
            d["architecture"] = self.spec.to_dict()
        return d


def _parse_description(path: Path) -> dict[str, Any]:
    file = path / MODEL_FILE
    if not file.is_file():
        raise CTEError(f"not a model directory (no {MODEL_FILE})", path)
    try:
        d = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CTEError(f"unreadable model description: {e}", file) from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CTEError(f"not a {FORMAT} description (format={d.get('format') if isinstance(d, dict) else None!r})", file)
    if d.get("task", "foreground") not in TASKS:
        raise CTEError(f"task {d.get('task')!r} is not one of {TASKS}", file)
    return d


def _flat(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def check_variables(spec: UNetSpec, variables: Any, where: str | os.PathLike) -> None:
    """Raise CTEError listing missing, unexpected and mis-shaped weights against ``spec``."""
    from cte_jax.networks import abstract_variables

    want = _flat(abstract_variables(spec))
    have = _flat(variables)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shaped = sorted(k for k in set(want) & set(have) if tuple(np.shape(have[k])) != tuple(want[k].shape))
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for k in shaped[:5]:
        problems.append(f"{k} has shape {tuple(np.shape(have[k]))}, architecture needs {tuple(want[k].shape)}")
    if problems:
        raise CTEError("weights do not match the architecture: " + "; ".join(problems), where)


def save_model(model: Model, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a model directory, atomically (a temporary sibling renamed at the end).

    Only grey-box models are saved here; a black-box ONNX model is saved by its converter.
    """
    out = Path(out_dir)
    if model.spec is None:
        raise ValueError("save_model writes grey-box models (with spec and variables)")
    check_variables(model.spec, model.variables, out)

    def fill(tmp: Path) -> None:
        import orbax.checkpoint as ocp

        variables = jax.tree.map(np.asarray, model.variables)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save((tmp / CHECKPOINT_DIR).absolute(), variables)
            ckptr.wait_until_finished()
        desc = model.description()
        desc["name"] = out.name if model.name is None else model.name
        (tmp / MODEL_FILE).write_text(json.dumps(desc, indent=2, sort_keys=True) + "\n")

    return write_model_dir(out, fill, overwrite=overwrite)


def write_model_dir(out: str | os.PathLike, fill: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Create model directory ``out`` atomically: ``fill`` writes into a temporary sibling, which is
    renamed to ``out`` only when it succeeded; on any failure nothing is left behind."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CTEError("already exists (choose another --out, remove it, or pass --overwrite)", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        as_if_created(tmp)
        fill(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_model(path: str | os.PathLike) -> Model:
    """Read a model directory; errors name the directory and what does not fit."""
    path = Path(path)
    d = _parse_description(path)
    prep = d.get("preprocessing") or {}
    name = d.get("name") or path.name
    common = dict(name=name, normalization=prep, task=d.get("task", "foreground"),
                  channel=int(d.get("channel", 0)), provenance=d.get("provenance", {}), path=path)
    if "onnx" in d:
        from cte_jax.blackbox import onnx_predictor

        return Model(predict=onnx_predictor(path / d["onnx"], d), **common)
    if "architecture" not in d:
        raise CTEError("model.json has neither 'architecture' nor 'onnx'", path / MODEL_FILE)
    try:
        spec = UNetSpec.from_dict(d["architecture"])
    except (TypeError, ValueError) as e:
        raise CTEError(f"bad architecture description: {e}", path / MODEL_FILE) from None
    if not 0 <= common["channel"] < spec.out_channels:
        raise CTEError(f"channel {common['channel']} but the network has {spec.out_channels} outputs", path / MODEL_FILE)
    ckpt = path / CHECKPOINT_DIR
    if not ckpt.is_dir():
        raise CTEError(f"no weights ({CHECKPOINT_DIR}/ missing)", path)
    try:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            variables = ckptr.restore(ckpt.absolute())
    except Exception as e:  # orbax raises many types for damaged checkpoints
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 200 else detail[:200] + " ..."
        raise CTEError(f"unreadable checkpoint (damaged or incompletely copied?): {type(e).__name__}: {detail}",
                       ckpt) from None
    variables = jax.tree.map(np.asarray, variables)
    check_variables(spec, variables, path)
    return Model(spec=spec, variables=variables, **common)


def is_model_dir(path: Path) -> bool:
    return (path / MODEL_FILE).is_file()


def load_bank(path: str | os.PathLike) -> list[Model]:
    """All models in a bank directory (its subdirectories with a model.json), sorted by name.

    A path that is itself a model directory is a bank of one.
    """
    path = Path(path)
    if not path.exists():
        raise CTEError("bank not found", path)
    if is_model_dir(path):
        return [load_model(path)]
    if not path.is_dir():
        raise CTEError("bank must be a directory of model directories", path)
    dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    models = [load_model(p) for p in dirs if is_model_dir(p)]
    if not models:
        raise CTEError("bank has no model directories (subfolders with model.json)", path)
    names = [m.name for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        where = "; ".join(f"{n!r} in " + ", ".join(m.path.name for m in models if m.name == n) for n in dup)
        raise CTEError(f"two model directories give their models the same name ({where}): "
                       f"rename one's \"name\" in its model.json", path)
    return models
