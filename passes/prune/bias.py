"""A layer's bias, for the prune passes that move a removed weight's mean contribution into it.

A Conv, ConvTranspose or Gemm has its bias input (added when absent); a MatMul has the constant of
the one Add after it, when that constant is float32, read by that Add only, and one value per
output. Anything else has no bias these passes can change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.graph.names import NameAllocator
from optimizer.graph.walk import TensorUse
from optimizer.graph.weights import Weight, constant_weight


@dataclass(frozen=True)
class Bias:
    """Where a layer's bias lives: an existing constant, or a new third input of ``node``.
    ``scale`` turns a change of the layer's matrix product into a change of the bias (Gemm: 1 / beta
    x alpha; otherwise 1)."""

    weight: Weight | None
    node: gs.Node
    scale: float


def layer_bias(node: gs.Node, outputs: int, uses: dict[str, list[TensorUse]]) -> Bias | str:
    """The bias of ``node`` (``outputs`` values), existing or addable, or why it cannot be changed."""
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        if beta == 0.0:
            return f"{node.op} '{node.name}' has beta=0"
        if len(node.inputs) < 3 or not node.inputs[2].name:
            return Bias(None, node, alpha / beta)
        bias = constant_weight(node.inputs[2], uses.get(node.inputs[2].name, []))
        if bias is None or len(uses.get(bias.name, [])) != 1 or bias.values.shape != (outputs,):
            return f"the bias of {node.op} '{node.name}' is not a constant of {outputs} values read by it alone"
        return Bias(bias, node, alpha / beta)
    readers = uses.get(node.outputs[0].name, [])
    if len(readers) != 1 or readers[0].node.op != "Add":
        return f"{node.op} '{node.name}' is not followed by one Add (no bias)"
    add = readers[0].node
    other = add.inputs[1 - readers[0].index]
    bias = constant_weight(other, uses.get(other.name, []))
    if bias is None or len(uses.get(bias.name, [])) != 1 or bias.values.dtype != np.float32:
        return f"the Add '{add.name}' after {node.op} '{node.name}' adds no float32 constant of its own"
    if bias.values.size != outputs:
        return f"the Add '{add.name}' after {node.op} '{node.name}' adds {bias.values.size} values, not {outputs}"
    return Bias(bias, add, 1.0)


def add_to_bias(bias: Bias, change: np.ndarray, names: NameAllocator) -> None:
    """Add ``change`` (one value per output, in units of the layer's matrix product) to the bias."""
    if bias.weight is not None:
        values = bias.weight.values
        updated = values.astype(np.float64) + (change * bias.scale).reshape(values.shape)
        bias.weight.write(updated.astype(values.dtype))
        return
    node = bias.node
    values = (change * bias.scale).astype(np.float32)
    constant = gs.Constant(names.fresh(node.name or node.outputs[0].name, "_bias"), values)
    if len(node.inputs) == 2:
        node.inputs.append(constant)
    else:
        node.inputs[2] = constant
