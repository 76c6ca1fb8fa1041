"""torch-em ``UNet2d`` state dicts -> cte_jax model directories.

torch-em's ``UNet2d(in_channels, out_channels, depth=4, initial_features=32, gain=2,
final_activation=None, ...)`` (torch_em/model/unet.py): ``depth`` encoder blocks plus a base,
features ``initial_features * gain**i``, each block ``[norm] conv3x3 ReLU [norm] conv3x3 ReLU``,
decoder samplers = bilinear x2 then a 1x1 conv, joined as ``[upsampled, skip]``. The norm
(``norm`` keyword: ``InstanceNorm`` (no affine), ``InstanceNormTrackStats``, ``GroupNorm`` with
``min(32, channels)`` groups, ``BatchNorm``, or None) is read off the weights when not given,
because torch-em's default changed between versions. Module names read:
``encoder.blocks.{i}.block.{k}``, ``base.block.{k}``, ``decoder.blocks.{j}.block.{k}``,
``decoder.samplers.{j}.conv``, ``out_conv``.
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

FORMAT = "torch-em"
DEFAULT_NORMALIZE = "zscore"  # torch-em's default raw transform (standardize)

DEFAULTS: dict[str, Any] = {
    "in_channels": None,
    "out_channels": None,
    "depth": 4,
    "initial_features": 32,
    "gain": 2,
    "final_activation": None,
    "return_side_outputs": False,
    "postprocessing": None,
    "norm": "infer",
    "kernel_size": 3,
    "padding": 1,
    "anisotropic_kernel": False,
    "check_shape": True,
    "conv_block_impl": None,
    "pooler_impl": None,
    "sampler_impl": None,
}
NORMS = ("InstanceNorm", "InstanceNormTrackStats", "GroupNorm", "BatchNorm", None)
_FIRST = "encoder.blocks.0.block"


def parse_arch(arch: Any, source=None) -> dict[str, Any]:
    given = C.parse_kwargs_text(arch)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise CTEError(f"unknown UNet2d argument(s) {unknown}; known: {', '.join(sorted(DEFAULTS))}", source)
    return dict(DEFAULTS, **given)


def infer_norm(state: Mapping[str, np.ndarray]) -> str | None:
    """The torch-em ``norm`` a state dict was trained with, from its first block."""
    w0 = state.get(f"{_FIRST}.0.weight")
    if w0 is not None and np.ndim(w0) == 4:
        return None
    if f"{_FIRST}.0.running_mean" in state:
        return "BatchNorm"  # InstanceNormTrackStats has the same weights and the same inference maths
    if w0 is not None:
        return "GroupNorm"
    return "InstanceNorm"


def _final(name: Any, source) -> str | None:
    if name is None:
        return None
    table = {"Sigmoid": "sigmoid", "Softmax": "softmax", "Softmax2d": "softmax"}
    if name not in table:
        raise CTEError(f"final_activation {name!r}: supported are None, 'Sigmoid', 'Softmax'", source)
    return table[name]


def spec_from_kwargs(kwargs: Mapping[str, Any], state: Mapping[str, np.ndarray] | None = None,
                     source=None) -> tuple[UNetSpec, str | None]:
    """(spec, norm) of torch-em ``UNet2d(**kwargs)``; channels and norm read from ``state`` when absent."""
    k = dict(kwargs)

    def bad(msg):
        return CTEError(f"torch-em UNet2d: {msg}", source)

    if k["return_side_outputs"]:
        raise bad("return_side_outputs=true is not supported")
    if k["postprocessing"] is not None:
        raise bad(f"postprocessing {k['postprocessing']!r} inside the network is not supported")
    for impl, ok in (("conv_block_impl", "ConvBlock2d"), ("pooler_impl", "MaxPool2d"), ("sampler_impl", "Upsampler2d")):
        if k[impl] is not None and not str(k[impl]).endswith(ok):
            raise bad(f"{impl}={k[impl]!r}: only torch-em's default {ok} is supported")
    if k["kernel_size"] != 3 or k["padding"] != 1:
        raise bad("only kernel_size=3, padding=1 are supported")
    depth, init, gain = k["depth"], k["initial_features"], k["gain"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (depth, init, gain)) or depth < 1 or init < 1 or gain < 1:
        raise bad(f"depth, initial_features, gain must be positive ints, got {depth!r}, {init!r}, {gain!r}")
    if gain != 2:
        # torch-em's decoder block i takes features[i] channels but is fed [upsampled, skip] =
        # 2 * features[i + 1]: only gain 2 gives a network that runs.
        raise bad(f"gain {gain}: torch-em UNet2d only runs with gain 2")
    features = tuple(init * gain ** i for i in range(depth + 1))
    norm = k["norm"]
    if norm == "infer":
        norm = infer_norm(state or {})
    if norm not in NORMS:
        raise bad(f"norm {norm!r} is not one of {NORMS}")
    cin, cout = k["in_channels"], k["out_channels"]
    conv0 = f"{_FIRST}.{0 if norm is None else 1}.weight"
    if cin is None:
        if not state or conv0 not in state:
            raise bad(f"the weights have no {conv0!r} to read in_channels from: they are not a torch-em UNet2d "
                      f"(first names: {sorted(state or {})[:4]}); {C.NOT_THIS_NETWORK}")
        cin = int(np.shape(state[conv0])[1])
    if cout is None:
        if not state or "out_conv.weight" not in state:
            raise bad(f"the weights have no 'out_conv.weight' to read out_channels from: they are not a torch-em "
                      f"UNet2d (first names: {sorted(state or {})[:4]}); {C.NOT_THIS_NETWORK}")
        cout = int(np.shape(state["out_conv.weight"])[0])
    order = {None: "cr", "InstanceNorm": "icr", "GroupNorm": "gcr", "BatchNorm": "bcr", "InstanceNormTrackStats": "bcr"}[norm]
    try:
        spec = UNetSpec(in_channels=int(cin), out_channels=int(cout), features=features, layer_order=order,
                        num_groups=32, group_rule="min", conv_bias_always=True, encoder_mid="full",
                        upsampling="bilinear_conv", skip_first=False, final_activation=_final(k["final_activation"], source))
    except (TypeError, ValueError) as e:
        raise bad(str(e)) from None
    return spec, norm


def entries(spec: UNetSpec, norm: str | None) -> list[C.Entry]:
    conv_idx = (0, 2) if norm is None else (1, 4)
    norm_idx = (None, None) if norm is None else (0, 3)
    depth = spec.levels - 1
    es: list[C.Entry] = []

    def block(ours, prefix):
        out = []
        for u in range(2):
            nk = None if norm_idx[u] is None else f"{prefix}.block.{norm_idx[u]}"
            out += C.conv_unit_entries(spec, (ours, f"unit_{u}"), f"{prefix}.block.{conv_idx[u]}", nk)
        return out

    for i in range(depth):
        es += block(f"encoders_{i}", f"encoder.blocks.{i}")
    es += block(f"encoders_{depth}", "base")
    for j in range(depth):
        es += block(f"decoders_{j}", f"decoder.blocks.{j}")
        es.append(C.Entry(("params", f"upsamplers_{j}", "conv", "kernel"), f"decoder.samplers.{j}.conv.weight", "conv"))
        es.append(C.Entry(("params", f"upsamplers_{j}", "conv", "bias"), f"decoder.samplers.{j}.conv.bias", "vec"))
    return es + C.final_entries("out_conv")


def from_state_dict(state: Mapping[str, np.ndarray], arch: Any = None, *, source: str | os.PathLike = "<state dict>"
                    ) -> tuple[UNetSpec, dict]:
    """(spec, Flax variables) of a torch-em UNet2d state dict."""
    kwargs = parse_arch(arch, source)
    state = torch_pickle.unwrap_state_dict(dict(state), source)
    spec, norm = spec_from_kwargs(kwargs, state, source)
    what = f"torch-em UNet2d(depth={kwargs['depth']}, initial_features={kwargs['initial_features']}, norm={norm})"
    return spec, C.assemble(spec, state, entries(spec, norm), source, what=what)


def convert(source: str | os.PathLike, *, arch: Any = None, normalize: Any = None, out: str | os.PathLike | None,
            bank: str | os.PathLike | None = None, overwrite: bool = False, task: str = "foreground",
            channel: int = 0) -> Path:
    """Convert a torch-em ``UNet2d`` state dict to a model directory.

    Args and raises as :func:`converters.pytorch_3dunet.convert`; ``arch`` holds torch-em
    ``UNet2d`` kwargs (``depth``, ``initial_features``, ``gain``, ``final_activation``, ``norm``...).
    """
    return C.convert_checkpoint(source, from_state_dict=from_state_dict, converter=f"converters.torch_em ({FORMAT})",
                                default_normalize=DEFAULT_NORMALIZE, arch=arch, normalize=normalize, out=out,
                                bank=bank, overwrite=overwrite, task=task, channel=channel)
