"""N:M semi-structured sparsity: keep N of every M consecutive weights along the reduction axis.

The reduction axis is the one a matrix multiply sums over, so the groups line up with what
sparse tensor cores read: MatMul weight [K, N] groups along K; Gemm B along K ([K, N] with
transB=0, [N, K] with transB=1); Conv [O, I/g, kh, kw] along I*kh*kw in the (kh, kw, I) order
of an implicit GEMM over NHWC data, which is groups of M input channels at each kernel
position (so I/g must be divisible by M); ConvTranspose [I, O/g, kh, kw] along I.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optimizer.graph.walk import TensorUse


@dataclass(frozen=True)
class ReductionLayout:
    """Which axis of the weight is summed over, and how long one group's reduction run is."""

    axis: int
    run_length: int


def reduction_layout(use: TensorUse, shape: tuple[int, ...]) -> ReductionLayout | str:
    """The layout of the weight read at ``use``, or the reason it has none."""
    node, rank = use.node, len(shape)
    if node.op == "MatMul":
        if rank < 2:
            return "MatMul weight of rank < 2 has no separate reduction axis"
        return ReductionLayout(rank - 2, shape[rank - 2])
    if node.op == "Gemm":
        axis = 1 if node.attrs.get("transB", 0) else 0
        return ReductionLayout(axis, shape[axis])
    if node.op == "Conv":
        return ReductionLayout(1, shape[1])
    if node.op == "ConvTranspose":
        group = int(node.attrs.get("group", 1))
        return ReductionLayout(0, shape[0] // group)
    return f"{node.op} has no reduction axis (N:M applies to Conv, ConvTranspose, Gemm, MatMul)"


def weight_layout(uses: list[TensorUse], shape: tuple[int, ...], m: int) -> ReductionLayout | str:
    """One layout all consumers agree on, whose reduction run is divisible by ``m``."""
    layouts = [reduction_layout(use, shape) for use in uses]
    reasons = [layout for layout in layouts if isinstance(layout, str)]
    if reasons:
        return reasons[0]
    if len(set(layouts)) != 1:
        return "its consumers reduce over different axes"
    layout = layouts[0]
    if isinstance(layout, str):  # unreachable: reasons returned above
        return layout
    if layout.run_length % m:
        return f"reduction length {layout.run_length} (axis {layout.axis}) is not divisible by M={m}"
    return layout


def nm_prune(
    values: np.ndarray, layout: ReductionLayout, n: int, m: int, scores: np.ndarray | None = None
) -> np.ndarray:
    """Zero the M-N lowest-ranked weights of every group of M along the reduction axis, ranked by
    ``scores`` (same shape as ``values``; Wanda's) or by magnitude.

    Ties keep index order (stable sort), so the pattern is the same on every run.
    """
    moved = np.moveaxis(values, layout.axis, -1)
    groups = moved.reshape(-1, m)
    ranking = np.abs(groups) if scores is None else np.moveaxis(scores, layout.axis, -1).reshape(-1, m)
    order = np.argsort(ranking, axis=1, kind="stable")[:, : m - n]
    pruned = groups.copy()
    np.put_along_axis(pruned, order, 0, axis=1)
    return np.ascontiguousarray(np.moveaxis(pruned.reshape(moved.shape), -1, layout.axis))


def follows_nm(values: np.ndarray, layout: ReductionLayout, n: int, m: int) -> bool:
    """True when every group of M along the reduction axis holds at most N non-zeros."""
    groups = np.moveaxis(values, layout.axis, -1).reshape(-1, m)
    return bool((np.count_nonzero(groups, axis=1) <= n).all())
