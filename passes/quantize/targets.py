"""Which weights the quantize pass touches: one target per weight tensor, with every consumer.

A weight is an initializer or the output of a Constant node, in any graph; a weight read by
several nodes (in one graph or across If/Loop/Scan bodies) is one target, so it is quantized
once. The dequantizing nodes go to the scope that owns all its readers (the innermost graph
holding every consumer, moved out of Loop/Scan bodies so they do not run each iteration).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.graph.core import DEFAULT_DOMAINS, is_constant_node, iter_graphs, node_subgraphs, weight_values
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
LOOPING_OPS = ("Loop", "Scan")
QUANTIZED_MARKERS = ("DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                     "QLinearMatMul", "QLinearConv", "MatMulNBits", "GatherBlockQuantized")
INTEGER_KINDS = ("i", "u")
QUANTIZED_SUFFIX = "_quantized"


@dataclass(frozen=True)
class Consumer:
    """One node input slot that reads a weight."""

    graph: gs.Graph
    node: gs.Node
    index: int


@dataclass
class WeightTarget:
    """A float weight and everything that reads it."""

    tensor: gs.Tensor
    values: np.ndarray
    constant_node: gs.Node | None
    consumers: list[Consumer] = field(default_factory=list)
    owner: gs.Graph | None = None

    @property
    def name(self) -> str:
        return self.tensor.name

    def op_types(self) -> list[str]:
        return sorted({c.node.op for c in self.consumers})


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


@dataclass
class Scopes:
    """Parent links between graphs: ``parent[id(sub)] = (graph, node holding sub)``."""

    parent: dict[int, tuple[gs.Graph, gs.Node]]

    @classmethod
    def of(cls, root: gs.Graph) -> Scopes:
        parent: dict[int, tuple[gs.Graph, gs.Node]] = {}
        for graph in iter_graphs(root):
            for node in graph.nodes:
                for sub in node_subgraphs(node):
                    parent[id(sub)] = (graph, node)
        return cls(parent)

    def chain(self, graph: gs.Graph) -> list[gs.Graph]:
        """``graph`` and its enclosing graphs, innermost first."""
        chain = [graph]
        while id(chain[-1]) in self.parent:
            chain.append(self.parent[id(chain[-1])][0])
        return chain

    def common_owner(self, graphs: Sequence[gs.Graph]) -> gs.Graph:
        """Innermost graph enclosing all ``graphs``, moved out of Loop/Scan bodies."""
        chains = [self.chain(g) for g in graphs]
        shared = [g for g in chains[0] if all(any(g is other for other in chain) for chain in chains[1:])]
        owner = shared[0]
        while id(owner) in self.parent and self.parent[id(owner)][1].op in LOOPING_OPS:
            owner = self.parent[id(owner)][0]
        return owner


def weight_slots(node: gs.Node) -> tuple[int, ...]:
    if node.domain not in DEFAULT_DOMAINS:
        return ()
    slots = WEIGHT_INPUTS.get(node.op, ())
    return tuple(i for i in slots if i < len(node.inputs) and node.inputs[i].name)


def name_matcher(patterns: Sequence[str]):
    """``re:...`` is a regular expression (searched anywhere); anything else a glob on the whole name."""
    regexes = [re.compile(p[3:]) for p in patterns if p.startswith("re:")]
    globs = [p for p in patterns if not p.startswith("re:")]

    def matches(name: str) -> bool:
        return any(r.search(name) for r in regexes) or any(fnmatch.fnmatchcase(name, g) for g in globs)
    return matches


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
    matches = name_matcher(selection.exclude_nodes)
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


def _is_integer_constant(tensor: gs.Constant) -> bool:
    try:
        return np.dtype(tensor.dtype).kind in INTEGER_KINDS and tensor.name.endswith(QUANTIZED_SUFFIX)
    except TypeError:
        return True


def collect_targets(root: gs.Graph, selection: Selection, report: PassReport) -> list[WeightTarget]:
    """Every weight to quantize, once, with all its consumers; skips go into ``report``."""
    nodes = quantizable_nodes(root, selection)
    excluded = excluded_nodes(nodes, selection)
    targets: dict[int, WeightTarget] = {}
    blocked: set[int] = set()
    guard = WeightGuard.of(root, allow_non_finite=selection.allow_non_finite)
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
            reason = skip_reason_for_input(node, index, values, selection.min_weight_elements)
            if reason is None:
                reason = guard.reason(tensor, values) or None
            if reason is not None:
                report.skip("node", f"{label} input {index} ({tensor.name})", reason)
                continue
            target = targets.get(id(tensor))
            if target is None:
                producer = tensor.inputs[0] if not isinstance(tensor, gs.Constant) and tensor.inputs else None
                constant_node = producer if producer is not None and is_constant_node(producer) else None
                target = targets[id(tensor)] = WeightTarget(tensor, np.asarray(values), constant_node)
            target.consumers.append(Consumer(graph, node, index))
    return _complete(root, targets, blocked, report)


def _complete(root: gs.Graph, targets: dict[int, WeightTarget], blocked: set[int],
              report: PassReport) -> list[WeightTarget]:
    """Drop weights that an excluded node or another reader needs in float; set owners."""
    readers = _all_readers(root)
    scopes = Scopes.of(root)
    kept = []
    for key in sorted(targets, key=lambda k: targets[k].name):
        target = targets[key]
        if key in blocked:
            report.skip("tensor", target.name, "also read by an excluded node, which keeps it in float")
            continue
        target_readers = readers.get(key, [])
        graphs = [g for g, _ in target_readers] or [c.graph for c in target.consumers]
        if target.constant_node is not None:
            graphs.append(_graph_of(root, target.constant_node))
        target.owner = scopes.common_owner(graphs)
        kept.append(target)
    return kept


def _all_readers(root: gs.Graph) -> dict[int, list[tuple[gs.Graph, gs.Node]]]:
    readers: dict[int, list[tuple[gs.Graph, gs.Node]]] = {}
    for graph in iter_graphs(root):
        for node in graph.nodes:
            for tensor in node.inputs:
                readers.setdefault(id(tensor), []).append((graph, node))
    return readers


def _graph_of(root: gs.Graph, node: gs.Node) -> gs.Graph:
    for graph in iter_graphs(root):
        if any(candidate is node for candidate in graph.nodes):
            return graph
    return root
