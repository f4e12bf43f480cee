"""Float rewrites that let static mode keep a CNN in onnxruntime's integer kernels, made before the
QDQ pairs go in (onnxruntime has no integer kernel for BatchNormalization, HardSigmoid, HardSwish
or Div, so each of them used to cost a DequantizeLinear, a float op and a QuantizeLinear):

- BatchNormalization right after a Conv is folded into the Conv's weight and bias, and so is a Mul,
  Add or Sub by a constant with one value per output channel (PP-LCNetV3's learnable affine after
  each Conv: PP-OCRv4 det has 28 Mul + Add pairs);
- HardSigmoid(x; a, b) with a > 0 becomes a * Clip(x + b/a, 0, 1/a): QLinearAdd, a Clip the
  QuantizeLinear's saturation does, and a positive scalar Mul;
- HardSwish(x) becomes (x * Clip(x + 3, 0, 6)) * 1/6 the same way.

A positive scalar Mul or Div after a quantized tensor is then no op at all: ``fold_rescales``
(after the QDQ pairs are in) gives the readers a DequantizeLinear with the scale multiplied, which
is exact: (q - z) * s * k == ((q - z) * s) * k.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.graph.names import NameAllocator
from optimizer.graph.weights import weight_values
from optimizer.pass_base import PassReport
from passes.quantize.common import float_constant

CONV_OPS = ("Conv",)
PRODUCERS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "GlobalAveragePool", "AveragePool")
RESCALE_OPS = ("Mul", "Div")
OPSET_CLIP_INPUTS = 11


def fold_batch_norms(graph: gs.Graph, report: PassReport) -> None:
    """Every BatchNormalization, and every per-channel constant Mul/Add/Sub, right after a Conv of the
    main graph, folded into it. In every mode: onnxruntime folds them at load anyway (when the weight is
    float), and their parameter vectors are float bytes the file need not carry (the layout detector: 94
    BatchNorms, 204 KB, 0.290 -> 0.27 of fp32 weight-only); static mode also saves their integer kernels
    and requantizations. The per-channel int8 rounding of the folded weight has the same relative error
    as the unfolded one's."""
    names = NameAllocator(graph, reserve_node_names=True)
    readers = _reader_counts(graph)
    for node in list(graph.nodes):
        if node.op == "BatchNormalization" and _fold_batchnorm(graph, node, readers, names):
            report.count("batchnorms_folded")
        elif node.op in ("Mul", "Add", "Sub") and _fold_channel_constant(graph, node, readers, names):
            report.count("channel_constants_folded")


def prepare_integer_forms(graph: gs.Graph, report: PassReport) -> None:
    """The activation rewrites above, in the main graph (subgraph bodies stay weight-only in static
    mode); BatchNorm is folded before, in every mode (``fold_batch_norms``)."""
    if int(graph.opset) < OPSET_CLIP_INPUTS:
        return
    names = NameAllocator(graph, reserve_node_names=True)
    constants: dict[tuple[str, float], gs.Constant] = {}  # one per value: one DequantizeLinear in static mode
    for node in list(graph.nodes):
        if (
            node.op in ("HardSigmoid", "HardSwish")
            and _worth_rewriting(node)
            and _split_hard_activation(graph, node, names, constants)
        ):
            report.count(f"{node.op.lower()}_rewritten")


def rescale_factor(node: gs.Node) -> float | None:
    """k when ``node`` multiplies its first input by a positive scalar constant k (Mul by k or
    Div by 1/k, the constant on either side of a Mul); else None."""
    if node.op not in RESCALE_OPS or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    slots = (1,) if node.op == "Div" else (1, 0)
    for slot in slots:
        values = weight_values(node.inputs[slot])
        if values is None or np.asarray(values).size != 1 or np.asarray(values).dtype != np.float32:
            continue
        value = float(np.asarray(values).reshape(()))
        if not np.isfinite(value) or value <= 0.0:
            return None
        if weight_values(node.inputs[1 - slot]) is not None:
            return None
        return 1.0 / value if node.op == "Div" else value
    return None


def rescaled_slot(node: gs.Node) -> int:
    """The input slot of the activation a rescale op multiplies (the non-constant one)."""
    return 1 if node.op == "Mul" and weight_values(node.inputs[1]) is None else 0


def rescaled_input(node: gs.Node) -> gs.Tensor:
    return node.inputs[rescaled_slot(node)]


Rescale = tuple[gs.Node, int, float]


def plan_rescales(nodes: list[gs.Node]) -> list[Rescale]:
    """The positive scalar Mul/Div among ``nodes``, read before QDQ insertion rewires their inputs."""
    found = []
    for node in nodes:
        factor = rescale_factor(node)
        if factor is not None:
            found.append((node, rescaled_slot(node), factor))
    return found


def fold_rescales(graph: gs.Graph, rescales: list[Rescale], names: NameAllocator, report: PassReport) -> None:
    """After QDQ insertion: DequantizeLinear(x_q, s, z) -> Mul k -> QuantizeLinear -> DequantizeLinear
    becomes DequantizeLinear(x_q, s * k, z), so onnxruntime runs no float op between integer kernels."""
    outputs = {id(t) for t in graph.outputs}
    for node, slot, factor in rescales:
        source = node.inputs[slot] if len(node.inputs) > slot else None
        if source is None or len(source.inputs) != 1:
            continue
        dequantize = source.inputs[0]
        result = node.outputs[0]
        quantizers = list(result.outputs)
        if dequantize.op != "DequantizeLinear" or id(result) in outputs or len(quantizers) != 1:
            continue
        if quantizers[0].op != "QuantizeLinear" or id(quantizers[0].outputs[0]) in outputs:
            continue
        scale = weight_values(dequantize.inputs[1])
        if scale is None or np.asarray(scale).size != 1:
            continue
        new_scale = float_constant(
            names.fresh(result.name, "_scale"), np.asarray(scale, np.float32) * np.float32(factor)
        )
        for reader in list(quantizers[0].outputs[0].outputs):
            if reader.op == "DequantizeLinear":
                replacement = [dequantize.inputs[0], new_scale, *dequantize.inputs[2:]]
                reader.inputs.clear()
                reader.inputs.extend(replacement)
        report.count("rescales_folded_into_scale")


def _reader_counts(graph: gs.Graph) -> dict[int, int]:
    counts: dict[int, int] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            counts[id(tensor)] = counts.get(id(tensor), 0) + 1
    for tensor in graph.outputs:
        counts[id(tensor)] = counts.get(id(tensor), 0) + 1
    return counts


def _fold_batchnorm(graph: gs.Graph, node: gs.Node, readers: dict[int, int], names: NameAllocator) -> bool:
    """Conv -> BatchNormalization (inference form, constant statistics) into one Conv."""
    if len(node.outputs) != 1 or int(node.attrs.get("training_mode", 0)):
        return False
    conv = _sole_conv(node.inputs[0], readers)
    params = [weight_values(t) for t in node.inputs[1:5]]
    if conv is None or any(p is None for p in params):
        return False
    gamma, beta, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
    factor = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    return _fold_affine(conv, node, factor, beta - mean * factor, names, "_bn_folded")


def _fold_channel_constant(graph: gs.Graph, node: gs.Node, readers: dict[int, int], names: NameAllocator) -> bool:
    """Conv -> Mul/Add/Sub by a constant that is one value per output channel (or one in all) into
    one Conv: x * a (either side), x + b (either side), x - b."""
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return False
    slots = (1,) if node.op == "Sub" else (1, 0)
    for slot in slots:
        conv = _sole_conv(node.inputs[1 - slot], readers)
        values = weight_values(node.inputs[slot])
        if conv is None or values is None or weight_values(node.inputs[1 - slot]) is not None:
            continue
        per_channel = _per_channel(np.asarray(values), np.asarray(weight_values(conv.inputs[1])))
        if per_channel is None:
            return False
        if node.op == "Mul":
            return _fold_affine(conv, node, per_channel, np.zeros_like(per_channel), names, "_scaled")
        shift = -per_channel if node.op == "Sub" else per_channel
        return _fold_affine(conv, node, np.ones_like(per_channel), shift, names, "_shifted")
    return False


def _per_channel(values: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """``values`` as one float64 per output channel of a Conv whose weight is ``weight``, when they
    broadcast against its output [N, C, ...] without growing it; else None."""
    rank = weight.ndim
    if values.dtype != np.float32 or values.ndim > rank or not np.all(np.isfinite(values)):
        return None
    shape = (1,) * (rank - values.ndim) + values.shape
    channels = weight.shape[0]
    if any(size != 1 for i, size in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(np.asarray(values, np.float64).reshape(-1), (channels,)).copy()


def _sole_conv(source: gs.Tensor, readers: dict[int, int]) -> gs.Node | None:
    """The Conv that produces ``source``, when ``source`` has no other reader (nor is a graph output)
    and the Conv's float32 weight (and bias, if any) are constants it alone reads."""
    if len(source.inputs) != 1 or readers.get(id(source), 0) != 1:
        return None
    conv = source.inputs[0]
    if conv.op not in CONV_OPS or len(conv.inputs) < 2 or readers.get(id(conv.inputs[1]), 0) != 1:
        return None
    weight = weight_values(conv.inputs[1])
    has_bias = len(conv.inputs) > 2 and bool(conv.inputs[2].name)
    if weight is None or np.asarray(weight).dtype != np.float32:
        return None
    if has_bias and weight_values(conv.inputs[2]) is None:
        return None
    return conv


def _fold_affine(
    conv: gs.Node, node: gs.Node, factor: np.ndarray, shift: np.ndarray, names: NameAllocator, suffix: str
) -> bool:
    """Conv(x) * factor + shift (per output channel) as one Conv that takes over ``node``'s output."""
    weight = np.asarray(weight_values(conv.inputs[1]))
    if factor.size != weight.shape[0]:
        return False
    bias = weight_values(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2].name else None
    base = np.zeros(weight.shape[0]) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    folded_weight = (weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32)
    folded_bias = (base * factor + shift).astype(np.float32)
    if isinstance(conv.inputs[1], gs.Constant):  # read by this Conv alone: keep its name (reports, errors)
        conv.inputs[1].values = folded_weight
    else:
        conv.inputs[1] = float_constant(names.fresh(conv.inputs[1].name, suffix), folded_weight)
    bias_constant = float_constant(names.fresh(f"{conv.name or conv.outputs[0].name}_bias", suffix), folded_bias)
    if len(conv.inputs) > 2:
        conv.inputs[2] = bias_constant
    else:
        conv.inputs.append(bias_constant)
    conv.outputs[0] = node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    return True


def _worth_rewriting(node: gs.Node) -> bool:
    """Only where the integer chain can go through: the input comes from an op static mode quantizes."""
    producers = node.inputs[0].inputs if node.inputs else []
    return len(producers) == 1 and producers[0].op in PRODUCERS


def _split_hard_activation(
    graph: gs.Graph, node: gs.Node, names: NameAllocator, constants: dict[tuple[str, float], gs.Constant]
) -> bool:
    alpha = float(node.attrs.get("alpha", 0.2)) if node.op == "HardSigmoid" else 1.0 / 6.0
    beta = float(node.attrs.get("beta", 0.5)) if node.op == "HardSigmoid" else 0.5
    if alpha <= 0.0 or len(node.outputs) != 1:
        return False
    source, result = node.inputs[0], node.outputs[0]
    base = node.name or result.name

    def tensor(suffix: str) -> gs.Variable:
        return gs.Variable(names.fresh(base, suffix), dtype=np.float32)

    def constant(suffix: str, value: float) -> gs.Constant:
        if (suffix, value) not in constants:
            constants[suffix, value] = float_constant(names.fresh(base, suffix), np.asarray(value, np.float32))
        return constants[suffix, value]

    shifted, clipped = tensor("_shifted"), tensor("_clipped")
    new_nodes = [
        gs.Node("Add", names.fresh(base, "_Add"), {}, [source, constant("_offset", beta / alpha)], [shifted]),
        gs.Node(
            "Clip",
            names.fresh(base, "_Clip"),
            {},
            [shifted, constant("_low", 0.0), constant("_high", 1.0 / alpha)],
            [clipped],
        ),
    ]
    if node.op == "HardSwish":
        gated = tensor("_gated")
        new_nodes.append(gs.Node("Mul", names.fresh(base, "_Gate"), {}, [source, clipped], [gated]))
        clipped = gated
    new_nodes.append(gs.Node("Mul", names.fresh(base, "_Scale"), {}, [clipped, constant("_alpha", alpha)], [result]))
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.extend(new_nodes)
    return True
