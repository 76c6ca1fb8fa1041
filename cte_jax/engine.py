"""The scoring engine: one compiled program per architecture runs clean + perturbed passes and metrics."""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cte_jax import backend
from cte_jax import metrics as M
from cte_jax.arch import UNetSpec
from cte_jax.networks import UNet
from cte_jax.perturbations import Perturbation, perturb_bottleneck, perturb_input

Array = jax.Array
METRICS = ("nhd", "ei", "vrand", "confidence", "entropy", "mcdropout")
# Baselines computed by the same program (cte_jax.baselines): "confidence" and "entropy" use the
# clean pass only (identical for every perturbation); "mcdropout" needs Plan.mc_samples draws.
BASELINE_METRICS = ("confidence", "entropy", "mcdropout")
CLEAN_METRICS = ("confidence", "entropy")
MC_SAMPLES = 4  # draws per image for "mcdropout"; each costs one more decoder pass
STRATEGIES = ("auto", "map", "vmap")
PRECISIONS = ("float32", "bfloat16")


# How random draws are keyed, recorded in results files and --json settings: "common" = by (seed,
# perturbation, unit), the same for every model (see _score_one_model).
DRAWS = "common"


def stable_id(text: str) -> int:
    """A PRNG fold-in id that depends only on ``text``: the same perturbation gets the same
    random draws whatever else is in the sweep or the batch."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def default_strategy() -> str:
    """Stacked models: vmap on accelerators; a loop on CPU, where vmapping different weights
    turns every convolution into a grouped convolution that XLA:CPU runs several times slower."""
    return "map" if jax.default_backend() == "cpu" else "vmap"


CPU_CHUNK_PIXELS = 2 * 128 * 128  # measured on AVX2 EPYC: see benchmarks/README.md, "What changed"


def default_chunk_pixels() -> int:
    """Pixels per image sub-batch inside the scoring program: on CPU, small sub-batches keep
    each layer's activations in cache (a batch of 8 images 128x128 ran 10-13 % slower per image
    than sub-batches of 2); accelerators take the whole batch (0). ``CTE_JAX_CHUNK_PIXELS``
    overrides it (0 = whole batch)."""
    env = os.environ.get("CTE_JAX_CHUNK_PIXELS", "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            from cte_jax.errors import CTEError

            raise CTEError(f"environment variable CTE_JAX_CHUNK_PIXELS must be a pixel count (0 = whole "
                           f"batches), got {env!r}") from None
    return CPU_CHUNK_PIXELS if jax.default_backend() == "cpu" else 0


def chunk_size(batch: int, h: int, w: int, chunk_pixels: int) -> int:
    """Images per sub-batch: the largest divisor of ``batch`` holding at most ``chunk_pixels``
    pixels (at least 1 image); the whole batch when ``chunk_pixels`` is 0."""
    if chunk_pixels <= 0:
        return batch
    most = max(1, chunk_pixels // max(h * w, 1))
    return max(d for d in range(1, min(batch, most) + 1) if batch % d == 0)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one compiled scoring program (hashable: the compile cache key)."""

    spec: UNetSpec
    perturbations: tuple[Perturbation, ...]
    metrics: tuple[str, ...]
    task: str = "foreground"
    threshold: float = 0.5
    strategy: str = "map"
    precision: str = "float32"
    mc_samples: int = MC_SAMPLES  # perturbed draws per image for "mcdropout" (only then computed)
    chunk_pixels: int = 0  # image sub-batches of at most this many pixels per model ("map" only); 0 = whole batch

    def __post_init__(self):
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ValueError(f"unknown metric {bad[0]!r}; choose from {', '.join(METRICS)}")
        if self.strategy not in ("map", "vmap"):
            raise ValueError(f"strategy {self.strategy!r} is not 'map' or 'vmap'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.mc_samples < 2:
            raise ValueError(f"mc_samples must be >= 2, got {self.mc_samples}")
        if self.chunk_pixels < 0:
            raise ValueError(f"chunk_pixels must be >= 0, got {self.chunk_pixels}")

    @property
    def clean_only(self) -> bool:
        """True when every metric is a baseline of the clean pass alone (no perturbed pass)."""
        return bool(self.metrics) and all(m in CLEAN_METRICS for m in self.metrics)

    @property
    def draws(self) -> int:
        """Perturbed passes per image and perturbation: mc_samples with "mcdropout", else 1."""
        return self.mc_samples if "mcdropout" in self.metrics else 1


def box_mask(boxes: Array, shape: tuple[int, int]) -> Array:
    """Valid-pixel masks (b h w) from boxes (b 4) = (y0, y1, x0, x1), half-open."""
    ys = jnp.arange(shape[0])[None, :, None]
    xs = jnp.arange(shape[1])[None, None, :]
    b = boxes[:, :, None, None]
    return (ys >= b[:, 0]) & (ys < b[:, 1]) & (xs >= b[:, 2]) & (xs < b[:, 3])


def instances_of(p: Array, mask: Array, plan: Plan) -> Array:
    """Instance labels (b h w) of probabilities p (b h w) for the plan's task."""
    from cte_jax import instances

    # Labelling is a while loop per image. vmap runs every image until the slowest converges and
    # pays selects on all of them; on CPU ("map" strategy) a loop over images is twice as fast.
    over_images = jax.vmap if plan.strategy == "vmap" else (lambda fn: lambda xs: jax.lax.map(fn, xs))
    if plan.task == "boundary":
        return over_images(lambda q: instances.boundary_instances(q, threshold=plan.threshold, min_size=0))(
            jnp.where(mask, p, 1.0))
    return over_images(lambda q: instances.foreground_instances(q, threshold=plan.threshold, min_size=0))(
        jnp.where(mask, p, 0.0))


def consistency(p: Array, q: Array, mask: Array, plan: Plan, p_instances: Array | None,
                q_draws: Array | None = None) -> tuple[Array, Array]:
    """All the plan's metrics of clean p vs perturbed q (b h w) -> scores, valid (n_metrics b).

    ``q_draws`` (k-1 b h w): further perturbed draws beside q, needed by "mcdropout" only;
    without them (black-box models) "mcdropout" is invalid.
    """
    from cte_jax import baselines as B

    scores, valid = [], []
    for name in plan.metrics:
        if name == "nhd":
            s, v = M.normalized_hamming_consistency(p, q, mask=mask, threshold=plan.threshold)
        elif name == "ei":
            s, v = M.effective_invariance(p, q, mask=mask, threshold=plan.threshold)
        elif name == "confidence":
            s, v = B.mean_foreground_confidence(p, mask=mask, threshold=plan.threshold)
        elif name == "entropy":
            s, v = B.one_minus_mean_entropy(p, mask=mask)
        elif name == "mcdropout":
            if q_draws is None:
                s, v = jnp.zeros(p.shape[:-2], jnp.float32), jnp.zeros(p.shape[:-2], bool)
            else:
                s, v = B.mc_variance_consistency(p, jnp.concatenate([q[None], q_draws]), mask=mask,
                                                 threshold=plan.threshold)
        else:
            # Instance ids are 1 + a flat pixel index, so h*w bounds them: the faster table path.
            s, v = M.foreground_rand_score(p_instances, instances_of(q, mask, plan), mask=mask,
                                           max_id=p.shape[-2] * p.shape[-1])
        scores.append(s.astype(jnp.float32))
        valid.append(v)
    return jnp.stack(scores), jnp.stack(valid)


def _score_one_model(plan: Plan, variables, channel, norm_idx, inputs, boxes, unit_ids, key):
    """Scores of one model on one batch: (n_perturbations n_metrics b) scores and valid flags.

    The random draws depend on (key, perturbation, unit) only, not on the model: every model of the
    bank sees the same noise, strengths and dropped channel positions on an image (common random
    numbers, as the reference's one fixed seed gives), so a model's score does not depend on its
    name and two copies of one network score alike."""
    net = UNet(plan.spec)
    dtype = jnp.bfloat16 if plan.precision == "bfloat16" else jnp.float32
    x = inputs[norm_idx]  # this model's normalisation of the batch (b h w c)
    b = x.shape[0]
    mask = box_mask(boxes, x.shape[1:3])
    if plan.precision == "bfloat16":
        variables = jax.tree.map(lambda v: v.astype(dtype), variables)

    def image_keys(pert: Perturbation) -> Array:
        """Keys (n_draws b) of the perturbed draws of every image: draw 0 is the one every
        metric uses; further draws (mcdropout only) fold in their index."""
        k = jax.random.fold_in(key, stable_id(pert.name))
        keys = jax.vmap(lambda u: jax.random.fold_in(k, u))(unit_ids)
        extra = [jax.vmap(lambda kk, d=d: jax.random.fold_in(kk, d))(keys) for d in range(1, n_draws)]
        return jnp.stack([keys] + extra)

    def prob(logits):
        from cte_jax.networks import probabilities

        return jnp.take(probabilities(plan.spec, logits.astype(jnp.float32)), channel, axis=-1)

    # Baselines of the clean pass alone need no perturbed pass: every perturbation's row is the
    # clean scores (rank --metric confidence entropy).
    clean_only = plan.clean_only
    feature_perts = [p for p in plan.perturbations if p.is_feature and not clean_only]
    input_perts = [p for p in plan.perturbations if not p.is_feature and not clean_only]
    n_draws = plan.draws

    def over_draws(fn, pert, *per_image):
        """fn(key, *image args) over (draws, images) -> (n_draws * b, ...), draw-major."""
        out = jax.vmap(lambda ks: jax.vmap(fn)(ks, *per_image))(image_keys(pert))
        return out.reshape((-1,) + out.shape[2:])

    # Input perturbations join the clean images in one batch: one encoder+decoder call.
    xs = [x] + [over_draws(lambda k, im, m, pert=pert: perturb_input(k, im, pert, mask=m), pert, x, mask)
                for pert in input_perts]
    x_all = jnp.concatenate(xs).astype(dtype)
    feats = net.apply(variables, x_all, method=UNet.encode)
    # Bottleneck perturbations reuse the clean encoder: the skips stay clean, only the bottleneck
    # of the clean images is dropped out, once per feature perturbation (and draw, for mcdropout).
    # Each dropped bottleneck is decoded in a call of its own (on CPU one call over all of them
    # measured 9-19 % slower: bigger working set), with the clean skips, and reuses the clean
    # decode's skip-channel convolutions (UNet.decode_shared): those do not see the bottleneck.
    def decode(fs, partials=None):
        logits, partials = net.apply(variables, fs, partials, method=UNet.decode_shared)
        p = prob(logits)
        return p.reshape((-1, b) + p.shape[1:]), partials  # chunks of b rows

    probs, partials = decode(feats)  # chunk 0 = clean, then (input perturbations x draws)
    chunks = {pert: probs[1 + i * n_draws:1 + (i + 1) * n_draws] for i, pert in enumerate(input_perts)}

    def clean_rows(a):  # the clean images' rows, once per draw
        return None if a is None else jnp.concatenate([a[:b]] * n_draws) if n_draws > 1 else a[:b]

    skips = [clean_rows(f) for f in feats[:-1]]
    clean_partials = [clean_rows(a) for a in partials]
    for pert in feature_perts:
        dropped = over_draws(lambda k, f, pert=pert: perturb_bottleneck(k, f, pert), pert, feats[-1][:b])
        chunks[pert] = decode(skips + [dropped], clean_partials)[0]
    clean = probs[0]
    if clean_only:  # one set of clean-pass scores, the row of every perturbation
        out = [consistency(clean, clean, mask, plan, None)] * len(plan.perturbations)
    else:
        clean_inst = instances_of(clean, mask, plan) if "vrand" in plan.metrics else None
        out = [consistency(clean, chunks[pert][0], mask, plan, clean_inst, chunks[pert][1:] if n_draws > 1 else None)
               for pert in plan.perturbations]
    return jnp.stack([s for s, _ in out]), jnp.stack([v for _, v in out]), foreground_fraction(clean, mask, plan.threshold)


def foreground_fraction(p: Array, mask: Array, threshold: float) -> Array:
    """Fraction (b,) of counted pixels predicted foreground: near-empty predictions look very
    consistent (tiny unions agree), so ranking reports it beside the score."""
    fg = jnp.sum((p > threshold) & mask, axis=(-2, -1))
    return (fg / jnp.maximum(jnp.sum(mask, axis=(-2, -1)), 1)).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def compiled_scorer(plan: Plan):
    """The jitted :func:`scoring_function` of ``plan``: built once per plan; jit then compiles
    once per shape, with the backend's compiler options."""
    return backend.jit(scoring_function(plan))


def scoring_function(plan: Plan):
    """The scoring program of ``plan``, not jitted (to be wrapped, e.g. in ``shard_map``).

    Signature: (stacked_variables, channels (m), norm_idx (m), inputs (k b h w c)
    = the batch under each of the k normalisations the group's models use, boxes (b 4) of valid
    pixels, unit_ids (b), key) -> scores, valid (m n_pert n_metric b), clean foreground fraction (m b).
    """

    def run(variables, channels, norm_idx, inputs, boxes, unit_ids, key):
        b, h, w = inputs.shape[1:4]
        c = b if plan.strategy == "vmap" else chunk_size(b, h, w, plan.chunk_pixels)

        def one(args):
            v, ch, ni = args
            if c == b:
                return _score_one_model(plan, v, ch, ni, inputs, boxes, unit_ids, key)
            # Sub-batches of c images, looped: every per-image result is the same as in one call
            # (dropout keys come from unit ids), only the working set shrinks.
            n = b // c
            sub = (jnp.moveaxis(inputs.reshape((inputs.shape[0], n, c) + inputs.shape[2:]), 1, 0),
                   boxes.reshape(n, c, 4), unit_ids.reshape(n, c))
            s, val, fg = jax.lax.map(lambda a: _score_one_model(plan, v, ch, ni, *a, key), sub)
            merge = lambda a: jnp.moveaxis(a, 0, -2).reshape(a.shape[1:-1] + (b,))  # (n ... c) -> (... b)
            return merge(s), merge(val), fg.reshape(b)

        xs = (variables, channels, norm_idx)
        if plan.strategy == "vmap":
            return jax.vmap(lambda *a: one(a))(*xs)
        return jax.lax.map(one, xs)

    return run


def stack_variables(variable_list: Sequence) -> dict:
    """Stack the variable trees of same-architecture models along a new leading model axis."""
    return jax.tree.map(lambda *v: np.stack(v), *variable_list)


def score_black_box(predict, pert_list: Sequence[Perturbation], plan_metrics: Sequence[str], *, x: np.ndarray,
                    boxes: np.ndarray, unit_ids: np.ndarray, key: Array, threshold: float,
                    channel: int = 0, task: str = "foreground") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score a black-box model (host predict function) on normalised images x (b h w c) with input
    perturbations; perturbations and metrics still run compiled on the device.

    A feature perturbation cannot reach a black box's layers: under one, only the clean-pass
    baselines (CLEAN_METRICS) are scored, and every other metric is left invalid.
    """
    plan = _bb_plan(tuple(plan_metrics), threshold, task)
    mask = box_mask(jnp.asarray(boxes), x.shape[1:3])
    clean = np.asarray(predict(x))[..., channel]
    fg = np.asarray(foreground_fraction(jnp.asarray(clean), mask, threshold))
    in_clean = np.array([m in CLEAN_METRICS for m in plan_metrics])
    s_clean = np.zeros((len(plan_metrics), x.shape[0]), np.float32)
    v_clean = np.zeros((len(plan_metrics), x.shape[0]), bool)
    if in_clean.any():  # baselines of the clean pass: no perturbed prediction, one set of scores
        cplan = _bb_plan(tuple(m for m in plan_metrics if m in CLEAN_METRICS), threshold, task)
        s, v = _bb_metrics(cplan)(jnp.asarray(clean), jnp.asarray(clean), mask, None)
        s_clean[in_clean], v_clean[in_clean] = np.asarray(s), np.asarray(v)
    if plan.clean_only or all(p.is_feature for p in pert_list):
        n = len(pert_list)
        return np.repeat(s_clean[None], n, 0), np.repeat(v_clean[None], n, 0), fg
    clean_inst = instances_of(jnp.asarray(clean), mask, plan) if "vrand" in plan.metrics else None
    scores, valid = [], []
    for pert in pert_list:
        if pert.is_feature:
            scores.append(s_clean)
            valid.append(v_clean)
            continue
        k = jax.random.fold_in(key, stable_id(pert.name))
        xp = _bb_perturb(pert)(jax.vmap(lambda u: jax.random.fold_in(k, u))(jnp.asarray(unit_ids)), jnp.asarray(x), mask)
        q = np.asarray(predict(np.asarray(xp)))[..., channel]
        s, v = _bb_metrics(plan)(jnp.asarray(clean), jnp.asarray(q), mask, clean_inst)
        scores.append(np.asarray(s))
        valid.append(np.asarray(v))
    return np.stack(scores), np.stack(valid), fg


@functools.lru_cache(maxsize=None)
def _bb_plan(metrics: tuple[str, ...], threshold: float, task: str) -> Plan:
    return Plan(spec=UNetSpec(), perturbations=(), metrics=metrics, task=task, threshold=threshold)


@functools.lru_cache(maxsize=None)
def _bb_perturb(pert: Perturbation):
    return jax.jit(jax.vmap(lambda k, im, m: perturb_input(k, im, pert, mask=m)))


@functools.lru_cache(maxsize=None)
def _bb_metrics(plan: Plan):
    return jax.jit(lambda p, q, m, pi: consistency(p, q, m, plan, pi))
