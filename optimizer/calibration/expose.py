"""Graph side of calibration: which tensors can be observed, how big they are, and the models
that expose them as outputs.

onnxruntime allocates every graph output of a run and keeps it to the end of the run, even the
outputs the caller did not fetch, so exposing all tensors in one model holds a whole sample's
activations at once. Calibration therefore builds one model per group of tensors, each keeping
only the nodes its tensors depend on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from optimizer.graph.shapes import shapes_only, without_graph_body
from optimizer.graph.walk import names_read, proto_subgraphs, walk_proto

FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    }
)
UNKNOWN_TENSOR = "no such tensor in the main graph"
SUBGRAPH_ONLY = "produced only inside a subgraph (If/Loop/Scan body), which cannot be a graph output"


@dataclass(frozen=True)
class TensorCatalog:
    """Where every main-graph tensor comes from, with elem types and sizes when known."""

    produced: dict[str, int]  # node output -> index of its node in the main graph
    inputs: frozenset[str]
    initializers: dict[str, onnx.TensorProto]
    subgraph_names: frozenset[str]
    elem_types: dict[str, int]
    nbytes: dict[str, int]


def build_catalog(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> TensorCatalog:
    """Catalog of ``model``; sizes come from shape inference with the given concrete input shapes."""
    graph = model.graph
    produced: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name:
                produced.setdefault(name, index)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    inputs = frozenset(info.name for info in graph.input) - frozenset(initializers)
    infos = _typed_value_infos(model, input_shapes)
    elem_types = {name: info.type.tensor_type.elem_type for name, info in infos.items()}
    elem_types.update({name: tensor.data_type for name, tensor in initializers.items()})
    nbytes = {name: size for name, info in infos.items() if (size := _static_nbytes(info)) is not None}
    return TensorCatalog(produced, inputs, initializers, frozenset(_subgraph_outputs(graph)), elem_types, nbytes)


def _typed_value_infos(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]
) -> dict[str, onnx.ValueInfoProto]:
    """Value infos after shape inference on a copy with concrete input shapes.

    Shape inference is best effort: a model it cannot handle (custom ops, over 2 GB) keeps the
    value infos it already declares, and the missing types are learnt from the first run.
    """
    declared = list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
    copy = shapes_only(model)
    for info in copy.graph.input:
        shape = input_shapes.get(info.name)
        if shape is not None and info.type.HasField("tensor_type"):
            info.type.tensor_type.shape.Clear()
            for size in shape:
                info.type.tensor_type.shape.dim.add().dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(copy, strict_mode=False, data_prop=True)
        declared = list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info)
    except Exception:  # onnx raises several unrelated types; inference is optional here
        pass
    del copy
    infos: dict[str, onnx.ValueInfoProto] = {}
    for info in declared:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            infos.setdefault(info.name, info)
    return infos


def _static_nbytes(info: onnx.ValueInfoProto) -> int | None:
    tensor_type = info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    elements = 1
    for dim in tensor_type.shape.dim:
        if not dim.HasField("dim_value") or dim.dim_value < 0:
            return None
        elements *= dim.dim_value
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return elements * itemsize


def _subgraph_outputs(graph: onnx.GraphProto) -> set[str]:
    """Names produced inside a subgraph at any depth: onnxruntime cannot expose them as outputs."""
    return {
        name for site in walk_proto(graph) if site.depth > 0 for node in site.graph.node for name in node.output if name
    }


def expose_outputs(
    model: onnx.ModelProto, names: Iterable[str], *, prune: bool = False, elem_types: Mapping[str, int] | None = None
) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are ``names`` (main-graph tensors).

    Without ``prune`` the original outputs stay and ``names`` are appended; with ``prune`` the
    outputs are exactly ``names`` and only the nodes and initializers they need are kept.
    Each added output carries its type from the model or shape inference (symbolic shapes
    only: shape inference runs without concrete inputs here); an output whose type stays
    unknown gets no type at all, which onnxruntime accepts (it infers it) but the checker does not.
    With ``elem_types`` (a catalog's), outputs get those element types and no shape, and shape
    inference is not run again.
    """
    wanted = list(dict.fromkeys(names))
    if elem_types is None:
        infos = _typed_value_infos(model, {})
    else:
        infos = {
            name: onnx.helper.make_tensor_value_info(name, elem_types[name], None)
            for name in wanted
            if elem_types.get(name)
        }
    result = onnx.ModelProto()
    if prune:
        _copy_pruned(model, wanted, result)
        existing: set[str] = set()
    else:
        result.CopyFrom(model)
        existing = {output.name for output in result.graph.output}
    for name in wanted:
        if name in existing:
            continue
        info = infos.get(name)
        if info is None:
            result.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        else:
            result.graph.output.append(info)
    return result


def _copy_pruned(model: onnx.ModelProto, wanted: Sequence[str], result: onnx.ModelProto) -> None:
    """Copy everything but the graph body, then the nodes ``wanted`` needs, in order."""
    graph = model.graph
    needed = set(wanted)
    kept_nodes = []
    for node in reversed(graph.node):
        if not any(name in needed for name in node.output):
            continue
        kept_nodes.append(node)
        needed.update(name for name in node.input if name)
        for _, subgraph in proto_subgraphs(node):
            needed |= names_read(subgraph)  # its own names too: a superset is harmless
    result.CopyFrom(without_graph_body(model))
    target = result.graph
    target.node.extend(reversed(kept_nodes))
    target.initializer.extend(tensor for tensor in graph.initializer if tensor.name in needed)
    target.sparse_initializer.extend(s for s in graph.sparse_initializer if s.values.name in needed)
    target.input.extend(graph.input)
    target.value_info.extend(info for info in graph.value_info if info.name in needed)


def group_by_budget(
    names: Sequence[str], nbytes: Mapping[str, int], *, budget_bytes: int, max_per_group: int | None
) -> list[list[str]]:
    """Consecutive groups (``names`` in graph order) whose summed sizes stay within the budget.

    A tensor larger than the budget gets a group of its own.
    """
    groups: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name in names:
        size = nbytes[name]
        full = max_per_group is not None and len(current) >= max_per_group
        if current and (full or current_bytes + size > budget_bytes):
            groups.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current:
        groups.append(current)
    return groups


def is_float_array(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" or array.dtype.name == "bfloat16"
