"""Multi-host ranking: two local CPU processes joined by jax.distributed (coordinator on 127.0.0.1)
give the single-process result, written by process 0; the CLI's compilation cache is filled."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from cte_jax.arch import UNetSpec
from cte_jax.cli import main
from cte_jax.modelio import save_model
from helpers import random_models, write_disc_images  # noqa: E402
from cte_jax.parallel import detect_cluster
from cte_jax.preprocess import Normalization

ROOT = Path(__file__).resolve().parents[1]
SPEC = UNetSpec(features=(4, 8, 16), layer_order="cr")
NORM = Normalization(kind="percentile", lo=5, hi=98).to_dict()
TIMEOUT = 420  # seconds for the whole two-process run; both are killed when it passes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    for m in random_models(3, SPEC, NORM):
        save_model(m, root / "bank" / m.name)
    write_disc_images(root / "target", 5, seed=2)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ARGS = ["--perturbation", "dropout:0.2", "noise:0.05", "--metric", "nhd", "--batch-size", "2", "--quiet"]


def _run_two_processes(setup: Path, out: Path) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu", CTE_JAX_CACHE_DIR=str(out / "xla"))
    env.pop("XLA_FLAGS", None)
    for k in [k for k in env if k.startswith(("SLURM_", "OMPI_"))]:
        env.pop(k)
    procs = []
    try:
        for i in range(2):
            cmd = [sys.executable, "-m", "cte_jax.cli", "rank", "--bank", str(setup / "bank"), "--target",
                   str(setup / "target"), "--json", str(out / "ranking.json"), *ARGS, "--distributed",
                   "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                   "--timeout", "120"]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        done = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
        return done
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_processes_give_the_single_process_result(setup, tmp_path, monkeypatch, capsys):
    dist = tmp_path / "dist"
    dist.mkdir()
    runs = _run_two_processes(setup, dist)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    # Only process 0 prints the ranking (Gloo, JAX's CPU collectives, announces its peers on both).
    assert "CTE-NHD" in runs[0].stdout and "CTE-NHD" not in runs[1].stdout

    monkeypatch.setenv("CTE_JAX_CACHE_DIR", "off")
    single = tmp_path / "single"
    single.mkdir()
    assert main(["rank", "--bank", str(setup / "bank"), "--target", str(setup / "target"),
                 "--json", str(single / "ranking.json"), *ARGS]) == 0
    want = json.loads((single / "ranking.json").read_text())
    got = json.loads((dist / "ranking.json").read_text())
    assert got["settings"] == want["settings"]
    want, got = want["records"], got["records"]
    assert [{k: v for k, v in r.items() if k != "score"} for r in got] == \
        [{k: v for k, v in r.items() if k != "score"} for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-6)
    assert all(r["n_scored"] + r["n_skipped"] == 5 for r in got)

    # Process 0 merged every per-image score into its file; process 1's file is gone.
    units = set()
    for line in (dist / "ranking.scores.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "format" not in rec:
            units |= {(m, p, u) for m in rec["models"] for p in rec["perturbations"] for u in rec["units"]}
    assert len(units) == 3 * 2 * 5
    assert not (dist / "ranking.scores.p1.jsonl").exists()
    # The CLI turned the persistent compilation cache on.
    assert any((dist / "xla").iterdir())


def test_distributed_flags_need_distributed(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CTE_JAX_CACHE_DIR", "off")
    code = main(["rank", "--bank", str(setup / "bank"), "--target", str(setup / "target"), "--quiet",
                 "--coordinator", "127.0.0.1:1234"])
    assert code == 2 and "--distributed" in capsys.readouterr().err


def test_cluster_detection():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "gpu[01-02]",
             "SLURM_LOCALID": "3"}
    assert detect_cluster(slurm) == {"kind": "slurm", "num_processes": 8, "process_id": 3}
    ompi = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}
    assert detect_cluster(ompi)["process_id"] == 1 and detect_cluster(ompi)["coordinator_known"] is False
    assert detect_cluster({}) is None
