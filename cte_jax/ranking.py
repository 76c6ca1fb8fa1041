"""Rank a bank on a target: batches of patches through the engine, per-image scores to a ranking."""

from __future__ import annotations

import dataclasses
import functools
import json
import queue
import sys
import threading
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Container, Iterable, Iterator, Sequence

import jax
import numpy as np

from cte_jax import backend, engine
from cte_jax.errors import CTEError
from cte_jax.modelio import Model, load_bank
from cte_jax.perturbations import Perturbation, parse_perturbation

AGGREGATES = ("median", "mean")
DEFAULT_PERTURBATION = "dropout:0.1"
# Flag models whose median foreground fraction is below 20% of the bank's reference
# (reference_foreground), or above twice it and above half the image: a model of the wrong
# polarity (trained on dark nuclei, shown bright ones) segments the background, and large stable
# masks look consistent.
LOW_FOREGROUND_RATIO = 0.2
HIGH_FOREGROUND_RATIO, HIGH_FOREGROUND_MIN = 2.0, 0.5
# Resamples of the target's images behind each model's "order support" (the share of resamples in
# which it still scores above the next model down); at 1000 the share's own noise is below 0.01
# near 0.95. On very large targets fewer, so that a pair costs at most ORDER_MAX_DRAWS unit draws
# (about a second on one CPU core), but never fewer than ORDER_MIN_RESAMPLES (noise below 0.02).
ORDER_RESAMPLES, ORDER_MIN_RESAMPLES, ORDER_MAX_DRAWS = 1000, 200, 20_000_000
_CHUNK_DRAWS = 4_000_000  # unit draws held in memory at once (~16 MB of indices, as much per model)
ORDER_SURE = 0.95  # below it, `rank` calls a model and the next one down a close call


def reference_foreground(fractions: Iterable[float]) -> float:
    """The bank's typical foreground fraction on a target, which the flags compare against: the
    median over the models that predict at most half of the image (HIGH_FOREGROUND_MIN).

    A plain median fails when most of the bank has the wrong polarity: on stained-tissue nuclei, 7
    of our 10 fluorescence models segmented the background (foreground 0.83-0.92), the median
    became 0.84, and none was flagged. When every model calls more than half of the image
    foreground there is no plausible model to compare with, and the reference is
    HIGH_FOREGROUND_MIN / HIGH_FOREGROUND_RATIO, so that every one of them is flagged high."""
    fg = [float(f) for f in fractions]
    if not fg:
        return 0.0
    plausible = [f for f in fg if f <= HIGH_FOREGROUND_MIN]
    return float(np.median(plausible)) if plausible else HIGH_FOREGROUND_MIN / HIGH_FOREGROUND_RATIO


@dataclasses.dataclass
class Batch:
    """Patches of one input shape: inputs per normalisation key (k b h w c) and their bookkeeping."""

    inputs: dict[str, np.ndarray]  # normalisation key -> (b h w c) float32
    boxes: np.ndarray  # (b 4) int32 valid box (y0, y1, x0, x1); all-zero for padding rows
    unit_ids: np.ndarray  # (b,) int32
    names: list[str | None]  # unit names; None for padding rows
    images: np.ndarray | None = None  # (b,) int32 index of each row's image in the target; -1 for padding
    images_read: int = 0  # images read (or skipped as done) since the previous batch: for progress


def _norm_key(model: Model) -> str:
    return json.dumps(model.normalization, sort_keys=True)


def prefetch(items: Iterable, size: int = 2) -> Iterator:
    """Iterate ``items`` on a background thread, ``size`` ahead, so reading overlaps compute.
    Exceptions in the producer are re-raised in the consumer; when the consumer stops early the
    producer stops too (it never blocks forever on a full queue)."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer
            put(e)

    t = threading.Thread(target=produce, daemon=True, name="cte_jax-prefetch")
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def iter_batches(target, norms: dict[str, Any], *, batch_size: int, tile: int = 256, halo: int = 32,
                 tile_above: int = 1024, multiple: int = 16, bucket: int = 32, images: Sequence[int] | None = None,
                 skip: Container[str] | None = None) -> Iterator[Batch]:
    """Read the target once; normalise each image whole under every normalisation key, cut it
    into patches, and group patches of one input shape into batches of ``batch_size`` (the last
    batch of a shape is padded with empty rows so no new shape is compiled).

    Only one image and at most ``batch_size - 1`` waiting patches per input shape are held at a
    time, whatever the size of the target.

    Args:
      images: indices of the images to read (default: all), e.g. one host's share.
      skip: unit names (``image`` or ``image#patch``) already scored: they are left out, and an
        image none of whose units is needed is not read at all (its size comes from its header).
    """
    from cte_jax import preprocess, tiling

    pending: dict[tuple, list] = defaultdict(list)
    read = 0

    def make(units) -> Batch:
        nonlocal read
        pad = batch_size - len(units)
        units = units + [None] * pad
        first = next(u for u in units if u is not None)
        inputs = {k: np.stack([(u or first)[0][k] for u in units]) for k in norms}
        boxes = np.array([u[1] if u else (0, 0, 0, 0) for u in units], np.int32)
        ids = np.array([engine.stable_id(u[2]) if u else 0 for u in units], np.int32)
        index = np.array([u[3] if u else -1 for u in units], np.int32)
        batch = Batch(inputs, boxes, ids, [u[2] if u else None for u in units], index, read)
        read = 0
        return batch

    def plan(h, w):
        return tiling.plan_patches(h, w, tile=tile, halo=halo, tile_above=tile_above, multiple=multiple,
                                   bucket=bucket)

    def unit_names(name, patches):
        return [name] if len(patches) == 1 else [f"{name}#{j}" for j in range(len(patches))]

    for i in range(len(target.names)) if images is None else images:
        name = target.names[i]
        img = None
        if skip and hasattr(target, "shape"):
            h, w = target.shape(i)[:2]
        else:
            img = target.read(i)
            h, w = img.shape[:2]
        patches = plan(h, w)
        units = unit_names(name, patches)
        if skip and all(u in skip for u in units):
            read += 1
            continue
        if img is None:
            img = target.read(i)
            if img.shape[:2] != (h, w):  # a header that disagrees with the pixels: trust the pixels
                patches = plan(*img.shape[:2])
                units = unit_names(name, patches)
        normalised = {k: preprocess.normalize(img, norm) for k, norm in norms.items()}
        del img
        read += 1
        for patch, unit in zip(patches, units):
            if skip and unit in skip:
                continue
            per_key = {k: tiling.extract_patch(x, patch) for k, x in normalised.items()}
            shape = next(iter(per_key.values())).shape
            pending[shape].append((per_key, tuple(int(v) for v in patch.valid), unit, i))
            if len(pending[shape]) == batch_size:
                yield make(pending.pop(shape))
    for units in pending.values():
        yield make(units)


@dataclasses.dataclass
class _Group:
    """Models of one architecture and task (this process's share of them): one compiled program."""

    plan: engine.Plan
    models: list[Model]
    index: np.ndarray = None  # (m,) positions of the models in the bank
    norm_keys: list[str] = dataclasses.field(default_factory=list)
    placed: Any = None  # parallel.Placed
    subsets: dict = dataclasses.field(default_factory=dict)  # positions -> Placed, for resumed runs

    def args(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ms = [self.models[i] for i in pos]
        norm_idx = np.array([self.norm_keys.index(_norm_key(m)) for m in ms], np.int32)
        channels = np.array([m.channel for m in ms], np.int32)
        return channels, norm_idx


def _groups(models: Sequence[Model], index: Sequence[int], perts, metrics, threshold, strategy, precision,
            chunk_pixels) -> list[_Group]:
    by_key: dict[tuple, _Group] = {}
    positions: dict[tuple, list[int]] = defaultdict(list)
    for m, i in zip(models, index):
        if m.is_black_box:
            continue
        key = (m.spec.key(), m.task)
        if key not in by_key:
            plan = engine.Plan(spec=m.spec, perturbations=tuple(perts), metrics=tuple(metrics), task=m.task,
                               threshold=threshold, strategy=strategy, precision=precision,
                               chunk_pixels=chunk_pixels)
            by_key[key] = _Group(plan, [])
        by_key[key].models.append(m)
        positions[key].append(i)
    for key, g in by_key.items():
        g.index = np.array(positions[key], np.int64)
        g.norm_keys = sorted({_norm_key(m) for m in g.models})
    return list(by_key.values())


def _check_inputs(models: Sequence[Model], perts: Sequence[Perturbation], metrics: Sequence[str], aggregate: str):
    if aggregate not in AGGREGATES:
        raise CTEError(f"unknown aggregate {aggregate!r}; choose from {', '.join(AGGREGATES)}")
    for m in metrics:
        if m not in engine.METRICS:
            raise CTEError(f"unknown metric {m!r}; choose from {', '.join(engine.METRICS)}")
    if len(set(metrics)) != len(metrics):
        raise CTEError("a metric is given twice")
    if not perts:
        raise CTEError("no perturbation given")
    if len({p.name for p in perts}) != len(perts):
        raise CTEError("a perturbation is given twice")
    if len({m.name for m in models}) != len(models):
        raise CTEError("two models of the bank have the same name")
    if models and all(m.is_black_box for m in models) and all(p.is_feature for p in perts) \
            and not any(k in engine.CLEAN_METRICS for k in metrics):
        raise CTEError(f"every model of the bank is a black box (e.g. ONNX), whose layers {', '.join(p.name for p in perts)} "
                       f"cannot reach: give an input perturbation, e.g. --perturbation noise:0.01-0.03")


def _split(need: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows of ``need`` (m P) with one pattern of needed perturbations: (model positions, perts)."""
    if need.all():
        return [(np.arange(need.shape[0]), np.arange(need.shape[1]))]
    out = []
    for pattern in dict.fromkeys(map(tuple, need)):
        if any(pattern):
            rows = np.nonzero((need == np.array(pattern)).all(axis=1))[0]
            out.append((rows, np.nonzero(pattern)[0]))
    return out


def rank(bank: str | Path | Sequence[Model], target, *, perturbations: Sequence[str | Perturbation] = (DEFAULT_PERTURBATION,),
         metrics: Sequence[str] = ("nhd",), aggregate: str = "median", seed: int = 0, batch_size: int = 8,
         strategy: str = "auto", precision: str = "float32", threshold: float = 0.5, tile: int = 256,
         halo: int = 32, tile_above: int = 1024, progress: bool = True, dataset: str | None = None,
         on_scores: Callable[[str, str, str, list[str], np.ndarray, np.ndarray], None] | None = None,
         results: str | Path | None = None, resume: bool = False, overwrite: bool = False,
         devices: int | Sequence | None = None, shard: str = "auto") -> list[dict]:
    """Rank the models of ``bank`` for ``target`` by prediction consistency (CTE).

    Args:
      bank: a bank directory, a model directory, or a list of :class:`Model`.
      target: a folder of images, an image or TIFF stack, a zarr/N5 array, or an opened Target.
      perturbations: specs like ``"dropout:0.1"`` or ``"noise:0.03-0.05"``; several form a sweep
        that shares the clean pass (and the encoder, for bottleneck dropout).
      metrics: any of ``nhd``, ``ei``, ``vrand``; or the baselines ``confidence``, ``entropy``
        (clean pass only: the same scores under every perturbation) and ``mcdropout``.
      aggregate: ``median`` (the paper) or ``mean`` over the target's scored images.
      seed: root of every random draw (per model, perturbation and image, independent of batching).
      batch_size: patches per compiled call (rounded up to a multiple of the device count when
        images are split over devices).
      strategy: ``auto``, ``map`` (loop over stacked models; fastest on CPU) or ``vmap``.
      precision: ``float32`` or ``bfloat16`` compute.
      on_scores: called per scored block with (model, perturbation, metric, unit names, scores,
        valid).
      results: a ``.jsonl`` file receiving every per-unit score as it is computed
        (:class:`cte_jax.results.ResultsStore`); with ``resume`` the scores already in it are
        taken as they are, images whose units are all scored are not even read, and a (model,
        perturbation) pair already scored on the whole target is never run again.
      resume: continue ``results`` instead of starting it afresh.
      overwrite: start ``results`` afresh even when it holds an earlier run's scores (without it or
        ``resume``, such a file is refused rather than lost).
      devices: how many of this process's devices to use (default all), or a list of devices.
      shard: split stacked models over the devices (``models``), split each batch of images
        (``images``), neither (``none``), or ``auto``: by the fewest idle device slots. Scores do
        not depend on the choice.

    On a multi-host run (after ``jax.distributed.initialize``, see
    :func:`cte_jax.parallel.initialize_distributed`) each process scores its share of models x
    images (:func:`cte_jax.parallel.process_share`) on its own devices; the per-unit scores are
    gathered and every process returns the same records.

    Returns:
      One record per (model, perturbation, metric): ``{model, perturbation, metric, score, rank,
      n_scored, n_skipped, n_images, architecture}`` (``n_scored`` counts images or tiles,
      ``n_images`` the images they come from), plus ``foreground_fraction``, ``low_foreground`` and
      ``high_foreground`` when the model predicted on some image, and ``note`` for a black box
      under a feature perturbation; rank 1 is the most consistent model of that (perturbation,
      metric). ``score`` is None when no image could be scored; ``architecture`` (channels per
      level, e.g. ``"16-32-64"``) is None for a black box. ``order_support``: how firmly the
      target's images put the model above the next one down (:func:`order_support`, seeded by
      ``seed``); None for the last-ranked or an unscored model.
    """
    from cte_jax import data, parallel, preprocess
    from cte_jax.results import ResultsStore, ScoreTable, model_fingerprint

    models = list(load_bank(bank) if isinstance(bank, (str, Path)) else bank)
    try:
        perts = [p if isinstance(p, Perturbation) else parse_perturbation(p) for p in perturbations]
    except ValueError as e:
        raise CTEError(str(e)) from None
    metrics = list(metrics)
    _check_inputs(models, perts, metrics, aggregate)
    if strategy not in engine.STRATEGIES:
        raise CTEError(f"unknown strategy {strategy!r}; choose from {', '.join(engine.STRATEGIES)}")
    if precision not in engine.PRECISIONS:
        raise CTEError(f"unknown precision {precision!r}; choose from {', '.join(engine.PRECISIONS)}")
    if shard not in parallel.SHARD_MODES:
        raise CTEError(f"unknown shard mode {shard!r}; choose from {', '.join(parallel.SHARD_MODES)}")
    if resume and results is None:
        raise CTEError("resuming needs the results file of the interrupted run")
    if not 0.0 < threshold < 1.0:
        raise CTEError(f"threshold must lie between 0 and 1 (probabilities above it are foreground), got {threshold}")
    if batch_size < 1:
        raise CTEError(f"batch size must be at least 1, got {batch_size}")
    if not 0 <= seed < 2 ** 32:
        raise CTEError(f"seed must be a whole number from 0 to {2 ** 32 - 1}, got {seed}")
    # Environment variables that select kernels and sub-batches: refuse bad values before any work.
    backend.requested_kernels()
    chunk_pixels = engine.default_chunk_pixels()
    strategy = engine.default_strategy() if strategy == "auto" else strategy
    tgt = data.open_target(target, dataset=dataset) if isinstance(target, (str, Path)) else target
    if len(tgt) == 0:
        raise CTEError("target has no images", getattr(tgt, "path", None))

    norms = {}
    for m in models:
        try:
            norms[_norm_key(m)] = preprocess.Normalization.from_dict(m.normalization)
        except (TypeError, ValueError, KeyError) as e:
            raise CTEError(f"bad preprocessing description: {e}", m.path) from None
    # The patch grid depends on the whole bank, not on one host's share: every host cuts alike.
    multiple = max([m.spec.size_multiple for m in models if not m.is_black_box] + [16])
    n_proc, proc = jax.process_count(), jax.process_index()
    model_share, image_share = parallel.process_share(len(models), len(tgt), n_proc, proc)
    executor = parallel.Executor(devices=devices, shard=shard)
    groups = _groups([models[i] for i in model_share], model_share, perts, metrics, threshold, strategy, precision,
                     chunk_pixels)
    black_boxes = [i for i in model_share if models[i].is_black_box]
    feature_perts = [p for p in perts if p.is_feature]
    key = jax.random.key(seed)

    table = ScoreTable([m.name for m in models], [p.name for p in perts], metrics)
    # A black box cannot take a feature perturbation; the clean-pass baselines are scored under it all the same.
    clean_baselines = any(k in engine.CLEAN_METRICS for k in metrics)
    applicable = np.array([[not (m.is_black_box and p.is_feature) or clean_baselines for p in perts]
                           for m in models], bool)
    mine = applicable & np.isin(np.arange(len(models)), model_share)[:, None]
    store = None
    if results is not None:
        config = {"target": str(Path(getattr(tgt, "path", "")).resolve()), "n_images": len(tgt),
                  "names": zlib.crc32("\n".join(tgt.names).encode()), "seed": seed, "draws": engine.DRAWS,
                  "threshold": threshold, "precision": precision, "tile": tile, "halo": halo, "tile_above": tile_above,
                  "multiple": multiple}
        store = ResultsStore(results, config=config, fingerprints={m.name: model_fingerprint(m) for m in models},
                             resume=resume, overwrite=overwrite, process_index=proc, process_count=n_proc)
        if resume:
            store.load(table)
        store.open()
    skip = table.complete_units(mine) if resume else None

    step = batch_size
    for g in groups:
        g.placed = executor.place(engine.stack_variables([m.variables for m in g.models]), batch_size=batch_size)
        if g.placed.mode == "images":
            step = -(-batch_size // executor.n_devices) * executor.n_devices
    note = parallel.split_note([(g.models[0].name, len(g.models), g.placed.mode) for g in groups],
                                executor.n_devices)
    if note and progress and proc == 0:
        print(note, file=sys.stderr, flush=True)
    bar = _progress(len(image_share) * len(model_share), progress, "ranking")
    batches = prefetch(iter_batches(tgt, norms, batch_size=step, tile=tile, halo=halo, tile_above=tile_above,
                                    multiple=multiple, bucket=max(32, multiple),
                                    images=image_share if n_proc > 1 else None, skip=skip))

    def enter(index, pert_idx, names, images, s, v, fg):
        """Keep one scored block (m P M b) of real units: table, file, callback."""
        if store is not None:
            store.append([models[i].name for i in index], [perts[i].name for i in pert_idx], metrics, names,
                         images, s, v, fg)
        table.add(index, pert_idx, names, images, s, v, fg, saved=store is not None)
        if on_scores is not None:
            for a, mi in enumerate(index):
                for b, pi in enumerate(pert_idx):
                    for k, metric in enumerate(metrics):
                        on_scores(models[mi].name, perts[pi].name, metric, list(names), s[a, b, k], v[a, b, k])

    all_perts = np.arange(len(perts))
    try:
        for batch in batches:
            real = np.array([i for i, n in enumerate(batch.names) if n is not None], np.int64)
            names = [batch.names[i] for i in real]
            images = batch.images[real]
            for g in groups:
                # Only (model, perturbation) pairs still lacking some unit of this batch are run.
                need = table.missing(g.index, all_perts, names) & mine[g.index]
                for pos, pp in _split(need):
                    whole = len(pos) == len(g.models)
                    plan = g.plan if len(pp) == len(perts) else dataclasses.replace(
                        g.plan, perturbations=tuple(perts[i] for i in pp))
                    placed = g.placed if whole else _subset(executor, g, pos, batch_size)
                    inputs = np.stack([batch.inputs[k] for k in g.norm_keys])
                    s, v, fg = executor.score(plan, placed, *g.args(pos), inputs, batch.boxes, batch.unit_ids, key)
                    enter(g.index[pos], pp, names, images, s[..., real], v[..., real], fg[:, real])
            for mi in black_boxes:
                m = models[mi]
                pp = all_perts[table.missing([mi], all_perts, names)[0] & mine[mi]]
                if len(pp):
                    s, v, fg = engine.score_black_box(m.predict, [perts[i] for i in pp], metrics,
                                                      x=batch.inputs[_norm_key(m)], boxes=batch.boxes,
                                                      unit_ids=batch.unit_ids, key=key, threshold=threshold,
                                                      channel=m.channel, task=m.task)
                    enter([mi], pp, names, images, s[None][..., real], v[None][..., real], fg[None][:, real])
            bar.update(batch.images_read * len(model_share))
        bar.close()
        if n_proc > 1:
            # Every process ends with every score: its share, plus what only its own file held.
            select = table.select(model_share, image_share) | table.saved[:, :, :table.n_units].any(axis=1)
            table.add_rows(parallel.allgather_rows(table.rows(select)))
        if store is not None:
            store.finalize(table)
    finally:
        if store is not None:
            store.close()
    return _records(table, models, perts, metrics, aggregate, feature_perts, seed=seed)


def _subset(executor, g: _Group, pos: np.ndarray, batch_size: int):
    """Placed variables of some of a group's models (resumed runs only); the last two are kept."""
    k = tuple(int(i) for i in pos)
    if k not in g.subsets:
        if len(g.subsets) >= 2:
            g.subsets.pop(next(iter(g.subsets)))
        g.subsets[k] = executor.subset(g.placed, pos, batch_size=batch_size)
    return g.subsets[k]


def order_support(a: np.ndarray, b: np.ndarray, *, images: np.ndarray | None = None, aggregate: str = "median",
                  n_resamples: int = ORDER_RESAMPLES, seed: int = 0) -> float | None:
    """How firmly the images put model ``a`` above model ``b``: the share of paired bootstrap
    resamples of the target's images in which ``a``'s aggregate score is above ``b``'s (ties
    count half).

    Near 1, another draw of target images would very likely keep the order; near 0.5 the two
    models are within image-to-image noise of each other. It measures sampling noise only, not
    whether consistency orders the two models as their true performance would.

    Args:
      a, b: (n,) scores of the two models on the same n units (images or tiles), in the same order.
      images: (n,) the image each unit comes from (default: every unit is its own image). Tiles
        of one image are not independent draws: a resample draws images, with all their tiles.
      aggregate: ``median`` or ``mean``, as the ranking's score.
      n_resamples: bootstrap resamples (images drawn with replacement, the same draw for both);
        beyond ``ORDER_MAX_DRAWS / n`` units only that many, and at least ``ORDER_MIN_RESAMPLES``.
      seed: seeds the draws; ``order_support(a, b) + order_support(b, a) == 1`` for one seed.

    Returns:
      The share in [0, 1], or None with fewer than two images (nothing to resample).
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    n = a.shape[0]
    groups = np.arange(n) if images is None else np.unique(np.asarray(images), return_inverse=True)[1].ravel()
    g = int(groups.max()) + 1 if n else 0
    if g < 2:
        return None
    n_resamples = min(n_resamples, max(ORDER_MIN_RESAMPLES, ORDER_MAX_DRAWS // n))
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, _CHUNK_DRAWS // n))
    if g == n:  # one unit per image: draw units directly
        agg = np.median if aggregate == "median" else np.mean
        pick = lambda x, idx: agg(x[idx], axis=1)  # noqa: E731
    else:
        pick = functools.partial(_resampled_aggregate, groups=groups, g=g, aggregate=aggregate)
    wins = 0.0
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, g, size=(min(chunk, n_resamples - start), g), dtype=np.int64 if g >= 2**31 else np.int32)
        sa, sb = pick(a, idx), pick(b, idx)
        wins += np.count_nonzero(sa > sb) + 0.5 * np.count_nonzero(sa == sb)
    return wins / n_resamples


def _resampled_aggregate(x: np.ndarray, idx: np.ndarray, *, groups: np.ndarray, g: int, aggregate: str) -> np.ndarray:
    """Per row of ``idx`` (r g: drawn images), the median or mean of the units of the drawn
    images, an image drawn k times counting its units k times: exactly np.median / np.mean of the
    expanded draw, without building it."""
    r = idx.shape[0]
    counts = np.zeros((r, g), np.float64)
    np.add.at(counts, (np.repeat(np.arange(r), g), idx.ravel()), 1.0)
    w = counts[:, groups]  # (r n) copies of each unit
    if aggregate != "median":
        return (w * x).sum(axis=1) / w.sum(axis=1)
    order = np.argsort(x, kind="stable")
    xs, cum = x[order].astype(np.float64), np.cumsum(w[:, order], axis=1)
    total = cum[:, -1:]
    lo = np.argmax(cum > (total - 1) // 2, axis=1)  # the middle element(s) of the sorted expansion
    hi = np.argmax(cum > total // 2, axis=1)
    return (xs[lo] + xs[hi]) / 2


def _records(table, models: Sequence[Model], perts: Sequence[Perturbation], metrics: Sequence[str], aggregate: str,
             feature_perts: Sequence[Perturbation], *, seed: int = 0) -> list[dict]:
    fg_median = {}
    for mi, m in enumerate(models):
        f = table.foreground(mi)
        if len(f):
            fg_median[m.name] = float(np.median(f.astype(np.float64)))
    bank_fg = reference_foreground(fg_median.values())
    records = []
    for mi, m in enumerate(models):
        for pi, p in enumerate(perts):
            for ki, metric in enumerate(metrics):
                vals, n_skipped = table.values(mi, pi, ki)
                # Sorted, so a mean does not depend on the order units were scored or gathered in.
                vals = np.sort(vals.astype(np.float64))
                score = None
                if len(vals):
                    score = float(np.median(vals) if aggregate == "median" else np.mean(vals))
                note = None
                if m.is_black_box and p in feature_perts and metric not in engine.CLEAN_METRICS:
                    note = "black-box model: feature perturbations need its layers"
                    n_skipped = 0  # not scored at all, not skipped
                rec = {"model": m.name, "perturbation": p.name, "metric": metric, "score": score, "rank": None,
                       "n_scored": len(vals), "n_skipped": n_skipped, "n_images": table.n_images(mi, pi, ki),
                       "architecture": architecture(m)}
                if m.name in fg_median:
                    rec["foreground_fraction"] = fg_median[m.name]
                    # A model predicting far less foreground than the bank's typical model looks
                    # consistent for the wrong reason (tiny unions agree), and so does one segmenting
                    # most of the image; flag them, leave the paper's score unchanged.
                    rec["low_foreground"] = fg_median[m.name] < LOW_FOREGROUND_RATIO * bank_fg
                    rec["high_foreground"] = fg_median[m.name] > max(HIGH_FOREGROUND_MIN, HIGH_FOREGROUND_RATIO * bank_fg)
                if note:
                    rec["note"] = note
                records.append(rec)
    records = assign_ranks(records)
    index = {m.name: mi for mi, m in enumerate(models)}
    support: dict[tuple, float | None] = {}
    for pi, p in enumerate(perts):
        for ki, metric in enumerate(metrics):
            ranked = [r for r in records if (r["perturbation"], r["metric"]) == (p.name, metric) and r["rank"]]
            for upper, lower in zip(ranked, ranked[1:]):  # the last one keeps order_support None (below)
                # A clean-pass baseline has the same scores under every perturbation: resample once.
                key = (metric if metric in engine.CLEAN_METRICS else (p.name, metric), upper["model"], lower["model"])
                if key not in support:
                    sa, sb, images = table.paired(index[upper["model"]], index[lower["model"]], pi, ki, images=True)
                    support[key] = order_support(sa, sb, images=images, aggregate=aggregate, seed=seed)
                upper["order_support"] = support[key]
    for r in records:
        r.setdefault("order_support", None)
    return records


def architecture(model: Model) -> str | None:
    """The model's channels per U-Net level, e.g. ``"16-32-64"`` (None for a black box): what sets
    how strongly bottleneck dropout perturbs its output."""
    return None if model.spec is None else "-".join(str(f) for f in model.spec.features)


def assign_ranks(records: list[dict]) -> list[dict]:
    """Rank 1..n within each (perturbation, metric) by descending score; None scores last, unranked.
    Returns the records sorted by (perturbation, metric, rank)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["perturbation"], r["metric"])].append(r)
    out = []
    for key in groups:
        rs = groups[key]
        scored = sorted((r for r in rs if r["score"] is not None), key=lambda r: (-r["score"], r["model"]))
        for i, r in enumerate(scored):
            r["rank"] = i + 1
        out += scored + sorted((r for r in rs if r["score"] is None), key=lambda r: r["model"])
    return out


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="model-image", leave=False)
