"""Perturbations of inputs and bottleneck features: pure functions with explicit PRNG keys."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

Array = jax.Array

INPUT_KINDS = ("noise", "brightness", "contrast", "gamma")
FEATURE_KINDS = ("dropout",)
KINDS = INPUT_KINDS + FEATURE_KINDS


# -- the formulas (SPEC "Perturbations"); x is normalised, never clipped ------------------------
def gaussian_noise(key: Array, x: Array, *, sigma: Array | float) -> Array:
    """x' = x + N(0, sigma^2), independent per pixel. x: (h w c); sigma scalar."""
    return x + sigma * jax.random.normal(key, x.shape, x.dtype)


def brightness(key: Array | None, x: Array, *, delta: Array | float) -> Array:
    """x' = x + theta_B."""
    del key
    return x + delta


def contrast(key: Array | None, x: Array, *, factor: Array | float, mask: Array | None = None) -> Array:
    """x' = mean(x) + theta_C (x - mean(x)); the mean over the image's counted pixels (h w c)."""
    del key
    if mask is None:
        mean = jnp.mean(x)
    else:
        w = jnp.broadcast_to(mask[..., None], x.shape).astype(x.dtype)
        mean = jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1)
    return mean + factor * (x - mean)


def gamma_correction(key: Array | None, x: Array, *, gamma: Array | float) -> Array:
    """x' = sign(x) |x|^theta_gamma (sign-preserving, since normalised images have negatives)."""
    del key
    return jnp.sign(x) * jnp.power(jnp.abs(x), gamma)


def spatial_dropout(key: Array, features: Array, *, rate: float) -> Array:
    """Channel dropout of one image's features (h w c): each channel kept with probability 1-p and
    scaled by 1/(1-p) (Tompson et al. 2015; torch Dropout2d). ``rate`` is a static float."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return features
    keep = jax.random.bernoulli(key, 1.0 - rate, (1, 1, features.shape[-1]))
    return jnp.where(keep, features / (1.0 - rate), 0).astype(features.dtype)


_INPUT_FNS = {
    "noise": lambda k, x, s, m: gaussian_noise(k, x, sigma=s),
    "brightness": lambda k, x, s, m: brightness(k, x, delta=s),
    "contrast": lambda k, x, s, m: contrast(k, x, factor=s, mask=m),
    "gamma": lambda k, x, s, m: gamma_correction(k, x, gamma=s),
}


_IDENTITY = {"dropout": 0.0, "noise": 0.0, "brightness": 0.0, "contrast": 1.0, "gamma": 1.0}


# -- a named perturbation with its strength -------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Perturbation:
    """A perturbation kind with a fixed strength (lo == hi) or a range U(lo, hi) drawn per image.

    ``dropout`` takes a fixed rate (the paper's p_d); input kinds may take a range.
    """

    kind: str
    lo: float
    hi: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown perturbation {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.hi < self.lo:
            raise ValueError(f"perturbation range {self.lo}-{self.hi} is empty")
        if self.kind == "dropout" and (self.lo != self.hi or not 0.0 <= self.lo < 1.0):
            raise ValueError(f"dropout takes one rate in [0, 1), got {self.name}")
        if self.kind == "noise" and self.lo < 0:
            raise ValueError(f"noise sigma must be >= 0, got {self.name}")
        if self.kind == "gamma" and self.lo <= 0:
            raise ValueError(f"gamma must be > 0, got {self.name}")
        if self.kind == "contrast" and self.lo <= 0:
            raise ValueError(f"contrast factor must be > 0 (1 leaves the image as it is), got {self.name}")

    @property
    def is_feature(self) -> bool:
        return self.kind in FEATURE_KINDS

    @property
    def is_identity(self) -> bool:
        """True for a strength that leaves every image as it is (dropout:0, noise:0, brightness:0,
        contrast:1, gamma:1): every model is then perfectly consistent."""
        return self.lo == self.hi == _IDENTITY[self.kind]

    @property
    def name(self) -> str:
        s = f"{self.lo:g}" if self.lo == self.hi else f"{self.lo:g}-{self.hi:g}"
        return f"{self.kind}:{s}"

    def strength(self, key: Array) -> Array:
        """One draw of theta ~ U(lo, hi) (exactly lo when fixed)."""
        if self.lo == self.hi:
            return jnp.float32(self.lo)
        return jax.random.uniform(key, (), jnp.float32, self.lo, self.hi)


_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_SPEC = re.compile(rf"^\s*([a-z]+)\s*:\s*({_NUM})\s*(?:-\s*({_NUM}))?\s*$")


def parse_perturbation(text: str) -> Perturbation:
    """Parse ``kind:value`` or ``kind:lo-hi``, e.g. ``dropout:0.1``, ``noise:0.03-0.05``,
    ``brightness:-0.1``. Raises ValueError with the accepted forms."""
    m = _SPEC.match(text)
    if not m:
        raise ValueError(f"bad perturbation {text!r}: use KIND:VALUE or KIND:LO-HI with KIND one of "
                         f"{', '.join(KINDS)} (e.g. dropout:0.1, noise:0.03-0.05, gamma:1.2)")
    kind, lo, hi = m.group(1), float(m.group(2)), m.group(3)
    return Perturbation(kind, lo, float(hi) if hi is not None else lo)


def perturb_input(key: Array, x: Array, pert: Perturbation, *, mask: Array | None = None) -> Array:
    """Apply an input perturbation to one image x (h w c), strength drawn from ``key``.

    ``pert`` is static: its kind selects the formula while tracing, not inside the program.
    """
    if pert.is_feature:
        raise ValueError(f"{pert.name} acts on features, not on the input")
    k_strength, k_noise = jax.random.split(key)
    return _INPUT_FNS[pert.kind](k_noise, x, pert.strength(k_strength), mask)


def perturb_bottleneck(key: Array, features: Array, pert: Perturbation) -> Array:
    """Apply a feature perturbation to one image's bottleneck features (h w c)."""
    if not pert.is_feature:
        raise ValueError(f"{pert.name} acts on the input, not on features")
    return spatial_dropout(key, features, rate=pert.lo)
