"""Shared helpers of the benchmarks: random-weight banks in PyTorch and cte_jax with identical
weights, synthetic targets, timing, memory, FLOP counts and output tables.

Nothing here is imported by the library. PyTorch is imported lazily (only the benchmarks that
compare against it need it), so a subprocess that only ranks keeps torch out of its memory.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from cte_jax import backend  # noqa: E402  (imports no jax at module level)

NORM = {"kind": "percentile", "lo": 5, "hi": 98}
SCHEMA = "cte_jax.benchmark/1"


# -- the machine and its load ------------------------------------------------------------------
def cpu_threads() -> int:
    """Cores this process may run on: the size of XLA:CPU's intra-op thread pool."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def lscpu_summary() -> str:
    """'model name, N cores (threads per core T), flags of interest' from lscpu."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or platform.machine()
    info = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    flags = set(info.get("Flags", "").split())
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{info.get('Model name', '?')}, {info.get('CPU(s)', '?')} CPU(s) "
            f"({info.get('Thread(s) per core', '?')} thread/core), {info.get('Architecture', '?')}, "
            f"{'/'.join(simd) or 'no AVX2'}, {info.get('Hypervisor vendor', 'bare metal')}")


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (other work competing for the cores)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [float("nan")] * 3


def machine_info() -> dict[str, Any]:
    import jax

    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": lscpu_summary(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "xla_threads": cpu_threads(),
        "load_average_start": load_average(),
    }
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def set_torch_threads(n: int | None = None) -> int:
    """Give PyTorch as many intra-op threads as XLA uses (all cores this process may use)."""
    import torch

    n = n or cpu_threads()
    torch.set_num_threads(n)
    return n


# -- timing ------------------------------------------------------------------------------------
def block(x):
    """Wait for every array in ``x`` (jax.block_until_ready on a pytree; host values pass)."""
    import jax

    return jax.block_until_ready(x)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds) of one call, results made ready before the clock stops."""
    t0 = time.perf_counter()
    out = block(fn())
    return out, time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int | dict[str, int], warmup: int | dict[str, int] = 1,
                last: dict[str, Any] | None = None) -> dict[str, list[float]]:
    """Time each function ``repeats`` times after ``warmup`` untimed calls, in rounds
    (A B C, A B C, ...) so slow drifts of the machine's load hit every contender alike.
    ``repeats`` and ``warmup`` may be per function (a dict; a slow contender can be timed fewer
    times: it then takes part in the first rounds only). ``last``, if given, receives each
    function's last result."""
    reps = repeats if isinstance(repeats, dict) else {k: repeats for k in fns}
    warm = warmup if isinstance(warmup, dict) else {k: warmup for k in fns}
    for r in range(max(warm.values(), default=0)):
        for k, fn in fns.items():
            if r < warm[k]:
                out = timed(fn)[0]
                if last is not None:
                    last[k] = out
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(max(reps.values())):
        for k, fn in fns.items():
            if r < reps[k]:
                out, t = timed(fn)
                times[k].append(t)
                if last is not None:
                    last[k] = out
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> str:
    """'median (min-max)' in seconds, for tables."""
    return f"{median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


# -- memory ------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size of this process, MiB: since the last :func:`reset_peak_rss`
    (Linux VmHWM), else since the start (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2 ** 20


def reset_peak_rss() -> bool:
    """Restart the peak-RSS counter at the current RSS (Linux: ``5`` to /proc/self/clear_refs).
    Returns False where that is not possible (the peak then counts from the process start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    """Resident set size now, MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError):
        import psutil

        return psutil.Process().memory_info().rss / 2 ** 20


# -- synthetic targets -------------------------------------------------------------------------
def synthetic_images(n: int, size: int, *, seed: int = 0, nuclei: int | None = None) -> np.ndarray:
    """(n size size) uint8 fluorescence-like images: bright blurred discs on a noisy background."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    nuclei = nuclei if nuclei is not None else max(4, size * size // 1200)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        img = np.zeros((size, size), np.float32)
        cy = rng.uniform(0, size, nuclei)
        cx = rng.uniform(0, size, nuclei)
        r = rng.uniform(3, max(4, size / 20), nuclei)
        level = rng.uniform(60, 160, nuclei)
        for y, x, rr, lv in zip(cy, cx, r, level):
            y0, y1 = int(max(0, y - rr - 1)), int(min(size, y + rr + 2))
            x0, x1 = int(max(0, x - rr - 1)), int(min(size, x + rr + 2))
            sub = (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2 < rr * rr
            img[y0:y1, x0:x1][sub] = np.maximum(img[y0:y1, x0:x1][sub], lv)
        img = ndimage.gaussian_filter(img, 1.0) + rng.normal(20, 6, (size, size))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_zarr(images: np.ndarray, path: str | os.PathLike, *, chunk: int = 1) -> Path:
    """Write (n h w) images as a zarr v2 array with tensorstore, ``chunk`` slices per chunk."""
    import tensorstore as ts

    path = Path(path)
    n, h, w = images.shape
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
                     "metadata": {"shape": [n, h, w], "chunks": [chunk, h, w],
                                  "dtype": np.dtype(images.dtype).str,
                                  "compressor": {"id": "zlib", "level": 1}}},
                    create=True, delete_existing=True).result()
    store.write(images).result()
    return path


def write_zarr_streaming(n: int, size: int, path: str | os.PathLike, *, seed: int = 0, pool: int = 64) -> Path:
    """A zarr target of ``n`` tiles (n size size uint8) written in slabs, never all in memory:
    tiles cycle through a pool of ``pool`` distinct synthetic images."""
    import tensorstore as ts

    path = Path(path)
    base = synthetic_images(min(pool, n), size, seed=seed)
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
                     "metadata": {"shape": [n, size, size], "chunks": [1, size, size], "dtype": "|u1",
                                  "compressor": {"id": "zlib", "level": 1}}},
                    create=True, delete_existing=True).result()
    slab = 1024
    for start in range(0, n, slab):
        stop = min(n, start + slab)
        idx = np.arange(start, stop) % len(base)
        store[start:stop].write(base[idx]).result()
    return path


def percentile_normalize(img: np.ndarray, lo: float = 5.0, hi: float = 98.0) -> np.ndarray:
    """SPEC's percentile normalisation, (x - P_lo) / (P_hi - P_lo + 1e-10), float32, written here
    independently for the PyTorch pipelines."""
    x = np.asarray(img, np.float64)
    a, b = np.percentile(x, [lo, hi])
    return ((x - a) / (b - a + 1e-10)).astype(np.float32)


# -- banks with the same weights in both frameworks ----------------------------------------------
def build_bank(archs: Sequence[dict], per_arch: int, calibration: np.ndarray, *, seed: int = 0,
               foreground: tuple[float, float] = (0.3, 0.5)) -> list[dict]:
    """Random-weight pytorch-3dunet ``UNet2D`` models and their cte_jax conversions.

    Each model is built by ``tests/torch_reference.py`` with random weights (``randomize_``),
    then its output is centred: the final conv's bias is shifted by a quantile of its logits
    on ``calibration`` images (n h w, normalised) so that a fraction drawn from ``foreground``
    of the pixels is predicted foreground (random networks otherwise predict all or nothing and
    every metric is trivial). The PyTorch state dict is converted with
    ``converters.pytorch_3dunet.from_state_dict``.

    Returns:
      One dict per model: ``name``, ``arch`` (kwargs), ``torch`` (nn.Module, eval), ``model``
      (cte_jax Model), ``foreground`` (the fraction aimed at).
    """
    import torch

    from converters.pytorch_3dunet import from_state_dict
    from cte_jax.modelio import Model
    from torch_reference import UNet2D3dunet, randomize_

    rng = np.random.default_rng(seed)
    xs = torch.from_numpy(np.asarray(calibration, np.float32)[:, None])
    bank = []
    k = 0
    for a, arch in enumerate(archs):
        for r in range(per_arch):
            net = randomize_(UNet2D3dunet(1, 1, **arch), seed=seed * 1000 + k).eval()
            frac = float(rng.uniform(*foreground))
            with torch.inference_mode():
                logits = torch.logit(net(xs).clamp(1e-6, 1 - 1e-6)).flatten()
                if logits.numel() > 2_000_000:
                    logits = logits[torch.randperm(logits.numel(), generator=torch.Generator().manual_seed(k))[:2_000_000]]
                net.final_conv.bias -= torch.quantile(logits, 1.0 - frac)
            state = {n: t.detach().numpy().copy() for n, t in net.state_dict().items()}
            spec, variables = from_state_dict(state, arch)
            name = f"a{a}_m{r}"
            bank.append({"name": name, "arch": dict(arch), "torch": net, "foreground": frac,
                         "model": Model(name=name, normalization=dict(NORM), spec=spec, variables=variables)})
            k += 1
    return bank


def random_variables(spec, seed: int) -> dict:
    """Random weights for a cte_jax ``spec`` (no PyTorch), drawn like ``randomize_``: He-scaled
    normal kernels, norm scales 1 + 0.2 N, biases 0.1 N, running means 0.2 N, variances 0.5 + U."""
    import jax

    rng = np.random.default_rng(seed)
    shapes = _abstract(spec)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:]).strip("[]'")
        shape = tuple(leaf.shape)
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        if name == "scale":
            return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        if name == "mean":
            return (0.2 * rng.standard_normal(shape)).astype(np.float32)
        if name == "var":
            return (0.5 + rng.random(shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def _abstract(spec):
    from cte_jax.networks import abstract_variables

    return abstract_variables(spec)


def jax_bank(specs: Sequence, per_spec: int, calibration: np.ndarray, *, seed: int = 0,
             foreground: tuple[float, float] = (0.3, 0.5), prefix: str = "m") -> list:
    """Random-weight cte_jax models (no PyTorch), deterministic in (specs, per_spec, calibration,
    seed), each centred like :func:`build_bank` so that 30-50 % of pixels are foreground.

    Returns:
      A list of cte_jax ``Model`` named ``{prefix}{spec index}_{replicate}``.
    """
    import jax

    from cte_jax.modelio import Model
    from cte_jax.networks import UNet

    rng = np.random.default_rng(seed + 7)
    x = np.asarray(calibration, np.float32)[..., None]
    models = []
    k = 0
    for a, spec in enumerate(specs):
        logits_fn = backend.jit(lambda v, x, spec=spec: UNet(spec).apply(v, x, method=lambda m, y: m.decode_logits(m.encode(y))))
        for r in range(per_spec):
            v = random_variables(spec, seed * 100_003 + k)
            frac = float(rng.uniform(*foreground))
            logits = np.asarray(logits_fn(v, x)).ravel()
            v["params"]["final"]["bias"] = (v["params"]["final"]["bias"] - np.quantile(logits, 1.0 - frac)).astype(np.float32)
            models.append(Model(name=f"{prefix}{a}_{r}", normalization=dict(NORM), spec=spec, variables=v))
            k += 1
    return models


def encoder_decoder_times(models: Sequence, x: np.ndarray, *, repeats: int) -> dict[str, float]:
    """Median seconds of the encoder alone and of the decoder alone (features -> probabilities)
    of same-architecture ``models`` on one batch x (b h w c), models looped with ``lax.map`` as
    the engine does on CPU."""
    import jax

    from cte_jax import engine
    from cte_jax.networks import UNet

    net = UNet(models[0].spec)
    v = jax.device_put(engine.stack_variables([m.variables for m in models]))
    x = jax.device_put(np.asarray(x, np.float32))
    enc = backend.jit(lambda v, x: jax.lax.map(lambda vv: net.apply(vv, x, method=UNet.encode), v))
    dec = backend.jit(lambda v, f: jax.lax.map(lambda a: net.apply(a[0], a[1], method=UNet.decode), (v, f)))
    feats = block(enc(v, x))
    t = interleaved({"encoder": lambda: enc(v, x), "decoder": lambda: dec(v, feats)}, repeats=repeats, warmup=1)
    return {k: median(s) for k, s in t.items()}


def clean_parity(bank: Sequence[dict], x: np.ndarray) -> float:
    """Largest |PyTorch - cte_jax| clean probability over the bank on normalised images x (b h w):
    evidence that both frameworks hold the same weights."""
    import jax
    import torch

    from cte_jax.networks import UNet

    worst = 0.0
    with torch.inference_mode():
        t = torch.from_numpy(np.asarray(x, np.float32)[:, None])
        for m in bank:
            pt = m["torch"](t)[:, 0].numpy()
            apply = backend.jit(UNet(m["model"].spec).apply)
            pj = np.asarray(apply(m["model"].variables, np.asarray(x, np.float32)[..., None]))[..., 0]
            worst = max(worst, float(np.abs(pt - pj).max()))
    return worst


# -- PyTorch U-Net pieces (pytorch-3dunet UNet2D as in tests/torch_reference.py) ----------------
def torch_encode(net, x):
    """Encoder of a ``UNet2D3dunet``: features per level, bottleneck FIRST (the forward's order)."""
    feats = []
    for enc in net.encoders:
        x = enc(x)
        feats.insert(0, x)
    return feats


def torch_decode(net, feats):
    """Decoder of a ``UNet2D3dunet`` from ``torch_encode``'s features -> probabilities (b 1 h w)."""
    x = feats[0]
    for dec, skip in zip(net.decoders, feats[1:]):
        x = dec(skip, x)
    x = net.final_conv(x)
    return net.final_activation(x) if net.final_activation is not None else x


# -- SPEC's per-image metrics on the host (the PyTorch pipelines' metrics) ------------------------
def reference_nhd(p: np.ndarray, q: np.ndarray, threshold: float = 0.5) -> float | None:
    """CTE-NHD of one image the reference way: 1 - Hamming distance of the hard masks on
    their union, in NumPy. None when the union is empty."""
    y, yq = p > threshold, q > threshold
    u = y | yq
    n = int(np.count_nonzero(u))
    if n == 0:
        return None
    return 1.0 - float(np.count_nonzero(y[u] != yq[u])) / n


def _cross_band_scipy(s: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    cross = ndimage.generate_binary_structure(2, 1)
    return ndimage.grey_dilation(s, footprint=cross) != ndimage.grey_erosion(s, footprint=cross)


def reference_vrand(y: np.ndarray, yq: np.ndarray) -> float | None:
    """CTE-VRand of one pair of hard masks the reference way: ``skimage.measure.label``
    (8-connected) instances, SPEC's mask (union minus the border band of the clean instances),
    background pixels as singletons, ``1 - skimage.metrics.adapted_rand_error``. None when
    undefined (empty clean instances, empty mask, zero denominator)."""
    from skimage.measure import label
    from skimage.metrics import adapted_rand_error

    s = label(y, connectivity=2)
    t = label(yq, connectivity=2)
    m = ((s > 0) | (t > 0)) & ~_cross_band_scipy(s)
    if not s.any() or not m.any():
        return None
    a, b = s[m].astype(np.int64), t[m].astype(np.int64)
    n = a.size
    a = np.where(a == 0, a.max() + 1 + np.arange(n), a)
    b = np.where(b == 0, b.max() + 1 + np.arange(n), b)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = adapted_rand_error(a, b, ignore_labels=())[0]
    return None if not np.isfinite(err) else 1.0 - float(err)


def _cross_band_numpy(s: np.ndarray) -> np.ndarray:
    """dilation(s) != erosion(s) with the 4-connected cross, edges replicated (as scipy's
    default 'reflect' mode does for a one-pixel footprint)."""
    pad = np.pad(s, 1, mode="edge")
    h, w = s.shape
    views = [pad[1:h + 1, 1:w + 1], pad[0:h, 1:w + 1], pad[2:h + 2, 1:w + 1], pad[1:h + 1, 0:w], pad[1:h + 1, 2:w + 2]]
    return np.maximum.reduce(views) != np.minimum.reduce(views)


_EIGHT = np.ones((3, 3), bool)


def fast_vrand(y: np.ndarray, yq: np.ndarray) -> float | None:
    """The same CTE-VRand as :func:`reference_vrand`, vectorised: ``scipy.ndimage.label`` and
    pair counts instead of a sparse contingency table. With singletons for background, the
    Rand F-score (alpha 0.5) reduces to 2 X / (A + B), X = sum over (clean, perturbed) instance
    pairs of c (c - 1), A, B the same over the instances of each side, counted inside the mask."""
    from scipy import ndimage

    s, _ = ndimage.label(y, structure=_EIGHT)
    t, nt = ndimage.label(yq, structure=_EIGHT)
    m = ((s > 0) | (t > 0)) & ~_cross_band_numpy(s)
    if not s.any() or not m.any():
        return None
    a, b = s[m].astype(np.int64), t[m].astype(np.int64)
    both = (a > 0) & (b > 0)
    _, c_ab = np.unique(a[both] * (nt + 1) + b[both], return_counts=True)
    c_a = np.bincount(a)[1:]
    c_b = np.bincount(b)[1:]
    x = float(np.sum(c_ab * (c_ab - 1.0)))
    den = float(np.sum(c_a * (c_a - 1.0)) + np.sum(c_b * (c_b - 1.0)))
    if den == 0:
        return None
    return 2.0 * x / den


# -- analytic FLOPs ------------------------------------------------------------------------------
def conv_flops(spec, h: int, w: int) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of the convolutions of one image (h w) through ``spec``, as
    cte_jax's inference network computes them.

    Returns ``{"encoder", "decoder", "total", "decoder_shared"}``; the decoder includes upsampling
    convolutions (transposed 3x3 for deconv, 1x1 for bilinear_conv, at the low resolution) and
    the final 1x1 conv. Nearest-2x upsampled channels are convolved at the low resolution
    (``networks.conv3x3_upsampled``: 16 taps per low-res pixel instead of 36).
    ``decoder_shared`` is a perturbed decode that reuses the clean decode's skip-channel
    convolutions (``UNet.decode_shared``). Norms, activations, pooling and resizing are not
    counted (they are not convolutions).
    """
    from cte_jax.networks import static_skip_channels

    L = spec.levels
    sizes = [(h, w)]
    for _ in range(1, L):
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    enc = 0.0
    for lv in range(L):
        cin, mid, cout = spec.encoder_channels(lv)
        hw = sizes[lv][0] * sizes[lv][1]
        enc += 2 * 9 * hw * (cin * mid + mid * cout)
    dec = saved = 0.0
    for st in range(L - 1):
        lv = L - 2 - st
        hw = sizes[lv][0] * sizes[lv][1]
        deep, skip = spec.features[lv + 1], spec.features[lv]
        cin, cout = spec.decoder_channels(st)
        dec += 2 * 9 * hw * (cin * cout + cout * cout)
        low = sizes[lv + 1][0] * sizes[lv + 1][1]
        if spec.upsampling == "nearest" and sizes[lv] == (2 * sizes[lv + 1][0], 2 * sizes[lv + 1][1]):
            dec -= 2 * (9 * hw - 16 * low) * deep * cout  # the upsampled channels, at low resolution
        static = static_skip_channels(spec, st)
        saved += 2 * 9 * hw * (static[1] - static[0]) * cout if static else 0.0
        if spec.upsampling in ("deconv", "deconv_concat"):
            # transposed 3x3 stride 2: every input pixel meets 9 kernel taps
            dec += 2 * 9 * low * deep * skip
        elif spec.upsampling == "bilinear_conv":
            dec += 2 * low * deep * skip
    dec += 2 * h * w * spec.features[0] * spec.out_channels
    return {"encoder": enc, "decoder": dec, "total": enc + dec, "decoder_shared": dec - saved}


# -- output ----------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a tiny configuration (seconds): checks the benchmark runs")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per contender (median reported)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    return p


QUICK_NOTE = "--quick is a smoke test: tiny models, persistent compilation cache on"


def configure(args: argparse.Namespace, quick: dict, full: dict, overrides: Sequence[str] = ("repeats",)) -> dict:
    """The configuration a benchmark runs: ``quick`` or ``full``, with the command line's
    ``overrides`` (arguments given as other than None replace the entries of the same name).

    ``--quick`` also turns on the user-level persistent compilation cache: it is a smoke test,
    and its compile figures are cache loads after the first run.
    """
    cfg = dict(quick if args.quick else full)
    for key in overrides:
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    if args.quick:
        from cte_jax.cache import enable_compilation_cache

        enable_compilation_cache()
    return cfg


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])


def finish(name: str, result: dict, tables: Sequence[tuple[str, str]], json_path: Path | None) -> dict:
    """Print the tables with the command, machine and load; write JSON if asked."""
    result = {"schema": SCHEMA, "benchmark": name, "command": command_line(), **result}
    result.setdefault("machine", machine_info())
    result["machine"]["load_average_end"] = load_average()
    m = result["machine"]
    print(f"\n## {name}\n")
    print(f"command: `{result['command']}`")
    print(f"date: {m['date']}  machine: {m['machine']}")
    print(f"jax {m['jax']} ({m['jax_backend']}, {m['xla_threads']} XLA threads)"
          + (f", torch {m['torch']} ({m['torch_threads']} threads)" if "torch" in m else ""))
    print(f"load average (1/5/15 min): start {m['load_average_start']}, end {m['load_average_end']}")
    for title, table in tables:
        print(f"\n### {title}\n\n{table}")
    for note in result.get("notes", []):
        print(f"\n- {note}", end="")
    print()
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, default=float))
    return result
