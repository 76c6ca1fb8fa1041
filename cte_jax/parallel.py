"""Scoring across devices and hosts: a local device mesh, shard_map over models or images, multi-host setup."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cte_jax import backend, engine
from cte_jax.errors import CTEError

SHARD_MODES = ("auto", "none", "models", "images")
AXIS = "devices"


# -- devices of this process -------------------------------------------------------------------
def local_mesh(devices: int | Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh (named ``"devices"``) over this process's devices.

    Args:
      devices: None for every local device, a count n for the first n, or a list of devices.
        Only this process's devices: on a multi-host run each process scores its own share with
        its own devices and the hosts exchange per-image scores only (:func:`allgather_rows`).
    """
    local = jax.local_devices()
    if devices is None:
        chosen = local
    elif isinstance(devices, int):
        if not 1 <= devices <= len(local):
            raise CTEError(f"--devices {devices}: this process has {len(local)} device(s) "
                           f"({local[0].platform})")
        chosen = local[:devices]
    else:
        chosen = list(devices)
        if not chosen:
            raise CTEError("no device given")
    return Mesh(np.array(chosen), (AXIS,))


def choose_shard(shard: str, *, n_devices: int, n_models: int, batch_size: int) -> str:
    """The axis a group of ``n_models`` stacked models is split over.

    ``auto`` keeps one device when there is one and otherwise picks the axis that leaves fewer
    device slots idle: the model axis is padded to a multiple of the device count with dummy
    copies, the image axis with empty rows. Models win ties: each device then holds only its
    own models' weights.
    """
    if shard not in SHARD_MODES:
        raise CTEError(f"unknown shard mode {shard!r}; choose from {', '.join(SHARD_MODES)}")
    if n_devices == 1:
        return "none"
    if shard != "auto":
        return shard

    def idle(n):  # fraction of device slots holding padding
        return (math.ceil(n / n_devices) * n_devices - n) / (math.ceil(n / n_devices) * n_devices)

    return "models" if idle(n_models) <= idle(batch_size) else "images"


def split_note(groups: Sequence[tuple[str, int, str]], n_devices: int) -> str | None:
    """One line saying how the bank's architecture groups, given as (a model's name, number of
    models, shard mode), were split over ``n_devices`` devices; None on one device."""
    if n_devices == 1:
        return None
    how = {"models": "split by model", "images": "each batch split by image", "none": "not split"}
    parts = [f"{n} model{'s' if n != 1 else ''} {how[mode]}" for _, n, mode in groups]
    if len(parts) > 1:
        parts = [f"{part} (architecture of {name})" for part, (name, _, _) in zip(parts, groups)]
    return f"{n_devices} devices: " + "; ".join(parts)


def _pad_to(n: int, k: int) -> int:
    return math.ceil(n / k) * k


def _pad_rows(a, n: int, axis: int = 0, *, repeat_first: bool):
    """Pad ``a`` along ``axis`` to length n: copies of the first entry (dummy models) or zeros
    (empty image rows)."""
    extra = n - a.shape[axis]
    if extra == 0:
        return a
    xp = np if isinstance(a, np.ndarray) else jax.numpy
    if repeat_first:
        fill = xp.repeat(xp.take(a, xp.arange(1), axis=axis), extra, axis=axis)
    else:
        shape = list(a.shape)
        shape[axis] = extra
        fill = xp.zeros(shape, a.dtype)
    return xp.concatenate([a, fill], axis=axis)


@functools.lru_cache(maxsize=None)
def sharded_scorer(plan: engine.Plan, mesh: Mesh, mode: str):
    """``engine.scoring_function(plan)`` run under ``shard_map`` over ``mesh``, same signature.

    ``models``: each device scores its slice of the stacked model axis on the whole batch (the
    model axis must be a multiple of the device count). ``images``: each device scores every
    model on its slice of the batch (b a multiple of the device count). Random draws are keyed by
    (perturbation, unit) ids, not by position, so either split gives the single-device scores.
    """
    inner = engine.scoring_function(plan)
    d = AXIS
    if mode == "models":
        in_specs = (P(d), P(d), P(d), P(), P(), P(), P())
        out_specs = (P(d), P(d), P(d))
    elif mode == "images":
        in_specs = (P(), P(), P(), P(None, d), P(d), P(d), P())
        out_specs = (P(None, None, None, d), P(None, None, None, d), P(None, d))
    else:
        raise ValueError(f"mode {mode!r} is not 'models' or 'images'")
    # check_vma off: the per-device program is the plain engine program; no collectives inside.
    return backend.jit(jax.shard_map(inner, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False))


@dataclasses.dataclass(frozen=True)
class Placed:
    """Stacked variables of ``n_models`` models placed on the devices for one shard mode."""

    variables: Any  # leaves (m_padded ...) on device: split over the mesh ("models") or replicated
    n_models: int
    mode: str


class Executor:
    """Runs scoring programs on this process's devices, split by model or by image.

    Example::

        ex = Executor(shard="auto")
        placed = ex.place(stacked_variables, batch_size=8)
        scores, valid, fg = ex.score(plan, placed, channels, norm_idx, inputs, boxes, unit_ids,
                                     key)   # numpy, shapes as engine.compiled_scorer
    """

    def __init__(self, *, devices: int | Sequence[jax.Device] | None = None, shard: str = "auto"):
        if shard not in SHARD_MODES:
            raise CTEError(f"unknown shard mode {shard!r}; choose from {', '.join(SHARD_MODES)}")
        self.mesh = local_mesh(devices)
        self.shard = shard

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    def mode(self, n_models: int, batch_size: int) -> str:
        return choose_shard(self.shard, n_devices=self.n_devices, n_models=n_models, batch_size=batch_size)

    def batch_multiple(self, n_models: int, batch_size: int) -> int:
        """What the batch size should be a multiple of for no padded image rows."""
        return self.n_devices if self.mode(n_models, batch_size) == "images" else 1

    def place(self, variables: Any, *, batch_size: int) -> Placed:
        """Put stacked variables (leading model axis m) on the devices for the chosen split."""
        m = int(jax.tree.leaves(variables)[0].shape[0])
        mode = self.mode(m, batch_size)
        if mode == "models":
            mp = _pad_to(m, self.n_devices)
            variables = jax.tree.map(lambda v: _pad_rows(v, mp, repeat_first=True), variables)
            sharding = NamedSharding(self.mesh, P(AXIS))
        elif mode == "images":
            sharding = NamedSharding(self.mesh, P())
        else:
            sharding = self.mesh.devices.flat[0]
        return Placed(jax.device_put(variables, sharding), m, mode)

    def subset(self, placed: Placed, idx: Sequence[int], *, batch_size: int) -> Placed:
        """The placed variables of models ``idx`` (positions in the stack) only."""
        sel = np.asarray(idx, np.int32)
        return self.place(jax.tree.map(lambda v: v[sel], placed.variables), batch_size=batch_size)

    def score(self, plan: engine.Plan, placed: Placed, channels, norm_idx, inputs, boxes, unit_ids,
              key) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores, valid (m P M b) and clean foreground fractions (m b) as host arrays, without
        the dummy models and empty rows the split added."""
        m, b = placed.n_models, int(boxes.shape[0])
        channels, norm_idx = (np.asarray(a, np.int32) for a in (channels, norm_idx))
        if placed.mode == "none":
            out = engine.compiled_scorer(plan)(placed.variables, channels, norm_idx, inputs, boxes, unit_ids,
                                               key)
        elif placed.mode == "models":
            mp = int(jax.tree.leaves(placed.variables)[0].shape[0])
            pad = functools.partial(_pad_rows, n=mp, repeat_first=True)
            out = sharded_scorer(plan, self.mesh, "models")(placed.variables, pad(channels), pad(norm_idx),
                                                           inputs, boxes, unit_ids, key)
        else:
            bp = _pad_to(b, self.n_devices)
            out = sharded_scorer(plan, self.mesh, "images")(
                placed.variables, channels, norm_idx,
                _pad_rows(np.asarray(inputs), bp, axis=1, repeat_first=False),
                _pad_rows(np.asarray(boxes, np.int32), bp, repeat_first=False),
                _pad_rows(np.asarray(unit_ids, np.int32), bp, repeat_first=False), key)
        s, v, fg = (np.asarray(a) for a in out)  # the only device-to-host transfer: per-image values
        return s[:m, ..., :b], v[:m, ..., :b], fg[:m, :b]


# -- several hosts ------------------------------------------------------------------------------
def detect_cluster(environ: dict | None = None) -> dict | None:
    """What a SLURM or Open MPI launch says about this process, or None outside one.

    Returns ``{"kind", "num_processes", "process_id"}``; JAX derives the coordinator address
    from the same environment (SLURM: first node of the step; Open MPI: the mpirun host).
    """
    env = os.environ if environ is None else environ
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_NODELIST")):
        return {"kind": "slurm", "num_processes": int(env["SLURM_NTASKS"]), "process_id": int(env["SLURM_PROCID"])}
    if "OMPI_COMM_WORLD_SIZE" in env and "OMPI_COMM_WORLD_RANK" in env:
        return {"kind": "ompi", "num_processes": int(env["OMPI_COMM_WORLD_SIZE"]),
                "process_id": int(env["OMPI_COMM_WORLD_RANK"]),
                "coordinator_known": "OMPI_MCA_orte_hnp_uri" in env}
    return None


def initialize_distributed(*, coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout: int = 300) -> tuple[int, int]:
    """Join a multi-host run: ``jax.distributed.initialize`` with explicit values where given and
    the SLURM / Open MPI environment for the rest. Call before anything else touches JAX devices.

    Returns:
      (process index, process count).
    """
    cluster = detect_cluster()
    explicit = coordinator is not None and num_processes is not None and process_id is not None
    if not explicit:
        if cluster is None:
            raise CTEError("--distributed outside SLURM or Open MPI needs --coordinator HOST:PORT, "
                           "--num-processes N and --process-id I")
        num_processes = cluster["num_processes"] if num_processes is None else num_processes
        process_id = cluster["process_id"] if process_id is None else process_id
        if coordinator is None and cluster["kind"] == "ompi" and not cluster["coordinator_known"]:
            raise CTEError("this Open MPI launch does not say where process 0 runs; give --coordinator HOST:PORT")
    if not 0 <= process_id < num_processes:
        raise CTEError(f"process id {process_id} is not in 0..{num_processes - 1}")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout)
    except (RuntimeError, ValueError) as e:
        raise CTEError(f"cannot join the distributed run ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    return jax.process_index(), jax.process_count()


def process_share(n_models: int, n_images: int, n_processes: int, index: int) -> tuple[list[int], list[int]]:
    """This process's models and images: the processes form a grid of (model shares x image
    shares); images are split first (round robin, so every share sees every image size), and
    models only when there are more processes than images.

    Returns:
      (model indices, image indices) of process ``index``.
    """
    n_img_shares = max(d for d in range(1, n_processes + 1) if n_processes % d == 0 and d <= max(n_images, 1))
    n_model_shares = n_processes // n_img_shares
    mi, ii = divmod(index, n_img_shares)
    return list(range(mi, n_models, n_model_shares)), list(range(ii, n_images, n_img_shares))


def allgather_rows(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate every process's rows (arrays sharing their leading length; other dims may
    differ between processes) in process order, on every process.

    Pads to the largest shape with ``multihost_utils.process_allgather`` of fixed-size arrays,
    then cuts each process's rows back out. One process: returns ``rows`` unchanged.
    """
    if jax.process_count() == 1:
        return rows
    from jax.experimental import multihost_utils

    names = sorted(rows)
    shapes = np.array([[rows[k].ndim] + list(rows[k].shape) + [0] * (8 - rows[k].ndim) for k in names], np.int64)
    all_shapes = np.asarray(multihost_utils.process_allgather(shapes))  # (n_proc, n_arrays, 9)
    out = {}
    for j, k in enumerate(names):
        nd = int(shapes[j, 0])
        big = tuple(int(s) for s in all_shapes[:, j, 1:1 + nd].max(axis=0))
        a = rows[k]
        dtype = np.uint8 if a.dtype == bool else a.dtype
        padded = np.zeros(big, dtype)
        padded[tuple(slice(0, s) for s in a.shape)] = a
        got = np.asarray(multihost_utils.process_allgather(padded))  # (n_proc, *big)
        parts = [got[p][tuple(slice(0, int(s)) for s in all_shapes[p, j, 1:1 + nd])] for p in range(got.shape[0])]
        # Non-leading dims may differ between processes (string widths): pad them to the largest.
        parts = [np.pad(q, [(0, 0)] + [(0, big[i] - q.shape[i]) for i in range(1, nd)]) for q in parts]
        cat = np.concatenate(parts) if parts else padded[:0]
        out[k] = cat.astype(bool) if a.dtype == bool else cat
    return out


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
