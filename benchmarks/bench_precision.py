"""float32 against bfloat16 compute in rank(): speed, and agreement of the rankings (Kendall tau).

    python benchmarks/bench_precision.py            # full: 8 models (2 architectures) x 16 images 128x128
    python benchmarks/bench_precision.py --quick    # seconds: 4 tiny models x 4 images 64x64

Both runs rank the same bank on the same zarr target with the same seed, so the dropout masks
are identical and only the arithmetic differs (``rank(..., precision="bfloat16")`` casts the
weights and activations to bfloat16; probabilities and metrics stay float32). Agreement is
Kendall's tau-b (``cte_jax.stats.kendall_tau``) between the two score vectors over the bank,
per metric; tau = 1 means the same order.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

FULL = dict(specs=[dict(features=(16, 32, 64, 128), layer_order="gcr", num_groups=8),
                   dict(features=(16, 32, 64), layer_order="bcr")],
            per_spec=4, images=16, size=128, batch_size=8, repeats=3)
QUICK = dict(specs=[dict(features=(4, 8, 16), layer_order="gcr", num_groups=2)],
             per_spec=4, images=4, size=64, batch_size=4, repeats=1)


def run(models, target, precision, metrics, rate, batch_size) -> dict[tuple[str, str], float]:
    from cte_jax.ranking import rank

    recs = rank(models, target, perturbations=[f"dropout:{rate}"], metrics=list(metrics), progress=False,
                batch_size=batch_size, precision=precision)
    return {(r["metric"], r["model"]): r["score"] for r in recs}


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--metrics", nargs="+", default=["nhd", "vrand"], choices=["nhd", "ei", "vrand"])
    p.add_argument("--rate", type=float, default=0.1)
    args = p.parse_args(argv)
    cfg = C.configure(args, QUICK, FULL)

    from cte_jax.arch import UNetSpec
    from cte_jax.stats import kendall_tau, spearman_rho

    machine = C.machine_info()
    notes = ["speed ratio = median float32 time / median bfloat16 time (> 1: bfloat16 is faster); "
             "steady state, first calls (with compilation) reported apart"]
    if args.quick:
        notes.append(C.QUICK_NOTE)
    with tempfile.TemporaryDirectory() as tmp:
        imgs = C.synthetic_images(cfg["images"], cfg["size"], seed=6)
        target = C.write_zarr(imgs, Path(tmp) / "target.zarr")
        calib = np.stack([C.percentile_normalize(im) for im in imgs[:4]])
        models = C.jax_bank([UNetSpec(**s) for s in cfg["specs"]], cfg["per_spec"], calib, seed=7)
        fns = {prec: (lambda prec=prec: run(models, target, prec, args.metrics, args.rate, cfg["batch_size"]))
               for prec in ("float32", "bfloat16")}
        first = {k: C.timed(fn)[1] for k, fn in fns.items()}
        last: dict = {}
        times = C.interleaved(fns, repeats=cfg["repeats"], warmup=0, last=last)

    med = {k: C.median(v) for k, v in times.items()}
    n_pairs = len(models) * cfg["images"]
    speed_ratio = med["float32"] / med["bfloat16"]
    agreement = {}
    for metric in args.metrics:
        names = [m.name for m in models]
        a = np.array([last["float32"][(metric, n)] for n in names], float)
        b = np.array([last["bfloat16"][(metric, n)] for n in names], float)
        agreement[metric] = {"kendall_tau": float(kendall_tau(a, b)), "spearman_rho": float(spearman_rho(a, b)),
                             "max_abs_score_difference": float(np.nanmax(np.abs(a - b))),
                             "same_order": bool(np.array_equal(np.argsort(-a, kind="stable"), np.argsort(-b, kind="stable"))),
                             "same_top1": bool(np.nanargmax(a) == np.nanargmax(b)),
                             "float32": a.tolist(), "bfloat16": b.tolist()}
    tables = [(f"{len(models)} models x {cfg['images']} images {cfg['size']}x{cfg['size']}, dropout {args.rate}, "
               f"metrics {', '.join(args.metrics)}",
               C.markdown_table(["precision", "steady time s, median (min-max)", "first call s (incl. compile)",
                                 "model-images/s", "float32 / this"],
                                [(k, C.spread(times[k]), first[k], n_pairs / med[k], med["float32"] / med[k])
                                 for k in fns])),
              ("rank agreement float32 vs bfloat16", C.markdown_table(
                  ["metric", "Kendall tau", "Spearman rho", "max |score difference|", "same order", "same top-1"],
                  [(k, v["kendall_tau"], v["spearman_rho"], v["max_abs_score_difference"], v["same_order"],
                    v["same_top1"]) for k, v in agreement.items()]))]
    return C.finish("bench_precision", {"machine": machine, "config": {**cfg, "metrics": args.metrics, "rate": args.rate},
                                        "times_s": times, "first_call_s": first, "median_s": med,
                                        "speed_ratio_float32_over_bfloat16": speed_ratio, "agreement": agreement,
                                        "notes": notes}, tables, args.json)


if __name__ == "__main__":
    main()
