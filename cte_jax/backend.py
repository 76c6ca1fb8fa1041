"""Compiler options per backend: which convolution kernels XLA uses, chosen by measurement.

On CPU, XLA's own convolution emitter runs the 3x3 convolutions of our U-Nets 1.5-1.8x slower
than PyTorch's oneDNN kernels. jaxlib ships a second set of kernels (YNNPACK, the successor of
XNNPACK) that XLA uses for dot/convolution and reduction fusions when asked; on this project's
benchmark U-Nets they halve the forward pass (benchmarks/README.md). Both fusion types are asked
for: with dots alone, XLA's own reductions (GroupNorm statistics) ran 2-3x slower than without
the option; adding reductions made the GroupNorm U-Net's scoring program 11 % faster. They are
still marked experimental in XLA, so they are used only after a probe shows that this jaxlib
accepts the option and computes the same convolution as the default kernels.

Set ``CTE_JAX_CPU_KERNELS=xla`` to keep XLA's default kernels (``ynn``, the default, asks for
YNNPACK). Accelerators get no extra options.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

import numpy as np

ENV = "CTE_JAX_CPU_KERNELS"
KERNELS = ("ynn", "xla")
_YNN = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}

log = logging.getLogger(__name__)


def requested_kernels() -> str:
    value = os.environ.get(ENV, "ynn").strip().lower() or "ynn"
    if value not in KERNELS:
        from cte_jax.errors import CTEError

        raise CTEError(f"environment variable {ENV}={value!r}: choose one of {', '.join(KERNELS)}")
    return value


@functools.lru_cache(maxsize=None)
def _ynn_works() -> bool:
    """Compile one small convolution with and without YNNPACK and compare: False when this jaxlib
    does not know the option (older or newer releases) or gives a different answer."""
    import jax

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 8)).astype(np.float32)
    k = rng.standard_normal((3, 3, 8, 4)).astype(np.float32)
    try:
        fast = np.asarray(jax.jit(conv, compiler_options=_YNN)(x, k))
    except Exception as err:  # unknown option, unsupported jit argument, kernel failure
        log.info("YNNPACK kernels unavailable (%s); using XLA's own", err)
        return False
    ref = np.asarray(jax.jit(conv)(x, k))
    return bool(np.allclose(fast, ref, rtol=1e-4, atol=1e-4))


def compiler_options() -> dict[str, Any]:
    """Options for ``jax.jit(..., compiler_options=...)`` on the default backend."""
    import jax

    if jax.default_backend() != "cpu" or requested_kernels() != "ynn":
        return {}
    return dict(_YNN) if _ynn_works() else {}


def jit(fn: Callable, **kwargs) -> Callable:
    """``jax.jit`` with this backend's :func:`compiler_options` (decided once, at the call)."""
    import jax

    options = compiler_options()
    if options:
        kwargs["compiler_options"] = options
    return jax.jit(fn, **kwargs)
