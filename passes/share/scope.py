"""Scope bookkeeping for weight sharing and clustering: the graph tree, the weights it holds, and
the graphs a weight will be stored in.

onnx-graphsurgeon shares one ``Constant`` object between a graph and the subgraphs that read it;
on export it becomes an initializer of every graph whose own nodes read it (``export_model`` then
drops the copies an enclosing graph already holds). So an initializer is stored once per
*outermost* graph reading it: a tensor read only inside both branches of an If is stored twice.
Passes that redirect readers use ``storage_graphs`` to count copies before and after.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues

from optimizer.graph.core import (
    DEFAULT_DOMAINS,
    constant_node_values,
    is_constant_node,
    iter_graphs,
)
from optimizer.graph.interface import training_bound_ids

TRAINING_BINDING_REASON = "bound by training_info (initialization_binding / update_binding)"


@dataclass
class GraphTree:
    """Parent links, depth and a printable path for every graph under the main graph."""

    root: gs.Graph
    parent: dict[int, gs.Graph | None] = field(default_factory=dict)
    depth: dict[int, int] = field(default_factory=dict)
    order: dict[int, int] = field(default_factory=dict)
    path: dict[int, str] = field(default_factory=dict)
    node_graph: dict[int, gs.Graph] = field(default_factory=dict)

    @classmethod
    def build(cls, root: gs.Graph) -> GraphTree:
        tree = cls(root)
        tree._visit(root, None, "main")
        return tree

    def _visit(self, graph: gs.Graph, parent: gs.Graph | None, path: str) -> None:
        self.parent[id(graph)] = parent
        self.depth[id(graph)] = 0 if parent is None else self.depth[id(parent)] + 1
        self.order[id(graph)] = len(self.order)
        self.path[id(graph)] = path
        for index, node in enumerate(graph.nodes):
            self.node_graph[id(node)] = graph
            label = node.name or f"{node.op}_{index}"
            for key, value in node.attrs.items():
                if isinstance(value, gs.Graph):
                    self._visit(value, graph, f"{path}/{label}.{key}")
                elif isinstance(value, (list, tuple)):
                    for position, item in enumerate(value):
                        if isinstance(item, gs.Graph):
                            self._visit(item, graph, f"{path}/{label}.{key}[{position}]")

    def add_node(self, graph: gs.Graph, node: gs.Node) -> None:
        """Append a new node to ``graph`` (the caller sorts the graph afterwards)."""
        graph.nodes.append(node)
        self.node_graph[id(node)] = graph

    def graph_of(self, node: gs.Node) -> gs.Graph:
        return self.node_graph[id(node)]

    def ancestors(self, graph: gs.Graph) -> list[gs.Graph]:
        """``graph`` itself, then each enclosing graph up to the main graph."""
        chain = [graph]
        while self.parent[id(chain[-1])] is not None:
            chain.append(self.parent[id(chain[-1])])
        return chain

    def is_within(self, inner: gs.Graph, outer: gs.Graph) -> bool:
        return any(g is outer for g in self.ancestors(inner))

    def common_ancestor(self, graphs: list[gs.Graph]) -> gs.Graph:
        common = self.ancestors(graphs[0])
        for graph in graphs[1:]:
            chain = {id(g) for g in self.ancestors(graph)}
            common = [g for g in common if id(g) in chain]
        return common[0]

    def outermost(self, graphs: list[gs.Graph]) -> list[gs.Graph]:
        """The graphs of ``graphs`` that no other one of them encloses, in walk order."""
        unique = {id(g): g for g in graphs}
        kept = [
            g for g in unique.values()
            if not any(id(a) in unique for a in self.ancestors(g)[1:])
        ]
        return sorted(kept, key=lambda g: self.order[id(g)])


@dataclass
class Weight:
    """A stored tensor: an initializer (``gs.Constant``) or the output of a Constant node."""

    tensor: gs.Tensor
    values: np.ndarray
    order: int
    node: gs.Node | None = None
    home: gs.Graph | None = None
    protected: str = ""
    digests: dict[int, bytes] | None = None

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)

    @property
    def consumers(self) -> list[gs.Node]:
        unique = {id(node): node for node in self.tensor.outputs}
        return list(unique.values())

    def digest(self) -> bytes:
        """A 16-byte hash of the raw bytes, computed once per tensor per pass run."""
        cache = self.digests if self.digests is not None else {}
        key = id(self.tensor)
        if key not in cache:
            hasher = hashlib.blake2b(digest_size=16)
            hasher.update(_byte_view(self.values).data)
            cache[key] = hasher.digest()
        return cache[key]

    def same_bytes(self, other: Weight) -> bool:
        if self.values.dtype != other.values.dtype or self.values.shape != other.values.shape:
            return False
        return _byte_view(self.values).tobytes() == _byte_view(other.values).tobytes()

    def reader_graphs(self, tree: GraphTree) -> list[gs.Graph]:
        return [tree.graph_of(node) for node in self.consumers]

    def storage_graphs(self, tree: GraphTree) -> list[gs.Graph]:
        """Graphs that will hold a stored copy on export."""
        if self.node is not None:
            return [self.home]
        return tree.outermost(self.reader_graphs(tree))

    def label(self, tree: GraphTree) -> str:
        graphs = [self.home] if self.node is not None else tree.outermost(self.reader_graphs(tree))
        where = tree.path[id(graphs[0])] if graphs else "main"
        return self.name if where == "main" else f"{where}/{self.name}"

    def has_custom_consumer(self) -> bool:
        return any(node.domain not in DEFAULT_DOMAINS for node in self.consumers)


def _byte_view(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values).reshape(-1).view(np.uint8)


def collect_weights(root: gs.Graph, digests: dict[int, bytes] | None = None) -> list[Weight]:
    """Every dense numeric weight some node reads, in walk order (sparse ones are left out).

    A weight that is also a graph input or output is marked ``protected``: callers may override
    or read it, so it is never replaced or shared.
    """
    protected = _protected_tensor_ids(root)
    seen: set[int] = set()
    weights: list[Weight] = []
    for graph in iter_graphs(root):
        for node in graph.nodes:
            candidates = [(node.outputs[0], node)] if is_constant_node(node) else []
            candidates += [(t, None) for t in node.inputs if isinstance(t, gs.Constant)]
            for tensor, producer in candidates:
                if id(tensor) in seen or not tensor.outputs:
                    continue
                seen.add(id(tensor))
                values = _dense_values(tensor, producer)
                if values is None:
                    continue
                reason = protected.get(id(tensor), "")
                weights.append(Weight(tensor, values, len(weights), producer,
                                      graph if producer is not None else None, reason, digests))
    return weights


def _dense_values(tensor: gs.Tensor, producer: gs.Node | None) -> np.ndarray | None:
    if producer is None and isinstance(tensor._values, SparseValues):
        return None
    values = constant_node_values(producer) if producer is not None else tensor.values
    if not isinstance(values, np.ndarray) or values.dtype.kind not in "biuf":
        return None
    return values


def _protected_tensor_ids(root: gs.Graph) -> dict[int, str]:
    """id -> why the tensor must keep its name: a graph input or output, or a training binding."""
    reasons = dict.fromkeys(training_bound_ids(root), TRAINING_BINDING_REASON)
    for graph in iter_graphs(root):
        for tensor in itertools.chain(graph.outputs, graph.inputs):
            reasons[id(tensor)] = "a graph input or output: callers may read or override it"
    return reasons


def tensor_names(root: gs.Graph) -> dict[str, set[int]]:
    """Every tensor name in every graph with the ids of the objects carrying it."""
    names: dict[str, set[int]] = {}
    for graph in iter_graphs(root):
        for tensor in itertools.chain(graph.inputs, graph.outputs):
            names.setdefault(tensor.name, set()).add(id(tensor))
        for node in graph.nodes:
            for tensor in itertools.chain(node.inputs, node.outputs):
                if tensor.name:
                    names.setdefault(tensor.name, set()).add(id(tensor))
    return names


def unique_name(base: str, taken: dict[str, set[int]]) -> str:
    """``base`` or ``base_1``, ``base_2``...: a name no tensor carries yet (then reserved)."""
    name, counter = base, 0
    while name in taken:
        counter += 1
        name = f"{base}_{counter}"
    taken[name] = set()
    return name


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> int:
    """Point every input slot of ``node`` that reads ``old`` at ``new``; how many slots changed."""
    changed = 0
    for index, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[index] = new
            changed += 1
    return changed


def drop_constant_node(weight: Weight) -> None:
    """Remove the Constant node of a weight nobody reads any more."""
    if weight.node is not None and not weight.tensor.outputs:
        weight.node.outputs.clear()
        weight.home.nodes.remove(weight.node)
