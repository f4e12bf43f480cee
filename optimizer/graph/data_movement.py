"""Data-movement ops (Slice, Split, Squeeze, Reshape, Transpose, Gather, ...) applied with numpy.

A weight often reaches its reader through such a chain (an LSTM's W sliced out of a stacked
tensor, a MatMul weight transposed first). These ops only move elements, so applying them to an
array of element positions says where each stored element ends up: ``trace_positions`` uses that
to map a reader's axis back to the stored weight's (``follow_chain``). Parameters (starts, axes, shape, indices) must
be stored constants; an op whose parameter is computed at run time is not applied (``NotApplied``).
Cast and Identity keep the positions as they are (the probe tracks places, not values).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.graph.opsets import DEFAULT_DOMAINS
from optimizer.graph.walk import TensorUse, iter_graphs
from optimizer.graph.weights import weight_values

DATA_INPUTS: dict[str, tuple[int, ...] | None] = {
    "Identity": (0,),
    "Cast": (0,),
    "Slice": (0,),
    "Split": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Reshape": (0,),
    "Transpose": (0,),
    "Flatten": (0,),
    "Gather": (0,),
    "Concat": None,  # every input
}
"""Op -> the input slots that carry data (None: all of them); the other inputs are parameters."""


class NotApplied(Exception):
    """The op cannot be applied here: a parameter is computed at run time, or a form is unsupported."""


def is_data_movement(node: gs.Node, slot: int) -> bool:
    """``node`` moves the data it reads at input ``slot`` without computing on it (a Cast only
    between float types: to an integer or bool it changes the values)."""
    if node.domain not in DEFAULT_DOMAINS or node.op not in DATA_INPUTS:
        return False
    if node.op == "Cast" and int(node.attrs.get("to", 0)) not in FLOAT_TYPES:
        return False
    slots = DATA_INPUTS[node.op]
    return slots is None or slot in slots


@dataclass(frozen=True)
class ChainReaders:
    """Every node input slot reading each tensor (by ``id``), in all graphs, and the tensors that
    are graph outputs of some graph."""

    uses: dict[int, list[TensorUse]]
    outputs: frozenset[int]

    @staticmethod
    def of(root: gs.Graph) -> ChainReaders:
        uses: dict[int, list[TensorUse]] = {}
        outputs: set[int] = set()
        for graph in iter_graphs(root):
            outputs.update(id(t) for t in graph.outputs)
            for node in graph.nodes:
                for index, tensor in enumerate(node.inputs):
                    uses.setdefault(id(tensor), []).append(TensorUse(graph, node, index))
        return ChainReaders(uses, frozenset(outputs))


FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
)
MAX_CHAIN = 64
FROM_ELSEWHERE = -1
"""Position value of elements a Concat takes from its other inputs."""


def follow_chain(
    tensor: gs.Tensor,
    positions: np.ndarray,
    readers: ChainReaders,
    is_leaf: Callable[[TensorUse], bool],
) -> list[tuple[TensorUse, np.ndarray]]:
    """Where ``positions`` (an array shaped like ``tensor``) end up at each leaf reader, through
    data-movement readers. A node runs once all its data inputs are known: pieces of the same
    weight (a Split whose parts a Concat puts back in another order) or stored constants (filled
    with FROM_ELSEWHERE). Unread outputs (a Split part nobody uses) end there. Raises ``NotApplied``
    naming the reader that is neither a leaf nor a data-movement op, a graph output the chain
    reaches, or an input computed at run time."""
    known: dict[int, np.ndarray] = {id(tensor): positions}
    pending, waiting, done = [tensor], {}, set()
    found: list[tuple[TensorUse, np.ndarray]] = []
    while pending:
        current = pending.pop(0)
        if id(current) in readers.outputs:
            raise NotApplied(f"{current.name} is a graph output")
        for use in readers.uses.get(id(current), []):
            if is_leaf(use):
                found.append((use, known[id(current)]))
            elif not is_data_movement(use.node, use.index):
                raise NotApplied(f"read by {use.node.op} '{use.node.name}' input {use.index}")
            elif id(use.node) not in done:
                inputs = _chain_inputs(use.node, known)
                if inputs is None:
                    waiting[id(use.node)] = use.node
                    continue
                done.add(id(use.node))
                waiting.pop(id(use.node), None)
                if len(done) > MAX_CHAIN:
                    raise NotApplied(f"a chain of more than {MAX_CHAIN} data-movement ops")
                for output, moved in zip(use.node.outputs, apply_data_movement(use.node, inputs), strict=False):
                    known[id(output)] = moved
                    pending.append(output)
    for node in waiting.values():
        computed = next(t.name for t in node.inputs if id(t) not in known and weight_values(t) is None)
        raise NotApplied(f"{node.op} '{node.name}' also reads {computed}, computed at run time")
    return found


def _chain_inputs(node: gs.Node, known: dict[int, np.ndarray]) -> list[np.ndarray] | None:
    """The data inputs of ``node``: positions where they are known, a stored constant's shape
    filled with FROM_ELSEWHERE, or None while one is neither (not known yet, or computed)."""
    slots = DATA_INPUTS[node.op] or tuple(range(len(node.inputs)))
    arrays = []
    dtype = next(iter(known.values())).dtype
    for slot in slots:
        source = node.inputs[slot]
        if id(source) in known:
            arrays.append(known[id(source)])
            continue
        values = weight_values(source)
        if values is None:
            return None
        arrays.append(np.full(np.shape(values), FROM_ELSEWHERE, dtype))
    return arrays


def apply_data_movement(node: gs.Node, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``node``'s outputs for data ``inputs`` (parameters are read from the node's constant inputs).
    Parameters that do not fit the data (a Reshape to a shape of another size) raise ``NotApplied``."""
    try:
        return _APPLY[node.op](node, list(inputs))
    except (ValueError, IndexError, TypeError, np.exceptions.AxisError) as error:
        raise NotApplied(f"{node.op} '{node.name}' cannot apply to a {list(inputs[0].shape)} input: {error}") from error


def _param(node: gs.Node, slot: int, attr: str | None = None) -> np.ndarray | None:
    """A parameter given as input ``slot`` (a stored constant) or, in older opsets, as ``attr``."""
    if attr is not None and attr in node.attrs:
        return np.asarray(node.attrs[attr], dtype=np.int64)
    if slot >= len(node.inputs) or not node.inputs[slot].name:
        return None
    values = weight_values(node.inputs[slot])
    if values is None:
        raise NotApplied(f"{node.op} input {slot} ({node.inputs[slot].name}) is computed at run time")
    return np.asarray(values).astype(np.int64)


def _slice(node: gs.Node, inputs: list[np.ndarray]) -> list[np.ndarray]:
    data = inputs[0]
    starts, ends = _param(node, 1, "starts"), _param(node, 2, "ends")
    if starts is None or ends is None:
        raise NotApplied("Slice without starts or ends")
    axes = _param(node, 3, "axes")
    steps = _param(node, 4)
    axes = np.arange(len(starts)) if axes is None else axes
    steps = np.ones(len(starts), np.int64) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = int(axis) % data.ndim
        data = np.take(data, _slice_indices(data.shape[axis], int(start), int(end), int(step)), axis=axis)
    return [data]


def _slice_indices(size: int, start: int, end: int, step: int) -> np.ndarray:
    """ONNX Slice's clamping rules, as explicit indices."""
    if step == 0:
        raise NotApplied("Slice step 0")
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), size), min(max(end, 0), size)
    else:
        start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
    return np.arange(start, end, step, dtype=np.int64)


def _split(node: gs.Node, inputs: list[np.ndarray]) -> list[np.ndarray]:
    data = inputs[0]
    axis = int(node.attrs.get("axis", 0)) % data.ndim
    sizes = _param(node, 1, "split")
    count = len(node.outputs)
    if sizes is None:
        chunk = -(-data.shape[axis] // count)
        sizes = np.asarray([min(chunk, data.shape[axis] - i * chunk) for i in range(count)], np.int64)
    return np.split(data, np.cumsum(sizes)[:-1], axis=axis)


def _squeeze(node: gs.Node, inputs: list[np.ndarray]) -> list[np.ndarray]:
    data = inputs[0]
    axes = _param(node, 1, "axes")
    if axes is None:
        return [np.squeeze(data)]
    return [np.squeeze(data, axis=tuple(int(a) % data.ndim for a in axes))]


def _unsqueeze(node: gs.Node, inputs: list[np.ndarray]) -> list[np.ndarray]:
    data = inputs[0]
    axes = _param(node, 1, "axes")
    if axes is None:
        raise NotApplied("Unsqueeze without axes")
    rank = data.ndim + len(axes)
    return [np.expand_dims(data, tuple(sorted(int(a) % rank for a in axes)))]


def _reshape(node: gs.Node, inputs: list[np.ndarray]) -> list[np.ndarray]:
    data = inputs[0]
    shape = _param(node, 1, "shape")
    if shape is None:
        raise NotApplied("Reshape without a shape")
    allow_zero = bool(node.attrs.get("allowzero", 0))
    target = [data.shape[i] if d == 0 and not allow_zero else int(d) for i, d in enumerate(shape)]
    return [data.reshape(target)]


def _transpose(node: gs.Node, inputs: list[np.ndarray]) -> list[np.ndarray]:
    perm = node.attrs.get("perm")
    return [np.transpose(inputs[0], None if perm is None else [int(p) for p in perm])]


def _flatten(node: gs.Node, inputs: list[np.ndarray]) -> list[np.ndarray]:
    data = inputs[0]
    axis = int(node.attrs.get("axis", 1))
    axis = axis + data.ndim if axis < 0 else axis
    return [data.reshape(int(np.prod(data.shape[:axis])), -1)]


def _gather(node: gs.Node, inputs: list[np.ndarray]) -> list[np.ndarray]:
    data = inputs[0]
    indices = _param(node, 1)
    if indices is None:
        raise NotApplied("Gather without indices")
    axis = int(node.attrs.get("axis", 0)) % data.ndim
    return [np.take(data, np.where(indices < 0, indices + data.shape[axis], indices), axis=axis)]


def _concat(node: gs.Node, inputs: list[np.ndarray]) -> list[np.ndarray]:
    axis = int(node.attrs.get("axis", 0)) % inputs[0].ndim
    return [np.concatenate(inputs, axis=axis)]


def _same(node: gs.Node, inputs: list[np.ndarray]) -> list[np.ndarray]:
    return [inputs[0]]


_APPLY: dict[str, Callable[[gs.Node, list[np.ndarray]], list[np.ndarray]]] = {
    "Identity": _same,
    "Cast": _same,
    "Slice": _slice,
    "Split": _split,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Flatten": _flatten,
    "Gather": _gather,
    "Concat": _concat,
}
