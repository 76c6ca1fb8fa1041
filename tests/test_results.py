"""The per-unit score table and results file: exact round trips, resuming interrupted and extended
runs without recomputing finished work, and memory that does not grow with the target."""

from __future__ import annotations

import json
import tracemalloc
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest

from cte_jax import parallel, ranking
from cte_jax.arch import UNetSpec
from cte_jax.errors import CTEError
from cte_jax.modelio import Model
from helpers import random_models, write_disc_images  # noqa: E402
from cte_jax.preprocess import Normalization
from cte_jax.ranking import iter_batches, prefetch, rank
from cte_jax.results import ResultsStore, ScoreTable, default_results_path, model_fingerprint, shard_path

SPEC = UNetSpec(features=(4, 8, 16), layer_order="cr")
NORM = Normalization(kind="percentile", lo=5, hi=98).to_dict()


def _models(n: int) -> list[Model]:
    return random_models(n, SPEC, NORM)


@pytest.fixture(scope="module")
def models():
    return _models(3)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return write_disc_images(tmp_path_factory.mktemp("target"), 6, seed=0)


# -- the table ----------------------------------------------------------------------------------
def _random_blocks(rng, n_blocks=6, m=3, p=2, k=2, b=4):
    """Blocks of random scores with random validity over overlapping unit sets."""
    blocks = []
    for _ in range(n_blocks):
        models = sorted(rng.choice(m, size=rng.integers(1, m + 1), replace=False).tolist())
        perts = sorted(rng.choice(p, size=rng.integers(1, p + 1), replace=False).tolist())
        units = sorted(rng.choice(10, size=b, replace=False).tolist())
        s = rng.random((len(models), len(perts), k, b)).astype(np.float32)
        v = rng.random((len(models), len(perts), k, b)) > 0.2
        fg = rng.random((len(models), b)).astype(np.float32)
        blocks.append((models, perts, [f"u{u}" for u in units], units, s, v, fg))
    return blocks


def _oracle(blocks):
    """First value wins, per (model, pert, metric, unit), in plain dicts."""
    scores, fgs = {}, {}
    for models, perts, names, _, s, v, fg in blocks:
        for a, mi in enumerate(models):
            for c, pi in enumerate(perts):
                for u, name in enumerate(names):
                    key = (mi, pi, name)
                    if key not in scores:
                        scores[key] = [(float(s[a, c, k, u]) if v[a, c, k, u] else None, bool(v[a, c, k, u]))
                                       for k in range(s.shape[2])]
            for u, name in enumerate(names):
                fgs.setdefault((mi, name), float(fg[a, u]))
    return scores, fgs


def _table_entries(t: ScoreTable):
    scores, fgs = {}, {}
    for mi in range(len(t.models)):
        for c in range(t.n_units):
            name = t.unit_names[c]
            for pi in range(len(t.perturbations)):
                if t.done[mi, pi, c]:
                    scores[(mi, pi, name)] = [(float(t.scores[mi, pi, k, c]) if t.valid[mi, pi, k, c] else None,
                                               bool(t.valid[mi, pi, k, c])) for k in range(len(t.metrics))]
            if t.fg_done[mi, c]:
                fgs[(mi, name)] = float(t.fg[mi, c])
    return scores, fgs


@pytest.mark.parametrize("seed", range(4))
def test_table_keeps_first_value_of_every_entry(seed):
    rng = np.random.default_rng(seed)
    blocks = _random_blocks(rng)
    t = ScoreTable(["a", "b", "c"], ["p", "q"], ["nhd", "ei"], capacity=2)  # forces growth
    for models, perts, names, images, s, v, fg in blocks:
        t.add(models, perts, names, images, s, v, fg)
    assert _table_entries(t) == _oracle(blocks)
    # values(): the valid scores of done units; skipped: done but invalid.
    scores, _ = _oracle(blocks)
    for mi in range(3):
        for pi in range(2):
            for k in range(2):
                vals, skipped = t.values(mi, pi, k)
                want = [e[k] for (m_, p_, _), e in scores.items() if (m_, p_) == (mi, pi)]
                assert sorted(vals.tolist()) == sorted(x for x, ok in want if ok)
                assert skipped == sum(not ok for _, ok in want)


@pytest.mark.parametrize("seed", range(3))
def test_paired_scores_are_the_units_valid_for_both_in_name_order(seed):
    rng = np.random.default_rng(seed)
    blocks = _random_blocks(rng)
    scores, _ = _oracle(blocks)
    t, flipped = ScoreTable(["a", "b", "c"], ["p", "q"], ["nhd", "ei"]), ScoreTable(["a", "b", "c"], ["p", "q"], ["nhd", "ei"])
    for block in blocks:
        t.add(*block)
    # The same entries, entered unit by unit in the reverse order of t's columns.
    for c in reversed(range(t.n_units)):
        for mi, pi in zip(*np.nonzero(t.done[:, :, c])):
            flipped.add([mi], [pi], [t.unit_names[c]], [t.unit_images[c]], t.scores[mi, pi, :, c].reshape(1, 1, -1, 1),
                        t.valid[mi, pi, :, c].reshape(1, 1, -1, 1), None)
    assert flipped.unit_names != t.unit_names
    for ma, mb, pi, k in [(0, 1, 0, 0), (1, 2, 1, 1), (2, 0, 0, 1)]:
        names = sorted(u for (m_, p_, u) in scores if (m_, p_) == (ma, pi) and (mb, pi, u) in scores
                       and scores[(ma, pi, u)][k][1] and scores[(mb, pi, u)][k][1])
        a, b = t.paired(ma, mb, pi, k)
        assert a.tolist() == [scores[(ma, pi, u)][k][0] for u in names]
        assert b.tolist() == [scores[(mb, pi, u)][k][0] for u in names]
        # Same units, same order, whatever order the units entered the table in.
        fa, fb = flipped.paired(ma, mb, pi, k)
        assert fa.tolist() == a.tolist() and fb.tolist() == b.tolist()


def test_table_missing_and_complete_units():
    t = ScoreTable(["a", "b"], ["p", "q"], ["nhd"])
    one = np.ones((1, 1, 1, 2), np.float32)
    t.add([0], [0], ["x", "y"], [0, 1], one, one > 0, None)
    t.add([0, 1], [1], ["x"], [0], np.ones((2, 1, 1, 1), np.float32), np.ones((2, 1, 1, 1), bool), None)
    np.testing.assert_array_equal(t.missing([0, 1], [0, 1], ["x"]), [[False, False], [True, False]])
    np.testing.assert_array_equal(t.missing([0, 1], [0, 1], ["x", "y"]), [[False, True], [True, True]])
    assert t.missing([0], [0], ["new"]).all()
    assert t.complete_units(np.array([[True, False], [False, False]])) == {"x", "y"}
    assert t.complete_units(np.array([[True, True], [False, True]])) == {"x"}
    assert t.complete_units(np.ones((2, 2), bool)) == set()


def test_rows_round_trip_between_tables():
    rng = np.random.default_rng(7)
    blocks = _random_blocks(rng)
    t = ScoreTable(["a", "b", "c"], ["p", "q"], ["nhd", "ei"])
    for models, perts, names, images, s, v, fg in blocks:
        t.add(models, perts, names, images, s, v, fg)
    u = ScoreTable(["a", "b", "c"], ["p", "q"], ["nhd", "ei"])
    u.add_rows(t.rows())
    assert _table_entries(u) == _table_entries(t)
    # A selection keeps only the chosen (model, unit) rows.
    sel = t.select([1], [int(i) for i in t.unit_images[:t.n_units][:3]])
    rows = t.rows(sel)
    assert set(rows["model"].tolist()) <= {1}


def test_table_memory_per_unit_is_small():
    t = ScoreTable([f"m{i}" for i in range(64)], [f"p{i}" for i in range(6)], ["nhd"], capacity=1)
    for c in range(1000):
        t.columns([f"tile{c}"], [c])
    per_unit = sum(a.nbytes for a in (t.scores, t.valid, t.done, t.saved, t.fg, t.fg_done)) / t.scores.shape[-1]
    # 64 models x 6 perturbations x (4 + 1 + 1 + 1) bytes + 64 x 5: the documented bound.
    assert per_unit <= 64 * 6 * 7 + 64 * 5


# -- the file -----------------------------------------------------------------------------------
CONFIG = {"target": "/data/t", "n_images": 10, "seed": 0}


def _store(path, **kw):
    kw.setdefault("config", CONFIG)
    kw.setdefault("fingerprints", {"a": "1", "b": "2", "c": "3"})
    return ResultsStore(path, **kw)


def _write_blocks(store, blocks, table_names=("a", "b", "c"), perts=("p", "q"), metrics=("nhd", "ei")):
    for models, pp, names, images, s, v, fg in blocks:
        store.append([table_names[i] for i in models], [perts[i] for i in pp], list(metrics), names, images, s, v, fg)


def test_file_round_trip_is_exact_and_drops_a_cut_last_line(tmp_path):
    rng = np.random.default_rng(3)
    blocks = _random_blocks(rng)
    blocks[0][4][0, 0, 0, 0] = np.float32(1 / 3)  # needs all 9 digits
    path = tmp_path / "r.scores.jsonl"
    st = _store(path)
    st.open()
    _write_blocks(st, blocks)
    st.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-25])  # a crash in the middle of the last line
    t = ScoreTable(["a", "b", "c"], ["p", "q"], ["nhd", "ei"])
    _store(path, resume=True).load(t)
    assert _table_entries(t) == _oracle(blocks[:-1])
    # Resuming cuts the broken line before appending, so the file parses again line by line.
    st = _store(path, resume=True)
    st.open()
    _write_blocks(st, blocks[-1:])
    st.close()
    for line in path.read_text().splitlines():
        json.loads(line)
    t = ScoreTable(["a", "b", "c"], ["p", "q"], ["nhd", "ei"])
    _store(path, resume=True).load(t)
    assert _table_entries(t) == _oracle(blocks)


def test_file_keeps_only_requested_models_perturbations_and_metrics(tmp_path):
    blocks = _random_blocks(np.random.default_rng(5))
    path = tmp_path / "r.jsonl"
    st = _store(path)
    st.open()
    _write_blocks(st, blocks)
    st.close()
    t = ScoreTable(["c", "a"], ["q"], ["ei"])
    _store(path, resume=True).load(t)
    full_s, full_fg = _oracle(blocks)
    want = {(["c", "a"].index("abc"[m]), 0, u): [e[1]] for (m, p, u), e in full_s.items() if p == 1 and m != 1}
    assert _table_entries(t)[0] == want


@pytest.mark.parametrize("change, match", [
    ({"config": {**CONFIG, "seed": 1}}, "seed"),
    ({"fingerprints": {"a": "changed"}}, "model 'a' changed"),
])
def test_file_refuses_other_settings(tmp_path, change, match):
    path = tmp_path / "r.jsonl"
    st = _store(path)
    st.open()
    st.close()
    with pytest.raises(CTEError, match=match):
        _store(path, resume=True, **change).load(ScoreTable(["a"], ["p"], ["nhd"]))


def test_damaged_middle_line_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    st = _store(path)
    st.open()
    _write_blocks(st, _random_blocks(np.random.default_rng(1), n_blocks=2))
    st.close()
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:20]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CTEError, match="line 2"):
        _store(path, resume=True).load(ScoreTable(["a", "b", "c"], ["p", "q"], ["nhd", "ei"]))


def test_paths():
    assert default_results_path("/x/ranking.json") == Path("/x/ranking.scores.jsonl")
    assert shard_path(Path("/x/r.scores.jsonl"), 0) == Path("/x/r.scores.jsonl")
    assert shard_path(Path("/x/r.scores.jsonl"), 3) == Path("/x/r.scores.p3.jsonl")


def test_fingerprint_follows_the_weights(models):
    a = model_fingerprint(models[0])
    assert a == model_fingerprint(models[0]) and a != model_fingerprint(models[1])
    bumped = Model(name="m0", normalization=NORM, spec=SPEC,
                   variables=jax.tree.map(lambda v: v.copy(), models[0].variables))
    bumped.variables["params"]["final"]["bias"][0] += 1e-7
    assert model_fingerprint(bumped) != a


# -- resuming rankings --------------------------------------------------------------------------
class _Interrupt(Exception):
    pass


def _counting(monkeypatch):
    """Count the units each (model name, perturbation) pair is scored on by the executor."""
    seen: Counter = Counter()
    real_score, real_args = parallel.Executor.score, ranking._Group.args
    scored = []  # the names of the models whose arguments were built last

    def args(self, pos):
        scored[:] = [self.models[i].name for i in pos]
        return real_args(self, pos)

    def score(self, plan, placed, *rest):
        out = real_score(self, plan, placed, *rest)
        boxes = rest[3]
        n_real = int(np.sum((boxes[:, 1] > boxes[:, 0])))
        for name in scored:
            for p in plan.perturbations:
                seen[(name, p.name)] += n_real
        return out

    monkeypatch.setattr(ranking._Group, "args", args)
    monkeypatch.setattr(parallel.Executor, "score", score)
    return seen


def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(models, target, tmp_path, monkeypatch):
    kw = dict(perturbations=["dropout:0.2"], metrics=["nhd", "ei"], batch_size=2, progress=False)
    reference = rank(models, target, **kw)
    path = tmp_path / "r.scores.jsonl"
    calls = []

    def stop_in_second_batch(model, pert, metric, names, s, v):
        calls.append(names)
        if len(calls) > len(models) * 2:  # the first callback of the second batch (3 models x 2 metrics)
            raise _Interrupt

    with pytest.raises(_Interrupt):
        rank(models, target, results=path, on_scores=stop_in_second_batch, **kw)
    # A block is in the file before its callback runs: the first two batches (4 of 6 units).
    done_units = {u for line in path.read_text().splitlines()[1:] for u in json.loads(line)["units"]}
    assert len(done_units) == 4
    seen = _counting(monkeypatch)
    resumed = rank(models, target, results=path, resume=True, **kw)
    assert resumed == reference
    assert dict(seen) == {(m.name, "dropout:0.2"): 2 for m in models}  # only the missing units


def test_a_results_file_with_scores_is_refused_unless_resumed_or_overwritten(models, target, tmp_path):
    kw = dict(perturbations=["dropout:0.2"], metrics=["nhd"], batch_size=2, progress=False)
    path = tmp_path / "r.scores.jsonl"
    path.write_text(json.dumps({"format": "header only"}) + "\n")  # a run killed before its first block
    first = rank(models[:1], target, results=path, **kw)
    before = path.read_bytes()
    with pytest.raises(CTEError, match="earlier run.*--resume.*--overwrite"):
        rank(models[:1], target, results=path, **kw)
    assert path.read_bytes() == before  # nothing lost
    assert rank(models[:1], target, results=path, overwrite=True, **kw) == first
    assert len(path.read_bytes()) == len(before)  # started afresh, not appended


def test_cut_results_file_recomputes_only_what_is_missing(models, target, tmp_path, monkeypatch):
    kw = dict(perturbations=["dropout:0.2"], metrics=["nhd"], batch_size=2, progress=False)
    path = tmp_path / "r.scores.jsonl"
    reference = rank(models, target, results=path, **kw)
    lines = path.read_bytes().split(b"\n")
    # Keep the header and the first block whole, cut the second block in half, drop the rest.
    path.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][: len(lines[2]) // 2])
    kept = set(json.loads(lines[1])["units"])
    seen = _counting(monkeypatch)
    resumed = rank(models, target, results=path, resume=True, **kw)
    assert resumed == reference
    # Each model scored exactly the 4 units that were not in the file, once.
    assert dict(seen) == {(m.name, "dropout:0.2"): 6 - len(kept) for m in models}


def test_extended_bank_and_sweep_run_only_the_new_pairs(models, target, tmp_path, monkeypatch):
    kw = dict(metrics=["nhd"], batch_size=3, progress=False)
    path = tmp_path / "r.scores.jsonl"
    rank(models[:2], target, perturbations=["dropout:0.2"], results=path, **kw)
    seen = _counting(monkeypatch)
    got = rank(models, target, perturbations=["dropout:0.2", "dropout:0.3"], results=path, resume=True, **kw)
    pairs = set(seen)
    assert pairs == {("m0", "dropout:0.3"), ("m1", "dropout:0.3"), ("m2", "dropout:0.2"), ("m2", "dropout:0.3")}
    assert all(n == 6 for n in seen.values())
    monkeypatch.undo()
    fresh = rank(models, target, perturbations=["dropout:0.2", "dropout:0.3"], **kw)
    assert [(r["model"], r["perturbation"], r["rank"]) for r in got] == \
        [(r["model"], r["perturbation"], r["rank"]) for r in fresh]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in fresh], abs=1e-7)


def test_resume_needs_a_file_and_a_fresh_run_starts_over(models, target, tmp_path):
    with pytest.raises(CTEError, match="resum"):
        rank(models, target, resume=True, progress=False)
    path = tmp_path / "r.scores.jsonl"
    path.write_text("old junk\n")
    rank(models[:1], target, results=path, progress=False, batch_size=6)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["format"] == "cte_jax.results" and len(lines) == 2


# -- memory stays flat as the target grows -------------------------------------------------------------
class _FakeTarget:
    """n images of one size, made on read; counts reads."""

    def __init__(self, n):
        self.names = [f"t{i:05d}" for i in range(n)]
        self.reads = []

    def __len__(self):
        return len(self.names)

    def shape(self, i):
        return (64, 64, 1)

    def read(self, i):
        self.reads.append(i)
        return np.random.default_rng(i).integers(0, 255, (64, 64, 1), dtype=np.uint8)


def _peak_while_streaming(n):
    norms = {"k": Normalization.from_dict(NORM)}
    tracemalloc.start()
    for _ in prefetch(iter_batches(_FakeTarget(n), norms, batch_size=4)):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_streaming_memory_does_not_grow_with_the_target():
    _peak_while_streaming(2)  # one-time allocations (imports, caches) out of the way
    small, large = _peak_while_streaming(16), _peak_while_streaming(160)
    # One 64x64 image is 16 kB as uint8 and 16 kB as float32 patch; ten times the images may not
    # cost more than a few images' worth of extra peak memory.
    assert large < small + 200_000, (small, large)


def test_iter_batches_reads_only_its_share_and_skips_done_images():
    norms = {"k": Normalization.from_dict(NORM)}
    tgt = _FakeTarget(8)
    units = [u for b in iter_batches(tgt, norms, batch_size=3, images=[1, 3, 5, 7], skip={"t00003"})
             for u in b.names if u is not None]
    assert units == ["t00001", "t00005", "t00007"]
    assert tgt.reads == [1, 5, 7]
