"""Per-image scores of a ranking: a compact in-memory table and an append-only file to resume from."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from cte_jax.errors import CTEError

FORMAT = "cte_jax.results"
VERSION = 1


class ScoreTable:
    """Every per-unit score of a ranking: (model, perturbation, metric) x unit, growing by unit.

    A unit is one scored image or tile. Per unit the table holds, for each (model, perturbation)
    pair, a done flag and the metrics' float32 scores with valid flags, and per model the clean
    foreground fraction: about ``n_models * n_perts * (5 * n_metrics + 2) + 5 * n_models``
    bytes, nothing else (no patches, no predictions).

    Attributes:
      models, perturbations, metrics: names, in the order of the array axes.
      scores: (n_models n_perts n_metrics capacity) float32; ``valid`` the same shape, bool.
      done: (n_models n_perts capacity) bool: the pair was scored on the unit.
      saved: like ``done``: the entry is already in this process's results file.
      fg, fg_done: (n_models capacity) clean foreground fraction and whether it is known.
      unit_names, unit_images: per unit column: name and image index in the target.
    """

    def __init__(self, models: Sequence[str], perturbations: Sequence[str], metrics: Sequence[str], *,
                 capacity: int = 64):
        self.models, self.perturbations, self.metrics = list(models), list(perturbations), list(metrics)
        self.model_index = {n: i for i, n in enumerate(self.models)}
        self.pert_index = {n: i for i, n in enumerate(self.perturbations)}
        self.metric_index = {n: i for i, n in enumerate(self.metrics)}
        m, p, k = len(self.models), len(self.perturbations), len(self.metrics)
        self.n_units = 0
        self.unit_index: dict[str, int] = {}
        self.unit_names: list[str] = []
        self.unit_images = np.zeros(capacity, np.int32)
        self.scores = np.zeros((m, p, k, capacity), np.float32)
        self.valid = np.zeros((m, p, k, capacity), bool)
        self.done = np.zeros((m, p, capacity), bool)
        self.saved = np.zeros((m, p, capacity), bool)
        self.fg = np.zeros((m, capacity), np.float32)
        self.fg_done = np.zeros((m, capacity), bool)

    # -- units ---------------------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        cap = self.unit_images.shape[0]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        for name in ("unit_images", "scores", "valid", "done", "saved", "fg", "fg_done"):
            a = getattr(self, name)
            b = np.zeros(a.shape[:-1] + (new,), a.dtype)
            b[..., :cap] = a
            setattr(self, name, b)

    def columns(self, names: Sequence[str], images: Sequence[int]) -> np.ndarray:
        """Column of each unit, adding the units not seen yet."""
        cols = np.empty(len(names), np.int64)
        for i, (n, im) in enumerate(zip(names, images)):
            c = self.unit_index.get(n)
            if c is None:
                c = self.n_units
                self._grow(c + 1)
                self.unit_index[n] = c
                self.unit_names.append(n)
                self.unit_images[c] = im
                self.n_units += 1
            cols[i] = c
        return cols

    # -- writing -------------------------------------------------------------------------------
    def add(self, models: Sequence[int], perts: Sequence[int], names: Sequence[str], images: Sequence[int],
            scores: np.ndarray, valid: np.ndarray, fg: np.ndarray | None = None, *, saved: bool = False) -> np.ndarray:
        """Enter a block of scores: models (m), perts (P) as table indices, units (b),
        scores/valid (m P n_metrics b) in the table's metric order, fg (m b) or None.

        Entries already done keep their first value (a repeated unit scores the same).

        Returns:
          (m P b) bool: which entries were new.
        """
        cols = self.columns(names, images)
        models, perts = np.asarray(models, np.int64), np.asarray(perts, np.int64)
        new = ~self.done[models[:, None, None], perts[None, :, None], cols[None, None, :]]
        a, b, c = np.nonzero(new)
        gm, gp, gc = models[a], perts[b], cols[c]
        # scores[gm, gp, :, gc] is (n_new, n_metrics): advanced indices first, then the sliced axis.
        self.scores[gm, gp, :, gc] = np.asarray(scores, np.float32)[a, b, :, c]
        self.valid[gm, gp, :, gc] = np.asarray(valid, bool)[a, b, :, c]
        self.done[gm, gp, gc] = True
        self.saved[gm, gp, gc] |= saved
        if fg is not None:
            fresh = ~self.fg_done[models[:, None], cols[None, :]]
            a, c = np.nonzero(fresh)
            self.fg[models[a], cols[c]] = np.asarray(fg, np.float32)[a, c]
            self.fg_done[models[a], cols[c]] = True
        return new

    # -- reading -------------------------------------------------------------------------------
    def missing(self, models: Sequence[int], perts: Sequence[int], names: Sequence[str]) -> np.ndarray:
        """(m P) bool: the pair lacks at least one of the units ``names``."""
        cols = [self.unit_index.get(n, -1) for n in names]
        if not cols or min(cols) < 0:
            return np.ones((len(models), len(perts)), bool)
        d = self.done[np.ix_(np.asarray(models, np.int64), np.asarray(perts, np.int64), np.asarray(cols, np.int64))]
        return ~d.all(axis=-1)

    def complete_units(self, pairs: np.ndarray) -> set[str]:
        """Names of the units done for every pair where ``pairs`` (n_models n_perts) is True."""
        if not pairs.any() or self.n_units == 0:
            return set()
        ok = self.done[pairs][:, :self.n_units].all(axis=0)
        return {self.unit_names[c] for c in np.nonzero(ok)[0]}

    def values(self, model: int, pert: int, metric: int) -> tuple[np.ndarray, int]:
        """Scores (float32) of the pair's valid scored units, and how many scored units were invalid."""
        n = self.n_units
        d = self.done[model, pert, :n]
        v = self.valid[model, pert, metric, :n]
        return self.scores[model, pert, metric, :n][d & v], int(np.sum(d & ~v))

    def n_images(self, model: int, pert: int, metric: int) -> int:
        """How many of the target's images the pair's valid scored units come from."""
        n = self.n_units
        scored = self.done[model, pert, :n] & self.valid[model, pert, metric, :n]
        return len(np.unique(self.unit_images[:n][scored]))

    def paired(self, model_a: int, model_b: int, pert: int, metric: int, *, images: bool = False) -> tuple:
        """Scores of two models on the units valid for both, in unit-name order (so that what is
        drawn from them does not depend on the order the units were scored in); with ``images``,
        also each unit's image index in the target."""
        n = self.n_units
        both = (self.done[model_a, pert, :n] & self.valid[model_a, pert, metric, :n]
                & self.done[model_b, pert, :n] & self.valid[model_b, pert, metric, :n])
        cols = np.nonzero(both)[0]
        cols = cols[np.argsort([self.unit_names[c] for c in cols], kind="stable")]
        pair = self.scores[model_a, pert, metric, cols], self.scores[model_b, pert, metric, cols]
        return (*pair, self.unit_images[cols]) if images else pair

    def foreground(self, model: int) -> np.ndarray:
        n = self.n_units
        return self.fg[model, :n][self.fg_done[model, :n]]

    # -- exchange between processes ------------------------------------------------------------
    def rows(self, select: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The known entries as fixed-width arrays, one row per (model, unit) with anything known;
        ``select`` (n_models n_units) bool limits which (model, unit) rows are taken."""
        n = self.n_units
        known = self.done[:, :, :n].any(axis=1) | self.fg_done[:, :n]
        if select is not None:
            known &= select
        mi, ci = np.nonzero(known)
        enc = [self.unit_names[c].encode() for c in ci]
        width = max([len(e) for e in enc] + [1])
        names = np.zeros((len(enc), width), np.uint8)
        for r, e in enumerate(enc):
            names[r, :len(e)] = np.frombuffer(e, np.uint8)
        return {
            "model": mi.astype(np.int32), "unit": names, "image": self.unit_images[ci].astype(np.int32),
            "done": self.done[mi, :, ci], "scores": self.scores[mi, :, :, ci], "valid": self.valid[mi, :, :, ci],
            "fg": self.fg[mi, ci], "fg_done": self.fg_done[mi, ci],
        }

    def select(self, models: Iterable[int], images: Iterable[int]) -> np.ndarray:
        """(n_models n_units) bool: the given models on units of the given images."""
        keep_m = np.zeros(len(self.models), bool)
        keep_m[list(models)] = True
        keep_u = np.isin(self.unit_images[:self.n_units], np.fromiter(images, np.int64))
        return keep_m[:, None] & keep_u[None, :]

    def add_rows(self, rows: dict[str, np.ndarray]) -> None:
        """Enter rows made by :meth:`rows` (possibly on another process); known entries stay."""
        names = [bytes(r).rstrip(b"\0").decode() for r in rows["unit"]]
        cols = self.columns(names, rows["image"])
        m = rows["model"].astype(np.int64)
        new = np.asarray(rows["done"], bool) & ~self.done[m, :, cols]  # (R P)
        r, p = np.nonzero(new)
        self.scores[m[r], p, :, cols[r]] = rows["scores"][r, p]
        self.valid[m[r], p, :, cols[r]] = np.asarray(rows["valid"], bool)[r, p]
        self.done[m[r], p, cols[r]] = True
        fresh = np.asarray(rows["fg_done"], bool) & ~self.fg_done[m, cols]
        self.fg[m[fresh], cols[fresh]] = rows["fg"][fresh]
        self.fg_done[m[fresh], cols[fresh]] = True


# -- the file ----------------------------------------------------------------------------------
def default_results_path(output: str | os.PathLike) -> Path:
    """Where the per-image scores of a ranking written to ``output`` go: ``out.json`` ->
    ``out.scores.jsonl`` beside it."""
    p = Path(output)
    return p.with_name(p.stem + ".scores.jsonl")


def shard_path(path: Path, index: int) -> Path:
    """Process ``index``'s file of a multi-host run (process 0 writes ``path`` itself)."""
    return path if index == 0 else path.with_name(f"{path.stem}.p{index}{path.suffix}")


def _shards(path: Path) -> list[tuple[int, Path]]:
    pat = re.compile(re.escape(path.stem) + r"\.p(\d+)" + re.escape(path.suffix) + "$")
    out = []
    if path.parent.is_dir():
        for q in path.parent.iterdir():
            m = pat.match(q.name)
            if m and int(m.group(1)) > 0:
                out.append((int(m.group(1)), q))
    return sorted(out)


def model_fingerprint(model) -> str:
    """A short digest of what makes a model's scores: architecture, preprocessing, task, output
    channel and every weight (black-box models: their description only)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps({"norm": model.normalization, "task": model.task, "channel": model.channel,
                         "spec": model.spec.key() if model.spec is not None else None,
                         "provenance": model.provenance if model.spec is None else None},
                        sort_keys=True, default=str).encode())
    if model.variables is not None:
        import jax

        for path, leaf in jax.tree_util.tree_leaves_with_path(model.variables):
            a = np.ascontiguousarray(np.asarray(leaf))
            h.update(f"{jax.tree_util.keystr(path)}{a.dtype}{a.shape}".encode())
            h.update(a.data)
    return h.hexdigest()


def _fmt(values: np.ndarray, ok: np.ndarray | None = None) -> str:
    """Comma-separated float32 values in their shortest exact form; ``null`` where not ok."""
    values = np.asarray(values, np.float32)
    ok = np.isfinite(values) if ok is None else (np.asarray(ok, bool) & np.isfinite(values))
    return ",".join(np.where(ok, values.astype(str), "null").ravel().tolist())


def _holds_scores(path: Path) -> bool:
    """Whether a results file holds a scored block after its header line (reads two lines)."""
    try:
        with open(path, "rb") as f:
            lines = [line for line in (f.readline(), f.readline()) if line.strip()]
    except OSError:
        return False
    return len(lines) > 1


class ResultsStore:
    """Per-unit scores appended to a JSON-lines file as a ranking runs, to resume from.

    Line 1 (and a line at the start of every resumed session) describes the run: ``{"format":
    "cte_jax.results", "version", "config", "models": {name: fingerprint}}``. Every other line is
    one scored block: ``{"models", "perturbations", "metrics", "units", "images", "shape": [m, P,
    n_metrics, b], "scores": [flat, C order, null where invalid], "fg": [m*b]}``. Lines are
    written whole and flushed, so a crash can only truncate the last one, which is dropped.

    On a multi-host run process 0 writes ``path`` and process i ``path.stem + ".p{i}" +
    path.suffix``; every process reads them all when resuming, and process 0 merges the others
    into ``path`` at the end (:meth:`finalize`).
    """

    def __init__(self, path: str | os.PathLike, *, config: dict[str, Any], fingerprints: dict[str, str],
                 resume: bool = False, overwrite: bool = False, process_index: int = 0, process_count: int = 1):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise CTEError("results folder does not exist", self.path.parent)
        if not resume and not overwrite:
            for f in self.files():
                if _holds_scores(f):
                    raise CTEError("results file holds the per-image scores of an earlier run: --resume continues "
                                   "that run, --overwrite starts afresh and discards them", f)
        self.config = json.loads(json.dumps(config))
        self.fingerprints = dict(fingerprints)
        self.resume = resume
        self.index, self.count = process_index, process_count
        self.own = shard_path(self.path, process_index)
        self._foreign: dict[Path, bool] = {}  # file -> holds entries this run did not take in
        self._f = None

    # -- reading -------------------------------------------------------------------------------
    def files(self) -> list[Path]:
        return ([self.path] if self.path.exists() else []) + [q for _, q in _shards(self.path)]

    def load(self, table: ScoreTable) -> int:
        """Enter every complete entry of the existing files into ``table`` (with --resume).

        Raises:
          CTEError: a file was written for another target or settings, or a model changed.
        """
        n = 0
        for f in self.files():
            n += self._load_file(f, table)
        return n

    def _load_file(self, f: Path, table: ScoreTable) -> int:
        lines = f.read_bytes().split(b"\n")
        foreign = False
        n = 0
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                if i == len(lines) - 1:  # a crash cut the last line: drop it
                    break
                raise CTEError(f"results file is damaged at line {i + 1}; delete it or run without --resume",
                               f) from None
            if i == 0 and rec.get("format") != FORMAT:
                raise CTEError("not a cte_jax results file", f)
            if "format" in rec:
                self._check_session(rec, f)
                continue
            got, partial = self._enter(rec, table, saved=(f == self.own))
            n += got
            foreign |= partial
        self._foreign[f] = foreign
        return n

    def _check_session(self, rec: dict, f: Path) -> None:
        if rec.get("version") != VERSION:
            raise CTEError(f"results file has version {rec.get('version')}, this cte_jax writes {VERSION}", f)
        old = rec.get("config", {})
        diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
        if diff:
            raise CTEError(f"results file was written with other settings ({', '.join(diff)} differ); "
                           "run without --resume or give another --results file", f)
        for name, fp in rec.get("models", {}).items():
            if name in self.fingerprints and self.fingerprints[name] != fp:
                raise CTEError(f"model {name!r} changed since the results file was written; run without "
                               "--resume or give another --results file", f)

    @staticmethod
    def _enter(rec: dict, table: ScoreTable, *, saved: bool) -> tuple[int, bool]:
        """Enter one block; returns (entries taken, whether some were left out)."""
        m, p, k, b = rec["shape"]
        scores = np.array(rec["scores"], dtype=np.float64).reshape(m, p, k, b)
        fg = np.array(rec["fg"], dtype=np.float64).reshape(m, b).astype(np.float32) if rec.get("fg") else None
        if any(t not in rec["metrics"] for t in table.metrics):  # a block lacking a metric we want
            return 0, True
        kidx = [rec["metrics"].index(t) for t in table.metrics]
        mi = [(j, table.model_index[n]) for j, n in enumerate(rec["models"]) if n in table.model_index]
        pi = [(j, table.pert_index[n]) for j, n in enumerate(rec["perturbations"]) if n in table.pert_index]
        partial = len(mi) < m or len(pi) < p or len(kidx) < k
        if not mi:
            return 0, True
        sel = scores[np.ix_([j for j, _ in mi], [j for j, _ in pi], kidx)]
        valid = ~np.isnan(sel)
        table.add([t for _, t in mi], [t for _, t in pi], rec["units"], rec["images"],
                  np.where(valid, sel, 0).astype(np.float32), valid,
                  fg[[j for j, _ in mi]] if fg is not None else None, saved=saved)
        return len(mi) * len(pi) * b, partial

    # -- writing -------------------------------------------------------------------------------
    def open(self) -> None:
        """Start this session: a fresh file (no --resume), or append to the old one after cutting
        a truncated last line."""
        if self.resume and self.own.exists():
            with open(self.own, "rb+") as f:
                data = f.read()
                end = data.rfind(b"\n") + 1
                if end < len(data):
                    f.truncate(end)
            self._f = open(self.own, "a", encoding="utf-8")
        else:
            if not self.resume and self.index == 0:
                # Stale files of an earlier, larger multi-host run would mix into a later --resume.
                for i, q in _shards(self.path):
                    if i >= self.count:
                        with contextlib.suppress(OSError):
                            q.unlink()
            self._f = open(self.own, "w", encoding="utf-8")
        self._write_line(json.dumps({"format": FORMAT, "version": VERSION, "config": self.config,
                                     "models": self.fingerprints}, sort_keys=True))

    def _write_line(self, text: str) -> None:
        self._f.write(text + "\n")
        self._f.flush()

    def append(self, models: Sequence[str], perturbations: Sequence[str], metrics: Sequence[str],
               names: Sequence[str], images: Sequence[int], scores: np.ndarray, valid: np.ndarray,
               fg: np.ndarray | None) -> None:
        """Write one scored block (scores, valid (m P n_metrics b); fg (m b) or None)."""
        head = json.dumps({"models": list(models), "perturbations": list(perturbations), "metrics": list(metrics),
                           "units": list(names), "images": [int(i) for i in images],
                           "shape": list(scores.shape)})
        body = f', "scores": [{_fmt(scores, valid)}], "fg": ' + ("null" if fg is None else f"[{_fmt(fg)}]")
        self._write_line(head[:-1] + body + "}")

    def write_table(self, table: ScoreTable, *, only_unsaved: bool = True, chunk: int = 256) -> int:
        """Append the table's entries (by default those not yet in this file); returns how many."""
        n = 0
        todo = table.done[:, :, :table.n_units] & (~table.saved[:, :, :table.n_units] if only_unsaved else True)
        for mi in range(len(table.models)):
            for pi in range(len(table.perturbations)):
                cols = np.nonzero(todo[mi, pi])[0]
                for s in range(0, len(cols), chunk):
                    c = cols[s:s + chunk]
                    fg_ok = table.fg_done[mi, c]
                    self.append([table.models[mi]], [table.perturbations[pi]], table.metrics,
                                 [table.unit_names[j] for j in c], table.unit_images[c],
                                 table.scores[mi, pi][:, c][None, None], table.valid[mi, pi][:, c][None, None],
                                 table.fg[mi, c][None] if fg_ok.all() else None)
                    table.saved[mi, pi, c] = True
                    n += len(c)
        return n

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def finalize(self, table: ScoreTable) -> None:
        """After a (gathered) run: process 0 adds every entry still missing from ``path``; then each
        process removes its own extra file if everything in it is now in ``path``."""
        from cte_jax import parallel

        if self.index == 0:
            self.write_table(table)
        self.close()
        parallel.barrier("cte_jax.results.finalize")
        if self.index != 0 and self.own.exists() and not self._foreign.get(self.own, False):
            self.own.unlink()
        if self.index == 0:
            for i, q in _shards(self.path):
                if i >= self.count and not self._foreign.get(q, True):
                    with contextlib.suppress(OSError):
                        q.unlink()
