"""The one table of weight axes: for a weight read at a node's input slot, which axis indexes output
channels, which one a dot product reduces over, and which one a lookup indexes.

Passes mean different axes and say so by name: quantize gives a Gather table one scale per looked-up
row (``lookup``, what onnxruntime's GatherBlockQuantized expects) and one per output channel elsewhere;
cluster gives every reader one codebook per ``output`` column (a Gather table's feature axis). Keeping
both answers in one table makes the disagreement visible instead of hiding it in two functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

RECURRENT_OPS = ("LSTM", "GRU", "RNN")


@dataclass(frozen=True)
class WeightAxes:
    """Axes of one weight as its reader uses it; ``None`` when the reader has no such axis."""

    output: int
    reduction: int | None
    lookup: int | None = None


def weight_axes(node: gs.Node, slot: int, ndim: int) -> WeightAxes:
    """Axes of the ``ndim``-D weight ``node`` reads at input ``slot`` (the op's weight slot: Gemm's B,
    Conv's W, Gather's data, a recurrent op's W or R). Unknown ops: output axis 0, no reduction."""
    op = node.op
    if op == "MatMul":
        return WeightAxes(ndim - 1, ndim - 2 if ndim >= 2 else None)
    if op == "Gemm":
        if slot == 0:  # A is [M, K], or [K, M] with transA
            trans_a = bool(node.attrs.get("transA", 0))
            return WeightAxes(1 if trans_a else 0, 0 if trans_a else 1)
        trans_b = bool(node.attrs.get("transB", 0))  # B is [K, N], or [N, K] with transB
        return WeightAxes(0 if trans_b else 1, 1 if trans_b else 0)
    if op == "Conv":
        return WeightAxes(0, 1)
    if op == "ConvTranspose":
        return WeightAxes(1, 0)
    if op == "Gather":
        lookup = int(node.attrs.get("axis", 0)) % ndim if ndim else None
        feature = 1 - lookup if ndim == 2 and lookup is not None else None
        return WeightAxes(ndim - 1, feature, lookup)
    if op in RECURRENT_OPS:  # W [dirs, gates*hidden, input], R [dirs, gates*hidden, hidden]
        return WeightAxes(1, 2)
    return WeightAxes(0, None)
