"""pytorch-3dunet / PlantSeg ``UNet2D`` checkpoints -> cte_jax model directories.

The architecture comes from the user as pytorch-3dunet's own ``UNet2D`` keyword arguments
(``--arch``), with pytorch-3dunet's defaults; unknown keys are an error. It is checked against
the state dict name by name. Handled: any layer order built from ``c`` with ``g``/``b`` norms
and ``r``/``l``/``e`` activations (``d``/``D`` dropouts are identities in inference and
dropped), ``num_levels`` or a list ``f_maps``, ``num_groups``, ``upsample`` nearest / bilinear /
deconv, ``final_sigmoid`` and ``is_segmentation``, ``conv_upscale``, checkpoints wrapped in
``model_state_dict``, ``module.`` prefixes, and the old layout whose 2D U-Net was made of Conv3d
with (1, 3, 3) kernels (5-D weights).

Module names read (pytorch3dunet/unet3d/model.py, buildingblocks.py):
``encoders.{i}.basic_module.SingleConv{1,2}.{conv,groupnorm,batchnorm}.*``,
``decoders.{j}.basic_module.SingleConv{1,2}.*``, ``decoders.{j}.upsampling.upsample.conv_transposed.weight``
(deconv), ``final_conv.*``.

Two keys beyond pytorch-3dunet's are accepted, because pytorch-3dunet versions differ:
``leaky_relu_slope`` (LeakyReLU slope of ``l``: 0.01 by default, torch's default used by
pytorch-3dunet since it builds Conv2d; 0.1 by default for the old Conv3d layout) and
``groupnorm_small_channels`` (``"one"``: a layer with fewer channels than ``num_groups`` gets
one group, the default; ``"min"``: ``min(num_groups, channels)`` groups, some old versions).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from converters import _common as C
from converters import torch_pickle
from cte_jax.arch import UNetSpec
from cte_jax.errors import CTEError

FORMAT = "pytorch-3dunet"
DEFAULT_NORMALIZE = "zscore"  # pytorch-3dunet's and PlantSeg's default raw transform (Standardize)

# pytorch-3dunet UNet2D / AbstractUNet keyword arguments and their defaults. in_channels and
# out_channels have no default there; here they are read off the weights when not given.
DEFAULTS: dict[str, Any] = {
    "in_channels": None,
    "out_channels": None,
    "final_sigmoid": True,
    "f_maps": 64,
    "layer_order": "gcr",
    "num_groups": 8,
    "num_levels": 4,
    "is_segmentation": True,
    "conv_kernel_size": 3,
    "pool_kernel_size": 2,
    "conv_padding": 1,
    "conv_upscale": 2,
    "upsample": "default",
    "dropout_prob": 0.1,
    "is3d": False,
    "name": "UNet2D",
}
EXTENSIONS: dict[str, Any] = {"leaky_relu_slope": None, "groupnorm_small_channels": "one"}
ALIASES = {"upsampling": "upsample"}
_PREFIX = "encoders.0.basic_module.SingleConv1.conv.weight"


def _is(value: Any, *allowed) -> bool:
    v = list(value) if isinstance(value, (list, tuple)) else value
    return any(v == a for a in allowed)


def _norm_key(order: str) -> str | None:
    if "g" in order:
        return "groupnorm"
    if "b" in order:
        return "batchnorm"
    return None


def parse_arch(arch: Any, source=None) -> dict[str, Any]:
    """``--arch`` (dict, inline JSON/YAML or a file) -> complete kwargs with pytorch-3dunet's defaults."""
    given = C.parse_kwargs_text(arch)
    kwargs = dict(DEFAULTS, **EXTENSIONS)
    for key, value in given.items():
        name = ALIASES.get(key, key)
        if name not in kwargs:
            known = sorted(set(DEFAULTS) | set(EXTENSIONS) | set(ALIASES))
            raise CTEError(f"unknown UNet2D argument {key!r} in --arch; known: {', '.join(known)}", source)
        if name != key and name in given:
            raise CTEError(f"--arch gives both {key!r} and {name!r}", source)
        kwargs[name] = value
    return kwargs


def spec_from_kwargs(kwargs: Mapping[str, Any], state: Mapping[str, np.ndarray] | None = None,
                     source=None) -> UNetSpec:
    """The :class:`UNetSpec` of pytorch-3dunet ``UNet2D(**kwargs)`` (kwargs completed by
    :func:`parse_arch`); channels missing from kwargs are read from ``state``."""
    k = dict(kwargs)

    def bad(msg):
        return CTEError(f"--arch: {msg}", source)

    if k["name"] not in ("UNet2D", None):
        raise bad(f"name {k['name']!r}: only pytorch-3dunet's UNet2D is supported")
    if k["is3d"]:
        raise bad("is3d=true: only 2D U-Nets are supported")
    if not _is(k["conv_kernel_size"], 3, [3, 3], [1, 3, 3]):
        raise bad(f"conv_kernel_size {k['conv_kernel_size']!r}: only 3x3 convolutions are supported")
    if not _is(k["conv_padding"], 1, [1, 1], [0, 1, 1]):
        raise bad(f"conv_padding {k['conv_padding']!r}: only padding 1 ('same') is supported")
    if not _is(k["pool_kernel_size"], 2, [2, 2], [1, 2, 2]):
        raise bad(f"pool_kernel_size {k['pool_kernel_size']!r}: only 2x2 pooling is supported")
    order = str(k["layer_order"])
    stripped = order.replace("d", "").replace("D", "")  # dropout: identity in inference
    if any(ch not in "cgbrle" for ch in stripped) or stripped.count("c") != 1:
        raise bad(f"layer_order {order!r}: pytorch-3dunet orders use one 'c' and letters from g, b, r, l, e, d, D")
    if stripped[0] in "rle":
        raise bad(f"layer_order {order!r}: a non-linearity cannot come first (pytorch-3dunet)")
    upsample = k["upsample"]
    modes = {"default": "nearest", "nearest": "nearest", "bilinear": "bilinear", "deconv": "deconv_concat"}
    if upsample not in modes:
        raise bad(f"upsample {upsample!r}: supported are default, nearest, bilinear, deconv")
    f_maps = k["f_maps"]
    if isinstance(f_maps, bool) or not isinstance(f_maps, (int, list, tuple)):
        raise bad(f"f_maps {f_maps!r} must be an int or a list of ints")
    if isinstance(f_maps, int):
        levels = k["num_levels"]
        if not isinstance(levels, int) or levels < 2:
            raise bad(f"num_levels {levels!r} must be an int >= 2")
        features = [f_maps * 2 ** i for i in range(levels)]
    else:
        features = [int(f) for f in f_maps]
    if len(features) < 2:
        raise bad("at least 2 levels are needed (pytorch-3dunet)")
    if modes[upsample] == "deconv_concat":
        for a, b in zip(features[:-1], features[1:]):
            if b != 2 * a:
                raise bad(f"upsample 'deconv' needs each level to double the features (pytorch-3dunet feeds the "
                          f"{b}-channel decoder conv with [skip, upsampled] = {2 * a} channels); f_maps {features}")
    old_layout = bool(state) and _PREFIX in state and np.ndim(state[_PREFIX]) == 5
    cin, cout = k["in_channels"], k["out_channels"]
    if cin is None:
        if not state or _PREFIX not in state:
            raise CTEError(f"the weights have no {_PREFIX!r} to read in_channels from: they are not a "
                           f"pytorch-3dunet UNet2D (first names: {sorted(state or {})[:4]}); {C.NOT_THIS_NETWORK}",
                           source)
        cin = int(np.shape(state[_PREFIX])[1])
    if cout is None:
        if not state or "final_conv.weight" not in state:
            raise CTEError(f"the weights have no 'final_conv.weight' to read out_channels from: they are not a "
                           f"pytorch-3dunet UNet2D (first names: {sorted(state or {})[:4]}); {C.NOT_THIS_NETWORK}",
                           source)
        cout = int(np.shape(state["final_conv.weight"])[0])
    if not k["is_segmentation"]:
        final = None
    else:
        final = "sigmoid" if k["final_sigmoid"] else "softmax"
    slope = k["leaky_relu_slope"]
    if slope is None:
        slope = 0.1 if old_layout else 0.01
    rule = k["groupnorm_small_channels"]
    if rule not in ("one", "min"):
        raise bad(f"groupnorm_small_channels {rule!r} is not 'one' or 'min'")
    try:
        return UNetSpec(
            in_channels=int(cin), out_channels=int(cout), features=tuple(features), layer_order=stripped,
            num_groups=int(k["num_groups"]), encoder_mid="full" if k["conv_upscale"] == 1 else "half",
            upsampling=modes[upsample], skip_first=True, final_activation=final, leaky_slope=float(slope),
            group_rule=rule)
    except (TypeError, ValueError) as e:
        raise bad(str(e)) from None


def entries(spec: UNetSpec) -> list[C.Entry]:
    """Where every variable of ``spec`` comes from in a pytorch-3dunet state dict."""
    norm = _norm_key(spec.layer_order)
    es: list[C.Entry] = []
    for i in range(spec.levels):
        for u in range(2):
            base = f"encoders.{i}.basic_module.SingleConv{u + 1}"
            es += C.conv_unit_entries(spec, (f"encoders_{i}", f"unit_{u}"), base + ".conv",
                                      base + f".{norm}" if norm else None)
    for j in range(spec.levels - 1):
        for u in range(2):
            base = f"decoders.{j}.basic_module.SingleConv{u + 1}"
            es += C.conv_unit_entries(spec, (f"decoders_{j}", f"unit_{u}"), base + ".conv",
                                      base + f".{norm}" if norm else None)
        if spec.upsampling == "deconv_concat":
            es.append(C.Entry(("params", f"upsamplers_{j}", "kernel"),
                              f"decoders.{j}.upsampling.upsample.conv_transposed.weight", "deconv"))
            es.append(C.Entry(("params", f"upsamplers_{j}", "bias"), "", "zeros"))
    return es + C.final_entries("final_conv")


def from_state_dict(state: Mapping[str, np.ndarray], arch: Any = None, *, source: str | os.PathLike = "<state dict>"
                    ) -> tuple[UNetSpec, dict]:
    """(spec, Flax variables) of a pytorch-3dunet UNet2D state dict (already unwrapped)."""
    kwargs = parse_arch(arch, source)
    state = torch_pickle.unwrap_state_dict(dict(state), source)
    spec = spec_from_kwargs(kwargs, state, source)
    return spec, C.assemble(spec, state, entries(spec), source, what=f"UNet2D architecture ({_summary(kwargs)})")


def _summary(kwargs: Mapping[str, Any]) -> str:
    keys = ("f_maps", "layer_order", "upsample") if isinstance(kwargs.get("f_maps"), (list, tuple)) else \
        ("f_maps", "num_levels", "layer_order", "upsample")
    shown = {k: kwargs[k] for k in keys if k in kwargs}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def convert(source: str | os.PathLike, *, arch: Any = None, normalize: Any = None, out: str | os.PathLike | None,
            bank: str | os.PathLike | None = None, overwrite: bool = False, task: str = "foreground",
            channel: int = 0) -> Path:
    """Convert a pytorch-3dunet ``UNet2D`` checkpoint (``.pt``/``.pth``/``.pytorch``) to a model directory.

    Args:
      source: the checkpoint (a state dict, or a dict holding one under ``model_state_dict``).
      arch: pytorch-3dunet ``UNet2D`` kwargs: dict, inline JSON/YAML, or a JSON/YAML file.
      normalize: ``percentile:LO,HI`` | ``zscore`` | ``minmax:A,B`` | ``none`` (default zscore).
      out: the model directory to write (its name is the model's name).
      bank: a bank directory to put the model in (``out`` is then a name inside it).
      overwrite: replace an existing directory.
      task, channel: what the scored output channel means, and which channel it is.

    Returns:
      The model directory written.

    Raises:
      CTEError: unreadable file, bad --arch, weights that do not fit (listed by name).
    """
    return C.convert_checkpoint(source, from_state_dict=from_state_dict, converter=f"converters.pytorch_3dunet ({FORMAT})",
                                default_normalize=DEFAULT_NORMALIZE, arch=arch, normalize=normalize, out=out,
                                bank=bank, overwrite=overwrite, task=task, channel=channel)
