"""Flax U-Net of the pytorch-3dunet / torch-em families, with encoder and decoder callable apart."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cte_jax.arch import UNetSpec

Array = jax.Array


# -- resizing with PyTorch's index rules, as static matrices ----------------------------------
def _nearest_matrix(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch ``F.interpolate(mode='nearest')``: source index floor(dst * n_in / n_out)."""
    src = np.minimum(np.floor(np.arange(n_out) * (n_in / n_out)).astype(np.int64), n_in - 1)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), src] = 1.0
    return m


def _linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch bilinear, ``align_corners=False``: src = (dst + 0.5) * n_in / n_out - 0.5, clamped at 0."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    w_hi = (src - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - w_hi)
    np.add.at(m, (np.arange(n_out), hi), w_hi)
    return m


def resize(x: Array, size: tuple[int, int], mode: str) -> Array:
    """Resize ``x`` (b h w c) to ``size`` (h', w') as PyTorch's ``F.interpolate`` does."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    if mode == "nearest":
        if tuple(size) == (2 * h, 2 * w):
            # PyTorch's rule is then floor(dst / 2): each pixel repeated into a 2x2 block. A
            # broadcast fuses into its consumer; the gathers below each write a copy.
            b, c = x.shape[0], x.shape[-1]
            return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        # An exact gather; a matmul would round in bfloat16.
        rows = np.argmax(_nearest_matrix(h, size[0]), 1)
        cols = np.argmax(_nearest_matrix(w, size[1]), 1)
        return x[:, rows][:, :, cols]
    mh = jnp.asarray(_linear_matrix(h, size[0]), x.dtype)
    mw = jnp.asarray(_linear_matrix(w, size[1]), x.dtype)
    x = jnp.einsum("Hh,bhwc->bHwc", mh, x, precision="highest")
    return jnp.einsum("Ww,bhwc->bhWc", mw, x, precision="highest")


# -- layers -----------------------------------------------------------------------------------
class InstanceNorm(nn.Module):
    """Per-image, per-channel normalisation without affine parameters (torch InstanceNorm2d)."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        mean = jnp.mean(x, axis=(1, 2), keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps)


class GroupNorm(nn.Module):
    """torch ``GroupNorm``: mean and biased variance over (h, w, channels of the group), then a
    per-channel affine. Same parameters (``scale``, ``bias``) as ``flax.linen.GroupNorm``.

    Written out because flax's version reshapes to (b h w groups c/g) and reduces over three
    non-adjacent axes, which XLA:CPU runs 5-7x slower than PyTorch. Here every pass is a reduction
    over (h, w) with channels minor: per-channel sums, combined per group, and the whole norm
    folds into one ``x * a[c] + b[c]``. The variance is the mean of squared deviations from the
    group mean (two passes), not E[x^2] - E[x]^2, which cancels badly in low precision.
    """

    num_groups: int
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        g = self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm: {c} channels do not split into {g} groups")
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        xf = x.astype(jnp.float32)
        count = x.shape[1] * x.shape[2] * (c // g)

        def per_group(channel_sums):  # (b c) -> (b c): each channel gets its group's total
            sums = channel_sums.reshape(-1, g, c // g).sum(-1)
            return jnp.repeat(sums, c // g, axis=-1)

        mean = per_group(jnp.sum(xf, axis=(1, 2))) / count
        dev = xf - mean[:, None, None, :]
        var = per_group(jnp.sum(dev * dev, axis=(1, 2))) / count
        a = scale * jax.lax.rsqrt(var + self.epsilon)  # (b c)
        b = bias - mean * a
        return (xf * a[:, None, None, :] + b[:, None, None, :]).astype(x.dtype)


def _activation(letter: str, x: Array, leaky_slope: float = 0.1) -> Array:
    if letter == "r":
        return nn.relu(x)
    if letter == "l":
        return nn.leaky_relu(x, negative_slope=leaky_slope)
    return nn.elu(x)


def _conv3x3_one_channel(x: Array, kernel: Array) -> Array:
    """3x3 'same' convolution of a one-channel x (b h w 1) as nine shifted multiply-adds.

    A grey image's first layer: as a convolution, XLA:CPU (and YNNPACK) spend as long on 1->8
    channels as on 8->16 (1.1 ms for two 128x128 images); nine broadcast products fuse into one
    loop that takes 0.15 ms. Equal to the convolution up to float rounding."""
    h, w = x.shape[1:3]
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = None
    for i in range(3):
        for j in range(3):
            term = p[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def _phase_taps(kernel: Array, axis: int) -> tuple[Array, Array]:
    """The 3 taps of ``kernel`` along ``axis`` folded to 2 for each output phase of a nearest-2x
    upsampled input: an even output row 2i sees input rows 2i-1, 2i, 2i+1, i.e. low-res rows
    i-1, i, i (taps [k0, k1 + k2] at offsets -1, 0); an odd row 2i+1 sees i, i, i+1 (taps
    [k0 + k1, k2] at offsets 0, +1)."""
    k0, k1, k2 = jnp.split(kernel, 3, axis=axis)
    return jnp.concatenate([k0, k1 + k2], axis), jnp.concatenate([k0 + k1, k2], axis)


def phase_kernels(kernel: Array) -> list[Array]:
    """The four 2x2 kernels (kh kw in out, from a 3x3 ``kernel`` in that layout) that convolve a
    low-resolution image into the output phases of its nearest-2x upsampling, phase ``2 * a + c``
    for output rows of parity a and columns of parity c (:func:`_phase_taps` on both axes)."""
    return [k for rows in _phase_taps(kernel, 0) for k in _phase_taps(rows, 1)]


def conv3x3_upsampled(x: Array, kernel: Array) -> Array:
    """The 3x3 'same' convolution of nearest-2x upsampled ``x`` (b h w c -> b 2h 2w out),
    computed at the low resolution without upsampling.

    Each of the four output phases (row parity, column parity) is a 2x2 convolution of ``x``
    with taps summed (:func:`phase_kernels`), so the work is 4 x 4 taps per low-res pixel
    instead of 9 x 4: 2.25x fewer multiply-adds. Zero padding of the upsampled image is zero
    padding of ``x`` (row -1 and row 2h map to low-res rows -1 and h), so borders are exact.
    Equal to ``conv(upsample(x))`` up to float rounding (the taps are summed first).
    """
    b, h, w, _ = x.shape
    pads = ((1, 0), (0, 1))  # the low-res offsets of phase 0 are (-1, 0), of phase 1 (0, +1)
    kernels = phase_kernels(kernel.astype(jnp.float32))
    out = []
    for a in range(2):
        out.append(jnp.stack([
            jax.lax.conv_general_dilated(x, kernels[2 * a + c].astype(x.dtype), (1, 1), (pads[a], pads[c]),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
            for c in range(2)], axis=3))  # b h w 2 out: column phase beside each column
    return jnp.stack(out, axis=2).reshape(b, 2 * h, 2 * w, kernel.shape[-1])  # b h 2 w 2 out


class Conv3x3(nn.Module):
    """3x3 convolution, padding 1, with ``flax.linen.Conv``'s parameters (``kernel`` (3 3 in out),
    ``bias``) and initialisers, that can also convolve a contiguous range of its input channels
    alone: conv(x) = conv(x[lo:hi] with kernel[lo:hi]) + conv(the rest with the rest) + bias."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array, static: tuple[int, int] | None = None,
                 partial: Array | None = None, up: tuple[int, int] | None = None) -> Array | tuple[Array, Array]:
        """Without ``static``: conv(x). With ``static = (lo, hi)``: returns (conv(x), partial), where
        partial is the contribution of input channels lo..hi (no bias); a given ``partial`` is
        used instead of recomputing it, so only the other channels are convolved.

        ``up = (lo, hi)``: input channels lo..hi are a nearest-2x upsampling, every 2x2 block of
        pixels equal (h and w even); their contribution is computed from one pixel per block by
        :func:`conv3x3_upsampled`. Must not overlap ``static``.
        """
        param = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        kernel = param.astype(x.dtype)

        def conv(a, k):
            if a.shape[-1] == 1:
                return _conv3x3_one_channel(a, k)
            return jax.lax.conv_general_dilated(a, k, (1, 1), ((1, 1), (1, 1)),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))

        if static is None and up is None:
            y = conv(x, kernel)
        else:
            terms, taken = [], []
            if static is not None:
                lo, hi = static
                if partial is None:
                    partial = conv(x[..., lo:hi], kernel[:, :, lo:hi])
                terms.append(partial)
                taken.append(static)
            if up is not None:
                lo, hi = up
                terms.append(conv3x3_upsampled(x[:, ::2, ::2, lo:hi], param[:, :, lo:hi]))
                taken.append(up)
            start = 0  # the channels left over are convolved as they are
            for lo, hi in sorted(taken) + [(x.shape[-1], x.shape[-1])]:
                if lo > start:
                    terms.append(conv(x[..., start:lo], kernel[:, :, start:lo]))
                start = max(start, hi)
            y = terms[0]
            for t in terms[1:]:
                y = y + t
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        return y if static is None else (y, partial)


class ConvUnit(nn.Module):
    """One 3x3 convolution with its norm and activation, in ``spec.layer_order``."""

    spec: UNetSpec
    in_channels: int
    out_channels: int
    activate: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool = False, static: tuple[int, int] | None = None,
                 partial: Array | None = None, up: tuple[int, int] | None = None) -> Array | tuple[Array, Array]:
        """``static``/``partial``/``up``: see :class:`Conv3x3`; with ``static`` returns (x, partial).
        The norms and activations before the convolution act per pixel and channel, so channels
        that are upsampled on entry still are when they reach it."""
        s = self.spec
        order = s.layer_order
        for i, letter in enumerate(order):
            before = i < order.index("c")
            n = self.in_channels if before else self.out_channels
            if letter == "c":
                x = Conv3x3(self.out_channels, use_bias=s.conv_bias, name="conv")(x, static, partial, up)
                if static is not None:
                    x, partial = x
            elif letter == "g":
                x = GroupNorm(num_groups=s.group_count(n), epsilon=s.norm_eps, name="norm")(x)
            elif letter == "b":
                x = nn.BatchNorm(use_running_average=not train, epsilon=s.norm_eps, momentum=0.9,
                                 dtype=x.dtype, name="norm")(x)
            elif letter == "i":
                x = InstanceNorm(eps=s.norm_eps, name="norm")(x)
            elif self.activate:
                x = _activation(letter, x, s.leaky_slope)
        return x if static is None else (x, partial)


class DoubleConv(nn.Module):
    spec: UNetSpec
    channels: tuple[int, int, int]  # in, mid, out

    @nn.compact
    def __call__(self, x: Array, train: bool = False, static: tuple[int, int] | None = None,
                 partial: Array | None = None, up: tuple[int, int] | None = None) -> Array | tuple[Array, Array]:
        """``static``/``partial``/``up`` go to the first convolution; with ``static`` returns (x, partial)."""
        cin, mid, cout = self.channels
        x = ConvUnit(self.spec, cin, mid, activate=self.spec.inner_activation, name="unit_0")(
            x, train, static, partial, up)
        if static is not None:
            x, partial = x
        x = ConvUnit(self.spec, mid, cout, name="unit_1")(x, train)
        return x if static is None else (x, partial)


class Upsample(nn.Module):
    """Brings deep features to the skip's size (and, for deconv / bilinear_conv, its channels)."""

    spec: UNetSpec
    out_channels: int

    @nn.compact
    def __call__(self, x: Array, size: tuple[int, int]) -> Array:
        mode = self.spec.upsampling
        if mode in ("nearest", "bilinear"):
            return resize(x, size, mode)
        if mode == "bilinear_conv":
            # torch-em resizes, then convolves 1x1. Both are linear and the resize weights of an
            # output pixel sum to 1 (so the bias passes through): convolving first is the same
            # map, on a quarter of the pixels.
            h, w = x.shape[1:3]
            x = nn.Conv(self.out_channels, (1, 1), dtype=x.dtype, name="conv")(x)
            return resize(x, (2 * h, 2 * w), "bilinear")
        # ConvTranspose2d(k=3, stride=2, padding=1, output_padding chosen to reach `size`):
        # a dilated convolution with a flipped kernel; the kernel here is stored already flipped
        # in (kh, kw, in, out) layout, so this equals torch's transposed conv on copied weights.
        # deconv_concat (pytorch-3dunet) uses no output padding and resizes (nearest) afterwards.
        h, w = x.shape[1:3]
        full = size if mode == "deconv" else (2 * h - 1, 2 * w - 1)
        op = (full[0] - (2 * h - 1), full[1] - (2 * w - 1))
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.out_channels))
        bias = self.param("bias", nn.initializers.zeros, (self.out_channels,))
        y = jax.lax.conv_general_dilated(
            x, kernel.astype(x.dtype), window_strides=(1, 1),
            padding=((1, 1 + op[0]), (1, 1 + op[1])), lhs_dilation=(2, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + bias.astype(x.dtype)
        return y if mode == "deconv" else resize(y, size, "nearest")


class UNet(nn.Module):
    """The network of a :class:`UNetSpec`. ``encode`` then ``decode`` equals ``__call__``.

    ``encode(x)`` returns the features of every level (b h_i w_i c_i), the last being the
    bottleneck, which feeds only the first decoder step; skips are the others. A perturbation of
    the bottleneck therefore needs ``encode`` once and ``decode`` once per perturbed variant.
    """

    spec: UNetSpec

    def setup(self):
        s = self.spec
        self.encoders = [DoubleConv(s, s.encoder_channels(i)) for i in range(s.levels)]
        ups, decs = [], []
        for j in range(s.levels - 1):
            skip = s.features[s.levels - 2 - j]
            ups.append(Upsample(s, skip))
            cin, cout = s.decoder_channels(j)
            decs.append(DoubleConv(s, (cin, cout, cout)))
        self.upsamplers = ups
        self.decoders = decs
        self.final = nn.Conv(s.out_channels, (1, 1))

    def encode(self, x: Array, train: bool = False) -> list[Array]:
        """x (b h w c_in), normalised -> features per level, bottleneck last."""
        feats = []
        for i, enc in enumerate(self.encoders):
            if i > 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            x = enc(x, train)
            feats.append(x)
        return feats

    def decode_logits(self, feats: Sequence[Array], train: bool = False) -> Array:
        """Features per level -> logits (b h w c_out), before the final activation."""
        return self._decode(feats, train, None)[0]

    def decode_shared(self, feats: Sequence[Array], partials: Sequence[Array | None] | None = None
                      ) -> tuple[Array, list[Array | None]]:
        """Inference decode that keeps what does not depend on the bottleneck: per decoder step,
        the first convolution's contribution of the skip channels (:func:`static_skip_channels`).

        Returns (logits, partials). Decoding a perturbed bottleneck with the same skips and the
        partials of the clean decode then convolves only the other channels of those layers;
        the result equals a full decode up to float rounding.
        """
        return self._decode(feats, False, partials, shared=True)

    def _decode(self, feats, train, partials, shared=False):
        s = self.spec
        x = feats[-1]
        kept = []
        for j in range(s.levels - 1):
            skip = feats[s.levels - 2 - j]
            up = self.upsamplers[j](x, skip.shape[1:3])
            # An exact nearest-2x upsampling is convolved at the low resolution. The two forms are
            # the same function of the parameters and the input, so gradients agree as well.
            upsampled = s.upsampling == "nearest" and skip.shape[1:3] == (2 * x.shape[1], 2 * x.shape[2])
            n_up, n_skip = up.shape[-1], skip.shape[-1]
            if s.upsampling == "deconv":
                x = skip + up
            elif s.skip_first:
                x = jnp.concatenate([skip, up], axis=-1)
            else:
                x = jnp.concatenate([up, skip], axis=-1)
            up_channels = ((n_skip, n_skip + n_up) if s.skip_first else (0, n_up)) if upsampled else None
            static = static_skip_channels(s, j) if shared else None
            if static is None:
                x = self.decoders[j](x, train, up=up_channels)
                kept.append(None)
            else:
                x, partial = self.decoders[j](x, train, static, None if partials is None else partials[j], up_channels)
                kept.append(partial)
        return self.final(x), kept

    def decode(self, feats: Sequence[Array], train: bool = False) -> Array:
        """Features per level -> output (b h w c_out) after the final activation."""
        return activate(self.spec, self.decode_logits(feats, train))

    def logits(self, x: Array, train: bool = False) -> Array:
        """Image -> output (b h w c_out) before the final activation."""
        return self.decode_logits(self.encode(x, train), train)

    def __call__(self, x: Array, train: bool = False) -> Array:
        return self.decode(self.encode(x, train), train)


def static_skip_channels(spec: UNetSpec, step: int) -> tuple[int, int] | None:
    """Input channels [lo, hi) of decoder step ``step``'s first convolution that depend on the skip
    only, after the norms and activations placed before that convolution; None if there are none.

    Activations, BatchNorm (inference) and InstanceNorm act per channel, so every skip channel
    qualifies. GroupNorm mixes the channels of a group: only groups lying wholly in the skip do.
    Decoders that add the skip (``deconv``) have none.
    """
    if spec.upsampling == "deconv":
        return None
    cin, _ = spec.decoder_channels(step)
    n_skip = spec.features[spec.levels - 2 - step]
    lo, hi = (0, n_skip) if spec.skip_first else (cin - n_skip, cin)
    before = spec.layer_order[:spec.layer_order.index("c")]
    if "g" in before:
        size = cin // spec.group_count(cin)
        lo, hi = -(-lo // size) * size, hi // size * size
    return (lo, hi) if hi > lo else None


def activate(spec: UNetSpec, logits: Array) -> Array:
    """The network's own output: ``logits`` after its final activation (unchanged without one)."""
    if spec.final_activation == "sigmoid":
        return jax.nn.sigmoid(logits)
    if spec.final_activation == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    return logits


def probabilities(spec: UNetSpec, logits: Array) -> Array:
    """Probabilities from ``logits``: the network's final activation, or a sigmoid when it has none.

    A network without a final activation outputs logits (e.g. torch-em models trained with the
    sigmoid inside the loss). Ranking, prediction and evaluation all threshold probabilities at
    0.5, so they all read a network's output through this one rule.
    """
    return activate(spec, logits) if spec.final_activation else jax.nn.sigmoid(logits)


def init_variables(spec: UNetSpec, key: Array, image_size: int = 64) -> dict:
    """Fresh variables ({'params', maybe 'batch_stats'}) for ``spec``."""
    side = max(image_size, spec.size_multiple)
    x = jnp.zeros((1, side, side, spec.in_channels), jnp.float32)
    # One compiled program: eager init dispatches (and compiles) every op on its own. Partitionable
    # threefry makes XLA:CPU compile each initialiser ~6x slower (45 s against 7 s for a 4-level
    # net here), and initial weights need no sharding.
    with jax.threefry_partitionable(False):
        return dict(jax.jit(UNet(spec).init)(key, x))


def abstract_variables(spec: UNetSpec) -> dict:
    """Shapes and dtypes of ``spec``'s variables, without allocating them."""
    return jax.eval_shape(lambda k: init_variables(spec, k), jax.random.key(0))


def check_size(spec: UNetSpec, height: int, width: int) -> None:
    """Raise ValueError if the network cannot take an image of this size."""
    m = spec.size_multiple
    if height < m or width < m:
        raise ValueError(f"image {height}x{width} is smaller than {m}x{m}, the minimum for {spec.levels} levels")
    if spec.needs_divisible_input and (height % m or width % m):
        raise ValueError(f"image {height}x{width}: sides must be multiples of {m} for {spec.upsampling} upsampling")
