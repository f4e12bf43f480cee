"""Data-aware structured pruning: statistics from calibration data, the multiply-adds each channel
costs, and the layers after a pruned group re-fitted by least squares (``optimizer.calibration.
channel_obs`` has the math).

For every legal channel group, the tensors its consumers read are observed on the calibration
feeds (second moments with a constant feature, so a removed channel's mean moves into the
consumer's bias). A consumer's bias is its bias input (Conv, ConvTranspose, Gemm: added when
absent) or, for a MatMul, the constant of the one Add after it; without one, the refit has no
intercept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.calibration.channel_obs import ChannelProblem, refit
from optimizer.calibration.gptq import HessianAccumulator
from optimizer.calibration.observe import Sampling, observe_activations
from optimizer.graph.names import NameAllocator
from optimizer.graph.walk import TensorUse
from optimizer.graph.weights import weight_values
from passes.prune.bias import Bias, add_to_bias, layer_bias
from passes.prune.channel_groups import ChannelGroup, Consumer

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class GroupStatistics:
    """Second moments (channels + constant) of each observed tensor, keyed by name, and the shape
    of every tensor observed on the first sample."""

    moments: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    samples: int
    rows: dict[str, int]


def observe_groups(
    graph: gs.Graph, groups: list[ChannelGroup], feeds: Callable[[], Iterable], sampling: Sampling
) -> GroupStatistics:
    """The consumers' input moments over the calibration feeds, and tensor shapes on one sample."""
    axes = {c.data.name: (c.data_axis, group.channels) for group in groups for c in group.consumers}
    accumulators = {name: HessianAccumulator(channels + 1) for name, (_, channels) in sorted(axes.items())}

    def visit(name: str, value: np.ndarray) -> None:
        axis, channels = axes[name]
        if value.ndim >= -axis and value.shape[axis] == channels:
            rows = np.moveaxis(value, axis, -1).reshape(-1, channels)
            accumulators[name].add(np.hstack([rows, np.ones((rows.shape[0], 1), rows.dtype)]))

    samples = observe_activations(graph, sorted(axes), feeds, visit, sampling, stage="channel statistics")
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str, value: np.ndarray) -> None:
        shapes.setdefault(name, value.shape)

    masks = [tensor.name for group in groups for tensor in group.broadcasts]
    names = sorted(set(_shape_names(graph)) | set(masks))
    observe_activations(graph, names, feeds, record, Sampling(1, sampling.provider, sampling.timeout_s))
    moments = {name: accumulator.hessian() for name, accumulator in accumulators.items() if accumulator.rows}
    rows = {name: accumulator.rows for name, accumulator in accumulators.items()}
    return GroupStatistics(moments, shapes, samples, rows)


def _shape_names(graph: gs.Graph) -> list[str]:
    """The data inputs and outputs of every multiply-add node (constants' shapes are stored)."""
    names: set[str] = set()
    for node in graph.nodes:
        if node.op in MAC_OPS:
            names.update(tensor.name for tensor in node.inputs[:2] if tensor.name and weight_values(tensor) is None)
            names.add(node.outputs[0].name)
    return sorted(names)


def node_macs(node: gs.Node, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-adds of one Conv/ConvTranspose/Gemm/MatMul on the observed shapes (0 if unknown)."""
    output = shapes.get(node.outputs[0].name)
    weight = _shape_of(node.inputs[1], shapes)
    data = _shape_of(node.inputs[0], shapes)
    if output is None or weight is None or data is None:
        return 0
    if node.op == "Conv":
        return int(np.prod(output)) * int(np.prod(weight[1:]))
    if node.op == "ConvTranspose":
        return int(np.prod(data)) * int(np.prod(weight[1:]))
    if node.op == "Gemm":
        return int(np.prod(output)) * int(data[0] if node.attrs.get("transA", 0) else data[-1])
    return int(np.prod(output)) * int(data[-1])


def _shape_of(tensor: gs.Tensor, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    stored = weight_values(tensor)
    return tuple(stored.shape) if stored is not None else shapes.get(tensor.name)


def total_macs(graph: gs.Graph, shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(node_macs(node, shapes) for node in graph.nodes if node.op in MAC_OPS)


def channel_macs(group: ChannelGroup, shapes: dict[str, tuple[int, ...]]) -> float:
    """Multiply-adds one channel of the group costs: its share of the producer, the consumers and
    the nodes between them whose work scales with the channels (depthwise Convs, attention)."""
    nodes = [group.producer, *group.scaling, *(c.node for c in group.consumers)]
    return sum(node_macs(node, shapes) for node in nodes) / group.channels


def observed_problems(
    group: ChannelGroup, statistics: GroupStatistics, uses: dict[str, list[TensorUse]]
) -> list[tuple[Consumer, ChannelProblem]]:
    """One least-squares problem per float32 consumer whose input was observed (current weights)."""
    found = []
    for consumer in group.consumers:
        moments = statistics.moments.get(consumer.data.name)
        values = consumer.weight.values
        if moments is None or values.dtype != np.float32:
            continue
        intercept = consumer_bias(consumer, uses) is not None
        size = group.channels + 1 if intercept else group.channels
        weight = np.moveaxis(values, consumer.axis, 0).reshape(group.channels, -1)
        found.append((consumer, ChannelProblem(moments[:size, :size], weight, intercept)))
    return found


def consumer_bias(consumer: Consumer, uses: dict[str, list[TensorUse]]) -> Bias | None:
    """The consumer's bias (existing or addable), or None when the refit cannot change one."""
    node = consumer.node
    outputs = consumer.weight.values.shape[1 - consumer.axis]
    if node.op == "ConvTranspose":
        outputs *= int(node.attrs.get("group", 1))
    found = layer_bias(node, outputs, uses)
    return None if isinstance(found, str) else found


def reconstruct(
    group: ChannelGroup,
    removed: np.ndarray,
    statistics: GroupStatistics,
    uses: dict[str, list[TensorUse]],
    damping: float,
    names: NameAllocator,
) -> list[dict[str, object]]:
    """Re-fit every observed consumer without the ``removed`` channels (weights written at full
    width; the caller then cuts them); returns per consumer the relative output error before and
    after the refit."""
    errors = []
    for consumer, problem in observed_problems(group, statistics, uses):
        result = refit(problem, removed, damping)
        values = np.moveaxis(consumer.weight.values, consumer.axis, 0)
        rows = values.reshape(group.channels, -1).copy()
        rows[np.setdiff1d(np.arange(group.channels), removed)] = result.kept_weight
        consumer.weight.write(np.ascontiguousarray(np.moveaxis(rows.reshape(values.shape), 0, consumer.axis)))
        if result.bias_delta is not None:
            bias = consumer_bias(consumer, uses)
            if bias is not None:
                add_to_bias(bias, result.bias_delta.reshape(values.shape[1], -1).sum(axis=1), names)
        entry: dict[str, object] = {
            "layer": consumer.node.name or consumer.node.outputs[0].name,
            "output_error_before": round(result.error_before, 6),
            "output_error_after": round(result.error_after, 6),
        }
        fitted = statistics.rows.get(consumer.data.name, 0)
        if fitted < group.channels:
            entry["note"] = (
                f"fitted on {fitted} calibration rows for {group.channels} channels: the refit can overfit"
                " (the errors above are on the calibration data); give more calibration data"
            )
        errors.append(entry)
    return errors
