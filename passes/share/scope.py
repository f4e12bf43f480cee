"""Scope bookkeeping for weight sharing and clustering: the weights a graph holds (the graph tree is
``optimizer.graph.walk.ScopeTree``), and the graphs a weight will be stored in.

onnx-graphsurgeon shares one ``Constant`` object between a graph and the subgraphs that read it;
on export it becomes an initializer of every graph whose own nodes read it (``export_model`` then
drops the copies an enclosing graph already holds). So an initializer is stored once per
*outermost* graph reading it: a tensor read only inside both branches of an If is stored twice.
Passes that redirect readers use ``storage_graphs`` to count copies before and after.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from optimizer.graph.interface import TRAINING_BINDING_REASON
from optimizer.graph.weights import Weight, collect_weights

__all__ = ["TRAINING_BINDING_REASON", "collect_weights"]


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
