"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
score each weight by |w| x ||x_j||_2, the L2 norm over the calibration samples of the input feature
it multiplies, and zero the lowest scores within each output (all of its inputs for unstructured
sparsity, each group of M for N:M). One pass of input norms and no weight update: a weight on a
feature that is always near zero goes first, a small weight on a feature with large activations
(the outlier channels of transformers) stays.

Input features: MatMul X[..., K] @ W[K, N] (feature k is row k of W); Gemm A[M, K] (transA: [K, M]);
Conv X[N, C, ...] with W[O, C/g, kh, kw] (the feature is the input channel, at every kernel
position). A weight with no such statistics (read inside a subgraph, by a ConvTranspose, as a batched
MatMul operand, or by readers whose inputs disagree in length) is pruned by magnitude; the report
says which and why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.calibration.observe import Sampling, observe_activations
from optimizer.graph.walk import TensorUse
from optimizer.graph.weights import Weight


@dataclass(frozen=True)
class FeatureInput:
    """Where a weight's input features come from: ``tensor`` (a main-graph activation) and the axis
    of it that holds the features."""

    tensor: str
    axis: int


def feature_input(use: TensorUse, rank: int, graph: gs.Graph) -> FeatureInput | str:
    """The activation whose features ``use``'s weight (of ``rank`` dimensions) multiplies, or why
    there is none."""
    node = use.node
    if use.graph is not graph:
        return f"read inside a subgraph of {node.op} '{node.name}' (no input statistics there)"
    data = node.inputs[0]
    if node.op == "MatMul" and use.index == 1 and rank == 2:
        return FeatureInput(data.name, -1)
    if node.op == "Gemm" and use.index == 1:
        return FeatureInput(data.name, 0 if node.attrs.get("transA", 0) else -1)
    if node.op == "Conv" and use.index == 1:
        return FeatureInput(data.name, 1)
    return f"{node.op} '{node.name}' reads it at input {use.index}: no per-feature input statistics"


def output_axis(use: TensorUse) -> int:
    """The weight axis that indexes outputs: each output's inputs compete among themselves."""
    node = use.node
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 0 if node.op == "Conv" else 1


def input_norms(
    graph: gs.Graph, inputs: Iterable[FeatureInput], feeds: Callable[[], Iterable], settings: Sampling
) -> tuple[dict[FeatureInput, np.ndarray], int]:
    """||x_j||_2 per feature of every input over up to ``settings.max_samples`` calibration samples
    (streamed: one sum of squares per feature is kept), and the number of samples run."""
    wanted: dict[str, list[FeatureInput]] = {}
    for item in inputs:
        wanted.setdefault(item.tensor, []).append(item)
    sums: dict[FeatureInput, np.ndarray] = {}

    def visit(name: str, value: np.ndarray) -> None:
        for item in wanted.get(name, []):
            moved = np.moveaxis(value, item.axis, -1).reshape(-1, value.shape[item.axis]).astype(np.float64)
            squares = np.einsum("ij,ij->j", moved, moved)
            previous = sums.get(item)
            sums[item] = squares if previous is None or previous.shape != squares.shape else previous + squares

    samples = observe_activations(
        graph,
        sorted(wanted),
        feeds,
        visit,
        settings,
        stage="Wanda input norms",
    )
    return {item: np.sqrt(total) for item, total in sums.items()}, samples


def feature_scale(weight: Weight, use: TensorUse, norm: np.ndarray) -> np.ndarray | str:
    """``norm`` laid out against ``weight``'s values (broadcastable), or why it does not fit."""
    shape = weight.values.shape
    node = use.node
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        per_group = shape[1]
        if norm.size != per_group * group or shape[0] % group:
            return f"input has {norm.size} channels, weight expects {per_group * group}"
        channel = (np.arange(shape[0]) // (shape[0] // group))[:, None] * per_group + np.arange(per_group)[None, :]
        return norm[channel].reshape(shape[0], per_group, *([1] * (len(shape) - 2)))
    reduction = 1 - output_axis(use)
    if norm.size != shape[reduction]:
        return f"input has {norm.size} features, weight reduces over {shape[reduction]}"
    return norm.reshape(-1, 1) if reduction == 0 else norm.reshape(1, -1)


def wanda_scores(weight: Weight, scales: list[np.ndarray]) -> np.ndarray:
    """|w| x the input norm, the norms of several readers combined as sqrt(sum of squares)."""
    combined = np.sqrt(sum(np.asarray(scale, np.float64) ** 2 for scale in scales))
    return np.abs(weight.values.astype(np.float64)) * combined


def prune_rows(values: np.ndarray, scores: np.ndarray, axis: int, sparsity: float) -> np.ndarray:
    """Zero round(sparsity x length) lowest-scoring weights of each output along ``axis`` (stable ties).
    An output that already has that many zeros is left as it is: a second run measures the input
    norms of the pruned model, which differ, and must not prune again."""
    moved = np.moveaxis(values, axis, 0)
    rows = moved.reshape(moved.shape[0], -1).copy()
    ranked = np.moveaxis(np.broadcast_to(scores, values.shape), axis, 0).reshape(rows.shape)
    count = int(np.floor(sparsity * rows.shape[1] + 0.5))
    open_rows = np.flatnonzero(np.count_nonzero(rows == 0, axis=1) < count)
    if count and open_rows.size:
        order = np.argsort(ranked[open_rows], axis=1, kind="stable")[:, :count]
        chosen = rows[open_rows]
        np.put_along_axis(chosen, order, 0, axis=1)
        rows[open_rows] = chosen
    return np.ascontiguousarray(np.moveaxis(rows.reshape(moved.shape), 0, axis))
