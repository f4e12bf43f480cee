"""Which weights the quantize pass touches: one target per weight tensor, with every consumer.

A weight is an initializer or the output of a Constant node, in any graph; a weight read by
several nodes (in one graph or across If/Loop/Scan bodies) is one target, so it is quantized
once. The dequantizing nodes go to the scope that owns all its readers (the innermost graph
holding every consumer, moved out of Loop/Scan bodies so they do not run each iteration).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.graph.opsets import DEFAULT_DOMAINS
from optimizer.graph.patterns import NamePatterns
from optimizer.graph.walk import TensorUse, iter_graphs
from optimizer.graph.weights import Weight, assign_owners, is_constant_derived, is_constant_node, weight_values
from optimizer.pass_base import PassReport
from passes.weight_guard import WeightGuard

WEIGHT_INPUTS = {
    "MatMul": (1,),
    "Gemm": (1,),
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gather": (0,),
    "LSTM": (1, 2),
    "GRU": (1, 2),
    "RNN": (1, 2),
}
QUANTIZED_MARKERS = (
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearMatMul",
    "QLinearConv",
    "MatMulNBits",
    "GatherBlockQuantized",
)
INTEGER_KINDS = ("i", "u")
FOUR_BIT_NAMES = ("int4", "uint4")
QUANTIZED_SUFFIX = "_quantized"


@dataclass(frozen=True)
class Selection:
    """What the user asked to quantize: op types, exclusions, minimum size."""

    op_types: tuple[str, ...]
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    exclude_first: int = 0
    exclude_last: int = 0
    min_weight_elements: int = 0
    allow_non_finite: bool = False
    small_weight_ops: tuple[str, ...] = ()


def weight_slots(node: gs.Node) -> tuple[int, ...]:
    if node.domain not in DEFAULT_DOMAINS:
        return ()
    slots = WEIGHT_INPUTS.get(node.op, ())
    return tuple(i for i in slots if i < len(node.inputs) and node.inputs[i].name)


def quantizable_nodes(root: gs.Graph, selection: Selection) -> list[tuple[gs.Graph, gs.Node]]:
    """Nodes of the selected op types, in graph order (subgraphs after their parent's nodes)."""
    found = []
    for graph in iter_graphs(root):
        for node in graph.nodes:
            if node.op in selection.op_types and weight_slots(node):
                found.append((graph, node))
    return found


def excluded_nodes(nodes: list[tuple[gs.Graph, gs.Node]], selection: Selection) -> dict[int, str]:
    """id(node) -> why the user's exclusions leave it alone."""
    reasons: dict[int, str] = {}
    matches = NamePatterns(selection.exclude_nodes).matches
    layers = [node for _, node in nodes if _reads_float_weight(node)]
    for position, node in enumerate(layers):
        if position < selection.exclude_first:
            reasons[id(node)] = f"among the first {selection.exclude_first} quantizable layers (exclude_first)"
        elif position >= len(layers) - selection.exclude_last:
            reasons[id(node)] = f"among the last {selection.exclude_last} quantizable layers (exclude_last)"
    for _, node in nodes:
        if node.op in selection.exclude_op_types:
            reasons[id(node)] = f"op type {node.op} is in exclude_op_types"
        elif matches(node.name or ""):
            reasons[id(node)] = "node name matches exclude_nodes"
    return reasons


def _reads_float_weight(node: gs.Node) -> bool:
    for index in weight_slots(node):
        values = weight_values(node.inputs[index])
        if values is not None and np.asarray(values).dtype == np.float32:
            return True
    return False


def skip_reason_for_input(node: gs.Node, index: int, values: np.ndarray | None, min_elements: int) -> str | None:
    """Why ``node.inputs[index]`` is not a weight to quantize, or None when it is one."""
    tensor = node.inputs[index]
    if values is None:
        if is_already_quantized(tensor):
            return "weight is already quantized"
        return "input is computed at run time, not a stored weight"
    values = np.asarray(values)
    if values.dtype.kind in INTEGER_KINDS:
        return f"weight is already integer ({values.dtype})"
    if values.dtype != np.float32:
        return f"weight dtype {values.dtype} is not float32"
    if values.size < min_elements:
        return f"{values.size} elements < min_weight_elements={min_elements}"
    if node.op == "Gather" and weight_values(node.inputs[1]) is not None:
        return "indices are constant too (constant folding, not quantization, applies)"
    if node.op == "MatMul" and weight_values(node.inputs[0]) is not None:
        return "both MatMul inputs are constant"
    return None


def is_already_quantized(tensor: gs.Tensor, depth: int = 6) -> bool:
    """The tensor is made from integer weights by DequantizeLinear or a Cast/Sub/Mul/Reshape chain."""
    if isinstance(tensor, gs.Constant):
        return _is_integer_constant(tensor)
    if depth == 0 or len(tensor.inputs) != 1:
        return False
    producer = tensor.inputs[0]
    if producer.op in QUANTIZED_MARKERS:
        return True
    if producer.op not in ("Cast", "Sub", "Mul", "Reshape"):
        return False
    return any(is_already_quantized(source, depth - 1) for source in producer.inputs)


def is_quantization_parameter_reader(node: gs.Node, depth: int = 2) -> bool:
    """``node`` reads its inputs as quantization parameters: a (De)QuantizeLinear or another
    quantized op, a node of the Cast/Mul chain that dequantizes an integer weight (its scale), or a
    Cast whose output only such nodes read (4-bit scales are stored as float16 behind one)."""
    if node.op in (*QUANTIZED_MARKERS, "QuantizeLinear") or any(is_already_quantized(t) for t in node.outputs):
        return True
    if node.op != "Cast" or depth == 0 or not node.outputs:
        return False
    readers = [reader for output in node.outputs for reader in output.outputs]
    return bool(readers) and all(is_quantization_parameter_reader(reader, depth - 1) for reader in readers)


def _is_integer_constant(tensor: gs.Constant) -> bool:
    try:
        dtype = np.dtype(tensor.dtype)
    except TypeError:
        return True
    integer = dtype.kind in INTEGER_KINDS or dtype.name in FOUR_BIT_NAMES  # ml_dtypes' int4/uint4: kind 'V'
    return integer and tensor.name.endswith(QUANTIZED_SUFFIX)


def collect_targets(root: gs.Graph, selection: Selection, report: PassReport) -> list[Weight]:
    """Every weight to quantize, once, with all its consumers; skips go into ``report``."""
    nodes = quantizable_nodes(root, selection)
    excluded = excluded_nodes(nodes, selection)
    targets: dict[int, Weight] = {}
    blocked: set[int] = set()
    guard = WeightGuard.of(root, allow_non_finite=selection.allow_non_finite)
    memo: dict[int, bool | None] = {}
    for graph, node in nodes:
        label = node.name or node.outputs[0].name
        if id(node) in excluded:
            report.skip("node", label, excluded[id(node)])
            for index in weight_slots(node):
                blocked.add(id(node.inputs[index]))
            continue
        for index in weight_slots(node):
            tensor = node.inputs[index]
            values = weight_values(tensor)
            if values is None and is_constant_derived(tensor, memo) and not is_already_quantized(tensor):
                continue  # made from stored weights at load: chains.collect_chained reports them
            minimum = 0 if node.op in selection.small_weight_ops else selection.min_weight_elements
            reason = skip_reason_for_input(node, index, values, minimum)
            if reason is None:
                reason = guard.reason(tensor, values) or None
            if reason is not None:
                report.skip("node", f"{label} input {index} ({tensor.name})", reason)
                continue
            target = targets.get(id(tensor))
            if target is None:
                producer = tensor.inputs[0] if not isinstance(tensor, gs.Constant) and tensor.inputs else None
                constant_node = producer if producer is not None and is_constant_node(producer) else None
                target = targets[id(tensor)] = Weight(tensor, constant_node, array=np.asarray(values))
            target.uses.append(TensorUse(graph, node, index))
    return _complete(root, targets, blocked, report)


def _complete(root: gs.Graph, targets: dict[int, Weight], blocked: set[int], report: PassReport) -> list[Weight]:
    """Drop weights that an excluded node needs in float; set owners."""
    kept = []
    for key in sorted(targets, key=lambda k: targets[k].name):
        if key in blocked:
            report.skip("tensor", targets[key].name, "also read by an excluded node, which keeps it in float")
            continue
        kept.append(targets[key])
    assign_owners(root, kept)
    return kept
