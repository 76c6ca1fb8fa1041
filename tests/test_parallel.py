"""Multi-device scoring, process shares, prefetch overlap and the compilation cache.

The 4-device runs need ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX starts,
so they run in a child process (this file run as a script) and are compared with the
single-device run of the same ranking in the test process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cte_jax import cache, engine, parallel
from cte_jax.arch import UNetSpec
from cte_jax.errors import CTEError
from cte_jax.modelio import Model
from helpers import random_models, write_disc_images  # noqa: E402
from cte_jax.perturbations import parse_perturbation
from cte_jax.preprocess import Normalization
from cte_jax.ranking import prefetch, rank

ROOT = Path(__file__).resolve().parents[1]
SPEC = UNetSpec(features=(4, 8, 16), layer_order="cr")
NORM = Normalization(kind="percentile", lo=5, hi=98).to_dict()
PERTS = ["dropout:0.2", "noise:0.05"]
METRICS = ["nhd", "ei"]


def _models(n: int) -> list[Model]:
    return random_models(n, SPEC, NORM)


def _per_unit(path: Path) -> dict[tuple, float | None]:
    """(model, perturbation, metric, unit) -> score (None: invalid) from a results file."""
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "format" in rec:
            continue
        m, p, k, b = rec["shape"]
        s = np.array(rec["scores"], dtype=object).reshape(m, p, k, b)
        for a, model in enumerate(rec["models"]):
            for c, pert in enumerate(rec["perturbations"]):
                for e, metric in enumerate(rec["metrics"]):
                    for u, unit in enumerate(rec["units"]):
                        out[(model, pert, metric, unit)] = s[a, c, e, u]
    return out


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# -- pure helpers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shard, n_dev, m, b, expect", [
    ("auto", 1, 5, 8, "none"),
    ("models", 1, 5, 8, "none"),
    ("auto", 4, 8, 6, "models"),   # no idle slot on models, 2 of 8 on images
    ("auto", 4, 5, 8, "images"),   # 3 of 8 idle on models, none on images
    ("auto", 4, 4, 4, "models"),   # tie: models
    ("images", 4, 8, 6, "images"),
    ("none", 4, 8, 8, "none"),
])
def test_choose_shard(shard, n_dev, m, b, expect):
    assert parallel.choose_shard(shard, n_devices=n_dev, n_models=m, batch_size=b) == expect


def test_split_note_says_how_each_group_was_split():
    assert parallel.split_note([("a", 5, "models")], 1) is None
    assert parallel.split_note([("a", 5, "models")], 4) == "4 devices: 5 models split by model"
    two = parallel.split_note([("a", 1, "images"), ("b", 3, "models")], 2)
    assert two == ("2 devices: 1 model each batch split by image (architecture of a); "
                   "3 models split by model (architecture of b)")


def test_choose_shard_rejects_unknown_mode():
    with pytest.raises(CTEError, match="shard mode"):
        parallel.choose_shard("rows", n_devices=2, n_models=2, batch_size=2)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 9), st.integers(1, 12), st.integers(1, 8))
def test_process_shares_cover_every_model_image_pair_once(n_models, n_images, n_proc):
    seen = np.zeros((n_models, n_images), int)
    for p in range(n_proc):
        ms, ims = parallel.process_share(n_models, n_images, n_proc, p)
        seen[np.ix_(ms, ims)] += 1
    assert (seen == 1).all()


def test_allgather_rows_is_identity_on_one_process():
    rows = {"a": np.arange(6).reshape(3, 2), "b": np.array([True, False, True])}
    assert parallel.allgather_rows(rows) is rows


def test_executor_on_one_device_equals_engine():
    models = _models(3)
    plan = engine.Plan(spec=SPEC, perturbations=(parse_perturbation("dropout:0.2"),), metrics=("nhd",))
    variables = engine.stack_variables([m.variables for m in models])
    ex = parallel.Executor(devices=1, shard="models")
    placed = ex.place(variables, batch_size=3)
    assert placed.mode == "none"
    x = np.random.default_rng(0).normal(size=(1, 3, 32, 32, 1)).astype(np.float32)
    args = (np.zeros(3, np.int32), np.zeros(3, np.int32))
    boxes = np.array([[0, 32, 0, 32]] * 3, np.int32)
    ids = np.arange(3, dtype=np.int32)
    got = ex.score(plan, placed, *args, x, boxes, ids, jax.random.key(0))
    want = engine.compiled_scorer(plan)(variables, *args, x, boxes, ids, jax.random.key(0))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, np.asarray(w))
    with pytest.raises(CTEError, match="device"):
        parallel.local_mesh(len(jax.local_devices()) + 1)


# -- four devices ----------------------------------------------------------------------------------
def _child_multidevice(target: str, out: str) -> None:
    """Run in a child with 4 host devices: rank with the bank split by model (5 models: one dummy
    copy pads it to 8) and with each batch split by image (batch 3 padded to 4)."""
    out = Path(out)
    info = {"devices": len(jax.local_devices())}
    models = _models(5)
    for shard in ("models", "images"):
        modes = []
        real_place = parallel.Executor.place

        def place(self, *a, **k):
            p = real_place(self, *a, **k)
            modes.append(p.mode)
            return p

        parallel.Executor.place = place
        err = io.StringIO()
        with contextlib.redirect_stderr(err):  # progress on: the split is reported before the bar
            recs = rank(models, target, perturbations=PERTS, metrics=METRICS, batch_size=3, progress=True,
                        shard=shard, results=out / f"{shard}.jsonl")
        parallel.Executor.place = real_place
        info[shard] = {"modes": modes, "records": recs, "stderr": err.getvalue()}
    (out / "info.json").write_text(json.dumps(info))


def test_four_devices_give_the_single_device_scores(tmp_path, monkeypatch):
    target = write_disc_images(tmp_path / "target", 4, seed=1)
    # One 32x32 image per sub-batch, on every side: sharded programs loop over sub-batches too.
    monkeypatch.setenv("CTE_JAX_CHUNK_PIXELS", "1024")
    proc = subprocess.run([sys.executable, __file__, "multidevice", str(target), str(tmp_path)], cwd=ROOT,
                          env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4", CTE_JAX_CACHE_DIR="off"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["devices"] == 4
    assert info["models"]["modes"] == ["models"] and info["images"]["modes"] == ["images"]
    assert info["models"]["stderr"].startswith("4 devices: 5 models split by model\n")
    assert info["images"]["stderr"].startswith("4 devices: 5 models each batch split by image\n")

    single = rank(_models(5), target, perturbations=PERTS, metrics=METRICS, batch_size=3, progress=False,
                  shard="none", results=tmp_path / "single.jsonl")
    ref = _per_unit(tmp_path / "single.jsonl")
    assert len(ref) == 5 * len(PERTS) * len(METRICS) * 4
    for shard in ("models", "images"):
        got = _per_unit(tmp_path / f"{shard}.jsonl")
        assert got.keys() == ref.keys()
        for k, v in ref.items():
            assert (got[k] is None) == (v is None), (shard, k)
            if v is not None:
                assert got[k] == pytest.approx(v, abs=1e-6), (shard, k)
        recs = info[shard]["records"]
        assert [(r["model"], r["perturbation"], r["metric"], r["rank"]) for r in recs] == \
            [(r["model"], r["perturbation"], r["metric"], r["rank"]) for r in single]
        assert [r["score"] for r in recs] == pytest.approx([r["score"] for r in single], abs=1e-6)


# -- reading overlaps compute ------------------------------------------------------------------------
def test_prefetch_reads_ahead_on_another_thread():
    events, lock = [], threading.Lock()
    main = threading.get_ident()

    def items():
        for i in range(4):
            with lock:
                events.append(("read", i, threading.get_ident() != main))
            yield i

    for i in prefetch(items(), size=2):
        time.sleep(0.1)  # "compute"
        with lock:
            events.append(("done", i, False))
    assert all(other for kind, _, other in events if kind == "read")
    # Item 1 was read while item 0 was still being computed.
    assert events.index(("read", 1, True)) < events.index(("done", 0, False))


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    it = prefetch(items(), size=2)
    next(it)
    it.close()
    time.sleep(0.5)
    n = len(produced)
    time.sleep(0.3)
    assert len(produced) == n < 10


def test_prefetch_reraises_producer_errors():
    def items():
        yield 1
        raise CTEError("cannot read slice 2")

    with pytest.raises(CTEError, match="slice 2"):
        list(prefetch(items()))


# -- compilation cache -------------------------------------------------------------------------------
def test_cache_dir_resolution(tmp_path):
    assert cache.cache_dir({"CTE_JAX_CACHE_DIR": str(tmp_path / "c")}) == tmp_path / "c"
    for off in ("off", "OFF", "0", ""):
        assert cache.cache_dir({"CTE_JAX_CACHE_DIR": off}) is None
    assert cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "cte_jax" / "xla"
    assert cache.cache_dir({}) == Path.home() / ".cache" / "cte_jax" / "xla"


def _child_cache() -> None:
    """Compile one small program with the cache on; print how many cache hits JAX reported."""
    hits = []
    jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name)
                                           if name == "/jax/compilation_cache/cache_hits" else None)
    folder = cache.enable_compilation_cache(min_compile_seconds=0)
    f = jax.jit(lambda x: jax.numpy.sin(x) @ x.T + 3.0)
    f(np.ones((7, 5), np.float32)).block_until_ready()
    print(json.dumps({"folder": str(folder), "hits": len(hits)}))


def test_compilation_cache_is_written_then_hit(tmp_path):
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, __file__, "cache"], cwd=ROOT, capture_output=True, text=True,
                              env=_env(CTE_JAX_CACHE_DIR=str(tmp_path / "xla")), timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["folder"] == str(tmp_path / "xla")
    assert any((tmp_path / "xla").iterdir())
    assert runs[0]["hits"] == 0 and runs[1]["hits"] >= 1


def test_cache_off_leaves_jax_alone(monkeypatch):
    monkeypatch.setenv("CTE_JAX_CACHE_DIR", "off")
    # The test session turns the cache on (conftest); take it off for this test only.
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert cache.enable_compilation_cache() is None
        assert not jax.config.jax_compilation_cache_dir
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


if __name__ == "__main__":
    if sys.argv[1] == "multidevice":
        _child_multidevice(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "cache":
        _child_cache()
