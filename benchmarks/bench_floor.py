"""Ranking cost against its floor, in units of one clean inference pass of the same bank, and the
achieved convolution throughput against the machine's measured peak.

    python benchmarks/bench_floor.py            # full: 4 models (16-32-64-128, gcr) x 16 images 128x128
    python benchmarks/bench_floor.py --quick    # seconds: 2 tiny models x 4 images 64x64

Everything runs in cte_jax on the same in-memory batches and stacked weights, one program per
contender, models looped with ``lax.map`` as the engine does on CPU:

- clean pass: ``UNet.apply`` of every model on every batch (the unit);
- encoder only, decoder only (on b images, and on 2b = the clean and dropped bottlenecks in
  one call, as the engine does): the floor of bottleneck-dropout ranking is
  ``encoder + 2 decoders`` (and ``encoder + decoder(2b)`` fused);
- the engine's scoring program (``engine.compiled_scorer``) with CTE-NHD and with CTE-VRand:
  encoder, clean and dropped decoders, metrics, per-image scores to the host;
- ``rank()`` end to end (reads and normalises a zarr target, bookkeeping, ranking).

Convolution FLOPs are counted analytically from the spec (2 per multiply-add; 3x3 convs,
transposed convs and 1x1 convs); the peak is the best of a few large ``lax.conv`` calls timed
alone. The goal: ranking within 15 % of its floor.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from cte_jax import backend  # noqa: E402

FULL = dict(spec=dict(features=(16, 32, 64, 128), layer_order="gcr", num_groups=8), models=4, images=16, size=128,
            batch_size=8, repeats=3, peak_shapes=[(8, 128, 128, 64, 64), (8, 64, 64, 128, 128), (8, 128, 128, 32, 32)])
QUICK = dict(spec=dict(features=(4, 8, 16), layer_order="gcr", num_groups=2), models=2, images=4, size=64,
             batch_size=4, repeats=2, peak_shapes=[(4, 64, 64, 32, 32)])


def conv_peak(shapes, repeats: int) -> list[dict]:
    """GFLOP/s of single 3x3 'SAME' convolutions (n h w cin cout), NHWC, float32, jitted."""
    import jax

    out = []
    for n, h, w, ci, co in shapes:
        x = jax.device_put(np.random.default_rng(0).standard_normal((n, h, w, ci), np.float32))
        k = jax.device_put(np.random.default_rng(1).standard_normal((3, 3, ci, co), np.float32))
        f = backend.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                              dimension_numbers=("NHWC", "HWIO", "NHWC")))
        t = C.interleaved({"conv": lambda: f(x, k)}, repeats=repeats, warmup=1)["conv"]
        flops = 2.0 * 9 * n * h * w * ci * co
        out.append({"shape": [n, h, w, ci, co], "gflop": flops / 1e9, "median_s": C.median(t),
                    "gflops_per_s": flops / min(t) / 1e9})
    return out


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=0.1)
    args = p.parse_args(argv)
    cfg = C.configure(args, QUICK, FULL)

    import jax
    import jax.numpy as jnp

    from cte_jax import engine
    from cte_jax.arch import UNetSpec
    from cte_jax.networks import UNet
    from cte_jax.perturbations import parse_perturbation
    from cte_jax.ranking import rank

    machine = C.machine_info()
    notes = ["units: median time / median time of one clean pass (UNet.apply) of the same bank on the same batches",
             "floor = encoder once + one decoder for each of the clean and perturbed passes",
             "GFLOP/s of the floor-equivalent work: conv FLOPs of encoder + 2 decoders per model-image, "
             "divided by the contender's time"]
    if args.quick:
        notes.append(C.QUICK_NOTE)

    spec = UNetSpec(**cfg["spec"])
    size, b = cfg["size"], cfg["batch_size"]
    imgs = C.synthetic_images(cfg["images"], size, seed=4)
    xn = np.stack([C.percentile_normalize(im) for im in imgs])[..., None]
    models = C.jax_bank([spec], cfg["models"], xn[:4, ..., 0], seed=5)
    m = len(models)
    variables = jax.device_put(engine.stack_variables([x.variables for x in models]))
    batches = [jax.device_put(xn[s:s + b]) for s in range(0, len(xn), b)]
    net = UNet(spec)

    # The engine loops over image sub-batches of c images (engine.default_chunk_pixels); the floor's
    # passes do the same, so that both sides see the same working sets.
    chunk_pixels = engine.default_chunk_pixels()
    c = engine.chunk_size(b, size, size, chunk_pixels)
    notes.append(f"every program (floor passes and engine alike) loops over sub-batches of {c} of the {b} images "
                 f"(engine.default_chunk_pixels() = {chunk_pixels})")

    def chunked(fn, tree, per=1):
        n = jax.tree.leaves(tree)[0].shape[0] // (c * per)
        if n <= 1:
            return fn(tree)
        out = jax.lax.map(fn, jax.tree.map(lambda a: a.reshape((n, -1) + a.shape[1:]), tree))
        return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), out)

    clean = backend.jit(lambda v, x: jax.lax.map(lambda vv: chunked(lambda xx: net.apply(vv, xx), x), v))
    encode = backend.jit(lambda v, x: jax.lax.map(
        lambda vv: chunked(lambda xx: net.apply(vv, xx, method=UNet.encode), x), v))
    decode = backend.jit(lambda v, f: jax.lax.map(
        lambda a: chunked(lambda ff: net.apply(a[0], ff, method=UNet.decode), a[1]), (v, f)))
    decode2 = backend.jit(lambda v, f: jax.lax.map(
        lambda a: chunked(lambda ff: net.apply(a[0], ff, method=UNet.decode), a[1], per=2), (v, f)))
    feats = [C.block(encode(variables, x)) for x in batches]
    feats2 = [jax.tree.map(lambda f: jnp.concatenate([f, f], axis=1), fs) for fs in feats]

    pert = parse_perturbation(f"dropout:{args.rate}")
    scorers = {}
    for metric in ("nhd", "vrand"):
        plan = engine.Plan(spec=spec, perturbations=(pert,), metrics=(metric,), strategy=engine.default_strategy(),
                           chunk_pixels=chunk_pixels)
        scorers[metric] = engine.compiled_scorer(plan)
    key = jax.random.key(0)
    zeros = np.zeros(m, np.int32)
    boxes = [np.tile(np.array([[0, size, 0, size]], np.int32), (x.shape[0], 1)) for x in batches]
    units = [np.arange(s, s + x.shape[0], dtype=np.int32) for s, x in zip(range(0, len(xn), b), batches)]

    def score(metric):
        return [np.asarray(scorers[metric](variables, zeros, zeros, x[None], bx, u, key)[0])
                for x, bx, u in zip(batches, boxes, units)]

    with tempfile.TemporaryDirectory() as tmp:
        target = C.write_zarr(imgs, Path(tmp) / "target.zarr")
        fns = {
            "clean pass (UNet.apply)": lambda: [clean(variables, x) for x in batches],
            "encoder only (b)": lambda: [encode(variables, x) for x in batches],
            "decoder only (b)": lambda: [decode(variables, f) for f in feats],
            "decoder only (2b)": lambda: [decode2(variables, f) for f in feats2],
            "engine, CTE-NHD": lambda: score("nhd"),
            "engine, CTE-VRand": lambda: score("vrand"),
            "rank(), CTE-NHD, end to end": lambda: rank(models, target, perturbations=[pert], metrics=["nhd"],
                                                        progress=False, batch_size=b),
        }
        times = C.interleaved(fns, repeats=cfg["repeats"], warmup=1)
    med = {k: C.median(v) for k, v in times.items()}
    unit = med["clean pass (UNet.apply)"]
    t_enc, t_dec, t_dec2 = med["encoder only (b)"], med["decoder only (b)"], med["decoder only (2b)"]
    floor = (t_enc + 2 * t_dec) / unit
    floor_fused = (t_enc + t_dec2) / unit
    fl = C.conv_flops(spec, size, size)
    n_pairs = m * cfg["images"]
    work = {"clean pass (UNet.apply)": fl["total"], "encoder only (b)": fl["encoder"], "decoder only (b)": fl["decoder"],
            "decoder only (2b)": 2 * fl["decoder"]}
    floor_work = fl["encoder"] + 2 * fl["decoder"]
    peaks = conv_peak(cfg["peak_shapes"], cfg["repeats"])
    peak = max(x["gflops_per_s"] for x in peaks)
    rows = []
    for k in fns:
        flops = n_pairs * work.get(k, floor_work)
        gf = flops / med[k] / 1e9
        rows.append((k, C.spread(times[k]), med[k] / unit, gf, f"{100 * gf / peak:.1f}%"))
    gaps = {k: med[k] / unit / floor - 1 for k in ("engine, CTE-NHD", "engine, CTE-VRand", "rank(), CTE-NHD, end to end")}
    tables = [(f"{m} models {list(spec.features)} {spec.layer_order} x {cfg['images']} images {size}x{size}, batch {b}, "
               f"dropout {args.rate}",
               C.markdown_table(["contender", "time s, median (min-max)", "clean-pass units", "conv GFLOP/s",
                                 "of peak"], rows)),
              ("floor and gap", C.markdown_table(
                  ["quantity", "clean-pass units", "gap to floor (goal <= 15%)"],
                  [("floor: encoder + 2 x decoder(b)", floor, ""), ("floor fused: encoder + decoder(2b)", floor_fused, "")]
                  + [(k, med[k] / unit, f"{100 * g:+.1f}%") for k, g in gaps.items()])),
              ("measured peak: one large 3x3 convolution (lax.conv, NHWC, float32)", C.markdown_table(
                  ["n h w cin cout", "GFLOP per call", "median s", "GFLOP/s (best)"],
                  [(" ".join(map(str, x["shape"])), x["gflop"], x["median_s"], x["gflops_per_s"]) for x in peaks]))]
    return C.finish("bench_floor", {
        "machine": machine, "config": {k: v for k, v in cfg.items()}, "times_s": times, "median_s": med,
        "clean_pass_units": {k: v / unit for k, v in med.items()}, "floor_units": floor, "floor_fused_units": floor_fused,
        "gap_to_floor": gaps, "conv_flops_per_image": fl, "peak_conv": peaks, "peak_gflops_per_s": peak,
        "achieved_fraction_of_peak": {r[0]: r[3] / peak for r in rows}, "notes": notes}, tables, args.json)


if __name__ == "__main__":
    main()
