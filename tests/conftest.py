"""Shared fixtures: where the real data lives, and small random models."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The CLI turns on a persistent XLA cache in the user's cache folder; tests keep theirs apart
# (shared by the subprocesses a test starts, so a program compiles once per run). A folder made
# here is removed when the run ends, so test runs do not pile up compiled programs in /tmp.
if "CTE_JAX_CACHE_DIR" not in os.environ:
    _xla_cache = tempfile.mkdtemp(prefix="cte_jax_test_xla_")
    os.environ["CTE_JAX_CACHE_DIR"] = _xla_cache
    atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)

# Non-partitionable threefry compiles random initialisers ~10x faster on CPU; tests compare
# computations with each other, never with stored random draws, so the stream does not matter.
# An environment variable, so the subprocesses tests start draw the same numbers.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "false")

# Two test processes (pytest-xdist) on one GPU must not each take most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# The test process caches compiled programs too (in the folder above, shared with the other
# worker process and the subprocesses): many tests compile the same scoring program, and a
# program compiled once is then read from disk. Every size of program is kept.
from cte_jax.cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache(min_compile_seconds=0)  # from $CTE_JAX_CACHE_DIR, so "off" still turns it off

SHARED = Path(os.environ.get("CTE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
DATA = SHARED / "data"
MODELS = SHARED / "models"


@pytest.fixture
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return DATA


@pytest.fixture
def shared_models() -> Path:
    if not MODELS.is_dir():
        pytest.skip("../shared/models is not present")
    return MODELS
