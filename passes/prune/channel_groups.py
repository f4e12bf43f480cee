"""Channel groups for structured pruning: one layer's output channels and everything that must
shrink with them.

Starting from a producer (Conv, ConvTranspose, Gemm, MatMul with a constant weight), the
channel tensor is followed through channel-transparent ops (elementwise activations, binary
ops whose other operand is a constant or another tensor of the same group, BatchNormalization,
pooling, depthwise Conv, Flatten/Reshape after a global pool) to the layers that consume the
channels (Conv, ConvTranspose, Gemm, MatMul inputs). Every constant on the way that spans the
channel axis is sliced with it. Anything else (a residual Add with another branch, Concat, a
graph output, a read inside a subgraph, a layout change) makes the group illegal, with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.graph.walk import TensorUse
from optimizer.graph.weights import Weight, constant_weight
from passes.prune.weights import is_default_domain

UNARY_OPS = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "HardSigmoid",
        "HardSwish",
        "Erf",
        "Gelu",
        "Elu",
        "Selu",
        "Celu",
        "Softplus",
        "Softsign",
        "Mish",
        "Exp",
        "Log",
        "Abs",
        "Neg",
        "Sqrt",
        "Reciprocal",
        "Identity",
        "Dropout",
        "Clip",
        "Floor",
        "Ceil",
        "Round",
        "Sin",
        "Cos",
        "Cast",
        "ThresholdedRelu",
        "Sign",
    }
)
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu", "Sum", "Mean"})
POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
CHANNEL_NORMS = frozenset({"BatchNormalization", "InstanceNormalization"})


@dataclass(frozen=True)
class Layout:
    """Where the channels are: ``axis`` counted from the end; ``rank`` when known (NCHW data)."""

    axis: int
    rank: int | None = None
    spatial_one: bool = False

    @property
    def is_nchw(self) -> bool:
        return self.rank is not None and self.rank >= 3 and self.axis == 1 - self.rank

    @property
    def is_last(self) -> bool:
        return self.axis == -1


@dataclass(frozen=True)
class Consumer:
    """A layer reading the group's channels: its weight's channel ``axis``, and the data tensor it
    reads them from with their axis there (counted from the end)."""

    node: gs.Node
    weight: Weight
    axis: int
    data: gs.Tensor
    data_axis: int


@dataclass
class ChannelGroup:
    """Channels removed together, ``unit`` at a time (an attention head is ``head_dim`` channels).
    ``variables`` and ``reshapes`` hold (tensor or shape constant, axis or position, divisor): the
    size there becomes the kept channel count over the divisor (a head count divides by the unit).
    ``scaling`` are the nodes besides producer and consumers whose work scales with the channels."""

    producer: gs.Node
    channels: int
    score: tuple[Weight, int]
    unit: int = 1
    slices: dict[str, tuple[Weight, int]] = field(default_factory=dict)
    variables: list[tuple[gs.Tensor, int, int]] = field(default_factory=list)
    depthwise: list[gs.Node] = field(default_factory=list)
    scaling: list[gs.Node] = field(default_factory=list)
    reshapes: list[tuple[Weight, int, int]] = field(default_factory=list)
    broadcasts: list[gs.Tensor] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    node_ids: set[int] = field(default_factory=set)
    pending: list[tuple[gs.Node, str]] = field(default_factory=list)


class Illegal(Exception):
    """The group cannot be pruned; the message is the reason for the report."""


def find_group(
    node: gs.Node, owner: gs.Graph, uses: dict[str, list[TensorUse]], outputs: frozenset[str]
) -> ChannelGroup:
    """The channel group of producer ``node``; raises Illegal with the reason."""
    group, layout = _producer(node, uses)
    frontier = [(node.outputs[0], layout)]
    seen: dict[str, Layout] = {}
    while frontier:
        tensor, layout = frontier.pop()
        if tensor.name in seen:
            continue
        seen[tensor.name] = layout
        group.variables.append((tensor, layout.axis, 1))
        if tensor.name in outputs:
            raise Illegal(f"channel tensor '{tensor.name}' is a graph output")
        for use in uses.get(tensor.name, []):
            if use.graph is not owner:
                raise Illegal(f"channel tensor '{tensor.name}' is read inside a subgraph")
            if id(use.node) not in group.node_ids:
                group.node_ids.add(id(use.node))
                frontier.extend(_visit(use, layout, group, uses))
    for user, name in group.pending:
        if name not in seen:
            raise Illegal(
                f"{user.op} '{user.name}' combines the channels with another branch ('{name}'),"
                " e.g. a residual connection"
            )
    _check_exclusive(group, uses)
    return group


def _producer(node: gs.Node, uses) -> tuple[ChannelGroup, Layout]:
    weight = _constant(node, 1, uses)
    if weight is None or weight.values.dtype.kind != "f":
        raise Illegal(f"{node.op} weight is not a float constant")
    shape = weight.values.shape
    if node.op in ("Conv", "ConvTranspose"):
        if int(node.attrs.get("group", 1)) != 1:
            raise Illegal(
                f"grouped {node.op} (group={node.attrs['group']}): its output channels follow its input channels"
            )
        out_axis = 0 if node.op == "Conv" else 1
        layout = Layout(1 - len(shape), len(shape))
    elif node.op == "Gemm":
        out_axis, layout = (0 if node.attrs.get("transB", 0) else 1), Layout(-1, 2)
    elif len(shape) == 2:
        out_axis, layout = 1, Layout(-1)
    else:
        raise Illegal(f"MatMul weight of rank {len(shape)}: only 2-D weights are pruned")
    group = ChannelGroup(node, shape[out_axis], (weight, out_axis))
    group.node_ids.add(id(node))
    _add_slice(group, weight, out_axis)
    if len(node.inputs) > 2 and node.inputs[2].name:
        _bias(node, group, uses)
    return group, layout


def _bias(node: gs.Node, group: ChannelGroup, uses) -> None:
    bias = _constant(node, 2, uses)
    if bias is None:
        raise Illegal(f"{node.op} bias is not a constant")
    shape = bias.values.shape
    if node.op != "Gemm" or (len(shape) == 1 and shape[0] == group.channels):
        _add_slice(group, bias, 0)
    elif len(shape) >= 1 and shape[-1] == group.channels:
        _add_slice(group, bias, len(shape) - 1)


def _visit(use: TensorUse, layout: Layout, group: ChannelGroup, uses) -> list[tuple[gs.Tensor, Layout]]:
    node = use.node
    if not is_default_domain(node):
        raise Illegal(f"custom op {node.domain}.{node.op} '{node.name}' reads the channels")
    if node.op in UNARY_OPS:
        _constants_only(node, range(1, len(node.inputs)), group, layout, uses)
        return [(node.outputs[0], layout)]
    if node.op in BINARY_OPS:
        return _binary(use, layout, group, uses)
    if node.op in CHANNEL_NORMS and use.index == 0:
        for index in range(1, len(node.inputs)):
            _add_slice(group, _required(node, index, uses), 0)
        return _single_output(node, layout)
    if node.op in POOL_OPS and layout.is_nchw:
        pooled = Layout(layout.axis, layout.rank, layout.spatial_one or node.op in GLOBAL_POOLS)
        return _single_output(node, pooled)
    if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and use.index == 0:
        return _consumer(node, layout, group, uses)
    if node.op in ("Flatten", "Reshape", "Squeeze") and layout.is_nchw and layout.spatial_one:
        return _flatten(node, layout, group, uses)
    if node.op == "Resize" and layout.is_nchw:
        return _resize(node, layout, uses)
    if node.op == "Concat":
        raise Illegal(f"Concat '{node.name}' joins the channels with other tensors")
    raise Illegal(f"{node.op} '{node.name}' reads the channels (input {use.index}); its layout cannot be followed")


def _binary(use: TensorUse, layout: Layout, group: ChannelGroup, uses) -> list[tuple[gs.Tensor, Layout]]:
    node = use.node
    for index, tensor in enumerate(node.inputs):
        if index == use.index:
            continue
        constant = _constant(node, index, uses)
        if constant is None:
            group.pending.append((node, tensor.name))
        else:
            _broadcast(node, constant, group, layout)
    return [(node.outputs[0], layout)]


def _broadcast(node: gs.Node, constant: Weight, group: ChannelGroup, layout: Layout) -> None:
    shape = constant.values.shape
    if len(shape) < -layout.axis or shape[layout.axis] == 1:
        return
    if shape[layout.axis] != group.channels:
        raise Illegal(f"{node.op} '{node.name}' constant '{constant.name}' has shape {list(shape)}")
    _add_slice(group, constant, len(shape) + layout.axis)


def _constants_only(node, indices, group, layout, uses) -> None:
    for index in indices:
        if node.inputs[index].name:
            constant = _constant(node, index, uses)
            if constant is None:
                raise Illegal(f"{node.op} '{node.name}' input {index} is not a constant")
            _broadcast(node, constant, group, layout)


def _consumer(node: gs.Node, layout: Layout, group: ChannelGroup, uses) -> list[tuple[gs.Tensor, Layout]]:
    weight = _required(node, 1, uses)
    if node.op in ("Conv", "ConvTranspose"):
        groups = int(node.attrs.get("group", 1))
        if groups == 1:
            axis = 0 if node.op == "ConvTranspose" else 1
            _add_slice(group, weight, axis)
            group.consumers.append(Consumer(node, weight, axis, node.inputs[0], layout.axis))
            return []
        if node.op == "Conv" and groups == group.channels and weight.values.shape[:2] == (groups, 1):
            _add_slice(group, weight, 0)
            if len(node.inputs) > 2 and node.inputs[2].name:
                _add_slice(group, _required(node, 2, uses), 0)
            group.depthwise.append(node)
            group.scaling.append(node)
            return _single_output(node, layout)
        raise Illegal(f"grouped {node.op} '{node.name}' (group={groups}) would need whole groups removed")
    if not layout.is_last or (node.op == "Gemm" and node.attrs.get("transA", 0)):
        raise Illegal(f"{node.op} '{node.name}' does not reduce over the channel axis")
    if weight.values.ndim != 2:
        raise Illegal(f"{node.op} '{node.name}' weight is not 2-D")
    axis = 1 if node.op == "Gemm" and node.attrs.get("transB", 0) else 0
    _add_slice(group, weight, axis)
    group.consumers.append(Consumer(node, weight, axis, node.inputs[0], layout.axis))
    return []


def _flatten(node: gs.Node, layout: Layout, group: ChannelGroup, uses) -> list[tuple[gs.Tensor, Layout]]:
    """[N, C, 1, 1] -> [N, C]: the channels become the last axis."""
    if node.op == "Flatten" and int(node.attrs.get("axis", 1)) != 1:
        raise Illegal(f"Flatten '{node.name}' with axis={node.attrs.get('axis')} mixes the batch and channels")
    if node.op == "Squeeze":
        axes = _constant(node, 1, uses) if len(node.inputs) > 1 else None
        wanted = axes.values.tolist() if axes is not None else node.attrs.get("axes")
        rank = layout.rank
        if rank is None or sorted(int(a) % rank for a in (wanted or [])) != list(range(2, rank)):
            raise Illegal(f"Squeeze '{node.name}' does not remove exactly the spatial axes")
    if node.op == "Reshape":
        shape = _required(node, 1, uses)
        target = shape.values.tolist()
        if len(target) != 2 or (target[0] == -1 and target[1] != group.channels):
            raise Illegal(f"Reshape '{node.name}' to {target}: layout after it cannot be followed")
        if target[1] == group.channels:
            group.reshapes.append((shape, 1, 1))
        elif target[1] != -1:
            raise Illegal(f"Reshape '{node.name}' to {target}: layout after it cannot be followed")
    return _single_output(node, Layout(-1, 2, True))


def _resize(node: gs.Node, layout: Layout, uses) -> list[tuple[gs.Tensor, Layout]]:
    scales = _constant(node, 2, uses) if len(node.inputs) > 2 and node.inputs[2].name else None
    has_sizes = len(node.inputs) > 3 and node.inputs[3].name
    if scales is None or has_sizes or scales.values.size != layout.rank or scales.values[1] != 1:
        raise Illegal(f"Resize '{node.name}' does not keep the channel axis (sizes or channel scale)")
    return _single_output(node, layout)


def _single_output(node: gs.Node, layout: Layout) -> list[tuple[gs.Tensor, Layout]]:
    extra = [t.name for t in node.outputs[1:] if t.name and t.outputs]
    if extra:
        raise Illegal(f"{node.op} '{node.name}' second output '{extra[0]}' is used")
    return [(node.outputs[0], layout)]


def _constant(node: gs.Node, index: int, uses) -> Weight | None:
    tensor = node.inputs[index]
    return constant_weight(tensor, uses.get(tensor.name, []))


def _required(node: gs.Node, index: int, uses) -> Weight:
    if index >= len(node.inputs) or not node.inputs[index].name:
        raise Illegal(f"{node.op} '{node.name}' has no input {index}")
    weight = _constant(node, index, uses)
    if weight is None:
        raise Illegal(f"{node.op} '{node.name}' input {index} is not a constant")
    return weight


def _add_slice(group: ChannelGroup, weight: Weight, axis: int) -> None:
    existing = group.slices.get(weight.name)
    if existing is not None and existing[1] != axis:
        raise Illegal(f"weight '{weight.name}' would be cut along two axes")
    if weight.values.shape[axis] != group.channels:
        raise Illegal(f"'{weight.name}' has {weight.values.shape[axis]} entries on axis {axis}, not {group.channels}")
    group.slices[weight.name] = (weight, axis)


def _check_exclusive(group: ChannelGroup, uses) -> None:
    """Every constant cut here must be read only by nodes of the group."""
    for name in sorted(group.slices):
        for use in uses.get(name, []):
            if id(use.node) not in group.node_ids:
                raise Illegal(f"weight '{name}' is also read by {use.node.op} '{use.node.name}'")
    for shape, _, _ in group.reshapes:
        if len(uses.get(shape.name, [])) != 1:
            raise Illegal(f"Reshape shape '{shape.name}' is shared with other nodes")


def channel_scores(group: ChannelGroup, criterion: str) -> np.ndarray:
    """L1 or L2 norm of the producer's weight, one value per output channel."""
    weight, axis = group.score
    values = np.moveaxis(weight.values.astype(np.float64), axis, 0).reshape(group.channels, -1)
    return np.abs(values).sum(axis=1) if criterion == "l1" else np.sqrt((values * values).sum(axis=1))
