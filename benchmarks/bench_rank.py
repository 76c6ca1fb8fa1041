"""Rank throughput of cte_jax against three PyTorch pipelines, side by side, same weights, same images.

    python benchmarks/bench_rank.py            # full: 4 models (2 architectures) x 16 images 128x128
    python benchmarks/bench_rank.py --quick    # seconds: 2 tiny models x 4 images 64x64

Contenders, each ranking the same bank on the same zarr target with bottleneck dropout, once
with CTE-NHD and once with CTE-VRand (every one reads the target and normalises it itself):

- ``cte_jax``: ``cte_jax.ranking.rank(...)`` (one compiled program per architecture: encoder
  once, clean and dropped decoder passes fused, metrics on the device, per-image scores to host).
- ``torch reference-style``: how the reference pipeline does it: per model, per image (batch 1),
  two full ``model(x)`` calls under ``torch.no_grad()``, the second with ``nn.Dropout2d`` in
  train mode applied to the bottleneck by a forward hook on the last encoder (dropout seeded
  with 42 each time, as the reference does); metrics in NumPy (NHD) or
  ``skimage.measure.label`` + ``skimage.metrics.adapted_rand_error`` (VRand).
- ``torch best``: the fastest PyTorch pipeline written here: batches, ``torch.inference_mode``,
  channels-last tensors, encoder once and one decoder call on [clean; dropped] bottlenecks,
  NHD vectorised in torch, VRand with ``scipy.ndimage.label`` and pair counts in NumPy. It runs
  at several batch sizes (8, 4, 2) and its fastest is the "torch best" of the summary: smaller
  batches keep activations in cache on CPU, for PyTorch as for XLA.
- ``torch shared``: torch best with cte_jax's two decoder shares written in PyTorch
  (``torch_decode_shared``): the dropped decode reuses the clean decode's skip-channel
  convolutions, and both convolve the upsampled channels at the low resolution. Same batch
  sizes; its fastest is the "torch shared" of the summary.

Compile time is reported apart: the first ``rank()`` call (compile + run) against steady-state
calls, and the engine's program lowered and compiled explicitly (``compiled_scorer(plan)
.lower(...).compile()``), and (full mode) in a fresh process with the persistent compilation
cache cold and then warm. PyTorch gets as many threads as XLA (the cores of this process), with
OpenMP's PASSIVE wait policy (see below). A last table times one forward pass, the widest
decoder convolution and its GroupNorm in both frameworks, to show where the time goes.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# PyTorch's OpenMP threads spin while waiting (libgomp's default ACTIVE policy): on a machine
# whose cores are shared with other work they then stall one another (a batch-1 forward pass was
# measured 6-45x slower here at a load average of 2-3). Threads that sleep while waiting keep
# PyTorch's timings meaningful there and cost little when the cores are free; --omp-active keeps
# the default. Set before torch (and its OpenMP runtime) is loaded.
if "--omp-active" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from cte_jax import backend  # noqa: E402

FULL = dict(archs=[dict(f_maps=[16, 32, 64, 128], layer_order="gcr", num_groups=8, num_levels=4),
                   dict(f_maps=[16, 32, 64], layer_order="bcr", num_levels=3)],
            per_arch=2, images=16, size=128, batch_size=8, torch_batches=(8, 4, 2), repeats=3)
QUICK = dict(archs=[dict(f_maps=[4, 8, 16], layer_order="gcr", num_groups=2, num_levels=3)],
             per_arch=2, images=4, size=64, batch_size=4, torch_batches=(4, 2), repeats=1)


# -- the three contenders ----------------------------------------------------------------------
def cte_jax_rank(models, target_path, *, rate: float, metric: str, batch_size: int) -> dict[str, float]:
    from cte_jax.ranking import rank

    recs = rank(models, target_path, perturbations=[f"dropout:{rate}"], metrics=[metric], progress=False,
                batch_size=batch_size)
    return {r["model"]: r["score"] for r in recs}


def torch_reference_style(bank, target_path, *, rate: float, metric: str) -> dict[str, float]:
    """Per model, per image: clean model(x), then model(x) again with Dropout2d hooked onto the
    bottleneck; metrics in NumPy / scikit-image."""
    import torch
    from torch import nn

    from cte_jax.data import open_target

    target = open_target(target_path)
    out = {}
    for m in bank:
        net = m["torch"]
        drop = nn.Dropout2d(rate).train()
        active = [False]

        def hook(module, inputs, output):
            return drop(output) if active[0] else output

        handle = net.encoders[-1].register_forward_hook(hook)
        vals = []
        try:
            for i in range(len(target)):
                x = torch.from_numpy(C.percentile_normalize(target.read(i)[..., 0]))[None, None]
                with torch.no_grad():
                    p = net(x)[0, 0].numpy()
                    active[0] = True
                    torch.manual_seed(42)
                    q = net(x)[0, 0].numpy()
                    active[0] = False
                s = C.reference_nhd(p, q) if metric == "nhd" else C.reference_vrand(p > 0.5, q > 0.5)
                if s is not None:
                    vals.append(s)
        finally:
            handle.remove()
        out[m["name"]] = float(np.median(vals)) if vals else None
    return out


def _torch_scores(bank_cl, target_path, *, metric: str, batch_size: int, clean_and_dropped) -> dict[str, float]:
    """The batched PyTorch pipelines' loop: read and normalise the target, then per batch and model
    ``clean_and_dropped(model entry, x)`` -> (clean, dropped) probabilities (b h w), scored on the
    host side of torch: NHD vectorised in torch, VRand with scipy labels (``fast_vrand``)."""
    import torch

    from cte_jax.data import open_target

    target = open_target(target_path)
    imgs = np.stack([C.percentile_normalize(target.read(i)[..., 0]) for i in range(len(target))])
    batches = [torch.from_numpy(imgs[s:s + batch_size, None]).contiguous(memory_format=torch.channels_last)
               for s in range(0, len(imgs), batch_size)]
    vals: dict[str, list] = {m["name"]: [] for m in bank_cl}
    for x in batches:
        for m in bank_cl:
            with torch.inference_mode():
                p, q = clean_and_dropped(m, x)
                y, yq = p > 0.5, q > 0.5
                if metric == "nhd":
                    union = (y | yq).sum(dim=(1, 2))
                    flips = (y ^ yq).sum(dim=(1, 2))
                    ok = union > 0
                    s = (1.0 - flips[ok].double() / union[ok].double()).tolist()
                else:
                    yn, yqn = y.numpy(), yq.numpy()
                    s = [v for v in (C.fast_vrand(yn[i], yqn[i]) for i in range(len(yn))) if v is not None]
            vals[m["name"]] += s
    return {k: (float(np.median(v)) if v else None) for k, v in vals.items()}


def torch_best(bank_cl, target_path, *, rate: float, metric: str, batch_size: int) -> dict[str, float]:
    """Batched, inference_mode, channels-last, encoder once, one decoder call for clean + dropped."""
    import torch
    import torch.nn.functional as F

    def clean_and_dropped(m, x):
        feats = C.torch_encode(m["torch"], x)
        dropped = F.dropout2d(feats[0], rate, training=True)
        probs = C.torch_decode(m["torch"], [torch.cat([feats[0], dropped])] + [torch.cat([f, f]) for f in feats[1:]])
        return probs[:len(x), 0], probs[len(x):, 0]

    return _torch_scores(bank_cl, target_path, metric=metric, batch_size=batch_size, clean_and_dropped=clean_and_dropped)


def shared_plan(model_entry) -> list[tuple]:
    """What ``torch_decode_shared`` needs per decoder step of a ``build_bank`` entry's PyTorch
    U-Net (pytorch-3dunet, nearest upsampling, skip first): (number of skip channels, the static
    skip channels of cte_jax's ``networks.static_skip_channels`` or None, the four phase kernels
    of the first convolution's upsampled channels, (4 cout cu 2 2), phase = 2 * row + column)."""
    import torch

    from cte_jax.networks import phase_kernels, static_skip_channels

    net, spec = model_entry["torch"], model_entry["model"].spec
    plan = []
    for j, dec in enumerate(net.decoders):
        w = dec.basic_module.SingleConv1.conv.weight.detach()  # cout cin 3 3
        n_skip = spec.features[spec.levels - 2 - j]
        hwio = w[:, n_skip:].permute(2, 3, 1, 0).numpy()  # the upsampled channels, kh kw cu cout
        kernels = torch.stack([torch.tensor(np.asarray(k)).permute(3, 2, 0, 1) for k in phase_kernels(hwio)])
        plan.append((n_skip, static_skip_channels(spec, j), kernels.contiguous()))
    return plan


def torch_decode_shared(net, feats, plan, partials=None):
    """``torch_decode`` with cte_jax's two decoder shares, written in PyTorch: the first conv of
    each decoder step convolves the nearest-2x upsampled channels at the low resolution (four
    2x2 convolutions, one per output phase, interleaved by ``pixel_shuffle``), and its static
    skip channels' contribution is computed once (``partials`` None) and then reused.
    Returns (probabilities, partials)."""
    import torch
    import torch.nn.functional as F

    x, kept = feats[0], []
    for (n_skip, static, kph), dec, skip in zip(plan, net.decoders, feats[1:]):
        z = torch.cat([skip, dec.upsampling(skip, x)], 1)
        mods = list(dec.basic_module.SingleConv1.named_children())
        at = [n for n, _ in mods].index("conv")
        for _, mod in mods[:at]:
            z = mod(z)
        w = dec.basic_module.SingleConv1.conv.weight
        lo, hi = static if static else (0, 0)
        part = partials[len(kept)] if partials is not None and static else (
            F.conv2d(z[:, lo:hi], w[:, lo:hi], padding=1) if static else None)
        kept.append(part)
        terms = [part] if static else []
        for a, b in ((0, lo), (hi, n_skip)):
            if b > a:
                terms.append(F.conv2d(z[:, a:b], w[:, a:b], padding=1))
        low = F.pad(z[:, n_skip:, ::2, ::2], (1, 1, 1, 1))
        h, wd = low.shape[2] - 2, low.shape[3] - 2
        phases = [F.conv2d(low[:, :, r:r + h + 1, c:c + wd + 1], kph[2 * r + c]) for r in (0, 1) for c in (0, 1)]
        y = torch.stack(phases, 2).reshape(z.shape[0], -1, h, wd)  # channel = cout * 4 + phase
        terms.append(F.pixel_shuffle(y, 2))
        out = sum(terms[1:], terms[0])
        if dec.basic_module.SingleConv1.conv.bias is not None:
            out = out + dec.basic_module.SingleConv1.conv.bias[:, None, None]
        for _, mod in mods[at + 1:]:
            out = mod(out)
        x = dec.basic_module.SingleConv2(out)
    x = net.final_conv(x)
    return (net.final_activation(x) if net.final_activation is not None else x), kept


def shared_decode_parity(bank_cl, x: np.ndarray) -> float:
    """Max |difference| between ``torch_decode_shared`` (clean, then a dropped bottleneck with the
    clean partials) and ``torch_decode`` of the same features, over the bank, on images x (b h w)."""
    import torch
    import torch.nn.functional as F

    xt = torch.from_numpy(np.asarray(x, np.float32)[:, None]).contiguous(memory_format=torch.channels_last)
    worst = 0.0
    with torch.inference_mode():
        for m in bank_cl:
            feats = C.torch_encode(m["torch"], xt)
            clean, partials = torch_decode_shared(m["torch"], feats, m["shared"])
            dropped = [F.dropout2d(feats[0], 0.5, training=True)] + feats[1:]
            pert, _ = torch_decode_shared(m["torch"], dropped, m["shared"], partials)
            for got, fs in ((clean, feats), (pert, dropped)):
                worst = max(worst, float((got - C.torch_decode(m["torch"], fs)).abs().max()))
    return worst


def torch_shared(bank_cl, target_path, *, rate: float, metric: str, batch_size: int) -> dict[str, float]:
    """torch best with cte_jax's decoder shares (``torch_decode_shared``): encoder once, a clean
    decode that keeps the skip partials, a dropped decode that reuses them."""
    import torch.nn.functional as F

    def clean_and_dropped(m, x):
        feats = C.torch_encode(m["torch"], x)
        clean, partials = torch_decode_shared(m["torch"], feats, m["shared"])
        dropped = [F.dropout2d(feats[0], rate, training=True)] + feats[1:]
        return clean[:, 0], torch_decode_shared(m["torch"], dropped, m["shared"], partials)[0][:, 0]

    return _torch_scores(bank_cl, target_path, metric=metric, batch_size=batch_size, clean_and_dropped=clean_and_dropped)


# -- where the time goes: one forward pass, one convolution, one norm --------------------------------
def diagnose(bank, bank_cl, x: np.ndarray, repeats: int) -> list[dict]:
    """Per architecture: a clean forward pass of one model on one batch x (b h w) in PyTorch
    (NCHW and channels-last) and in XLA (jit of UNet.apply), and the widest decoder layer alone
    (its 3x3 convolution, and its GroupNorm when the order has one) in both frameworks."""
    import jax
    import torch

    from cte_jax.networks import GroupNorm, UNet

    rows, seen = [], set()
    for m, mc in zip(bank, bank_cl):
        spec = m["model"].spec
        if spec.key() in seen:
            continue
        seen.add(spec.key())
        t_nchw = torch.from_numpy(x[:, None])
        t_cl = t_nchw.contiguous(memory_format=torch.channels_last)
        apply = backend.jit(UNet(spec).apply)
        v = jax.device_put(m["model"].variables)
        xj = jax.device_put(x[..., None])
        cin, cout = spec.decoder_channels(spec.levels - 2)
        rng = np.random.default_rng(0)
        act = rng.standard_normal((x.shape[0], x.shape[1], x.shape[2], cin)).astype(np.float32)
        ker = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
        conv_j = backend.jit(lambda a, k: jax.lax.conv_general_dilated(a, k, (1, 1), "SAME",
                                                                   dimension_numbers=("NHWC", "HWIO", "NHWC")))
        conv_t = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        conv_t.weight.data = torch.from_numpy(ker).permute(3, 2, 0, 1).contiguous()
        conv_t = conv_t.to(memory_format=torch.channels_last)
        act_j = jax.device_put(act)
        ker_j = jax.device_put(ker)
        act_t = torch.from_numpy(act).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

        def no_grad(fn):
            def run():
                with torch.inference_mode():
                    return fn()
            return run

        fns = {"forward torch NCHW": no_grad(lambda: m["torch"](t_nchw)),
               "forward torch channels-last": no_grad(lambda: mc["torch"](t_cl)),
               "forward XLA (UNet.apply)": lambda: apply(v, xj),
               "conv torch channels-last": no_grad(lambda: conv_t(act_t)),
               "conv XLA": lambda: conv_j(act_j, ker_j)}
        if "g" in spec.layer_order:
            import flax.linen as nn

            groups = spec.group_count(cin)
            gn = nn.GroupNorm(num_groups=groups, epsilon=spec.norm_eps, use_fast_variance=False)
            gv = gn.init(jax.random.key(0), act[:1])
            gn_j = backend.jit(gn.apply)
            gn_t = torch.nn.GroupNorm(groups, cin)
            ours = GroupNorm(num_groups=groups, epsilon=spec.norm_eps)
            ours_j = backend.jit(ours.apply)
            fns["GroupNorm torch channels-last"] = no_grad(lambda: gn_t(act_t))
            fns["GroupNorm XLA (flax)"] = lambda: gn_j(gv, act_j)
            fns["GroupNorm XLA (cte_jax)"] = lambda: ours_j(gv, act_j)
        t = C.interleaved(fns, repeats=repeats, warmup=1)
        rows.append({"features": list(spec.features), "layer_order": spec.layer_order, "batch": int(x.shape[0]),
                     "size": int(x.shape[1]), "layer": f"{cin}->{cout}", "median_s": {k: C.median(s) for k, s in t.items()}})
    return rows


# -- compile time -----------------------------------------------------------------------------------
def engine_args(models, plan, batch_size: int, size: int):
    """Arguments of the engine's program for one group, shaped as rank() passes them."""
    import jax

    from cte_jax import engine

    m = len(models)
    return (engine.stack_variables([x.variables for x in models]), np.zeros(m, np.int32), np.zeros(m, np.int32),
            np.zeros((1, batch_size, size, size, 1), np.float32),
            np.tile(np.array([[0, size, 0, size]], np.int32), (batch_size, 1)),
            np.arange(batch_size, dtype=np.int32), jax.random.key(0))


def plan_for(spec, rate: float, metrics, precision: str = "float32"):
    from cte_jax import engine
    from cte_jax.perturbations import parse_perturbation

    return engine.Plan(spec=spec, perturbations=(parse_perturbation(f"dropout:{rate}"),), metrics=tuple(metrics),
                       strategy=engine.default_strategy(), precision=precision)


def time_engine_compile(models, *, rate: float, metric: str, batch_size: int, size: int) -> list[dict]:
    """Lower and compile each architecture's program from scratch (in-memory caches cleared
    first; the compiled program then serves the following rank() calls)."""
    import jax

    from cte_jax import engine

    jax.clear_caches()
    engine.compiled_scorer.cache_clear()
    groups: dict[str, list] = {}
    for m in models:
        groups.setdefault(m.spec.key(), []).append(m)
    out = []
    for ms in groups.values():
        plan = plan_for(ms[0].spec, rate, [metric])
        args = engine_args(ms, plan, batch_size, size)
        t0 = time.perf_counter()
        lowered = engine.compiled_scorer(plan).lower(*args)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        out.append({"features": list(ms[0].spec.features), "layer_order": ms[0].spec.layer_order, "models": len(ms),
                    "lower_s": t1 - t0, "compile_s": t2 - t1})
    return out


def compile_child(payload: str) -> None:
    """(subprocess) Compile one program with the persistent cache in a given folder; print JSON."""
    cfg = json.loads(payload)
    t_start = time.perf_counter()
    import jax

    from cte_jax import engine
    from cte_jax.arch import UNetSpec
    from cte_jax.cache import enable_compilation_cache
    from cte_jax.modelio import Model
    from cte_jax.networks import init_variables

    enable_compilation_cache(cfg["cache"])
    spec = UNetSpec.from_dict(cfg["spec"])
    models = [Model(name=f"m{i}", normalization=C.NORM, spec=spec, variables=init_variables(spec, jax.random.key(i)))
              for i in range(cfg["models"])]
    plan = plan_for(spec, cfg["rate"], [cfg["metric"]])
    args = engine_args(models, plan, cfg["batch_size"], cfg["size"])
    t0 = time.perf_counter()
    lowered = engine.compiled_scorer(plan).lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    print(json.dumps({"lower_s": t1 - t0, "compile_s": t2 - t1, "process_s": t2 - t_start}))


def persistent_cache_check(model, n_models: int, *, rate: float, metric: str, batch_size: int, size: int) -> dict:
    """Compile in a fresh process twice with one cache folder: cold, then warm."""
    with tempfile.TemporaryDirectory() as cache:
        payload = json.dumps({"cache": cache, "spec": model.spec.to_dict(), "models": n_models, "rate": rate,
                              "metric": metric, "batch_size": batch_size, "size": size})
        runs = []
        for _ in range(2):
            env = dict(os.environ, JAX_COMPILATION_CACHE_DIR="")
            env.pop("JAX_COMPILATION_CACHE_DIR")
            r = subprocess.run([sys.executable, __file__, "--compile-child", payload], capture_output=True, text=True,
                               env=env, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(r.stderr[-2000:])
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return {"cold": runs[0], "warm": runs[1]}


# -- main ------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=0.1, help="bottleneck dropout rate")
    p.add_argument("--metrics", nargs="+", default=None, choices=["nhd", "vrand"],
                   help="default: nhd and vrand (quick: nhd)")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--no-cache-check", action="store_true", help="skip the persistent-cache subprocesses")
    p.add_argument("--no-diagnose", action="store_true", help="skip the forward / conv / norm comparison")
    p.add_argument("--omp-active", action="store_true",
                   help="leave OpenMP's default (spinning) wait policy for PyTorch instead of PASSIVE")
    p.add_argument("--compile-child", default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.compile_child is not None:
        compile_child(args.compile_child)
        return {}

    cfg = C.configure(args, QUICK, FULL, ("images", "size", "repeats"))
    metrics = args.metrics or (["nhd"] if args.quick else ["nhd", "vrand"])
    import torch

    threads = C.set_torch_threads()
    machine = C.machine_info()
    machine["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default (ACTIVE)")
    notes = [f"torch.set_num_threads({threads}): as many threads as XLA:CPU uses (the {threads} cores of this process); "
             f"OMP_WAIT_POLICY={machine['omp_wait_policy']}",
             "every contender reads the zarr target and percentile-normalises each image itself",
             "speed-up = contender's time / cte_jax's time (> 1: cte_jax is faster); medians of interleaved repeats "
             "after one warm-up call (the reference-style pipeline, eager and slowest: one timed call, no warm-up)"]
    if args.quick:
        notes.append(C.QUICK_NOTE + " (compile figures are cache loads after the first run); use the full run for figures")

    with tempfile.TemporaryDirectory() as tmp:
        imgs = C.synthetic_images(cfg["images"], cfg["size"], seed=1)
        target = C.write_zarr(imgs, Path(tmp) / "target.zarr")
        calib = np.stack([C.percentile_normalize(im) for im in imgs[:4]])
        bank = C.build_bank(cfg["archs"], cfg["per_arch"], calib, seed=0)
        models = [m["model"] for m in bank]
        bank_cl = [dict(m, torch=copy.deepcopy(m["torch"]).to(memory_format=torch.channels_last)) for m in bank]
        for m in bank_cl:
            m["shared"] = shared_plan(m)
        shared_parity = shared_decode_parity(bank_cl, calib[:2])
        parity = C.clean_parity(bank, calib[:2])
        n_pairs = len(bank) * cfg["images"]
        flops = sum(C.conv_flops(m.spec, cfg["size"], cfg["size"])["total"] for m in models) * cfg["images"]

        results, compile_rows, scores = {}, [], {}
        for metric in metrics:
            kw = dict(rate=args.rate, metric=metric)
            _, first = C.timed(lambda: cte_jax_rank(models, target, batch_size=cfg["batch_size"], **kw))
            compiles = time_engine_compile(models, batch_size=cfg["batch_size"], size=cfg["size"], **kw)
            fns = {"cte_jax": lambda: cte_jax_rank(models, target, batch_size=cfg["batch_size"], **kw),
                   "torch reference-style": lambda: torch_reference_style(bank, target, **kw),
                   **{f"torch best, batch {tb}": (lambda tb=tb: torch_best(bank_cl, target, batch_size=tb, **kw))
                      for tb in cfg["torch_batches"]},
                   **{f"torch shared, batch {tb}": (lambda tb=tb: torch_shared(bank_cl, target, batch_size=tb, **kw))
                      for tb in cfg["torch_batches"]}}
            scores[metric] = {}
            # The reference-style pipeline is eager (nothing to warm up) and an order of magnitude
            # slower than the others: it is timed once, in the first round.
            times = C.interleaved(fns, repeats={**{k: cfg["repeats"] for k in fns}, "torch reference-style": 1},
                                  warmup={**{k: 1 for k in fns}, "torch reference-style": 0}, last=scores[metric])
            steady = C.median(times["cte_jax"])
            results[metric] = {k: {"times_s": v, "median_s": C.median(v), "model_images_per_s": n_pairs / C.median(v),
                                   "speedup_of_cte_jax": C.median(v) / steady} for k, v in times.items()}
            # "torch best" is its fastest batch size in this run (cte_jax keeps rank()'s batch).
            fastest = min((k for k in times if k.startswith("torch best")), key=lambda k: C.median(times[k]))
            results[metric]["torch best"] = dict(results[metric][fastest], batch=fastest.rsplit(" ", 1)[-1])
            fastest = min((k for k in times if k.startswith("torch shared")), key=lambda k: C.median(times[k]))
            results[metric]["torch shared"] = dict(results[metric][fastest], batch=fastest.rsplit(" ", 1)[-1])
            results[metric]["cte_jax"]["first_call_s"] = first
            results[metric]["cte_jax"]["conv_gflops_per_s_clean_pass_equivalent"] = flops / steady / 1e9
            for c in compiles:
                compile_rows.append(dict(c, metric=metric, first_call_s=first, steady_s=steady))

        diag = None if args.no_diagnose else diagnose(
            bank, bank_cl, np.stack([C.percentile_normalize(im) for im in imgs[:cfg["batch_size"]]]),
            repeats=max(3, cfg["repeats"]))
        cache = None
        if not args.quick and not args.no_cache_check:
            cache = persistent_cache_check(models[0], cfg["per_arch"], rate=args.rate, metric=metrics[0],
                                           batch_size=cfg["batch_size"], size=cfg["size"])

    tables = []
    for metric, res in results.items():
        rows = [(f"**{k}** (fastest: batch {r['batch']})" if k in ("torch best", "torch shared") else k, C.spread(r["times_s"]),
                 r["model_images_per_s"], f"{r['speedup_of_cte_jax']:.2f}x") for k, r in res.items()]
        tables.append((f"bottleneck dropout {args.rate}, CTE-{metric.upper()}: {len(bank)} models x "
                       f"{cfg['images']} images {cfg['size']}x{cfg['size']} ({n_pairs} model-images)",
                       C.markdown_table(["pipeline", "time per ranking s, median (min-max)", "model-images/s",
                                         "cte_jax speed-up"], rows)))
    tables.append(("compile time (cte_jax), per architecture program",
                   C.markdown_table(["metric", "features", "order", "models", "lower s", "compile s",
                                     "first rank() s", "steady rank() s"],
                                    [(r["metric"], r["features"], r["layer_order"], r["models"], r["lower_s"],
                                      r["compile_s"], r["first_call_s"], r["steady_s"]) for r in compile_rows])))
    if cache:
        tables.append(("persistent compilation cache (fresh process, first architecture)",
                       C.markdown_table(["cache", "lower s", "compile s"],
                                        [(k, v["lower_s"], v["compile_s"]) for k, v in cache.items()])))
    if diag:
        kinds = list(dict.fromkeys(k for d in diag for k in d["median_s"]))
        drows = []
        for d in diag:
            ms = d["median_s"]
            for k in kinds:
                if k in ms:
                    base = {"forward": "forward torch channels-last", "conv": "conv torch channels-last",
                            "GroupNorm": "GroupNorm torch channels-last"}[k.split()[0]]
                    drows.append((f"{d['features']} {d['layer_order']}", k, 1e3 * ms[k], ms[k] / ms[base]))
        d0 = diag[0]
        tables.append((f"where the time goes: one model, one batch of {d0['batch']} images {d0['size']}x{d0['size']}; "
                       f"layers: the widest decoder layer ({', '.join(d['layer'] + ' ' + d['layer_order'] for d in diag)})",
                       C.markdown_table(["architecture", "operation", "median ms", "time / torch channels-last"], drows)))
    score_rows = []
    for metric, by in scores.items():
        for name in by["cte_jax"]:
            score_rows.append([metric, name] + [by[k].get(name) for k in by])
    heads = ["metric", "model"] + list(next(iter(scores.values())).keys())
    tables.append(("median scores (sanity check: dropout draws differ between frameworks, so scores agree "
                   "only statistically)", C.markdown_table(heads, score_rows)))
    notes.append(f"clean-pass parity PyTorch vs cte_jax: max |difference| of probabilities {parity:.2e}")
    notes.append("torch shared = torch best with cte_jax's two decoder shares written in PyTorch (skip-channel "
                 "convolutions of the clean decode reused, upsampled channels convolved at low resolution); its clean "
                 f"decode against torch's own: max |difference| of probabilities {shared_parity:.2e}")
    return C.finish("bench_rank", {"machine": machine, "config": {**cfg, "rate": args.rate, "metrics": metrics},
                                   "results": results, "compile": compile_rows, "persistent_cache": cache,
                                   "scores": scores, "parity_max_abs": parity, "shared_parity_max_abs": shared_parity,
                                   "diagnosis": diag, "notes": notes},
                    tables, args.json)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
