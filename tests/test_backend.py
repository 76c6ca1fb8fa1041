"""Per-backend compiler options: YNNPACK kernels on CPU, an opt-out, and the same scores either way."""

import jax
import numpy as np
import pytest

from cte_jax import backend, engine
from cte_jax.arch import UNetSpec
from cte_jax.errors import CTEError
from cte_jax.modelio import Model
from cte_jax.networks import init_variables
from cte_jax.ranking import rank

NORM = {"kind": "percentile", "lo": 5, "hi": 98}


def test_opt_out_and_bad_values(monkeypatch):
    monkeypatch.setenv(backend.ENV, "xla")
    assert backend.compiler_options() == {}
    monkeypatch.setenv(backend.ENV, "fastest")
    with pytest.raises(CTEError, match=backend.ENV):
        backend.compiler_options()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernels only")
def test_default_on_cpu_follows_the_probe(monkeypatch):
    monkeypatch.delenv(backend.ENV, raising=False)
    opts = backend.compiler_options()
    assert bool(opts) == backend._ynn_works()
    if opts:  # the option really reaches the compiler: an unknown value is refused there
        bad = {k: "NOT_A_FUSION_TYPE" for k in opts}
        with pytest.raises(Exception):
            jax.jit(lambda x: x @ x, compiler_options=bad)(np.eye(4, dtype=np.float32))


def test_scores_do_not_depend_on_the_kernels(monkeypatch, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        img = (rng.random((48, 48)) * 60).astype(np.uint8)
        img[10:20, 12 + 4 * i:24 + 4 * i] += 150
        Image.fromarray(img).save(tmp_path / f"im{i}.png")
    spec = UNetSpec(features=(8, 16, 32), layer_order="gcr", num_groups=4)
    models = []
    for i in range(2):
        v = init_variables(spec, jax.random.key(i))
        v["params"]["final"]["bias"] = v["params"]["final"]["bias"] + 0.05 * i
        models.append(Model(name=f"m{i}", normalization=NORM, spec=spec, variables=v))
    out = {}
    for kernels in ("xla", "ynn"):
        monkeypatch.setenv(backend.ENV, kernels)
        engine.compiled_scorer.cache_clear()
        recs = rank(models, tmp_path, perturbations=["dropout:0.2", "gamma:1.3"], metrics=["nhd", "ei"],
                    progress=False, seed=1)
        out[kernels] = {(r["model"], r["perturbation"], r["metric"]): r["score"] for r in recs}
    engine.compiled_scorer.cache_clear()
    assert out["xla"].keys() == out["ynn"].keys()
    for k, v in out["xla"].items():
        assert out["ynn"][k] == pytest.approx(v, abs=1e-3), k
