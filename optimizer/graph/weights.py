"""Weights as passes see them: an initializer (``gs.Constant``) or the output of a Constant node,
with the node inputs that read it and the graph that holds it; and tensors computed from constants
only (which onnxruntime folds at load).

``Weight`` is the one weight abstraction of the passes: prune, quantize, share and cluster each
collect the weights they may touch (their own order and filters), and read, write and place
them through it.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues

from optimizer.graph.interface import TRAINING_BINDING_REASON, training_bound_ids
from optimizer.graph.opsets import DEFAULT_DOMAINS
from optimizer.graph.walk import ScopeTree, TensorUse, iter_graphs, node_subgraphs


def is_constant_derived(tensor: gs.Tensor, memo: dict[int, bool | None]) -> bool:
    """True when ``tensor`` is computed from constants only (onnxruntime folds it at load, so it is
    a weight, not an activation). ``memo`` caches answers by tensor id across calls."""
    stack = [(tensor, False)]
    while stack:
        current, expanded = stack.pop()
        key = id(current)
        if isinstance(current, gs.Constant):
            memo[key] = True
            continue
        producers = current.inputs
        if len(producers) != 1 or producers[0].domain not in DEFAULT_DOMAINS or node_subgraphs(producers[0]):
            memo[key] = False
            continue
        inputs = [t for t in producers[0].inputs if t.name]
        if expanded:
            memo[key] = all(isinstance(t, gs.Constant) or memo.get(id(t)) is True for t in inputs)
        elif key not in memo:  # None while in progress: a cycle reads as "not constant"
            memo[key] = None
            stack.append((current, True))
            stack.extend((t, False) for t in inputs if id(t) not in memo)
    return memo[id(tensor)] is True


def is_constant_node(node: gs.Node) -> bool:
    return node.op == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.outputs) == 1


def constant_node_values(node: gs.Node) -> np.ndarray | None:
    """The tensor a Constant node produces, or None when it holds a sparse or unknown value."""
    attrs = node.attrs
    if "value" in attrs and isinstance(attrs["value"], gs.Constant):
        return attrs["value"].values
    scalar_forms = {
        "value_float": np.float32,
        "value_floats": np.float32,
        "value_int": np.int64,
        "value_ints": np.int64,
    }
    for key, dtype in scalar_forms.items():
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    return None


def weight_values(tensor: gs.Tensor) -> np.ndarray | None:
    """Values of a weight held as an initializer or produced by a Constant node, else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    producers = tensor.inputs
    if len(producers) == 1 and is_constant_node(producers[0]):
        return constant_node_values(producers[0])
    return None


@dataclass(eq=False)
class Weight:
    """A stored tensor: an initializer (``gs.Constant``) or the output of Constant node ``node``
    (held by graph ``home``), with the input slots that read it (``uses``, those a pass selected).

    ``owner`` is the graph where a pass places what replaces the weight (quantize's dequantizing
    nodes); ``protected`` says why the weight must keep its name ("" when it need not);
    ``order`` is its position in the collecting walk.
    """

    tensor: gs.Tensor
    node: gs.Node | None = None
    home: gs.Graph | None = None
    uses: list[TensorUse] = field(default_factory=list)
    array: np.ndarray | None = field(default=None, repr=False)
    order: int = 0
    protected: str = ""
    owner: gs.Graph | None = None
    digests: dict[int, bytes] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def values(self) -> np.ndarray:
        """The weight's values, read once (a Constant node's scalar forms included)."""
        if self.array is None:
            values = weight_values(self.tensor)
            if values is None:
                raise ValueError(f"tensor '{self.name}' holds no stored values")
            self.array = values
        return self.array

    def take_over(self, dtype: type[np.generic]) -> gs.Variable:
        """The weight's own tensor, turned into a computed ``dtype`` value (the caller adds the node that
        makes it), so its readers need no rewiring; a Constant node holding it loses its output."""
        tensor = self.tensor
        shape = list(self.values.shape)
        if self.node is not None:
            self.node.outputs.clear()
            tensor.dtype, tensor.shape = dtype, shape
            return tensor  # type: ignore[return-value]
        variable = tensor.to_variable(dtype=dtype, shape=shape)
        variable.type = "tensor_type"
        return variable

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)

    @property
    def consumers(self) -> list[gs.Node]:
        """Every node reading the tensor, once each, whichever slots a pass selected."""
        unique = {id(node): node for node in self.tensor.outputs}
        return list(unique.values())

    def op_types(self) -> list[str]:
        return sorted({use.node.op for use in self.uses})

    def write(self, values: np.ndarray) -> None:
        """Store ``values`` where the weight lives (initializer or Constant node), so a weight shared
        by several nodes is changed once and stays shared."""
        if isinstance(self.tensor, gs.Constant):
            self.tensor.values = values
        else:
            producer = self.tensor.inputs[0]
            producer.attrs = {"value": gs.Constant(self.tensor.name, values)}
            self.tensor.shape = list(values.shape)
        self.array = None

    def detach_constant_node(self) -> None:
        """Take the Constant node producing the weight out of its graph; its output tensor is left
        for a new producer (or for nobody)."""
        if self.node is None or self.home is None:
            raise ValueError(f"weight '{self.name}' is not a Constant node's output")
        self.node.outputs.clear()
        self.home.nodes.remove(self.node)

    def digest(self) -> bytes:
        """A 16-byte hash of the raw bytes, computed once per tensor (per ``digests`` cache)."""
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

    def reader_graphs(self, tree: ScopeTree) -> list[gs.Graph]:
        return [tree.graph_of(node) for node in self.consumers]

    def storage_graphs(self, tree: ScopeTree) -> list[gs.Graph]:
        """Graphs that will hold a stored copy on export: the Constant node's graph, or each
        outermost graph whose nodes read the initializer."""
        if self.home is not None:
            return [self.home]
        return tree.outermost(self.reader_graphs(tree))

    def label(self, tree: ScopeTree) -> str:
        graphs = self.storage_graphs(tree)
        where = tree.path(graphs[0]) if graphs else "main"
        return self.name if where == "main" else f"{where}/{self.name}"

    def has_custom_consumer(self) -> bool:
        return any(node.domain not in DEFAULT_DOMAINS for node in self.consumers)


def _byte_view(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values).reshape(-1).view(np.uint8)


def constant_weight(tensor: gs.Tensor, uses: list[TensorUse] | None = None) -> Weight | None:
    """A Weight when ``tensor`` is an initializer or the output of a Constant node with a
    ``value`` tensor (not a scalar form), else None."""
    if isinstance(tensor, gs.Constant):
        return Weight(tensor, uses=uses if uses is not None else [])
    producers = tensor.inputs
    if (
        len(producers) == 1
        and is_constant_node(producers[0])
        and isinstance(producers[0].attrs.get("value"), gs.Constant)
    ):
        return Weight(tensor, producers[0], uses=uses if uses is not None else [])
    return None


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
                weights.append(
                    Weight(
                        tensor,
                        producer,
                        graph if producer is not None else None,
                        array=values,
                        order=len(weights),
                        protected=reason,
                        digests=digests,
                    )
                )
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


def assign_owners(root: gs.Graph, weights: list[Weight]) -> None:
    """Each weight's owner: the graph holding all its readers (out of Loop/Scan bodies)."""
    readers = _all_readers(root)
    tree = ScopeTree.build(root)
    for target in weights:
        target_readers = readers.get(id(target.tensor), [])
        graphs = [g for g, _ in target_readers] or [c.graph for c in target.uses]
        if target.node is not None:
            graphs.append(tree.node_graph.get(id(target.node), root))
        target.owner = tree.common_ancestor(graphs, hoist_out_of_loops=True)


def _all_readers(root: gs.Graph) -> dict[int, list[tuple[gs.Graph, gs.Node]]]:
    readers: dict[int, list[tuple[gs.Graph, gs.Node]]] = {}
    for graph in iter_graphs(root):
        for node in graph.nodes:
            for tensor in node.inputs:
                readers.setdefault(id(tensor), []).append((graph, node))
    return readers
