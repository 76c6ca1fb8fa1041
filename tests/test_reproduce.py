"""benchmarks/reproduce.py: target preparation, recipes, and a --quick smoke run of the study.

The smoke run needs the shared data pack (../shared/data or $CTE_SHARED) and the committed nuclei
bank; it skips cleanly without them. No timing assertions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CTE_SHARED", REPO.parent / "shared"))
BANK = REPO / "benchmarks" / "banks" / "nuclei"
QUICK_MODELS = ("fluo256", "fluo360", "fluo_u2os520")


def _module():
    spec = importlib.util.spec_from_file_location("cte_reproduce", REPO / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cte_reproduce"] = mod
    spec.loader.exec_module(mod)
    return mod


def _fake_domain(root: Path, shapes: dict[str, tuple[int, int]]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for name, (h, w) in shapes.items():
        img = rng.integers(0, 256, (h, w), dtype=np.uint8)
        lab = np.zeros((h, w), np.uint16)
        lab[10:40, 10:40] = 1  # foreground only in the top-left tile
        lab[h - 30:h - 5, 5:30] = 300  # and in a bottom-left tile (an id above 255)
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        Image.fromarray(lab).save(root / "labels" / f"{name}.png")
    (root / "split.json").write_text(json.dumps({"train": [], "test": sorted(shapes)}))
    return root


def test_prepare_target_tiles_are_crops_of_the_source(tmp_path):
    from PIL import Image

    mod = _module()
    dom = _fake_domain(tmp_path / "dom", {"big": (600, 520), "small": (200, 240)})
    info = mod.prepare_target(dom, tmp_path / "t", max_units=10, whole_max=256)
    src_img = np.asarray(Image.open(dom / "images" / "big.png"))
    src_lab = np.asarray(Image.open(dom / "labels" / "big.png"))
    # Tiles of the 600x520 image on a 256 grid: (0,0), (0,256), (256,0), (256,256); only those
    # with labelled foreground are kept. The bottom band (rows 570-595) lies below the 512-row
    # grid, so only (0,0) survives; the 200x240 image is used whole.
    assert sorted(info["units"]) == ["big__0_0", "small"]
    tile = np.asarray(Image.open(tmp_path / "t" / "images" / "big__0_0.png"))
    np.testing.assert_array_equal(tile, src_img[:256, :256])
    lab = np.asarray(Image.open(tmp_path / "t" / "labels" / "big__0_0.png"))
    np.testing.assert_array_equal(lab, src_lab[:256, :256])
    small = np.asarray(Image.open(tmp_path / "t" / "labels" / "small.png"))
    assert small.max() == 300  # 16-bit ids survive the round trip
    # The cap: round-robin over images, first unit of every image before second ones.
    info1 = mod.prepare_target(dom, tmp_path / "t1", max_units=1, whole_max=256)
    assert info1["n_units"] == 1


def test_prepare_target_split_all_takes_every_image_of_the_domain(tmp_path):
    mod = _module()
    dom = _fake_domain(tmp_path / "dom", {"a": (200, 200), "b": (220, 200), "c": (240, 200)})
    (dom / "split.json").write_text(json.dumps({"train": ["a", "c"], "test": ["b"]}))
    test = mod.prepare_target(dom, tmp_path / "t", max_units=10, whole_max=256)
    assert test["units"] == ["b"]
    every = mod.prepare_target(dom, tmp_path / "t", max_units=10, whole_max=256, split="all")
    assert sorted(every["units"]) == ["a", "b", "c"]
    assert sorted(p.name for p in (tmp_path / "t" / "images").iterdir()) == ["a.png", "b.png", "c.png"]
    # The cached folder is rewritten when the request changes back.
    again = mod.prepare_target(dom, tmp_path / "t", max_units=10, whole_max=256)
    assert again["units"] == ["b"]
    assert [p.name for p in (tmp_path / "t" / "images").iterdir()] == ["b.png"]


def test_write_recipes_lists_every_model_with_its_command(tmp_path):
    mod = _module()
    for name, dom in (("a", "dom_a"), ("b", "dom_b")):
        d = tmp_path / "bank" / name
        (d / "checkpoint").mkdir(parents=True)
        (d / "checkpoint" / "w").write_bytes(b"x" * 2048)
        cmd = f"cte-jax train --data ../shared/data/{dom} --out {d}"
        (d / "model.json").write_text(json.dumps({
            "name": name, "task": "foreground", "architecture": {"features": [8, 16], "layer_order": "cr"},
            "provenance": {"command": cmd, "data": [{"domain": dom, "n_train": 5}], "train_seconds": 3.0,
                           "final_val": {"val_f1": 0.5}, "config": {"steps": 7, "patch_size": 64,
                                                                    "augment": False}}}))
    (written,) = mod.write_recipes(tmp_path)
    text = written.read_text()
    for name, dom in (("a", "dom_a"), ("b", "dom_b")):
        assert f"## {name}" in text and f"--data ../shared/data/{dom}" in text
        assert f"| {name} | {dom} | 8,16 | cr, nearest | 7 | 64 | no | 0.50 |" in text
    # model.json without an upsampling field: the network default, nearest.
    assert text.count("upsampling `nearest`") == 2


def test_quick_run_writes_consistent_tables(tmp_path):
    if not (SHARED / "data" / "nuclei").is_dir():
        pytest.skip("no shared data pack")
    present = [m for m in QUICK_MODELS if (BANK / m / "model.json").is_file()]
    if len(present) < 2:
        pytest.skip("nuclei bank not built (bash benchmarks/make_banks.sh)")
    scipy_stats = pytest.importorskip("scipy.stats")
    mod = _module()
    out = tmp_path / "out"
    assert mod.main(["--quick", "--shared", str(SHARED), "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    text = (out / "RESULTS.md").read_text()
    assert "Table 1" in text and "Table 2" in text and "Failure mode" in text
    runs = json.loads((tmp_path / "work" / "runs.json").read_text())["runs"]
    run = runs["nuclei"]
    key = "nhd@dropout:0.1"
    for perf in ("f1", "map"):
        per_target = run["summaries"][perf][key]["paper"]["per_target"]
        for target, row in per_target.items():
            models = run["result"]["targets"][target]["models"]
            # Leave-one-domain-out: no candidate was trained on the target's domain.
            for m in models:
                assert m["model"] in present
            s = [m["scores"][key] for m in models]
            q = [run["performance"][perf][target][m["model"]] for m in models]
            if len(set(s)) > 1 and len(set(q)) > 1:
                rho = scipy_stats.spearmanr(s, q).statistic
                assert row["spearman_rho"] == pytest.approx(rho, abs=1e-9)
                tau = scipy_stats.kendalltau(s, q).statistic
                assert row["kendall_tau"] == pytest.approx(tau, abs=1e-9)
            if perf == "f1":
                # The F1 of evaluate() and the table agree.
                assert q == [m["performance"] for m in models]


def _fake_run(scores: dict[str, dict[str, float]], perf: dict[str, dict[str, float]]) -> dict:
    """A run dict as run_task writes it, with one estimator "nhd@dropout:0.1"."""
    targets = {}
    for t, sc in scores.items():
        targets[t] = {"models": [{"model": m, "scores": {"nhd@dropout:0.1": s}, "low_foreground": False,
                                  "high_foreground": False, "foreground_fraction": 0.1} for m, s in sc.items()],
                      "estimators": {"nhd@dropout:0.1": {"corrected": None}}, "median_foreground_fraction": 0.1}
    return {"result": {"targets": targets}, "performance": {"f1": perf}}


def test_rank_shifts_are_estimator_rank_minus_performance_rank():
    mod = _module()
    # t1: the estimator reverses the true order of a, b, c; t2: it is right, and d has no score.
    run = _fake_run({"t1": {"a": 0.7, "b": 0.8, "c": 0.9}, "t2": {"a": 0.9, "b": 0.5, "d": None}},
                    {"t1": {"a": 0.9, "b": 0.8, "c": 0.7}, "t2": {"a": 0.6, "b": 0.4, "d": 0.9}})
    shifts = mod.rank_shifts(run, "nhd@dropout:0.1", "f1")
    assert shifts == {"a": [2.0, 0.0], "b": [0.0, 0.0], "c": [-2.0]}
    # Ties share the mean rank on both sides.
    run = _fake_run({"t": {"a": 0.5, "b": 0.5, "c": 0.1}}, {"t": {"a": 0.9, "b": 0.1, "c": 0.5}})
    assert mod.rank_shifts(run, "nhd@dropout:0.1", "f1") == {"a": [0.5], "b": [-1.5], "c": [1.0]}


def test_one_architecture_statistics_match_scipy_on_the_subset():
    scipy_stats = pytest.importorskip("scipy.stats")
    mod = _module()
    rng = np.random.default_rng(3)
    names = ["a", "b", "c", "d", "e"]
    scores = {t: dict(zip(names, rng.random(5).tolist())) for t in ("t1", "t2", "t3")}
    perf = {t: dict(zip(names, rng.random(5).tolist())) for t in ("t1", "t2", "t3")}
    run = _fake_run(scores, perf)
    keep = ["a", "c", "d", "e"]
    summ = mod.summarise(mod.restricted(run, keep), perf, n_permutations=9)
    want = np.mean([scipy_stats.spearmanr([scores[t][m] for m in keep], [perf[t][m] for m in keep]).statistic
                    for t in scores])
    assert summ["nhd@dropout:0.1"]["paper"]["mean"]["spearman_rho"] == pytest.approx(want, abs=1e-12)
    full = np.mean([scipy_stats.spearmanr([scores[t][m] for m in names], [perf[t][m] for m in names]).statistic
                    for t in scores])
    assert want != pytest.approx(full)  # leaving b out changes the statistic, so the filter acts


def test_architecture_groups_largest_first():
    mod = _module()
    facts = [{"name": n, "features": f, "layer_order": "cr", "upsampling": u, "task": "foreground"}
             for n, f, u in [("x", "8,16", "nearest"), ("a", "16,32", "nearest"), ("b", "16,32", "nearest"),
                             ("d", "16,32", "deconv"), ("y", "16,32,64", "nearest")]]
    groups = mod.architecture_groups(facts)
    assert groups[0] == ("16,32 cr nearest foreground", ["a", "b"])
    # Same channels, other upsampling: an architecture of its own.
    assert ("16,32 cr deconv foreground", ["d"]) in groups
    assert sorted(n for _, names in groups for n in names) == ["a", "b", "d", "x", "y"]


def test_pair_agreement_counts_pairs_by_performance_gap():
    mod = _module()
    # Pairs and gaps: (a,b) 0.01 right, (a,c) 0.31 right, (b,c) 0.30 wrong; t2: (a,b) 0.06, a score tie.
    run = _fake_run({"t1": {"a": 0.9, "b": 0.5, "c": 0.7}, "t2": {"a": 0.4, "b": 0.4}},
                    {"t1": {"a": 0.81, "b": 0.80, "c": 0.50}, "t2": {"a": 0.7, "b": 0.64}})
    got = mod.pair_agreement(run, "nhd@dropout:0.1", "f1")
    assert got == [(1, 1), (0, 0), (0, 1), (1, 2)]
    only_ac = {**run, "result": {"targets": mod.restricted(run, ["a", "c"])}}
    assert mod.pair_agreement(only_ac, "nhd@dropout:0.1", "f1") == [(0, 0), (0, 0), (0, 0), (1, 1)]


def test_sweep_table_gives_each_targets_spearman_and_their_mean():
    from scipy import stats

    mod = _module()
    rng = np.random.default_rng(2)
    models = [f"m{i}" for i in range(6)]
    perf = {t: {m: float(rng.random()) for m in models} for t in ("a", "b", "c")}
    results = {}
    for t in perf:
        rows = [{"model": m, "scores": {k: float(rng.random()) for k in ("nhd@dropout:0.05", "nhd@dropout:0.5")},
                 "low_foreground": False, "high_foreground": False} for m in models]
        results[t] = {"models": rows, "estimators": {k: {"corrected": None} for k in rows[0]["scores"]}}
    sweep = {"task": "nuclei", "target": "all", "n_units": {"a": 3, "b": 4, "c": 5}, "seconds": 1.0,
             "summary": mod.summarise(results, perf, n_permutations=10)}
    lines = mod.sweep_lines(sweep)
    assert "3 leave-one-domain-out nuclei targets (12 units)" in lines[2]
    for rate, key in (("0.05", "nhd@dropout:0.05"), ("0.5", "nhd@dropout:0.5")):
        cells = next(line for line in lines if line.startswith(f"| {rate} |")).strip("|").split("|")
        rhos = [stats.spearmanr([r["scores"][key] for r in results[t]["models"]], [perf[t][m] for m in models]).statistic
                for t in ("a", "b", "c")]
        assert [c.strip() for c in cells[2:]] == [f"{r:.2f}" for r in rhos]
        assert cells[1].split("/")[1].strip().startswith(f"{np.mean(rhos):.2f}±")
