"""Scope bookkeeping for weight sharing and clustering: the weights a graph holds (the graph tree is
``optimizer.graph.walk.ScopeTree``), and the graphs a weight will be stored in.

onnx-graphsurgeon shares one ``Constant`` object between a graph and the subgraphs that read it;
on export it becomes an initializer of every graph whose own nodes read it (``export_model`` then
drops the copies an enclosing graph already holds). So an initializer is stored once per
*outermost* graph reading it: a tensor read only inside both branches of an If is stored twice.
Passes that redirect readers use ``storage_graphs`` to count copies before and after.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues

from optimizer.graph.interface import training_bound_ids
from optimizer.graph.walk import iter_graphs
from optimizer.graph.weights import Weight, constant_node_values, is_constant_node

TRAINING_BINDING_REASON = "bound by training_info (initialization_binding / update_binding)"


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
        weight.detach_constant_node()
