"""Judge rankings against ground truth: CTE and baselines vs true performance on labelled targets.

``evaluate`` runs on one labelled target; ``evaluate_targets`` on several (each with its own bank
subset, e.g. leave-one-domain-out) and averages the statistics over targets like the paper's
Tables 1-2. For every model they compute:

* CTE scores for each perturbation x metric (``cte_jax.ranking.rank``), together with the
  unsupervised baselines of the same engine (``confidence``, ``entropy``, ``mcdropout``, see
  ``cte_jax.baselines``), in one pass over the target;
* CCFV (supervised, needs the labels), if asked;
* the true performance: foreground F1 (semantic) or mAP over IoU 0.50:0.05:0.95 (instance), per
  image from the model's clean prediction (``cte_jax.predict.predict_image``), median over images;

and, per estimator, Kendall tau / Spearman rho / Pearson r against performance with permutation
p-values (``cte_jax.stats``).

Failure mode (a model predicting almost no foreground looks very consistent, since tiny unions
agree), and so can one predicting most of the image (large masks barely change): ``rank`` flags
models whose median predicted-foreground fraction is below 20% of the bank's reference
(``low_foreground``) or above max(0.5, 2 x the reference) (``high_foreground``), where the
reference is the median over the models predicting at most half of the image (over all when none
does; :func:`cte_jax.ranking.reference_foreground`). A model is "flagged" when either fires.
Every estimator is reported in three variants side by side:

* ``paper``: the unchanged score over all models (what the paper reports);
* ``unflagged``: the same score, flagged models left out of the statistics;
* ``corrected``: a corrected score over all models, chosen by ``correction``:
  ``"flag_last"`` (default): flagged models are ranked below every unflagged one, keeping their
  order (``s' = s - (max s - min s) - 1``), so it changes nothing when no model is flagged;
  ``"fg_ratio"``: ``s' = s * min(1, fg / reference_fg)``, a continuous penalty for predicting
  less foreground than the bank's reference (scores in [0, 1] only: CTE and the unsupervised
  baselines; not CCFV). On our nuclei study (``benchmarks/RESULTS.md``, one model flagged on
  one of 7 targets) ``fg_ratio`` lowered CTE-NHD's mean S_rho from 0.77 to 0.52, while
  ``flag_last`` keeps 0.77; ``None``: no variant.

Outputs (when ``out_dir`` is given; every file written atomically): ``models.csv`` (one row per
model: performance, foreground fraction, flag, every estimator and corrected estimator),
``per_image.csv`` (per-image performance), ``per_image_scores.csv`` (per-image/patch estimator
scores), ``statistics.csv`` (one row per estimator and variant), ``summary.json`` (everything
returned), and PNG figures: ``fig2_<estimator>.png`` (score vs performance, one point per model)
and ``fig3_<metric>.png`` (the same across bottleneck-dropout strengths) when the run has at
least two dropout rates.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cte_jax.errors import CTEError

PERFORMANCES = ("f1", "map")
CORRECTIONS = ("fg_ratio", "flag_last")
CTE_METRICS = ("nhd", "ei", "vrand")
UNSUPERVISED_BASELINES = ("confidence", "entropy", "mcdropout")
BASELINES = UNSUPERVISED_BASELINES + ("ccfv",)
DEFAULT_BASELINES = BASELINES
PERTURBATION_FREE = ("confidence", "entropy")  # depend on the clean pass only
VARIANTS = ("paper", "unflagged", "corrected")
STATISTICS = ("kendall_tau", "spearman_rho", "pearson_r")
# The dropout rates of the paper's Figure 3: perturbations=[f"dropout:{r}" for r in FIG3_RATES].
FIG3_RATES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)

_LABELS = {"nhd": "CTE-NHD", "ei": "CTE-EI", "vrand": "CTE-VRand", "confidence": "mean foreground confidence",
           "entropy": "1 - mean entropy", "mcdropout": "MC variance agreement", "ccfv": "CCFV"}
_PERF_LABELS = {"f1": "foreground F1 (median over images)", "map": "mAP@0.50:0.95 (median over images)"}


@dataclasses.dataclass(frozen=True)
class LabelledTarget:
    """One labelled target of an evaluation and the models evaluated on it.

    Attributes:
      name: the target's name in tables and figures.
      path: a labelled domain folder (``images/``, ``labels/``, ``split.json``), or a folder of
        images when ``labels`` is given.
      labels: a folder of label images with the images' names (optional).
      split: the key of ``split.json`` to use (``"test"``, ``"all"`` for every image, or ``"auto"``:
        the test split when the domain has a ``split.json``, else every image); ignored when
        ``labels`` is given.
      exclude: model names to leave out, or a predicate on :class:`~cte_jax.modelio.Model`
        (e.g. models trained on this domain, for leave-one-domain-out).
      include: if given, only these model names are evaluated (before ``exclude``).
    """

    name: str
    path: str | Path
    labels: str | Path | None = None
    split: str = "auto"
    exclude: Sequence[str] | Callable[[Any], bool] = ()
    include: Sequence[str] | None = None


@dataclasses.dataclass(frozen=True)
class Estimator:
    """One column of the evaluation: a CTE metric under a perturbation, or a baseline."""

    key: str  # e.g. "nhd@dropout:0.1", "confidence", "ccfv"
    metric: str
    perturbation: str | None
    supervised: bool = False
    bounded: bool = True  # scores in [0, 1]: the fg_ratio correction applies

    @property
    def family(self) -> str:
        return "cte" if self.metric in CTE_METRICS else "baseline"

    @property
    def label(self) -> str:
        base = _LABELS.get(self.metric, self.metric)
        return f"{base} ({self.perturbation})" if self.perturbation else base


def _estimators(perts: Sequence[str], metrics: Sequence[str], baselines: Sequence[str]) -> list[Estimator]:
    out = [Estimator(f"{m}@{p}", m, p) for m in metrics for p in perts]
    for b in baselines:
        if b in PERTURBATION_FREE:
            out.append(Estimator(b, b, None))
        elif b == "mcdropout":
            out += [Estimator(f"mcdropout@{p}", "mcdropout", p) for p in perts]
        elif b == "ccfv":
            out.append(Estimator("ccfv", "ccfv", None, supervised=True, bounded=False))
    return out


def _check_options(perturbations, metrics, baselines, performance, correction, task):
    from cte_jax.perturbations import parse_perturbation

    if performance not in PERFORMANCES:
        raise CTEError(f"unknown performance {performance!r}; choose from {', '.join(PERFORMANCES)}")
    if correction is not None and correction not in CORRECTIONS:
        raise CTEError(f"unknown correction {correction!r}; choose from {', '.join(CORRECTIONS)} or None")
    if task is not None and task not in ("foreground", "boundary"):
        raise CTEError(f"unknown task {task!r}; choose foreground or boundary")
    bad = [m for m in metrics if m not in CTE_METRICS]
    if bad:
        raise CTEError(f"unknown CTE metric {bad[0]!r}; choose from {', '.join(CTE_METRICS)} "
                       f"(baselines go in baselines=)")
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise CTEError(f"unknown baseline {bad[0]!r}; choose from {', '.join(BASELINES)}")
    if len(set(metrics)) != len(metrics) or len(set(baselines)) != len(baselines):
        raise CTEError("a metric or baseline is given twice")
    if not metrics and not baselines:
        raise CTEError("nothing to evaluate: no metric and no baseline")
    try:
        perts = [parse_perturbation(p).name if isinstance(p, str) else p.name for p in perturbations]
    except ValueError as e:
        raise CTEError(str(e)) from None
    if not perts:
        raise CTEError("no perturbation given")
    if len(set(perts)) != len(perts):
        raise CTEError("a perturbation is given twice")
    return perts


# -- targets and models ----------------------------------------------------------------------------
def resolved_split(spec: LabelledTarget) -> str | None:
    """The split a target is evaluated on: ``auto`` is the test split when the domain has a
    ``split.json`` (its other images may have trained a model), else every image (a held-out
    domain); None with a separate labels folder."""
    from cte_jax import data

    if spec.labels is not None:
        return None
    if spec.split != "auto":
        return spec.split
    return "test" if (Path(spec.path) / data.SPLITS_FILE).is_file() else "all"


def _open(spec: LabelledTarget):
    from cte_jax import data

    if spec.labels is None:
        return data.open_labelled(spec.path, split=resolved_split(spec))
    images = data.open_target(spec.path)
    lab_path = Path(spec.labels)
    if not lab_path.is_dir():
        raise CTEError("labels must be a folder of label images named as the images", lab_path)
    # Label images are read as stored (palette PNGs give their indices), as open_labelled does.
    labels = data._open_folder(lab_path, labels=True)
    missing = [n for n in images.names if n not in labels]
    if missing:
        raise CTEError(f"{len(missing)} images have no label (first: {missing[0]!r})", lab_path)
    return images, labels.select(images.names)


def _select(models: Sequence[Any], spec: LabelledTarget) -> list[Any]:
    names = {m.name for m in models}
    chosen = list(models)
    if spec.include is not None:
        unknown = sorted(set(spec.include) - names)
        if unknown:
            raise CTEError(f"target {spec.name}: include names unknown models {unknown}")
        chosen = [m for m in chosen if m.name in set(spec.include)]
    if callable(spec.exclude):
        chosen = [m for m in chosen if not spec.exclude(m)]
    else:
        unknown = sorted(set(spec.exclude) - names)
        if unknown:
            raise CTEError(f"target {spec.name}: exclude names unknown models {unknown}")
        chosen = [m for m in chosen if m.name not in set(spec.exclude)]
    if len(chosen) < 2:
        raise CTEError(f"target {spec.name}: {len(chosen)} model(s) left to evaluate; a ranking needs at least 2")
    return chosen


def _squeeze_label(lab: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    lab = np.asarray(lab)
    if lab.ndim == 3 and lab.shape[-1] == 1:
        lab = lab[..., 0]
    if lab.ndim != 2:
        raise CTEError(f"label of {name!r} has shape {lab.shape}; expected one channel")
    if lab.shape != tuple(shape):
        raise CTEError(f"label of {name!r} is {lab.shape[0]}x{lab.shape[1]} but the image is {shape[0]}x{shape[1]}")
    if not np.issubdtype(lab.dtype, np.integer):
        lab = np.rint(lab)
    return lab.astype(np.int64)


# -- ground truth ---------------------------------------------------------------------------------
def gt_instances(label: np.ndarray, *, task: str, largest_to_background: bool = False) -> np.ndarray:
    """Ground-truth instances of a label image (h w): instance labels as they are; a binary
    foreground mask (0/1 or 0/255: :func:`cte_jax.data.is_binary_mask`) as its connected
    components (8-connectivity); for the boundary
    task (1 = boundary) the regions between boundaries grown over them, as for predictions."""
    import jax.numpy as jnp

    from cte_jax import instances
    from cte_jax.data import is_binary_mask

    label = np.asarray(label)
    if task == "boundary":
        return np.asarray(instances.boundary_instances(jnp.asarray((label != 0).astype(np.float32)), min_size=0,
                                                       largest_to_background=largest_to_background))
    if is_binary_mask(label):
        return np.asarray(instances.foreground_instances(jnp.asarray((label != 0).astype(np.float32)), min_size=0))
    return label


def image_performance(p: np.ndarray, label: np.ndarray, *, performance: str, task: str, threshold: float = 0.5,
                      min_size: int = 50, largest_to_background: bool = False,
                      gt: np.ndarray | None = None) -> float:
    """True performance of one clean prediction p (h w) against its label (h w).

    ``f1``: ``foreground_f1(p > threshold, label != 0)`` (for boundary models: of the boundary
    class). ``map``: predicted instances (foreground: connected components of ``p > threshold``
    without objects below ``min_size`` pixels; boundary: regions between boundaries grown back,
    seeds below ``min_size`` merged) against :func:`gt_instances`, mean AP over IoU
    0.50:0.05:0.95 (``cte_jax.evaluation.mean_average_precision``).
    """
    import jax.numpy as jnp

    from cte_jax import evaluation, instances

    if performance == "f1":
        return float(evaluation.foreground_f1(jnp.asarray(p > threshold), jnp.asarray(label != 0)))
    if task == "boundary":
        pred = instances.boundary_instances(jnp.asarray(p), threshold=threshold, min_size=min_size,
                                            largest_to_background=largest_to_background)
    else:
        pred = instances.foreground_instances(jnp.asarray(p), threshold=threshold, min_size=min_size)
    if gt is None:
        gt = gt_instances(label, task=task, largest_to_background=largest_to_background)
    return float(evaluation.mean_average_precision(np.asarray(pred), gt))


# -- statistics -------------------------------------------------------------------------------------
def is_flagged(model_row: Mapping[str, Any]) -> bool:
    """Whether ``rank`` flagged this model: foreground far below (``low_foreground``) or far above
    (``high_foreground``) the bank's reference fraction (:func:`cte_jax.ranking.reference_foreground`).
    Rows saved before the high flag existed lack it."""
    return bool(model_row.get("low_foreground") or model_row.get("high_foreground"))


def corrected_scores(scores: Sequence[float | None], fg: Sequence[float | None], flagged: Sequence[bool], *,
                     correction: str, bounded: bool = True) -> list[float | None] | None:
    """The ``correction`` variant of one estimator's scores (see the module docstring).

    Args:
      scores: per model (None = no score).
      fg: per model median predicted-foreground fraction (None = unknown: left unchanged).
      flagged: per model ``low_foreground`` or ``high_foreground``.
      correction: ``"fg_ratio"`` or ``"flag_last"``.
      bounded: the scores lie in [0, 1]; ``fg_ratio`` needs it (returns None otherwise).

    Returns:
      The corrected scores, or None when the correction does not apply.
    """
    if correction == "fg_ratio":
        if not bounded:
            return None
        from cte_jax.ranking import reference_foreground

        med = reference_foreground(f for f in fg if f is not None)
        out = []
        for s, f in zip(scores, fg):
            if s is None or f is None or med <= 0:
                out.append(s)
            else:
                out.append(float(s) * min(1.0, float(f) / med))
        return out
    if correction == "flag_last":
        vals = [s for s in scores if s is not None]
        if not vals:
            return list(scores)
        drop = (max(vals) - min(vals)) + 1.0
        return [None if s is None else (float(s) - drop if f else float(s)) for s, f in zip(scores, flagged)]
    raise ValueError(f"unknown correction {correction!r}")


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, np.floating):
        return _nan_to_none(float(x))
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def correlation(scores: Sequence[float | None], performance: Sequence[float], *, target: str = "target",
                seed: int = 0, n_permutations: int = 10_000, keep: Sequence[bool] | None = None) -> dict[str, Any]:
    """Kendall tau, Spearman rho, Pearson r and permutation p-values of scores vs performance
    over the models with a score (and ``keep``); ``{"n_models": k}`` alone when k < 2.
    Undefined coefficients (a constant sample) are None."""
    from cte_jax import stats

    pairs = [(s, q) for i, (s, q) in enumerate(zip(scores, performance))
             if s is not None and q is not None and (keep is None or keep[i])]
    row: dict[str, Any] = {"n_models": len(pairs)}
    if len(pairs) < 2:
        return row
    s = np.array([p[0] for p in pairs], np.float64)
    q = np.array([p[1] for p in pairs], np.float64)
    out = stats.ranking_summary({target: (s, q)}, key_or_seed=seed, n_permutations=n_permutations)
    row.update(out["per_target"][target])
    return _nan_to_none(row)


# -- one target -------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Options:
    perturbations: list[str]
    metrics: list[str]
    baselines: list[str]
    task: str | None
    performance: str
    min_size: int
    correction: str | None
    aggregate: str
    seed: int
    batch_size: int
    threshold: float
    tile_above: int
    ccfv_samples: tuple[int, ...]
    largest_to_background: bool
    n_permutations: int
    plots: bool
    progress: bool


def _bank(bank) -> list[Any]:
    from cte_jax.modelio import load_bank

    models = list(load_bank(bank) if isinstance(bank, (str, Path)) else bank)
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise CTEError("model names in the bank are not unique")
    return models


def _task_of(models: Sequence[Any], task: str | None, target: str) -> str:
    tasks = sorted({m.task for m in models})
    if len(tasks) > 1:
        raise CTEError(f"target {target}: the models mix tasks {tasks}; evaluate one task at a time")
    if task is not None and tasks[0] != task:
        raise CTEError(f"target {target}: task {task!r} asked but the models are {tasks[0]!r} models")
    return tasks[0]


def _evaluate_one(models_all: Sequence[Any], spec: LabelledTarget, o: _Options) -> tuple[dict, dict]:
    """Compute one target's tables; returns (result, per-image rows for the CSV files)."""
    from tqdm.auto import tqdm

    from cte_jax import baselines as B
    from cte_jax import data, engine
    from cte_jax.evaluation import dataset_performance
    from cte_jax.predict import predict_image
    from cte_jax.ranking import rank, reference_foreground

    models = _select(models_all, spec)
    task = _task_of(models, o.task, spec.name)
    images, labels = _open(spec)
    if len(images) == 0:
        raise CTEError(f"target {spec.name}: no images", spec.path)
    names = list(images.names)
    imgs = [images.read(i) for i in range(len(images))]
    labs = [_squeeze_label(labels.read(i), n, imgs[i].shape[:2]) for i, n in enumerate(names)]
    data.check_labels(labs, labels.path)
    gts = ([gt_instances(lab, task=task, largest_to_background=o.largest_to_background) for lab in labs]
           if o.performance == "map" else [None] * len(labs))

    # CTE and the unsupervised baselines: one rank() pass (one compiled program per architecture).
    engine_metrics = list(o.metrics) + [b for b in o.baselines if b in UNSUPERVISED_BASELINES]
    unit_rows: list[dict] = []

    def on_scores(model, pert, metric, units, s, v):
        for u, si, vi in zip(units, np.asarray(s), np.asarray(v)):
            unit_rows.append({"model": model, "perturbation": pert, "metric": metric, "unit": u,
                              "score": float(si) if vi else None})

    records = rank(models, images, perturbations=o.perturbations, metrics=engine_metrics, aggregate=o.aggregate,
                   seed=o.seed, batch_size=o.batch_size, threshold=o.threshold, tile_above=o.tile_above,
                   progress=o.progress, on_scores=on_scores) if engine_metrics else []
    rec = {(r["model"], r["perturbation"], r["metric"]): r for r in records}
    fg_info = {r["model"]: r for r in records if "foreground_fraction" in r}
    # Keep per-unit rows of perturbation-free baselines once (they repeat under every perturbation).
    unit_rows = [r for r in unit_rows if r["metric"] not in PERTURBATION_FREE or r["perturbation"] == o.perturbations[0]]

    ests = _estimators(o.perturbations, o.metrics, o.baselines)
    table: list[dict[str, Any]] = []
    image_rows: list[dict] = []
    bar = tqdm(total=len(models) * len(imgs), desc="performance", disable=not o.progress, leave=False)
    for m in models:
        per_image = []
        for n, img, lab, gt in zip(names, imgs, labs, gts):
            p = np.asarray(predict_image(m, img, tile_above=o.tile_above))[..., m.channel]
            v = image_performance(p, lab, performance=o.performance, task=task, threshold=o.threshold,
                                  min_size=o.min_size, largest_to_background=o.largest_to_background, gt=gt)
            per_image.append(v)
            image_rows.append({"model": m.name, "image": n, o.performance: v})
            bar.update(1)
        first = fg_info.get(m.name)
        row: dict[str, Any] = {"model": m.name, "performance": dataset_performance(per_image, aggregate=o.aggregate),
                               "n_images": len(per_image),
                               "foreground_fraction": first.get("foreground_fraction") if first else None,
                               "low_foreground": bool(first.get("low_foreground", False)) if first else False,
                               "high_foreground": bool(first.get("high_foreground", False)) if first else False,
                               "scores": {}, "n_scored": {}}
        for e in ests:
            if e.metric == "ccfv":
                continue
            r = rec.get((m.name, e.perturbation or o.perturbations[0], e.metric))
            row["scores"][e.key] = r["score"] if r else None
            row["n_scored"][e.key] = r["n_scored"] if r else 0
        table.append(row)
    bar.close()

    if "ccfv" in o.baselines:
        ids = [engine.stable_id(n) for n in names]
        for m, row in zip(models, table):
            c = B.ccfv(m, imgs, labs, image_ids=ids, samples=o.ccfv_samples, seed=o.seed, tile_above=o.tile_above)
            row["scores"]["ccfv"] = c["score"]
            row["n_scored"]["ccfv"] = c["n_foreground_images"]
            row["ccfv_layers"] = c["layers"]

    # Statistics per estimator and variant, and the corrected scores beside the paper's.
    perf = [r["performance"] for r in table]
    flagged = [is_flagged(r) for r in table]
    fg = [r["foreground_fraction"] for r in table]
    known_fg = [f for f in fg if f is not None]
    estimators: dict[str, Any] = {}
    for e in ests:
        scores = [r["scores"].get(e.key) for r in table]
        corr = corrected_scores(scores, fg, flagged, correction=o.correction, bounded=e.bounded) \
            if o.correction else None
        for r, c in zip(table, corr or [None] * len(table)):
            r.setdefault("corrected", {})[e.key] = c
        variants = {
            "paper": correlation(scores, perf, target=spec.name, seed=o.seed, n_permutations=o.n_permutations),
            "unflagged": correlation(scores, perf, target=spec.name, seed=o.seed, n_permutations=o.n_permutations,
                                     keep=[not f for f in flagged]),
            "corrected": (correlation(corr, perf, target=spec.name, seed=o.seed, n_permutations=o.n_permutations)
                          if corr is not None else None),
        }
        estimators[e.key] = {"label": e.label, "metric": e.metric, "perturbation": e.perturbation,
                             "family": e.family, "supervised": e.supervised, **variants}

    result = {
        "target": spec.name, "path": str(spec.path), "split": resolved_split(spec),
        "task": task, "performance": o.performance, "performance_label": _PERF_LABELS[o.performance],
        "aggregate": o.aggregate, "n_images": len(names), "perturbations": list(o.perturbations),
        "metrics": list(o.metrics), "baselines": list(o.baselines), "correction": o.correction,
        "median_foreground_fraction": float(np.median(known_fg)) if known_fg else None,
        "reference_foreground_fraction": reference_foreground(known_fg) if known_fg else None,
        "flagged": [r["model"] for r in table if is_flagged(r)],
        "models": table, "estimators": estimators, "seed": o.seed,
    }
    return result, {"images": image_rows, "units": unit_rows}


# -- files -------------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("@", "_")).strip("_")


def _write_json(obj: Any, path: Path) -> None:
    from cte_jax.cli import _atomic_write

    _atomic_write(path, lambda f: f.write(json.dumps(_nan_to_none(obj), indent=2, allow_nan=False) + "\n"))


def _write_csv(rows: Sequence[Mapping[str, Any]], fields: Sequence[str], path: Path) -> None:
    from cte_jax.cli import _atomic_write

    def write(f):
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})

    _atomic_write(path, write)


def _flat_models(result: dict) -> tuple[list[dict], list[str]]:
    keys = list(result["estimators"])
    fields = ["model", "performance", "n_images", "foreground_fraction", "low_foreground", "high_foreground"] + \
        keys + [f"{k} corrected" for k in keys]
    rows = []
    for r in result["models"]:
        row = {k: r.get(k, False) for k in fields[:6]}
        for k in keys:
            row[k] = r["scores"].get(k)
            row[f"{k} corrected"] = r.get("corrected", {}).get(k)
        rows.append(row)
    return rows, fields


def _flat_statistics(estimators: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> tuple[list[dict], list[str]]:
    fields = ["estimator", "variant", "n_models"]
    for s in STATISTICS:
        fields += [s, f"{s}_pvalue"]
    rows = []
    for key, e in estimators.items():
        for v in VARIANTS:
            st = e.get(v)
            if st is None:
                continue
            rows.append({"estimator": key, "variant": v, **{k: st.get(k) for k in fields[2:]}, **(extra or {})})
    return rows, fields


def _points(result: dict, key: str) -> list[tuple[str, float, float]]:
    return [(r["model"], r["scores"].get(key), r["performance"]) for r in result["models"]]


def _figures(results: Sequence[dict], out: Path, *, fig3: bool = True) -> dict[str, Any]:
    """Figure 2 per estimator (all given targets in one plot) and Figure 3 per CTE metric."""
    from cte_jax import plots
    from cte_jax.perturbations import parse_perturbation

    first = results[0]
    ylabel = first["performance_label"]
    made: dict[str, Any] = {}
    for key, e in first["estimators"].items():
        points = {r["target"]: _points(r, key) for r in results}
        flagged = {r["target"]: r["flagged"] for r in results}
        rho = {r["target"]: (r["estimators"][key].get("paper") or {}).get("spearman_rho") for r in results}
        made[f"fig2_{_safe(key)}"] = plots.score_vs_performance(
            points, out / f"fig2_{_safe(key)}.png", xlabel=e["label"], ylabel=ylabel,
            title=f"{e['label']} vs performance", highlight=flagged,
            notes={t: f"S_rho {v:.2f}" for t, v in rho.items() if v is not None})
    if fig3 and len(results) == 1:
        drop = [(parse_perturbation(p).lo, p) for p in first["perturbations"] if p.startswith("dropout:")]
        if len(drop) >= 2:
            for metric in first["metrics"]:
                series = {f"p={rate:g}": _points(first, f"{metric}@{p}") for rate, p in sorted(drop)}
                made[f"fig3_{metric}"] = plots.strength_sweep(
                    series, out / f"fig3_{metric}.png", xlabel=f"{_LABELS[metric]} (bottleneck dropout p)",
                    ylabel=ylabel, title=f"{_LABELS[metric]} across dropout strengths: {first['target']}")
    return made


def _write_target(result: dict, rows: dict, out: Path, plots: bool) -> None:
    """One target's files, written into a hidden folder inside ``out`` and moved into place only
    when all are written (summary.json last): an interrupted or failed run adds nothing."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        flat, fields = _flat_models(result)
        _write_csv(flat, fields, tmp / "models.csv")
        _write_csv(rows["images"], ["model", "image", result["performance"]], tmp / "per_image.csv")
        _write_csv(rows["units"], ["model", "perturbation", "metric", "unit", "score"], tmp / "per_image_scores.csv")
        stat_rows, stat_fields = _flat_statistics(result["estimators"])
        _write_csv(stat_rows, stat_fields, tmp / "statistics.csv")
        if plots:
            result["figures"] = _figures([result], tmp)
            for fig in result["figures"].values():
                fig["path"] = str(out / Path(fig["path"]).name)
        written = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
        result["files"] = sorted(set(written) | {"summary.json"} | {p.name for p in out.iterdir()
                                                                     if not p.name.startswith(".")})
        _write_json(result, tmp / "summary.json")
        for name in written + ["summary.json"]:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- public API ---------------------------------------------------------------------------------------
def _options(perturbations, metrics, baselines, task, performance, min_size, correction, aggregate, seed,
             batch_size, threshold, tile_above, ccfv_samples, largest_to_background, n_permutations, plots,
             progress) -> _Options:
    baselines = [] if baselines is None else list(baselines)
    perts = _check_options(perturbations, metrics, baselines, performance, correction, task)
    if aggregate not in ("median", "mean"):
        raise CTEError(f"unknown aggregate {aggregate!r}; choose median or mean")
    if int(n_permutations) < 1:
        raise CTEError(f"permutations must be at least 1 (they give the p-values), got {n_permutations}")
    return _Options(perts, list(metrics), baselines, task, performance, int(min_size), correction, aggregate,
                    int(seed), int(batch_size), float(threshold), int(tile_above), tuple(ccfv_samples),
                    bool(largest_to_background), int(n_permutations), bool(plots), bool(progress))


def evaluate(bank, target, *, labels=None, split: str = "auto", name: str | None = None,
             exclude: Sequence[str] | Callable[[Any], bool] = (), include: Sequence[str] | None = None,
             perturbations: Sequence[str] = ("dropout:0.1",), metrics: Sequence[str] = ("nhd",),
             task: str | None = None, performance: str = "f1", min_size: int = 50,
             baselines: Sequence[str] | None = DEFAULT_BASELINES, correction: str | None = "flag_last",
             aggregate: str = "median", out_dir=None, seed: int = 0, batch_size: int = 8, threshold: float = 0.5,
             tile_above: int = 1024, ccfv_samples: Sequence[int] = (100, 200, 400, 800),
             largest_to_background: bool = False, n_permutations: int = 10_000, plots: bool = True,
             progress: bool = False) -> dict[str, Any]:
    """Evaluate CTE and baselines against true performance on one labelled target.

    Args:
      bank: a bank directory or a list of :class:`~cte_jax.modelio.Model` (one task).
      target: a labelled domain folder (``images/``, ``labels/``, ``split.json``), or a folder
        of images when ``labels`` is given.
      labels: a folder of label images with the images' names (0 = background; instance ids,
        or 0/1 masks; for boundary models 1 = boundary).
      split: the ``split.json`` key, ``"all"``, or ``"auto"`` (default: the test split when the
        domain has a ``split.json``, else every image).
      name: the target's name in outputs (default: the folder name).
      exclude, include: which bank models to evaluate (names, or a predicate for ``exclude``).
      perturbations: perturbation specs (``"dropout:0.1"``, ``"noise:0.03-0.05"``); with at
        least two dropout rates a Figure 3 is drawn.
      metrics: CTE metrics among ``nhd``, ``ei``, ``vrand``.
      task: ``"foreground"`` or ``"boundary"``; default: the models' task (checked if given).
      performance: ``"f1"`` (semantic) or ``"map"`` (instance mAP over IoU 0.50:0.05:0.95).
      min_size: predicted objects (foreground) or seeds (boundary) below this size are removed
        before the mAP.
      baselines: any of ``confidence``, ``entropy``, ``mcdropout`` (unsupervised, engine) and
        ``ccfv`` (supervised); None or () for none.
      correction: the corrected-score variant: ``"fg_ratio"``, ``"flag_last"`` or None (see the
        module docstring); the paper's score is always reported unchanged beside it.
      aggregate: ``median`` (paper) or ``mean`` over images, for scores and performance.
      out_dir: write the tables, ``summary.json`` and figures here (created if missing).
      seed: root of every random draw (perturbations, CCFV sampling, permutation tests).
      batch_size, threshold, tile_above: as in :func:`cte_jax.ranking.rank`.
      ccfv_samples: CCFV pixels per layer, deepest first.
      largest_to_background: for boundary instances, set the largest segment to background.
      n_permutations: permutation-test size (exact below n! <= this).
      plots: write PNG figures (with ``out_dir``).
      progress: progress bars.

    Returns:
      ``{"target", "task", "performance", "n_images", "models": [{"model", "performance",
      "foreground_fraction", "low_foreground", "scores": {estimator: score}, "corrected":
      {estimator: score}, "n_scored": {...}}], "estimators": {estimator: {"label", "metric",
      "perturbation", "family", "supervised", "paper": stats, "unflagged": stats, "corrected":
      stats | None}}, "flagged": [...], "median_foreground_fraction", "figures", "files", ...}``
      where stats = ``{"n_models", "kendall_tau", "spearman_rho", "pearson_r", and their
      "_pvalue"s}`` (only ``n_models`` when fewer than 2 models have a score; None where a
      coefficient is undefined). Estimator keys: ``"<metric>@<perturbation>"`` for CTE metrics
      and ``mcdropout``; ``confidence``, ``entropy``, ``ccfv``.

    Raises:
      CTEError: bad options, unreadable data, fewer than 2 models, mixed tasks.
    """
    o = _options(perturbations, metrics, baselines, task, performance, min_size, correction, aggregate, seed,
                 batch_size, threshold, tile_above, ccfv_samples, largest_to_background, n_permutations, plots,
                 progress)
    spec = LabelledTarget(name=name or Path(target).name, path=target, labels=labels, split=split,
                          exclude=exclude, include=include)
    result, rows = _evaluate_one(_bank(bank), spec, o)
    if out_dir is not None:
        _write_target(result, rows, Path(out_dir), o.plots)
    return _nan_to_none(result)


def summarize_targets(results: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Average the statistics of several :func:`evaluate` results over targets (paper Tables 1-2).

    For each estimator and variant, the per-target (scores, performances) of the variant's models
    (``unflagged``: without the flagged ones; ``corrected``: the corrected scores) go through
    ``cte_jax.stats.ranking_summary``: mean and sample std (ddof 1) of Kendall tau, Spearman
    rho and Pearson r over the targets where each is defined. Use it to aggregate targets
    evaluated one at a time (e.g. leave-one-domain-out, one :func:`evaluate` call per domain).

    Args:
      results: ``{target name: evaluate() result}``, all with the same estimators.

    Returns:
      ``(summary, table)``: ``summary[estimator][variant] = {"mean": {stat: ..}, "std": {..},
      "n_targets": {..}, "targets": [...]}`` or None (no target with 2 scored models), and the
      same as flat rows ``{"estimator", "variant", "<stat>_mean", "<stat>_std", "<stat>_n_targets"}``.
    """
    from cte_jax import stats

    if not results:
        raise ValueError("no results to summarize")
    keys = list(next(iter(results.values()))["estimators"])
    for name, r in results.items():
        if list(r["estimators"]) != keys:
            raise ValueError(f"target {name!r} has other estimators than the first target")
    summary: dict[str, Any] = {}
    table = []
    for key in keys:
        summary[key] = {}
        for v in VARIANTS:
            per_target = {}
            for name, r in results.items():
                m = r["estimators"][key]
                if m.get(v) is None:
                    continue
                # The variant's own model set and scores: unflagged drops flagged models.
                s_key = "corrected" if v == "corrected" else "scores"
                pairs = [(row[s_key].get(key), row["performance"]) for row in r["models"]
                         if not (v == "unflagged" and is_flagged(row))]
                pairs = [p for p in pairs if p[0] is not None]
                if len(pairs) >= 2:
                    per_target[name] = ([p[0] for p in pairs], [p[1] for p in pairs])
            if not per_target:
                summary[key][v] = None
                continue
            agg = stats.ranking_summary(per_target)
            summary[key][v] = _nan_to_none({"mean": agg["mean"], "std": agg["std"], "n_targets": agg["n_targets"],
                                            "targets": sorted(per_target)})
            row = {"estimator": key, "variant": v}
            for s in STATISTICS:
                row[f"{s}_mean"] = summary[key][v]["mean"][s]
                row[f"{s}_std"] = summary[key][v]["std"][s]
                row[f"{s}_n_targets"] = summary[key][v]["n_targets"][s]
            table.append(row)
    return summary, table


def evaluate_targets(bank, targets: Sequence[LabelledTarget], *, perturbations: Sequence[str] = ("dropout:0.1",),
                     metrics: Sequence[str] = ("nhd",), task: str | None = None, performance: str = "f1",
                     min_size: int = 50, baselines: Sequence[str] | None = DEFAULT_BASELINES,
                     correction: str | None = "flag_last", aggregate: str = "median", out_dir=None, seed: int = 0,
                     batch_size: int = 8, threshold: float = 0.5, tile_above: int = 1024,
                     ccfv_samples: Sequence[int] = (100, 200, 400, 800), largest_to_background: bool = False,
                     n_permutations: int = 10_000, plots: bool = True, progress: bool = False) -> dict[str, Any]:
    """Evaluate on several labelled targets, each with its own models, and average over targets.

    Every target is evaluated as by :func:`evaluate` (same options) with its own bank subset
    (``LabelledTarget.include`` / ``exclude``; for leave-one-domain-out, exclude the models
    trained on the target's domain). Then, per estimator and variant, the statistics are
    averaged over targets with their sample std (``cte_jax.stats.ranking_summary``), the form of
    the paper's Tables 1-2.

    Args:
      bank: a bank directory or a list of models.
      targets: the labelled targets (unique names).
      out_dir: per-target outputs in ``out_dir/<target name>/``, plus ``summary.json``,
        ``table.csv`` (mean and std per estimator, variant and statistic) and one Figure 2 per
        estimator with every target (one colour and line per target) in ``out_dir``.
      Other arguments: as in :func:`evaluate`.

    Returns:
      ``{"targets": {name: evaluate()-style result}, "summary": {estimator: {variant:
      {"mean": {stat: ..}, "std": {..}, "n_targets": {..}} | None}}, "table": [rows],
      "figures": {...}}``.
    """
    o = _options(perturbations, metrics, baselines, task, performance, min_size, correction, aggregate, seed,
                 batch_size, threshold, tile_above, ccfv_samples, largest_to_background, n_permutations, plots,
                 progress)
    targets = list(targets)
    if not targets:
        raise CTEError("no target given")
    tnames = [t.name for t in targets]
    if len(set(tnames)) != len(tnames):
        raise CTEError(f"target names must be unique, got {tnames}")
    models = _bank(bank)
    out = Path(out_dir) if out_dir is not None else None
    results = {}
    for t in targets:
        result, rows = _evaluate_one(models, t, o)
        if out is not None:
            _write_target(result, rows, out / _safe(t.name), o.plots)
        results[t.name] = _nan_to_none(result)

    summary, table = summarize_targets(results)
    combined: dict[str, Any] = {"targets": results, "summary": summary, "table": table,
                                "options": dataclasses.asdict(o)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        fields = ["estimator", "variant"] + [f"{s}_{k}" for s in STATISTICS for k in ("mean", "std", "n_targets")]
        _write_csv(table, fields, out / "table.csv")
        if o.plots:
            combined["figures"] = _figures(list(results.values()), out, fig3=False)
        _write_json(combined, out / "summary.json")
    return combined
