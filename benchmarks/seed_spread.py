"""How far the perturbation's random draws move the nuclei study's headline number.

    python benchmarks/seed_spread.py --work W --seeds 0 1 2 3 4

The headline of ``benchmarks/RESULTS.md`` (mean Spearman rho of CTE-NHD under ``dropout:0.1``
against foreground F1, over the leave-one-domain-out nuclei targets) comes from one seed. This
scores the same candidates on the same targets with other seeds (only the dropout masks change)
and prints the mean rho of each, next to their mean and spread. It reads what
``reproduce.py --work W`` left there: the prepared targets (``W/targets/nuclei/``) and, for the
candidates of each target and their true F1, ``W/evaluate/nuclei/summary.json``. Seed 0 must give
the study's own number: the script checks that it does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEY = "nhd@dropout:0.1"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="the work folder of a reproduce.py run")
    p.add_argument("--banks", type=Path, default=REPO / "benchmarks" / "banks")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--json", type=Path, help="also write every per-target rho here")
    args = p.parse_args(argv)

    from scipy import stats

    from cte_jax.modelio import load_bank
    from cte_jax.ranking import rank

    summary = json.loads((args.work / "evaluate" / "nuclei" / "summary.json").read_text())
    bank = {m.name: m for m in load_bank(args.banks / "nuclei")}
    study = summary["summary"][KEY]["paper"]["mean"]["spearman_rho"]
    rows, t0 = {}, time.perf_counter()
    for seed in args.seeds:
        per_target = {}
        for name, res in summary["targets"].items():
            perf = {m["model"]: m["performance"] for m in res["models"] if m["performance"] is not None}
            recs = rank([bank[n] for n in perf], args.work / "targets" / "nuclei" / name / "images",
                        perturbations=["dropout:0.1"], metrics=["nhd"], seed=seed, progress=False)
            scored = [r for r in recs if r["score"] is not None]
            rho = stats.spearmanr([r["score"] for r in scored], [perf[r["model"]] for r in scored]).statistic
            per_target[name] = float(rho)
        rows[seed] = per_target
        mean = float(np.mean(list(per_target.values())))
        print(f"seed {seed}: mean rho {mean:.3f}  ({', '.join(f'{v:.2f}' for v in per_target.values())})  "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        if seed == summary["options"].get("seed", 0) and abs(mean - study) > 1e-6:
            raise SystemExit(f"seed {seed} gives {mean:.6f}, the study's summary says {study:.6f}")
    means = np.array([np.mean(list(r.values())) for r in rows.values()])
    print(f"\n| seeds | mean rho per seed | mean | sample std | min | max |\n|---|---|---|---|---|---|\n"
          f"| {' '.join(map(str, args.seeds))} | {' / '.join(f'{m:.3f}' for m in means)} | {means.mean():.3f} | "
          f"{means.std(ddof=1) if len(means) > 1 else 0:.3f} | {means.min():.3f} | {means.max():.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"study": study, "per_seed": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
