"""Training a U-Net for binary segmentation (BCE + Dice, augmentations, bottleneck dropout) to a model directory.

The recipe follows the paper's bank ("BCEDice loss ... a mixture of intensity and geometric
augmentations as well as DropOut"): random crops of per-image normalised images, random
dihedral transforms and the perturbation formulas as intensity augmentations, spatial dropout at
the bottleneck, Adam, validation on a deterministic part of the training split (never the test
split), and the best (or last) weights saved with :func:`cte_jax.modelio.save_model`.

Runs are reproducible and resumable: every random draw of step ``s`` comes from ``(seed, s)``
(crops from a NumPy generator seeded with them, augmentation and dropout keys from
``fold_in(key(seed), s)``), so a run resumed from an orbax checkpoint ends with the same weights
as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cte_jax import backend
from cte_jax.arch import UNetSpec
from cte_jax.augment import IntensityRanges, augment_batch, random_crop
from cte_jax.errors import CTEError
from cte_jax.losses import bce_dice_loss
from cte_jax.networks import UNet, init_variables
from cte_jax.perturbations import spatial_dropout

Array = jax.Array

TASKS = ("foreground", "boundary")
LABEL_KINDS = ("auto", "instance", "binary")
SCHEDULES = ("cosine", "constant")
KEEP = ("best", "last")

# Fields that may differ between a checkpointed run and its resumption.
_RESUMABLE_FIELDS = ("steps", "resume", "checkpoint_dir", "keep_checkpoints", "command", "name", "eval_every",
                     "checkpoint_every")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (stored in the model's provenance).

    Attributes:
      data: labelled domain folders (``images/``, ``labels/``, ``split.json``), trained on together.
      spec: the architecture; ``out_channels`` must be 1 and ``final_activation`` ``"sigmoid"``.
      normalization: the model's input normalisation, a :func:`cte_jax.preprocess.parse_normalization`
        string (``percentile:5,98`` is SPEC's nuclei recipe).
      grey: how RGB images become one channel for a 1-channel model (``luminance``, ``mean``, ``first``).
      task: ``foreground`` (target = label > 0) or ``boundary`` (target = pixels where an instance
        label changes between 4-neighbours; binary labels are taken as the boundary map as they are).
      label_kind: ``instance``, ``binary`` or ``auto`` (binary when every label of a domain holds 0
        and at most one other value: 0/1 or 0/255 masks).
      train_split: the key of ``split.json`` to train on; validation is carved out of it.
      val_fraction: share of each domain's training images held out for validation, chosen by a
        hash of the image name (deterministic, independent of the seed).
      patch_size: side of the square training crops; images smaller are mirror-padded.
      batch_size: crops per step.
      steps: optimisation steps.
      learning_rate: Adam's peak learning rate.
      schedule: ``cosine`` (decay to 5% of the peak over ``steps``, after ``warmup_steps``) or ``constant``.
      warmup_steps: linear warm-up steps.
      weight_decay: decoupled weight decay (AdamW) when > 0.
      dropout: spatial (channel) dropout rate on the bottleneck during training.
      augment: random flips/rot90 and intensity augmentations.
      intensity: strength ranges of the intensity augmentations.
      dice_weight: weight of the Dice term of the loss.
      seed: seeds initialisation, crops, augmentations and dropout.
      eval_every: validation every this many steps (and at the end).
      keep: save the ``best`` weights by validation F1 or the ``last``.
      checkpoint_every: orbax checkpoint every this many steps (0: never).
      checkpoint_dir: where checkpoints go; default ``<out>.ckpt`` beside the model directory.
      keep_checkpoints: keep the checkpoint directory after a successful run.
      resume: continue from the latest checkpoint in ``checkpoint_dir`` if there is one.
      name: model name (default: the output directory's name).
      command: the command line to record (default: this process's ``sys.argv``).
    """

    data: tuple[str, ...]
    spec: UNetSpec = UNetSpec(features=(16, 32, 64), layer_order="cr", final_activation="sigmoid")
    normalization: str = "percentile:5,98"
    grey: str = "luminance"
    task: str = "foreground"
    label_kind: str = "auto"
    train_split: str = "train"
    val_fraction: float = 0.1
    patch_size: int = 128
    batch_size: int = 8
    steps: int = 1000
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    dropout: float = 0.1
    augment: bool = True
    intensity: IntensityRanges = IntensityRanges()
    dice_weight: float = 1.0
    seed: int = 0
    eval_every: int = 100
    keep: str = "best"
    checkpoint_every: int = 100
    checkpoint_dir: str | None = None
    keep_checkpoints: bool = False
    resume: bool = False
    name: str | None = None
    command: str | None = None

    def __post_init__(self):
        data = (self.data,) if isinstance(self.data, (str, os.PathLike)) else self.data
        object.__setattr__(self, "data", tuple(os.fspath(d) for d in data))
        if isinstance(self.spec, dict):
            object.__setattr__(self, "spec", UNetSpec.from_dict(self.spec))
        if isinstance(self.intensity, dict):
            object.__setattr__(self, "intensity", IntensityRanges(**{k: tuple(v) if isinstance(v, list) else v
                                                                     for k, v in self.intensity.items()}))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range."""
        if not self.data:
            raise ValueError("data: at least one labelled domain folder is needed")
        s = self.spec
        if s.out_channels != 1 or s.final_activation != "sigmoid":
            raise ValueError(f"spec: the trainer makes one sigmoid output channel, got out_channels={s.out_channels}, "
                             f"final_activation={s.final_activation!r}")
        if s.in_channels not in (1, 3):
            raise ValueError(f"spec: in_channels must be 1 or 3, got {s.in_channels}")
        checks = [
            (self.task in TASKS, f"task {self.task!r} is not one of {TASKS}"),
            (self.label_kind in LABEL_KINDS, f"label_kind {self.label_kind!r} is not one of {LABEL_KINDS}"),
            (self.schedule in SCHEDULES, f"schedule {self.schedule!r} is not one of {SCHEDULES}"),
            (self.keep in KEEP, f"keep {self.keep!r} is not one of {KEEP}"),
            (0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.patch_size >= s.size_multiple and self.patch_size % s.size_multiple == 0,
             f"patch_size {self.patch_size} must be a positive multiple of {s.size_multiple} for {s.levels} levels"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0 <= self.seed < 2 ** 32, f"seed must be a whole number from 0 to {2 ** 32 - 1}, got {self.seed}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (0 <= self.warmup_steps < max(self.steps, 1), f"warmup_steps must be in [0, steps), got {self.warmup_steps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.dice_weight >= 0, f"dice_weight must be >= 0, got {self.dice_weight}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
            (self.train_split != "test", "train_split must not be the test split"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.normalization_object()  # raises ValueError on a bad string

    def normalization_object(self):
        from cte_jax.preprocess import parse_normalization

        return parse_normalization(self.normalization, grey=self.grey, in_channels=self.spec.in_channels)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["data"] = list(self.data)
        d["spec"] = self.spec.to_dict()
        d["intensity"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.intensity).items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}")
        return cls(**d)


# ------------------------------------------------------------------------------------------------
# data on the host
# ------------------------------------------------------------------------------------------------
def name_fraction(domain: str, name: str) -> float:
    """A deterministic number in [0, 1) from (domain, image name): SHA-256, first 8 bytes."""
    digest = hashlib.sha256(f"{domain}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def validation_names(domain: str, names: Sequence[str], fraction: float) -> list[str]:
    """The names held out for validation: those whose hash fraction is below ``fraction``.

    When ``fraction > 0`` and the domain has at least two images, at least one is held out and at
    least one is kept for training (the lowest or highest hashes).
    """
    if fraction <= 0 or len(names) < 2:
        return []
    ranked = sorted(names, key=lambda n: name_fraction(domain, n))
    k = sum(name_fraction(domain, n) < fraction for n in names)
    k = min(max(k, 1), len(names) - 1)
    chosen = set(ranked[:k])
    return [n for n in names if n in chosen]


def boundary_map(label: np.ndarray) -> np.ndarray:
    """Pixels (h w) whose instance id differs from one of their 4-neighbours (both sides marked)."""
    lab = label
    b = np.zeros(lab.shape, bool)
    b[1:, :] |= lab[1:, :] != lab[:-1, :]
    b[:-1, :] |= lab[:-1, :] != lab[1:, :]
    b[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    b[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    return b


def label_target(label: np.ndarray, *, task: str, binary: bool) -> np.ndarray:
    """The training target (h w 1) float32 of a label image (h w) or (h w 1).

    foreground: ``label > 0``. boundary: a binary label as it is (1 = boundary), an instance
    label's :func:`boundary_map`.
    """
    lab = np.asarray(label)
    if lab.ndim == 3:
        lab = lab[..., 0]
    if task == "foreground" or binary:
        t = lab > 0
    else:
        t = boundary_map(lab)
    return t.astype(np.float32)[..., None]


@dataclasses.dataclass
class Split:
    """Normalised images (h w c) and targets (h w 1) of one role, with their (domain, name)."""

    images: list[np.ndarray]
    targets: list[np.ndarray]
    names: list[tuple[str, str]]


def load_data(config: TrainConfig) -> tuple[Split, Split, list[dict[str, Any]]]:
    """Read, normalise and convert every training-split image: (train, validation, per-domain facts)."""
    from cte_jax.data import check_labels, is_binary_mask, open_labelled
    from cte_jax.preprocess import normalize

    norm = config.normalization_object()
    train, val = Split([], [], []), Split([], [], [])
    facts = []
    seen_domains: set[str] = set()
    for folder in config.data:
        root = Path(folder)
        domain = root.resolve().name
        if domain in seen_domains:
            raise CTEError("domain given twice", root)
        seen_domains.add(domain)
        images, labels = open_labelled(root, split=config.train_split)
        if len(images) == 0:
            raise CTEError(f"split {config.train_split!r} has no images", root)
        held = set(validation_names(domain, images.names, config.val_fraction))
        raw_labels = [labels.read(i) for i in range(len(labels))]
        check_labels(raw_labels, root / "labels")
        if config.label_kind == "auto":
            binary = all(is_binary_mask(lab) for lab in raw_labels)
        else:
            binary = config.label_kind == "binary"
        for i, name in enumerate(images.names):
            img = images.read(i)
            lab = raw_labels[i]
            if img.shape[:2] != lab.shape[:2]:
                raise CTEError(f"image {img.shape[:2]} and label {lab.shape[:2]} differ in size", labels.source_path(i))
            try:
                x = normalize(img, norm)
            except ValueError as e:
                raise CTEError(str(e), images.source_path(i)) from None
            part = val if name in held else train
            part.images.append(x)
            part.targets.append(label_target(lab, task=config.task, binary=binary))
            part.names.append((domain, name))
        val_names = [n for n in images.names if n in held]
        facts.append({
            "domain": domain,
            "path": str(root.resolve()),
            "split": config.train_split,
            "label_kind": "binary" if binary else "instance",
            "n_train": len(images) - len(held),
            "n_val": len(held),
            "val_names": val_names,
            "train_names_sha256": hashlib.sha256(
                "\n".join(sorted(n for n in images.names if n not in held)).encode()).hexdigest(),
        })
        images.close()
        labels.close()
    if not train.images:
        raise CTEError("no training images left after the validation split", config.data[0])
    return train, val, facts


def sample_batch(split: Split, *, seed: int, step: int, batch_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Random crops (b p p c), (b p p 1) of step ``step``: images drawn uniformly, crops uniformly.

    Depends only on (seed, step), so resumed runs draw the same batches.
    """
    rng = np.random.default_rng([seed, step])
    idx = rng.integers(0, len(split.images), batch_size)
    xs, ys = [], []
    for i in idx:
        x, y = random_crop(rng, split.images[i], split.targets[i], patch_size)
        xs.append(x)
        ys.append(y)
    return np.stack(xs), np.stack(ys)


def validation_tiles(split: Split, patch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut each validation image into non-overlapping ``patch_size`` tiles (mirror-padded).

    Returns:
      tiles (n p p c), targets (n p p 1), weights (n p p): 1 on image pixels, 0 on padding,
      owner (n,): the image index of each tile.
    """
    tiles, targets, weights, owner = [], [], [], []
    p = patch_size
    for k, (x, y) in enumerate(zip(split.images, split.targets)):
        h, w = x.shape[:2]
        H, W = -(-h // p) * p, -(-w // p) * p
        xp = _pad_bottom_right(x, H, W)
        yp = _pad_bottom_right(y, H, W)
        valid = np.zeros((H, W), np.float32)
        valid[:h, :w] = 1.0
        for r in range(0, H, p):
            for c in range(0, W, p):
                tiles.append(xp[r:r + p, c:c + p])
                targets.append(yp[r:r + p, c:c + p])
                weights.append(valid[r:r + p, c:c + p])
                owner.append(k)
    return np.stack(tiles), np.stack(targets), np.stack(weights), np.asarray(owner)


def _pad_bottom_right(a: np.ndarray, H: int, W: int) -> np.ndarray:
    h, w = a.shape[:2]
    if (h, w) == (H, W):
        return a
    # pad symmetrically around with mirror_pad_to's rule, then keep the top-left-aligned window
    pads = [(0, H - h), (0, W - w)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pads, mode="symmetric")


# ------------------------------------------------------------------------------------------------
# device programs
# ------------------------------------------------------------------------------------------------
def has_batch_norm(spec: UNetSpec) -> bool:
    return "b" in spec.layer_order


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Adam (AdamW with weight decay) on a cosine or constant schedule with optional warm-up."""
    lr = config.learning_rate
    if config.schedule == "cosine":
        sched = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if config.warmup_steps else lr, peak_value=lr, warmup_steps=config.warmup_steps,
            decay_steps=config.steps, end_value=0.05 * lr)
    else:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, config.warmup_steps), optax.constant_schedule(lr)],
                                     [config.warmup_steps]) if config.warmup_steps else optax.constant_schedule(lr)
    if config.weight_decay > 0:
        return optax.adamw(sched, weight_decay=config.weight_decay)
    return optax.adam(sched)


def _variables(params, batch_stats):
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_train_step(config: TrainConfig, tx: optax.GradientTransformation):
    """A jitted ``step(state, x, y, key) -> (state, loss)``; state = {params, batch_stats, opt_state}.

    Inside: augmentation (flips/rot90 on image and target together, intensity on the image),
    ``UNet.encode`` in training mode, spatial dropout of the bottleneck (one key per image), the
    decoder's logits, :func:`cte_jax.losses.bce_dice_loss`, and an optax update. BatchNorm
    statistics are updated (mutable ``batch_stats``) when the layer order has ``b``.
    """
    spec = config.spec
    net = UNet(spec)
    bn = has_batch_norm(spec)
    rate = float(config.dropout)
    ranges = config.intensity if config.augment else None

    def forward(module, x, key):
        feats = list(module.encode(x, train=True))
        if rate > 0:
            keys = jax.random.split(key, x.shape[0])
            feats[-1] = jax.vmap(functools.partial(spatial_dropout, rate=rate))(keys, feats[-1])
        return module.decode_logits(feats, train=True)

    def loss_fn(params, batch_stats, x, y, key):
        variables = _variables(params, batch_stats)
        if bn:
            logits, updates = net.apply(variables, x, key, method=forward, mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        else:
            logits = net.apply(variables, x, key, method=forward)
        return bce_dice_loss(logits, y, dice_weight=config.dice_weight), batch_stats

    @backend.jit
    def step(state, x, y, key):
        k_aug, k_drop = jax.random.split(key)
        if config.augment:
            x, y = augment_batch(k_aug, x, y, flips=True, ranges=ranges)
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], x, y, k_drop)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}, loss

    return step


def make_eval_step(config: TrainConfig):
    """A jitted ``evaluate(params, batch_stats, x, y, w) -> per-tile sums`` in inference mode.

    Returns per tile (n,): BCE sum, counted pixels, soft sums (p t, p, t) and hard counts
    (tp, predicted, true) at threshold 0.5, so the host can combine tiles per image.
    """
    net = UNet(config.spec)

    @backend.jit
    def evaluate(params, batch_stats, x, y, w):
        logits = net.apply(_variables(params, batch_stats), x, method=UNet.logits)[..., 0]
        t = y[..., 0]
        bce = optax.sigmoid_binary_cross_entropy(logits, t)
        p = jax.nn.sigmoid(logits)
        hard = (p > 0.5).astype(jnp.float32)
        tb = (t > 0.5).astype(jnp.float32)
        axes = (1, 2)
        return {
            "bce": jnp.sum(w * bce, axes), "n": jnp.sum(w, axes),
            "pt": jnp.sum(w * p * t, axes), "p": jnp.sum(w * p, axes), "t": jnp.sum(w * t, axes),
            "tp": jnp.sum(w * hard * tb, axes), "pred": jnp.sum(w * hard, axes), "true": jnp.sum(w * tb, axes),
        }

    return evaluate


def _program_fields(config: TrainConfig) -> tuple:
    """The config fields that shape the compiled programs (the optimiser schedule included)."""
    return (config.spec, config.augment, config.intensity if config.augment else None, config.dropout,
            config.dice_weight, config.learning_rate, config.schedule, config.warmup_steps, config.steps,
            config.weight_decay)


_PROGRAMS: dict[tuple, tuple] = {}


def programs(config: TrainConfig):
    """``(tx, step, evaluate)`` for ``config``, built once per distinct program: runs in one process
    that differ only in data, paths or bookkeeping share compiled code."""
    key = _program_fields(config)
    if key not in _PROGRAMS:
        if len(_PROGRAMS) >= 8:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        tx = make_optimizer(config)
        _PROGRAMS[key] = (tx, make_train_step(config, tx), make_eval_step(config))
    return _PROGRAMS[key]


def validate(evaluate, state, tiles, *, batch_size: int, dice_weight: float) -> dict[str, float]:
    """Validation loss (mean over images of BCE + w (1 - soft Dice)) and F1 (median over images).

    F1 per image = 2 tp / (predicted + true) at threshold 0.5 (1 when both are empty).
    """
    x, y, w, owner = tiles
    n = len(x)
    sums: dict[str, np.ndarray] = {}
    for i in range(0, n, batch_size):
        sl = slice(i, min(i + batch_size, n))
        xb, yb, wb = x[sl], y[sl], w[sl]
        pad = batch_size - len(xb)
        if pad:  # keep one compiled shape; padded tiles have zero weight
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros((pad, *yb.shape[1:]), yb.dtype)])
            wb = np.concatenate([wb, np.zeros((pad, *wb.shape[1:]), wb.dtype)])
        out = jax.device_get(evaluate(state["params"], state["batch_stats"], xb, yb, wb))
        for k, v in out.items():
            sums.setdefault(k, []).append(np.asarray(v)[: len(x[sl])])
    per_tile = {k: np.concatenate(v).astype(np.float64) for k, v in sums.items()}
    n_images = int(owner.max()) + 1
    per_image = {k: np.bincount(owner, weights=v, minlength=n_images) for k, v in per_tile.items()}
    bce = per_image["bce"] / np.maximum(per_image["n"], 1)
    soft_dice = (2 * per_image["pt"] + 1e-6) / (per_image["p"] + per_image["t"] + 1e-6)
    denom = per_image["pred"] + per_image["true"]
    f1 = np.where(denom > 0, 2 * per_image["tp"] / np.maximum(denom, 1e-12), 1.0)
    return {"val_loss": float(np.mean(bce + dice_weight * (1 - soft_dice))), "val_f1": float(np.median(f1)),
            "val_f1_mean": float(np.mean(f1)), "n_val": n_images}


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def _config_fingerprint(config: TrainConfig) -> dict[str, Any]:
    d = config.to_dict()
    for k in _RESUMABLE_FIELDS:
        d.pop(k, None)
    return d


class _Checkpoints:
    """An orbax CheckpointManager holding {state, best} pytrees and JSON metadata, latest only."""

    def __init__(self, directory: Path):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.dir = directory.absolute()
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, trees: dict, meta: dict) -> None:
        ocp = self.ocp
        trees = jax.tree.map(np.asarray, trees)
        self.manager.save(step, args=ocp.args.Composite(trees=ocp.args.StandardSave(trees),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract: dict) -> tuple[dict, dict]:
        ocp = self.ocp
        out = self.manager.restore(step, args=ocp.args.Composite(trees=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        return out["trees"], out["meta"]

    def close(self) -> None:
        self.manager.close()


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cte-jax")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


def _command() -> str:
    argv = list(sys.argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def train(config: TrainConfig, out_dir: str | os.PathLike, *, progress: bool = True,
          overwrite: bool = False) -> Path:
    """Train a model by ``config`` and write it as a model directory at ``out_dir``.

    Args:
      config: the run.
      out_dir: the model directory to create (must not exist unless ``overwrite``).
      progress: show a tqdm bar with the running loss and the last validation F1.
      overwrite: replace an existing ``out_dir``.

    Returns:
      ``out_dir`` as a Path. The model's provenance records the config, the data (domains,
      split, validation names), the steps, the validation history and final metrics, the
      cte_jax version and the command line.

    Raises:
      CTEError: unreadable data, an existing output, a checkpoint of a different run.
    """
    from cte_jax.modelio import Model, save_model

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CTEError("already exists (choose another output or remove it)", out)
    norm = config.normalization_object()
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else out.parent / f"{out.name}.ckpt"
    t_start = time.perf_counter()

    train_split, val_split, facts = load_data(config)
    tiles = validation_tiles(val_split, config.patch_size) if val_split.images else None

    tx, step_fn, eval_fn = programs(config)
    variables = init_variables(config.spec, jax.random.key(config.seed), image_size=config.patch_size)
    params = variables["params"]
    state = {"params": params, "batch_stats": variables.get("batch_stats", {}), "opt_state": tx.init(params)}
    best = {"params": state["params"], "batch_stats": state["batch_stats"]}
    meta: dict[str, Any] = {"step": 0, "best_step": 0, "best_f1": -1.0, "history": [], "loss_history": [],
                            "config": _config_fingerprint(config)}

    ckpts = _Checkpoints(ckpt_dir) if (config.checkpoint_every or config.resume) else None
    try:
        if config.resume and ckpts is not None and ckpts.latest() is not None:
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype),
                                    {"state": state, "best": best})
            trees, saved_meta = ckpts.restore(ckpts.latest(), abstract)
            if saved_meta.get("config") != meta["config"]:
                raise CTEError("checkpoint comes from a different training configuration (remove it or "
                               "drop --resume)", ckpt_dir)
            state, best, meta = trees["state"], trees["best"], saved_meta
        start = int(meta["step"])

        base_key = jax.random.key(config.seed)
        bar = _progress_bar(config.steps, start, progress)
        running: list[float] = []
        last: dict[str, float] = {}
        for step in range(start, config.steps):
            x, y = sample_batch(train_split, seed=config.seed, step=step, batch_size=config.batch_size,
                                patch_size=config.patch_size)
            state, loss = step_fn(state, x, y, jax.random.fold_in(base_key, step))
            running.append(loss)
            done = step + 1
            if len(running) >= 10 or done == config.steps:
                mean_loss = float(np.mean(jax.device_get(running)))
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"training loss became {mean_loss} at step {done}; "
                                             f"lower the learning rate")
                running = []
                bar.set_postfix(loss=f"{mean_loss:.4f}", **({"val_f1": f"{last['val_f1']:.3f}"} if last else {}))
                meta["last_loss"] = mean_loss
                meta["loss_history"].append([done, mean_loss])
            if tiles is not None and (done % config.eval_every == 0 or done == config.steps):
                last = validate(eval_fn, state, tiles, batch_size=config.batch_size, dice_weight=config.dice_weight)
                meta["history"].append({"step": done, **last})
                if last["val_f1"] > meta["best_f1"]:
                    meta["best_f1"], meta["best_step"] = last["val_f1"], done
                    best = {"params": state["params"], "batch_stats": state["batch_stats"]}
            bar.update(1)
            meta["step"] = done
            if ckpts is not None and config.checkpoint_every and done % config.checkpoint_every == 0 \
                    and done < config.steps:
                ckpts.save(done, {"state": state, "best": best}, meta)
        bar.close()
    finally:
        if ckpts is not None:
            ckpts.close()

    chosen = best if (config.keep == "best" and tiles is not None and meta["best_step"] > 0) else \
        {"params": state["params"], "batch_stats": state["batch_stats"]}
    chosen_step = meta["best_step"] if chosen is best else config.steps
    final = next((h for h in meta["history"] if h["step"] == chosen_step), None)
    variables = {"params": jax.device_get(chosen["params"])}
    if has_batch_norm(config.spec):
        variables["batch_stats"] = jax.device_get(chosen["batch_stats"])
    provenance = {
        "trainer": "cte_jax.train",
        "cte_jax_version": _version(),
        "jax_version": jax.__version__,
        "command": config.command or _command(),
        "config": config.to_dict(),
        "data": facts,
        "steps": config.steps,
        "weights_from_step": chosen_step,
        "final_val": final,
        "last_train_loss": meta.get("last_loss"),
        "val_history": meta["history"],
        "loss_history": meta["loss_history"],
        "train_seconds": round(time.perf_counter() - t_start, 1),
    }
    model = Model(name=config.name or out.name, normalization=norm.to_dict(), spec=config.spec,
                  variables=variables, task=config.task, channel=0, provenance=provenance)
    path = save_model(model, out, overwrite=overwrite)
    if ckpts is not None and not config.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return path


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------
# command line (``cte-jax train`` reuses these; ``python -m cte_jax.train`` runs them directly)
# ------------------------------------------------------------------------------------------------
def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 16,32,64, got {text!r}") from None
    if len(values) < 2:
        raise argparse.ArgumentTypeError(f"expected at least two levels like 16,32,64, got {text!r}")
    return values


def _float_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI like 0,0.2, got {text!r}") from None
    if hi < lo:
        raise argparse.ArgumentTypeError(f"empty range {text!r}: HI must be >= LO")
    return lo, hi


def add_arguments(p: "argparse.ArgumentParser") -> None:
    """Add the training flags to an argparse parser (defaults are TrainConfig's)."""
    d = TrainConfig(data=("x",))
    s = d.spec
    p.add_argument("--data", nargs="+", required=True, metavar="DIR",
                   help="labelled domain folder(s) with images/, labels/ and split.json; several are trained on together")
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to write (must not exist)")
    a = p.add_argument_group("architecture")
    a.add_argument("--features", type=_int_list, default=",".join(map(str, s.features)), metavar="F1,F2,...",
                   help="channels per level, encoder order; the count is the depth (default: %(default)s)")
    a.add_argument("--layer-order", default=s.layer_order,
                   help="letters of one conv unit: c conv, r/l/e ReLU/LeakyReLU/ELU, g GroupNorm, b BatchNorm, "
                        "i InstanceNorm (default: %(default)s)")
    a.add_argument("--num-groups", type=int, default=s.num_groups, help="GroupNorm groups (default: %(default)s)")
    a.add_argument("--upsampling", default=s.upsampling, choices=("nearest", "bilinear", "deconv", "bilinear_conv"),
                   help="decoder upsampling (default: %(default)s)")
    a.add_argument("--encoder-mid", default=s.encoder_mid, choices=("half", "full"),
                   help="channels after an encoder level's first conv (default: %(default)s)")
    a.add_argument("--skip-last", action="store_true", help="concatenate [upsampled, skip] instead of [skip, upsampled]")
    a.add_argument("--in-channels", type=int, default=s.in_channels, choices=(1, 3),
                   help="image channels the network takes; RGB becomes grey for 1 (default: %(default)s)")
    g = p.add_argument_group("data")
    g.add_argument("--normalization", default=d.normalization,
                   help="input normalisation: percentile:LO,HI, zscore, minmax:A,B or none (default: %(default)s)")
    g.add_argument("--grey", default=d.grey, choices=("luminance", "mean", "first"),
                   help="RGB to grey for a 1-channel model (default: %(default)s)")
    g.add_argument("--task", default=d.task, choices=TASKS,
                   help="foreground (label > 0) or boundary (instance borders; binary labels as they are) (default: %(default)s)")
    g.add_argument("--label-kind", default=d.label_kind, choices=LABEL_KINDS,
                   help="labels are instance ids or binary; auto: binary if every label holds 0 and one other value, "
                   "e.g. 0/1 or 0/255 (default: %(default)s)")
    g.add_argument("--split", default=d.train_split,
                   help="split.json key to train on; validation is taken from it, never from 'test' (default: %(default)s)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of each domain's training images held out for validation, by name hash (default: %(default)s)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--patch-size", type=int, default=d.patch_size, help="training crop side (default: %(default)s)")
    o.add_argument("--batch-size", type=int, default=d.batch_size, help="crops per step (default: %(default)s)")
    o.add_argument("--steps", type=int, default=d.steps, help="optimisation steps (default: %(default)s)")
    o.add_argument("--lr", type=float, default=d.learning_rate, help="Adam learning rate (default: %(default)s)")
    o.add_argument("--schedule", default=d.schedule, choices=SCHEDULES,
                   help="learning-rate schedule (default: %(default)s)")
    o.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps (default: %(default)s)")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default: %(default)s)")
    o.add_argument("--dropout", type=float, default=d.dropout,
                   help="spatial dropout rate at the bottleneck during training (default: %(default)s)")
    o.add_argument("--no-augment", action="store_true", help="no flips/rot90 and no intensity augmentation")
    i = d.intensity
    for name, what in (("noise", "Gaussian noise sigma"), ("brightness", "brightness shift"),
                       ("contrast", "contrast factor"), ("gamma", "gamma exponent")):
        o.add_argument(f"--aug-{name}", type=_float_range, default=getattr(i, name), metavar="LO,HI",
                       help=f"{what} of the intensity augmentation, drawn from U(LO, HI) per crop; the paper "
                            f"trains with the ranges it later perturbs with (default: %(default)s)")
    o.add_argument("--aug-p", type=float, default=i.p,
                   help="probability of each intensity augmentation per crop (default: %(default)s)")
    o.add_argument("--dice-weight", type=float, default=d.dice_weight, help="weight of the Dice loss term (default: %(default)s)")
    o.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    r = p.add_argument_group("validation and checkpoints")
    r.add_argument("--eval-every", type=int, default=d.eval_every, help="validate every N steps (default: %(default)s)")
    r.add_argument("--keep", default=d.keep, choices=KEEP, help="save the best (validation F1) or last weights (default: %(default)s)")
    r.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="orbax checkpoint every N steps, 0 for none (default: %(default)s)")
    r.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="checkpoint folder (default: OUT.ckpt)")
    r.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoint folder after success")
    r.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the same run")
    p.add_argument("--name", default=None, help="model name (default: the output folder's name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args, *, command: str | None = None) -> TrainConfig:
    """The TrainConfig of parsed ``add_arguments`` flags. Raises ValueError on bad values."""
    spec = UNetSpec(in_channels=args.in_channels, out_channels=1, features=args.features,
                    layer_order=args.layer_order, num_groups=args.num_groups, encoder_mid=args.encoder_mid,
                    upsampling=args.upsampling, skip_first=not args.skip_last, final_activation="sigmoid")
    return TrainConfig(
        data=tuple(args.data), spec=spec, normalization=args.normalization, grey=args.grey, task=args.task,
        label_kind=args.label_kind, train_split=args.split, val_fraction=args.val_fraction,
        patch_size=args.patch_size, batch_size=args.batch_size, steps=args.steps, learning_rate=args.lr,
        schedule=args.schedule, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        dropout=args.dropout, augment=not args.no_augment,
        intensity=IntensityRanges(noise=args.aug_noise, brightness=args.aug_brightness, contrast=args.aug_contrast,
                                  gamma=args.aug_gamma, p=args.aug_p),
        dice_weight=args.dice_weight, seed=args.seed,
        eval_every=args.eval_every, keep=args.keep, checkpoint_every=args.checkpoint_every,
        checkpoint_dir=args.checkpoint_dir, keep_checkpoints=args.keep_checkpoints, resume=args.resume,
        name=args.name, command=command)


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m cte_jax.train") -> int:
    """Parse training flags, train, print the model directory. User errors: one line, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description="Train a U-Net (BCE + Dice, augmentations, "
                                     "bottleneck dropout) and write a cte_jax model directory.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args, command=shlex.join([*prog.split(), *argv]))
        out = train(config, args.out, progress=not args.no_progress, overwrite=args.overwrite)
    except (CTEError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
