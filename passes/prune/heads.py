"""Attention heads as channel groups: the heads of one multi-head attention block, found from its
Softmax, removed whole (``head_dim`` channels at a time) from the Q, K and V projections (weights and
biases) and from the output projection's input rows.

The form matched is what exporters write for multi-head attention (torch's BERT-style export):

    x -> MatMul(Wq) [-> Add(bq)] -> Reshape([.., .., H | -1, d]) -> Transpose(0,2,1,3)  -\\
    x -> MatMul(Wk) [-> Add(bk)] -> Reshape(...)                 -> Transpose(0,2,3,1)  -> MatMul
         -> (Mul | Div by a scalar, Add | Sub | Where a mask)* -> Softmax -> MatMul(., V heads)
         -> Transpose(0,2,1,3) -> Reshape([.., .., H*d | -1]) -> MatMul(Wo)

A head count or width written in a Reshape
shape is rewritten; a mask operand must broadcast over the heads (checked on the observed shapes by
the caller: ``ChannelGroup.broadcasts``). Every tensor inside must be read only inside the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from optimizer.graph.walk import TensorUse
from optimizer.graph.weights import Weight, constant_weight
from passes.prune.channel_groups import ChannelGroup, Consumer, Illegal

SCORE_OPS = frozenset({"Mul", "Div", "Add", "Sub", "Where"})


@dataclass(frozen=True)
class Projection:
    matmul: gs.Node
    weight: Weight
    bias: Weight | None
    head_dim: int
    variables: tuple[tuple[gs.Tensor, int, int], ...]
    heads_entry: tuple[Weight, int] | None


class _Walk:
    """The block's nodes and tensors as they are found, checked for outside readers at the end."""

    def __init__(self, owner: gs.Graph, uses: dict[str, list[TensorUse]], outputs: frozenset[str]) -> None:
        self.owner, self.uses, self.outputs = owner, uses, outputs
        self.nodes: list[gs.Node] = []
        self.merge_variables: list[tuple[gs.Tensor, int]] = []

    def made_by(self, tensor: gs.Tensor, *ops: str) -> gs.Node:
        producers = tensor.inputs
        if len(producers) != 1 or producers[0].op not in ops:
            found = producers[0].op if producers else "a graph input"
            raise Illegal(f"'{tensor.name}' comes from {found}, not {' or '.join(ops)}")
        if tensor.name in self.outputs:
            raise Illegal(f"'{tensor.name}' is a graph output")
        readers = self.uses.get(tensor.name, [])
        if len(readers) != 1 or readers[0].graph is not self.owner:
            raise Illegal(f"'{tensor.name}' is read {len(readers)} times or inside a subgraph")
        self.nodes.append(producers[0])
        return producers[0]

    def constant(self, tensor: gs.Tensor) -> Weight | None:
        return constant_weight(tensor, self.uses.get(tensor.name, []))


def find_heads(softmax: gs.Node, owner: gs.Graph, uses: dict[str, list[TensorUse]], outputs) -> ChannelGroup:
    """The head group of the attention block around ``softmax``; raises Illegal with the reason."""
    walk = _Walk(owner, uses, outputs)
    walk.nodes.append(softmax)
    start = len(walk.nodes)
    scores, broadcasts = _scores(softmax.inputs[0], walk)
    chain = walk.nodes[start:]
    readers = uses.get(softmax.outputs[0].name, [])
    if len(readers) != 1 or readers[0].node.op != "MatMul" or readers[0].index != 0:
        raise Illegal(f"Softmax '{softmax.name}' output is not read by one MatMul as attention weights")
    context = readers[0].node
    walk.nodes.append(context)
    query = _projection(scores.inputs[0], ((0, 2, 1, 3),), walk)
    key = _projection(scores.inputs[1], ((0, 2, 3, 1),), walk)
    value = _projection(context.inputs[1], ((0, 2, 1, 3),), walk)
    output, merged, width_entry = _merge(context.outputs[0], walk)
    widths = {query.weight.values.shape[1], key.weight.values.shape[1], value.weight.values.shape[1]}
    dims = {query.head_dim, key.head_dim, value.head_dim}
    if len(widths) != 1 or len(dims) != 1 or output.values.shape[0] not in widths:
        raise Illegal(f"attention '{softmax.name}': widths {sorted(widths)} or head sizes {sorted(dims)} differ")
    group = _group((query, key, value), output, walk)
    score_tensors = [node.outputs[0] for node in (*chain, softmax, context)]
    group.variables.extend((tensor, -3, group.unit) for tensor in score_tensors)
    group.variables.append((merged, -1, 1))
    group.consumers.append(Consumer(walk.nodes[-1], output, 0, merged, -1))
    group.broadcasts.extend(broadcasts)
    group.scaling.extend([scores, context])
    for entry in (query.heads_entry, key.heads_entry, value.heads_entry):
        if entry is not None:
            group.reshapes.append((entry[0], entry[1], group.unit))
    if width_entry is not None:
        group.reshapes.append((width_entry[0], width_entry[1], 1))
    _check_inside(group, walk)
    return group


def _scores(tensor: gs.Tensor, walk: _Walk) -> tuple[gs.Node, list[gs.Tensor]]:
    """The Q x K^T MatMul under the score chain, and the mask operands met on the way."""
    broadcasts: list[gs.Tensor] = []
    for _ in range(8):
        node = walk.made_by(tensor, "MatMul", *SCORE_OPS)
        if node.op == "MatMul":
            return node, broadcasts
        chained = [i for i in node.inputs[1 if node.op == "Where" else 0 :] if _reaches_scores(i, 8)]
        if len(chained) != 1:
            raise Illegal(f"{node.op} '{node.name}' on the attention scores has no single score input")
        tensor = chained[0]
        for other in node.inputs:
            if other is tensor:
                continue
            constant = walk.constant(other)
            if node.op in ("Mul", "Div") and (constant is None or constant.values.size != 1):
                raise Illegal(f"{node.op} '{node.name}' scales the scores by a non-scalar")
            if constant is None:
                broadcasts.append(other)
            elif constant.values.ndim >= 3 and constant.values.shape[-3] != 1:
                raise Illegal(f"mask '{other.name}' of shape {list(constant.values.shape)} differs per head")
    raise Illegal("the attention score chain is longer than 8 ops")


def _reaches_scores(tensor: gs.Tensor, depth: int) -> bool:
    """Whether ``tensor`` is computed from a MatMul of two transposed tensors (Q x K^T) through
    score ops only."""
    if len(tensor.inputs) != 1 or depth == 0:
        return False
    node = tensor.inputs[0]
    if node.op == "MatMul":
        return all(len(i.inputs) == 1 and i.inputs[0].op == "Transpose" for i in node.inputs)
    return node.op in SCORE_OPS and any(_reaches_scores(i, depth - 1) for i in node.inputs)


def _projection(tensor: gs.Tensor, perms: tuple[tuple[int, ...], ...], walk: _Walk) -> Projection:
    transpose = walk.made_by(tensor, "Transpose")
    perm = tuple(int(p) for p in transpose.attrs.get("perm", ()))
    if perm not in perms:
        raise Illegal(f"Transpose '{transpose.name}' perm {list(perm)} is not a head split")
    reshape = walk.made_by(transpose.inputs[0], "Reshape")
    entries = _trailing_shape(reshape.inputs[1], walk)
    if len(entries) < 2 or entries[-1][0] <= 0:
        raise Illegal(f"Reshape '{reshape.name}' does not end in a constant [heads, head_dim]")
    heads, head_dim = entries[-2], entries[-1][0]
    node = walk.made_by(reshape.inputs[0], "Add", "MatMul")
    flat = [(node.outputs[0], -1, 1)]
    bias = None
    if node.op == "Add":
        constants = [(i, walk.constant(t)) for i, t in enumerate(node.inputs)]
        found = [(i, c) for i, c in constants if c is not None]
        if len(found) != 1:
            raise Illegal(f"Add '{node.name}' after the projection is not a bias add")
        index, bias = found[0]
        node = walk.made_by(node.inputs[1 - index], "MatMul")
        flat.append((node.outputs[0], -1, 1))
    weight = walk.constant(node.inputs[1])
    if weight is None or weight.values.ndim != 2 or weight.values.dtype.kind != "f":
        raise Illegal(f"MatMul '{node.name}' has no 2-D float constant weight")
    width = weight.values.shape[1]
    if width % head_dim or (heads[0] not in (-1, 0) and heads[0] * head_dim != width):
        raise Illegal(f"MatMul '{node.name}' width {width} is not heads x {head_dim}")
    if bias is not None and bias.values.size != width:
        raise Illegal(f"bias '{bias.name}' of '{node.name}' has {bias.values.size} values, not {width}")
    heads_entry = heads[1] if heads[0] > 0 else None
    variables = ((transpose.outputs[0], -3, head_dim), (reshape.outputs[0], -2, head_dim), *flat)
    return Projection(node, weight, bias, head_dim, variables, heads_entry)


def _trailing_shape(tensor: gs.Tensor, walk: _Walk) -> list[tuple[int, tuple[Weight, int] | None]]:
    """The constant trailing entries of a Reshape shape, each with where it is stored."""
    constant = walk.constant(tensor)
    if constant is not None:
        return [(int(v), (constant, i)) for i, v in enumerate(constant.values.reshape(-1))]
    if len(tensor.inputs) != 1 or tensor.inputs[0].op != "Concat":
        return []
    entries: list[tuple[int, tuple[Weight, int] | None]] = []
    for part in reversed(tensor.inputs[0].inputs):
        value = walk.constant(part)
        if value is None:
            break
        entries = [(int(v), (value, i)) for i, v in enumerate(value.values.reshape(-1))] + entries
    return entries


def _merge(tensor: gs.Tensor, walk: _Walk) -> tuple[Weight, gs.Tensor, tuple[Weight, int] | None]:
    """The output projection's weight after the heads are merged back, the merged tensor, and the
    shape entry holding the width when it is written out."""
    readers = walk.uses.get(tensor.name, [])
    transpose = readers[0].node if len(readers) == 1 else None
    if transpose is None or transpose.op != "Transpose" or tuple(transpose.attrs.get("perm", ())) != (0, 2, 1, 3):
        raise Illegal(f"attention output '{tensor.name}' is not merged by one Transpose(0,2,1,3)")
    walk.nodes.append(transpose)
    walk.merge_variables = [(transpose.outputs[0], -2)]
    readers = walk.uses.get(transpose.outputs[0].name, [])
    reshape = readers[0].node if len(readers) == 1 else None
    if reshape is None or reshape.op != "Reshape":
        raise Illegal(f"Transpose '{transpose.name}' is not followed by one Reshape")
    walk.nodes.append(reshape)
    entries = _trailing_shape(reshape.inputs[1], walk)
    merged = reshape.outputs[0]
    readers = walk.uses.get(merged.name, [])
    project = readers[0].node if len(readers) == 1 and readers[0].index == 0 else None
    weight = walk.constant(project.inputs[1]) if project is not None and project.op == "MatMul" else None
    if project is None or weight is None or weight.values.ndim != 2 or merged.name in walk.outputs:
        raise Illegal(f"merged heads '{merged.name}' are not read by one MatMul with a 2-D constant weight")
    walk.nodes.append(project)
    if not entries or entries[-1][0] not in (-1, weight.values.shape[0]):
        raise Illegal(f"Reshape '{reshape.name}' does not end in the merged width or -1")
    return weight, merged, entries[-1][1] if entries[-1][0] > 0 else None


def _group(projections: tuple[Projection, ...], output: Weight, walk: _Walk) -> ChannelGroup:
    query = projections[0]
    width = query.weight.values.shape[1]
    group = ChannelGroup(query.matmul, width, (output, 0), unit=query.head_dim)
    for projection in projections:
        _slice(group, projection.weight, 1)
        if projection.bias is not None:
            _slice(group, projection.bias, projection.bias.values.ndim - 1)
        group.variables.extend(projection.variables)
    _slice(group, output, 0)
    group.scaling.extend(p.matmul for p in projections[1:])
    group.node_ids.update(id(node) for node in walk.nodes)
    group.variables.extend((tensor, axis, group.unit) for tensor, axis in walk.merge_variables)
    return group


def _slice(group: ChannelGroup, weight: Weight, axis: int) -> None:
    if weight.name in group.slices and group.slices[weight.name][1] != axis:
        raise Illegal(f"weight '{weight.name}' would be cut along two axes")
    group.slices[weight.name] = (weight, axis)


def _check_inside(group: ChannelGroup, walk: _Walk) -> None:
    for name in sorted(group.slices):
        for use in walk.uses.get(name, []):
            if id(use.node) not in group.node_ids:
                raise Illegal(f"weight '{name}' is also read by {use.node.op} '{use.node.name}'")
    unique = {weight.name: (weight, position, divisor) for weight, position, divisor in group.reshapes}
    for name in sorted(unique):
        for use in walk.uses.get(name, []):
            if id(use.node) not in group.node_ids:
                raise Illegal(f"Reshape shape '{name}' is also read by {use.node.op} '{use.node.name}'")
    if len({(weight.name, position, divisor) for weight, position, divisor in group.reshapes}) != len(unique):
        raise Illegal("a Reshape shape constant of the block would change in two places")
    group.reshapes[:] = [unique[name] for name in sorted(unique)]


def broadcast_problem(group: ChannelGroup, shapes: dict[str, tuple[int, ...]]) -> str:
    """Why a mask operand of the head group does not broadcast over the heads ("" when all do)."""
    for tensor in group.broadcasts:
        shape = shapes.get(tensor.name)
        if shape is None:
            return f"mask '{tensor.name}' was not observed"
        if len(shape) >= 3 and shape[-3] != 1:
            return f"mask '{tensor.name}' of shape {list(shape)} differs per head"
    return ""
