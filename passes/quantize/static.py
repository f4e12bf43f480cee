"""Static mode: QuantizeLinear/DequantizeLinear pairs around each quantizable op, with activation
ranges from calibration data, placed the way onnxruntime's QDQ fusions expect.

- Conv, ConvTranspose, MatMul, Gemm: activation input QDQ, weight DequantizeLinear (int8 per
  channel, zero point 0), bias int32 with scale input_scale * weight_scale, output QDQ ->
  onnxruntime runs QLinearConv / QLinearMatMul / QGemm.
- The ops between them (Add, Mul, Concat, pooling, Resize, Transpose, Reshape, Sigmoid ...) get
  QDQ on their inputs and outputs too, so a chain of convolutions stays in int8 instead of paying
  a layout Transpose and a float round trip at every boundary (FIELD-NOTES).
- Relu and Clip right after a quantized op are removed: the QuantizeLinear of their output range
  (zero point at 0, or the clip bounds) saturates exactly as they would.
- A tensor whose calibrated range is wider than ``common.MAX_ACTIVATION_ABS`` (an attention mask filled
  with -1e9, say) stays float: 8 bits cannot hold it and everything near zero would collapse.
Every tensor is quantized once, whatever number of nodes read it. Subgraph bodies stay weight-only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.calibration.quant_math import (
    bias_weight_scale_floor,
    qtype,
    quantize,
    quantize_bias,
    quantize_weight,
    scale_zero_point,
)
from optimizer.errors import PassError
from optimizer.graph.names import NameAllocator
from optimizer.graph.patterns import NamePatterns
from optimizer.graph.weights import Weight, is_constant_derived, weight_values
from optimizer.internal_errors import working_on
from optimizer.pass_base import PassContext, PassReport
from passes.quantize.activation_ranges import calibrate_activations, inherited_ranges
from passes.quantize.common import QuantizedWeight, float_constant, integer_constant
from passes.quantize.dynamic import weight_only_reason
from passes.quantize.integer_forms import RESCALE_OPS, fold_rescales, plan_rescales, rescale_factor
from passes.quantize.options import QuantizeOptions
from passes.quantize.weights import (
    NAMED_REASON,
    WeightSpec,
    eight_bit_only,
    quantize_weight_only_all,
    scale_axis,
    weight_only_spec,
)

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
ALL_INPUTS = None
NEIGHBOR_INPUTS: dict[str, tuple[int, ...] | None] = {
    "Add": (0, 1),
    "Mul": (0, 1),
    "Concat": ALL_INPUTS,
    "Relu": (0,),
    "Clip": (0,),
    "MaxPool": (0,),
    "AveragePool": (0,),
    "GlobalAveragePool": (0,),
    "Resize": (0,),
    "Transpose": (0,),
    "Reshape": (0,),
    "Flatten": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Sigmoid": (0,),
    "LeakyRelu": (0,),
    "Split": (0,),
    "Slice": (0,),
    "Pad": (0,),
    "DepthToSpace": (0,),
    "SpaceToDepth": (0,),
    "Div": (0,),
}
REMOVABLE_ACTIVATIONS = ("Relu", "Clip")
OPSET_PER_CHANNEL = 13
OPSET_QDQ = 10


@dataclass
class StaticPlan:
    compute: list[Weight] = field(default_factory=list)
    weight_only: list[tuple[Weight, WeightSpec]] = field(default_factory=list)
    per_channel: bool = True
    notes: list[dict[str, str]] = field(default_factory=list)

    def required_opset(self) -> int:
        needs = [OPSET_PER_CHANNEL if self.per_channel else OPSET_QDQ] if self.compute else [1]
        return max(needs + [spec.required_opset() for _, spec in self.weight_only])


def plan_static(graph: gs.Graph, targets: list[Weight], options: QuantizeOptions) -> StaticPlan:
    plan = StaticPlan(per_channel=options.per_channel)
    for target in targets:
        in_main = all(c.graph is graph and c.node.op in COMPUTE_OPS for c in target.uses)
        # a GELU output's outlier channels do not survive one uint8 scale per tensor (static has no
        # outlier split): all-MiniLM-L6-v2 cosine 0.940 with its FFN-down MatMuls static, 0.993 without
        reasons = [
            weight_only_reason(c, options.dynamic_weight_only, calibrated=False)
            for c in target.uses
            if c.node.op == "MatMul"
        ]
        if eight_bit_only(target, options):
            reasons.append(NAMED_REASON)
        if in_main and target.values.ndim >= 2 and not any(reasons):
            plan.compute.append(target)
        else:
            plan.weight_only.append((target, weight_only_spec(target, options, graph.opset)))
            plan.notes += [{"tensor": target.name, "reason": reason} for reason in dict.fromkeys(reasons) if reason]
    return plan


def data_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The inputs of ``node`` that carry activations (not shapes, scales or weights)."""
    if node.op in COMPUTE_OPS:
        return [node.inputs[0]]
    slots = NEIGHBOR_INPUTS[node.op]
    indices = range(len(node.inputs)) if slots is ALL_INPUTS else [i for i in slots if i < len(node.inputs)]
    return [node.inputs[i] for i in indices if node.inputs[i].name]


def quantize_static(
    graph: gs.Graph,
    plan: StaticPlan,
    options: QuantizeOptions,
    names: NameAllocator,
    report: PassReport,
    context: PassContext,
) -> None:
    compute_nodes = _ordered_nodes(graph, {id(c.node) for t in plan.compute for c in t.uses})
    memo: dict[int, bool | None] = {}
    neighbors = [
        n
        for n in graph.nodes
        if n.op in NEIGHBOR_INPUTS
        and n.domain in ("", None, "ai.onnx")
        and not all(is_constant_derived(t, memo) for t in data_inputs(n))
        and (n.op != "Div" or (options.integer_forms and rescale_factor(n) is not None))
    ]
    compute_nodes = [n for n in compute_nodes if not is_constant_derived(n.inputs[0], memo)]
    neighbors = _after_softened(graph, neighbors, options)
    neighbors = _leading_to_integer_ops(compute_nodes, neighbors, report)
    inherited = inherited_ranges(neighbors, options.integer_forms)
    candidates = sorted(
        {t.name for n in compute_nodes + neighbors for t in data_inputs(n) + [n.outputs[0]] if t.name} - set(inherited)
    )
    ranges = calibrate_activations(graph, candidates, options, report, context)
    quantize_weight_only_all(plan.weight_only, names, report, plan.notes)
    for output, (source, factor) in inherited.items():
        if source in ranges:
            ranges[output] = (ranges[source][0] * factor, ranges[source][1] * factor)
    quantized_nodes = [n for n in compute_nodes if n.inputs[0].name in ranges and n.outputs[0].name in ranges]
    quantized_nodes += [n for n in neighbors if _neighbor_ready(n, ranges)]
    quantized_ids = {id(n) for n in quantized_nodes}
    removed = _remove_activations(graph, quantized_nodes, quantized_ids, ranges, report)
    quantized_nodes = [n for n in quantized_nodes if id(n) not in removed]
    activation_type = qtype(options.activation_type)
    input_names = {id(n): n.inputs[0].name for n in quantized_nodes if n.op in COMPUTE_OPS}
    rescales = plan_rescales([n for n in quantized_nodes if n.op in RESCALE_OPS and options.integer_forms])
    tensor_params = _insert_qdq(graph, quantized_nodes, ranges, activation_type, options, names, report)
    fold_rescales(graph, rescales, names, report)
    _quantize_compute_weights(plan, tensor_params, input_names, options, names, report)


def _leading_to_integer_ops(
    compute_nodes: list[gs.Node], neighbors: list[gs.Node], report: PassReport
) -> list[gs.Node]:
    """The neighbours worth quantizing: those whose output some quantized op reads, so the
    integer chain goes on (plus Relu/Clip right after a quantized op, folded into its Quantize).

    A neighbour whose result only goes to float ops saves no time, since onnxruntime dequantizes
    right after it, and costs accuracy: BERT's residual Adds feed LayerNorm and carry outlier
    channels 20x the rest, which one uint8 scale per tensor flattens (all-MiniLM-L6-v2 static went
    from cosine 0.49 to 0.94 once they stayed float).
    """
    chosen = {id(node) for node in compute_nodes}
    for node in neighbors:
        producers = node.inputs[0].inputs if node.inputs else []
        if node.op in REMOVABLE_ACTIVATIONS and producers and id(producers[0]) in chosen:
            chosen.add(id(node))
    changed = True
    while changed:
        changed = False
        for node in reversed(neighbors):
            if id(node) not in chosen and any(id(reader) in chosen for out in node.outputs for reader in out.outputs):
                chosen.add(id(node))
                changed = True
    kept = [node for node in neighbors if id(node) in chosen]
    left = len(neighbors) - len(kept)
    if left:
        report.details["float_neighbors"] = {
            "count": left,
            "why": "their output feeds no quantized op: quantizing them saves no time and loses accuracy",
        }
    return kept


def _after_softened(graph: gs.Graph, neighbors: list[gs.Node], options: QuantizeOptions) -> list[gs.Node]:
    """The neighbours not fed by an op named in ``int8_weight_only_nodes``: backing a layer off
    leaves its whole group float (its activation chain too, e.g. a SiLU's Sigmoid and Mul), so the
    tensors whose 8-bit rounding hurt are no longer rounded; the next quantized op's input is."""
    if not options.int8_weight_only_nodes:
        return neighbors
    matches = NamePatterns(options.int8_weight_only_nodes).matches
    floating = {id(t) for n in graph.nodes if n.op in COMPUTE_OPS and matches(n.name or "") for t in n.outputs}
    if not floating:
        return neighbors
    dropped: set[int] = set()
    changed = True
    while changed:  # one sweep in graph order, more only where the graph is not sorted
        changed = False
        for node in neighbors:
            if id(node) not in dropped and any(id(t) in floating for t in data_inputs(node)):
                floating.update(id(t) for t in node.outputs)
                dropped.add(id(node))
                changed = True
    return [node for node in neighbors if id(node) not in dropped]


def _ordered_nodes(graph: gs.Graph, wanted: set[int]) -> list[gs.Node]:
    return [node for node in graph.nodes if id(node) in wanted]


def _neighbor_ready(node: gs.Node, ranges: dict) -> bool:
    tensors = data_inputs(node) + [node.outputs[0]]
    return len(node.outputs) == 1 and all(t.name in ranges or weight_values(t) is not None for t in tensors)


def _remove_activations(
    graph: gs.Graph, nodes: list[gs.Node], quantized_ids: set[int], ranges: dict, report: PassReport
) -> set[int]:
    """Drop Relu/Clip whose input comes only from a quantized op: the output's QDQ range does it."""
    removed: set[int] = set()
    outputs = {id(t) for t in graph.outputs}
    for node in nodes:
        if node.op not in REMOVABLE_ACTIVATIONS or not node.inputs[0].inputs:
            continue
        source, result = node.inputs[0], node.outputs[0]
        producer = source.inputs[0]
        if id(producer) not in quantized_ids or len(source.outputs) != 1 or id(source) in outputs:
            continue
        if result.name not in ranges or not _range_implies(node, ranges[result.name]):
            continue
        producer.outputs[producer.outputs.index(source)] = result
        node.inputs.clear()
        node.outputs.clear()
        removed.add(id(node))
        report.count("activations_folded_into_quantize")
    return removed


def _range_implies(node: gs.Node, output_range: tuple[float, float]) -> bool:
    """Saturating to ``output_range`` reproduces the activation (its bounds lie inside the range's)."""
    low, high = output_range
    if node.op == "Relu":
        return low >= 0.0
    bounds = [weight_values(t) if t.name else None for t in node.inputs[1:3]]
    clip_low = float(bounds[0]) if len(bounds) > 0 and bounds[0] is not None else -np.inf
    clip_high = float(bounds[1]) if len(bounds) > 1 and bounds[1] is not None else np.inf
    if "min" in node.attrs:
        clip_low = float(node.attrs["min"])
    if "max" in node.attrs:
        clip_high = float(node.attrs["max"])
    return low >= clip_low and high <= clip_high


@dataclass(frozen=True)
class TensorParams:
    scale: float
    zero_point: int


def _insert_qdq(
    graph: gs.Graph,
    nodes: list[gs.Node],
    ranges: dict,
    activation_type,
    options: QuantizeOptions,
    names: NameAllocator,
    report: PassReport,
) -> dict[str, TensorParams]:
    """One QuantizeLinear + DequantizeLinear per activation tensor; constants get DequantizeLinear."""
    params: dict[str, TensorParams] = {}
    tensors: dict[str, gs.Tensor] = {}
    for node in nodes:
        for tensor in data_inputs(node) + [node.outputs[0]]:
            tensors.setdefault(tensor.name, tensor)
    consumers = {id(n) for n in nodes}
    shared: dict[tuple[str, bytes], gs.Constant] = {}  # equal scales and zero points stored once
    for name in sorted(tensors):
        tensor = tensors[name]
        values = weight_values(tensor)
        low, high = ranges.get(name) or _constant_range(name, values)
        scale, zero = scale_zero_point(
            np.float32(low), np.float32(high), activation_type, symmetric=options.symmetric_activations
        )
        params[name] = TensorParams(float(scale), int(zero))
        scale_value = np.asarray(scale, np.float32)
        scale_key, zero_key = ("scale", scale_value.tobytes()), ("zero", np.asarray(zero).tobytes())
        if scale_key not in shared:
            shared[scale_key] = float_constant(names.fresh(name, "_scale"), scale_value)
        if zero_key not in shared:
            zero_name = names.fresh(f"{activation_type.name}_zero_point_{int(zero)}", "")
            shared[zero_key] = integer_constant(zero_name, np.asarray(zero), activation_type)
        scale_c, zero_c = shared[scale_key], shared[zero_key]
        if values is not None:
            integers = quantize(np.asarray(values, np.float32), scale, zero, activation_type)
            _dequantized_constant(graph, tensor, integers, scale_c, zero_c, activation_type, consumers, names)
            report.count("qdq_constants")
        else:
            _quantize_activation(graph, tensor, scale_c, zero_c, activation_type, names)
            report.count("qdq_activations")
    return params


def _quantize_activation(
    graph: gs.Graph, tensor: gs.Tensor, scale: gs.Constant, zero: gs.Constant, activation_type, names: NameAllocator
) -> None:
    """tensor -> QuantizeLinear -> DequantizeLinear -> every reader (a graph output keeps the float)."""
    quantized = gs.Variable(names.fresh(tensor.name, "_quantized"), dtype=activation_type.storage_dtype)
    restored = gs.Variable(names.fresh(tensor.name, "_dequantized"), dtype=np.float32)
    readers = [(node, i) for node in list(tensor.outputs) for i, t in enumerate(node.inputs) if t is tensor]
    graph.nodes.append(
        gs.Node("QuantizeLinear", names.fresh(tensor.name, "_QuantizeLinear"), {}, [tensor, scale, zero], [quantized])
    )
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear", names.fresh(tensor.name, "_DequantizeLinear"), {}, [quantized, scale, zero], [restored]
        )
    )
    for node, index in readers:
        node.inputs[index] = restored


def _dequantized_constant(
    graph: gs.Graph,
    tensor: gs.Tensor,
    integers: np.ndarray,
    scale: gs.Constant,
    zero: gs.Constant,
    activation_type,
    consumers: set[int],
    names: NameAllocator,
) -> None:
    """A float constant read by quantized ops: integers + DequantizeLinear, for those ops only."""
    stored = integer_constant(names.fresh(tensor.name, "_quantized"), integers, activation_type)
    restored = gs.Variable(names.fresh(tensor.name, "_dequantized"), dtype=np.float32)
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear", names.fresh(tensor.name, "_DequantizeLinear"), {}, [stored, scale, zero], [restored]
        )
    )
    for node in list(tensor.outputs):
        if id(node) in consumers:
            for index, current in enumerate(node.inputs):
                if current is tensor:
                    node.inputs[index] = restored


def _quantize_compute_weights(
    plan: StaticPlan,
    params: dict[str, TensorParams],
    input_names: dict[int, str],
    options: QuantizeOptions,
    names: NameAllocator,
    report: PassReport,
) -> None:
    """Per-channel int8 weights behind DequantizeLinear; int32 bias where the input is quantized."""
    weight_type = qtype(options.weight_type)
    for target in plan.compute:
        with working_on("tensor", target.name):
            axis = scale_axis(target.uses[0], target.values.ndim) if options.per_channel else None
            floor = _bias_scale_floor(target, axis, params, input_names)
            quantized = quantize_weight(
                target.values, weight_type, symmetric=options.weights_symmetric(), axis=axis, min_scale=floor
            )
            if quantized.floored:
                report.count("weight_scales_raised_for_bias", quantized.floored)  # channels whose bias needed it
            weight = QuantizedWeight(target, quantized, names)
            weight.make_float_view("dq")
            report.count(f"weights_{weight_type.name}")
        for consumer in target.uses:
            with working_on("node", consumer.node.name):
                found = params.get(input_names.get(id(consumer.node), ""))
                if found is not None and consumer.node.op != "MatMul":
                    bias = BiasContext(found.scale, quantized.scale, options.int32_bias)
                    _quantize_bias(consumer.graph, consumer.node, bias, names, report)
            # static only when the activation became integer too; else the int8 weight runs in float
            report.count(f"static_{consumer.node.op}" if found is not None else f"weight_only_{consumer.node.op}")


def _bias_scale_floor(
    target: Weight, axis: int | None, params: dict[str, TensorParams], input_names: dict[int, str]
) -> np.ndarray | None:
    """The weight scale below which a reader's float bias would not fit int32 (``bias_weight_scale_floor``),
    over the Conv/Gemm readers whose input is quantized; per output channel, or one for the tensor."""
    channels = target.values.shape[axis] if axis is not None else None
    floors = []
    for use in target.uses:
        node = use.node
        found = params.get(input_names.get(id(node), ""))
        if found is None or node.op == "MatMul":
            continue
        bias = _float_bias(node)
        if bias is None or (channels is not None and bias.size != channels):
            continue
        floor = bias_weight_scale_floor(bias, found.scale)
        floors.append(floor if channels is not None else np.max(floor, initial=0.0))
    return np.max(floors, axis=0) if floors else None


@dataclass(frozen=True)
class BiasContext:
    input_scale: float
    weight_scale: np.ndarray
    int32_only: bool
    """QuantizeOptions.int32_bias: never leave a float bias for onnxruntime to quantize."""


def _quantize_bias(
    graph: gs.Graph, node: gs.Node, context: BiasContext, names: NameAllocator, report: PassReport
) -> None:
    """Conv/Gemm bias as int32 with scale input_scale * weight_scale (what QLinearConv adds), unless
    onnxruntime quantizes the float bias to those same integers at load."""
    bias = _float_bias(node)
    if bias is None:
        return
    if not context.int32_only and _quantized_at_load(graph, node, bias, context):
        report.count("bias_quantized_at_load")
        return
    integers, scale = quantize_bias(bias, context.input_scale, context.weight_scale)
    base = node.inputs[2].name
    stored = gs.Constant(names.fresh(base, "_quantized"), integers)
    restored = gs.Variable(names.fresh(base, "_dequantized"), dtype=np.float32)
    attrs = {"axis": 0} if np.ndim(scale) == 1 else {}
    dequantize = gs.Node(
        "DequantizeLinear",
        names.fresh(base, "_DequantizeLinear"),
        attrs,
        [stored, float_constant(names.fresh(base, "_scale"), scale)],
        [restored],
    )
    graph.nodes.append(dequantize)
    node.inputs[2] = restored
    report.count("bias_int32")


def _float_bias(node: gs.Node) -> np.ndarray | None:
    """A Conv/Gemm's constant float32 1-D bias, if it has one."""
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return None
    bias = weight_values(node.inputs[2])
    if bias is None or np.asarray(bias).dtype != np.float32 or np.asarray(bias).ndim != 1:
        return None
    return np.asarray(bias)


def _quantized_at_load(graph: gs.Graph, node: gs.Node, bias: np.ndarray, context: BiasContext) -> bool:
    """onnxruntime's WeightBiasQuantization (level 1, >= 1.21) rewrites a float Conv/Gemm bias as
    round(bias / (input_scale * weight_scale)) in int32 behind a DequantizeLinear, which constant folding
    stores, when the node's output goes only to a QuantizeLinear (1.22 added that check). The scales
    must be positive and the quotient must fit int32 (onnxruntime's Cast does not clip)."""
    readers = node.outputs[0].outputs
    if node.op not in ("Conv", "Gemm") or node.outputs[0] in graph.outputs:
        return False
    if len(readers) != 1 or readers[0].op != "QuantizeLinear":
        return False
    scale = np.float32(context.input_scale) * np.asarray(context.weight_scale, np.float32)
    if not np.all(scale > 0):
        return False
    return bool(np.all(np.abs(bias.astype(np.float64) / scale) < np.iinfo(np.int32).max))


def _constant_range(name: str, values: np.ndarray | None) -> tuple[float, float]:
    """[min, max] of a constant input (activations have calibrated ranges), 0 included."""
    if values is None:
        raise PassError(f"tensor '{name}' has no calibrated range and is not a constant")
    return float(np.min(values, initial=0.0)), float(np.max(values, initial=0.0))
