"""ONNX U-Nets -> cte_jax model directories: grey-box when recognised, black-box otherwise.

The weights are read from the graph's initializers with the ``onnx`` package (no torch). A graph
is *recognised* when its initializer names are those of a known U-Net family
(:mod:`converters._families`: pytorch-3dunet, torch-em, bioimage.io's example UNet2d), its
activation and final activation are read off its nodes, and -- when onnxruntime is installed --
the converted Flax network reproduces the graph's output on a random input (max abs difference
<= 1e-3 relative to the output's scale). A graph that is not recognised, or any graph with
``black_box=True``, becomes a black-box model: model.json + the ONNX file, run by onnxruntime
(:mod:`cte_jax.blackbox`) and scored with input perturbations only.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from converters import _common as C
from converters import _families
from cte_jax.arch import UNetSpec
from cte_jax.errors import CTEError

FORMAT = "onnx"
DEFAULT_NORMALIZE = "zscore"
VERIFY_TOLERANCE = 1e-3


class NotRecognised(Exception):
    """The graph is not a U-Net this converter can rebuild (the reason is the message)."""


@dataclasses.dataclass
class GraphFacts:
    """What the nodes of an ONNX graph say about the network."""

    input_name: str
    input_shape: list  # ints, or None for dynamic dims
    output_name: str
    output_shape: list
    op_counts: dict[str, int]
    activation: str | None  # r / l / e: the inner activation
    leaky_slope: float | None
    final_activation: str | None  # sigmoid / softmax applied at the output, or None
    n_activations: int


def _onnx():
    try:
        import onnx
    except ImportError:
        raise CTEError("reading ONNX weights needs the 'onnx' package (pip install 'cte-jax[onnx]')") from None
    return onnx


def load(path: str | os.PathLike):
    """The ONNX ModelProto (external data loaded from beside the file)."""
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise CTEError("file not found", path)
    try:
        model = onnx.load(os.fspath(path), load_external_data=True)
    except Exception as e:  # protobuf raises DecodeError and friends for damaged files
        hint = " (a PyTorch file? use --format torch-em or pytorch-3dunet)" if path.suffix.lower() in (
            ".pt", ".pth", ".pytorch") else " (truncated or damaged?)"
        raise CTEError(f"unreadable ONNX file{hint}: {type(e).__name__}: {str(e)[:200]}", path) from None
    if not model.graph.node:
        raise CTEError("ONNX file with an empty graph (truncated or damaged?)", path)
    return model


def initializers(model) -> dict[str, np.ndarray]:
    """name -> array of every initializer of the graph."""
    from onnx import numpy_helper

    return {init.name: np.array(numpy_helper.to_array(init)) for init in model.graph.initializer}


def _dims(value_info) -> list:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None)
    return dims


def output_activation(model) -> str | None:
    """``sigmoid`` / ``softmax`` when the graph's (first) output comes out of one, looking through
    Identity and Cast nodes; None when it is anything else, i.e. the graph outputs logits."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    node = producers.get(g.output[0].name) if g.output else None
    while node is not None and node.op_type in ("Identity", "Cast") and node.input:
        node = producers.get(node.input[0])
    if node is not None and node.op_type in ("Sigmoid", "Softmax"):
        return node.op_type.lower()
    return None


def graph_facts(model, path=None) -> GraphFacts:
    g = model.graph
    init_names = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in init_names]
    if len(inputs) != 1 or len(g.output) != 1:
        raise NotRecognised(f"{len(inputs)} inputs and {len(g.output)} outputs (a U-Net has one of each)")
    counts = collections.Counter(n.op_type for n in g.node)
    acts = {"Relu": "r", "LeakyRelu": "l", "Elu": "e"}
    present = [a for a in acts if counts.get(a)]
    final = output_activation(model)
    if len(present) > 1:
        raise NotRecognised(f"several activation kinds {present}")
    if counts.get("Sigmoid", 0) - (final == "sigmoid") > 0 or counts.get("Softmax", 0) - (final == "softmax") > 0:
        raise NotRecognised("sigmoid/softmax inside the network")
    slope = None
    if present == ["LeakyRelu"]:
        alphas = set()
        for n in g.node:
            if n.op_type == "LeakyRelu":
                a = [at.f for at in n.attribute if at.name == "alpha"]
                alphas.add(round(a[0], 7) if a else 0.01)
        if len(alphas) != 1:
            raise NotRecognised(f"LeakyRelu with several slopes {sorted(alphas)}")
        slope = alphas.pop()
    if present == ["Elu"]:
        for n in g.node:
            a = [at.f for at in n.attribute if at.name == "alpha" and n.op_type == "Elu"]
            if a and abs(a[0] - 1.0) > 1e-6:
                raise NotRecognised(f"Elu with alpha {a[0]} (only 1 is supported)")
    return GraphFacts(
        input_name=inputs[0].name, input_shape=_dims(inputs[0]), output_name=g.output[0].name,
        output_shape=_dims(g.output[0]), op_counts=dict(counts), activation=acts[present[0]] if present else None,
        leaky_slope=slope, final_activation=final, n_activations=sum(counts.get(a, 0) for a in acts))


def _verify_input_shape(facts: GraphFacts, spec: UNetSpec) -> tuple[int, ...]:
    dims = list(facts.input_shape)
    if len(dims) != 4:
        raise NotRecognised(f"input of rank {len(dims)} (expected b c y x)")
    side = max(16, spec.size_multiple * 2)
    b = dims[0] or 1
    c = dims[1] or spec.in_channels
    h = dims[2] or side
    w = dims[3] or side
    if c != spec.in_channels:
        raise NotRecognised(f"input has {c} channels, the weights {spec.in_channels}")
    return (b, c, h, w)


def verify(path: Path, model, facts: GraphFacts, spec: UNetSpec, variables: dict) -> float | None:
    """Max abs difference between onnxruntime and the Flax network on a random input, or None
    without onnxruntime. Raises NotRecognised above the tolerance."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import jax

    from cte_jax.networks import UNet

    shape = _verify_input_shape(facts, spec)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        ref = sess.run([facts.output_name], {facts.input_name: x})[0]
    except Exception as e:
        raise CTEError(f"onnxruntime cannot run the graph: {type(e).__name__}: {str(e)[:200]}", path) from None
    y = np.asarray(jax.jit(UNet(spec).apply)(variables, x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    if ref.shape != y.shape:
        raise NotRecognised(f"output shape {ref.shape} but the rebuilt network gives {y.shape}")
    diff = float(np.max(np.abs(ref - y)))
    if not diff <= VERIFY_TOLERANCE * max(1.0, float(np.max(np.abs(ref)))):
        raise NotRecognised(f"the rebuilt network differs from the graph by {diff:.3g}")
    return diff


def from_onnx(path: str | os.PathLike, *, kwargs: Mapping[str, Any] | None = None, check: bool = True
              ) -> tuple[UNetSpec, dict, dict]:
    """(spec, variables, facts) of a recognised ONNX U-Net; NotRecognised (with the reason) if not.

    Args:
      kwargs: the family's constructor kwargs when known (``--arch``, or a bioimage.io
        description); otherwise read off the weights and the graph.
      check: run the numerical check against onnxruntime (when installed).
    """
    path = Path(path)
    model = load(path)
    facts = graph_facts(model, path)
    state = initializers(model)
    family = _families.detect(state)
    if family is None:
        raise NotRecognised("initializer names are not those of a known U-Net family "
                            f"(first names: {sorted(state)[:4]})")
    # initializers that are not weights (shape constants, resize scales) are left out
    state = {k: v for k, v in state.items() if np.issubdtype(v.dtype, np.floating) and v.ndim >= 1
             and not k.startswith(("onnx::", "/"))}
    inner = True
    if family == "unet2d-example":
        blocks = 2 * (_families._count(state, r"encoders\.(\d+)\.")) + 1
        if facts.n_activations == blocks:
            inner = False
        elif facts.n_activations != 2 * blocks:
            raise NotRecognised(f"{facts.n_activations} activations for {blocks} double convs")
    try:
        spec, variables = _families.build(family, state, kwargs, source=path, final_activation=facts.final_activation,
                                          activation=facts.activation or "r", leaky_slope=facts.leaky_slope,
                                          inner_activation=inner)
    except CTEError as e:
        raise NotRecognised(e.problem) from None
    info = {"family": family, "activation": facts.activation, "final_activation": facts.final_activation}
    if check:
        diff = verify(path, model, facts, spec, variables)
        info["verified_max_abs_diff"] = diff
    return spec, variables, info


def black_box_description(path: Path, *, final_activation: str | None, normalization: dict, task: str,
                          channel: int, provenance: dict, axes: str = "bcyx", model=None) -> dict:
    """model.json fields of a black-box ONNX model (the converter adds format, name and 'onnx');
    ``model``: the graph already loaded from ``path``, if the caller has it."""
    model = load(path) if model is None else model
    g = model.graph
    init_names = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in init_names]
    if len(inputs) != 1 or len(g.output) < 1:
        raise CTEError(f"ONNX graph with {len(inputs)} inputs: black-box models take one image input", path)
    in_shape = _dims(inputs[0])
    out_shape = _dims(g.output[0])
    if len(in_shape) != len(axes):
        raise CTEError(f"ONNX input of rank {len(in_shape)} does not match axes {axes!r}", path)
    cin = in_shape[axes.index("c")] if "c" in axes else 1
    cout = out_shape[axes.index("c")] if "c" in axes and len(out_shape) == len(axes) else None
    if cout is not None and not 0 <= channel < cout:
        raise CTEError(f"channel {channel} but the graph has {cout} output channels", path)
    return {
        "task": task, "channel": channel, "preprocessing": normalization, "provenance": provenance,
        "postprocessing": final_activation,
        "onnx_io": {"input": inputs[0].name, "output": g.output[0].name, "axes": axes,
                    "input_shape": in_shape, "output_shape": out_shape, "in_channels": cin, "out_channels": cout},
    }


def convert(source: str | os.PathLike, *, arch: Any = None, normalize: Any = None, out: str | os.PathLike | None,
            bank: str | os.PathLike | None = None, overwrite: bool = False, black_box: bool = False,
            task: str = "foreground", channel: int = 0) -> Path:
    """Convert an ONNX U-Net (b c y x input) to a grey-box model directory when recognised, else
    (or with ``black_box``) to a black-box one.

    Args: as :func:`converters.convert`; ``arch`` holds the family's kwargs when the graph was
    exported from pytorch-3dunet or torch-em and the weights alone do not tell them.
    """
    source = Path(source)
    target = C.resolve_out(out, bank, source.stem)
    if target.exists() and not overwrite:
        raise CTEError("already exists (choose another --out, remove it, or pass --overwrite)", target)
    kwargs = C.parse_kwargs_text(arch) or None
    sha = C.sha256_of(source)
    provenance: dict[str, Any] = {"converter": f"converters.onnx_model ({FORMAT})", "source": str(source.resolve()),
                                  "sha256": sha, "normalization_from": "--normalize" if normalize is not None
                                  else f"default ({DEFAULT_NORMALIZE})"}
    reason = "--black-box"
    if not black_box:
        try:
            spec, variables, info = from_onnx(source, kwargs=kwargs)
        except NotRecognised as e:
            reason = str(e)
        else:
            norm = C.normalization_dict(normalize, default=DEFAULT_NORMALIZE, in_channels=spec.in_channels, source=source)
            provenance.update(info)
            return C.write_grey_box(out=target, spec=spec, variables=variables, normalization=norm,
                                    provenance=provenance, task=task, channel=channel, overwrite=overwrite)
    model = load(source)
    in_shape = _dims([i for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}][0])
    cin = in_shape[1] if len(in_shape) == 4 and in_shape[1] else 1
    norm = C.normalization_dict(normalize, default=DEFAULT_NORMALIZE, in_channels=cin, source=source)
    provenance["black_box_reason"] = reason
    graph_final = output_activation(model)
    provenance["graph_final_activation"] = graph_final
    # The graph's own sigmoid/softmax is part of the graph: nothing to add after it. A graph that
    # ends anywhere else outputs logits, which get the sigmoid a grey-box network without a final
    # activation gets (cte_jax.networks.probabilities).
    desc = black_box_description(source, final_activation=None if graph_final else "sigmoid", normalization=norm,
                                 task=task, channel=channel, provenance=provenance, model=model)
    return C.write_black_box(out=target, onnx_file=source, description=desc, overwrite=overwrite)
