"""Tests for optimizer.graph.axes, the one weight-axis table (output, reduction, lookup per op and slot)."""

from __future__ import annotations

import onnx_graphsurgeon as gs
import pytest

from optimizer.graph.axes import WeightAxes, weight_axes


def _node(op: str, **attrs: int) -> gs.Node:
    return gs.Node(op, attrs=attrs)


@pytest.mark.parametrize(("node", "slot", "ndim", "expected"), [
    (_node("MatMul"), 1, 2, WeightAxes(1, 0)),                      # [K, N]
    (_node("MatMul"), 1, 3, WeightAxes(2, 1)),                      # batched [B, K, N]
    (_node("Gemm"), 1, 2, WeightAxes(1, 0)),                        # B [K, N]
    (_node("Gemm", transB=1), 1, 2, WeightAxes(0, 1)),              # B [N, K]
    (_node("Gemm"), 0, 2, WeightAxes(0, 1)),                        # A [M, K]
    (_node("Gemm", transA=1), 0, 2, WeightAxes(1, 0)),              # A [K, M]
    (_node("Conv"), 1, 4, WeightAxes(0, 1)),                        # [out, in/group, kh, kw]
    (_node("ConvTranspose"), 1, 4, WeightAxes(1, 0)),               # [in, out/group, kh, kw]
    (_node("LSTM"), 1, 3, WeightAxes(1, 2)),                        # [dirs, 4*hidden, input]
    (_node("Relu"), 0, 2, WeightAxes(0, None)),
])
def test_output_and_reduction_axes(node: gs.Node, slot: int, ndim: int, expected: WeightAxes) -> None:
    assert weight_axes(node, slot, ndim) == expected


def test_gather_has_a_lookup_axis_apart_from_its_output_column() -> None:
    """quantize scales a Gather table per looked-up row (lookup), cluster per feature column (output)."""
    assert weight_axes(_node("Gather"), 0, 2) == WeightAxes(output=1, reduction=1, lookup=0)
    assert weight_axes(_node("Gather", axis=1), 0, 2) == WeightAxes(output=1, reduction=0, lookup=1)
    assert weight_axes(_node("Gather", axis=-1), 0, 3) == WeightAxes(output=2, reduction=None, lookup=2)
    assert weight_axes(_node("Gather"), 0, 0).lookup is None
