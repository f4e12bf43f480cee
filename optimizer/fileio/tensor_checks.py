"""Every tensor of a model, its byte count, and checks that its data matches dtype and shape;
then the graph limits a hostile file could abuse (nesting depth, cycles, dangling inputs,
opsets, a ConstantOfShape that would fill memory).

A hostile or broken file must fail at load time with a message that names the tensor or node,
so each check raises ``ModelLoadError`` as ``"{source}: {label}: {reason}"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NoReturn

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import TensorProto

from optimizer.errors import ModelLoadError
from optimizer.graph.walk import (
    Enter,
    Event,
    Leave,
    NodeStep,
    defined_names,
    model_events,
    names_read,
    proto_events,
    proto_subgraphs,
    walk_model,
)

__all__ = [
    "ELEMENT_BITS",
    "MAX_CONSTANT_OF_SHAPE_BYTES",
    "MAX_SUBGRAPH_DEPTH",
    "check_graph_structure",
    "check_inline_tensor",
    "check_opsets",
    "check_subgraph_depth",
    "check_text_fields",
    "custom_domain_ops",
    "describe_tensor",
    "iter_tensors",
    "load_error",
    "node_label",
    "payload_bytes",
    "raw_byte_count",
]

_Labelled = tuple[TensorProto, str]

_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
_PACKED_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6}
ELEMENT_BITS = {
    value: 0 if name == "STRING" else _PACKED_BITS.get(name, 8 * onnx.helper.tensor_dtype_to_np_dtype(value).itemsize)
    for name, value in TensorProto.DataType.items()
    if value != TensorProto.UNDEFINED
}
"""Bits per element of every dtype this onnx knows; 0 for strings (no fixed width)."""


def payload_bytes(tensor: TensorProto) -> int:
    """Data bytes of a tensor from dtype and shape, since upb copies raw_data on every read."""
    if tensor.HasField("raw_data"):
        bits = ELEMENT_BITS.get(tensor.data_type)
        if not bits or any(dim < 0 for dim in tensor.dims):
            return len(tensor.raw_data)
        return (math.prod(tensor.dims) * bits + 7) // 8
    numeric_fields = [field for field in _TYPED_FIELDS if field != "string_data"]
    numeric_count = sum(len(getattr(tensor, field)) for field in numeric_fields)
    return 8 * numeric_count + sum(len(value) for value in tensor.string_data)


def iter_tensors(model: onnx.ModelProto) -> Iterator[_Labelled]:
    """Every tensor in the model with a label for messages, in a deterministic order: the main
    graph, model-local functions (with their default attributes), then training graphs, each in
    lexical order (a node's subgraphs right after it)."""
    yield from _event_tensors(model_events(model, functions=True, training=True))


def _event_tensors(events: Iterator[Event]) -> Iterator[_Labelled]:
    for event in events:
        if isinstance(event, Enter) and event.site.kind != "function":
            yield from _iter_graph_tensors(event.site.graph)
        elif isinstance(event, NodeStep):
            node = event.node
            node_name = node.name or (node.output[0] if node.output else node.op_type)
            for attribute in node.attribute:
                yield from _iter_attribute_tensors(attribute, f"attribute '{attribute.name}' of node '{node_name}'")
        elif isinstance(event, Leave) and event.site.kind == "function":
            function = event.site.graph
            for attribute in function.attribute_proto:
                where = f"default attribute '{attribute.name}' of function '{function.name}'"
                yield from _iter_attribute_tensors(attribute, where)
                for _, graph in proto_subgraphs(onnx.NodeProto(attribute=[attribute])):
                    yield from _event_tensors(proto_events(graph))


def _iter_graph_tensors(graph: onnx.GraphProto) -> Iterator[_Labelled]:
    for tensor in graph.initializer:
        yield tensor, f"tensor '{tensor.name}'"
    for sparse in graph.sparse_initializer:
        yield from _iter_sparse_parts(sparse, f"sparse initializer '{sparse.values.name}'")


def _iter_attribute_tensors(attribute: onnx.AttributeProto, where: str) -> Iterator[_Labelled]:
    """The tensors an attribute holds itself; the graphs it holds are walked as graphs."""
    if attribute.HasField("t"):
        yield attribute.t, _tensor_label(attribute.t, where)
    for tensor in attribute.tensors:
        yield tensor, _tensor_label(tensor, where)
    if attribute.HasField("sparse_tensor"):
        yield from _iter_sparse_parts(attribute.sparse_tensor, where)
    for sparse in attribute.sparse_tensors:
        yield from _iter_sparse_parts(sparse, where)


def _iter_sparse_parts(sparse: onnx.SparseTensorProto, where: str) -> Iterator[_Labelled]:
    yield from ((sparse.values, f"values of {where}"), (sparse.indices, f"indices of {where}"))


def _tensor_label(tensor: TensorProto, where: str) -> str:
    return f"tensor '{tensor.name}' ({where})" if tensor.name else f"unnamed tensor ({where})"


def load_error(source: str, label: str, reason: str) -> ModelLoadError:
    return ModelLoadError(f"{source}: {label}: {reason}")


def describe_tensor(tensor: TensorProto) -> str:
    return f"shape {list(tensor.dims)} of {TensorProto.DataType.Name(tensor.data_type)}"


def _dtype_bits(tensor: TensorProto, source: str, label: str) -> int:
    bits = ELEMENT_BITS.get(tensor.data_type)
    if bits is None:
        raise load_error(source, label, f"unknown data type {tensor.data_type}")
    return bits


_MAX_ARRAY_BYTES = 2**63 - 1
"""numpy (and onnxruntime) refuse a shape whose size overflows int64, zero dimensions or not."""


def _element_count(tensor: TensorProto, source: str, label: str) -> int:
    dims = list(tensor.dims)
    if any(dim < 0 for dim in dims):
        raise load_error(source, label, f"negative dimension in shape {dims}")
    element_bits = max(ELEMENT_BITS.get(tensor.data_type) or 64, 8)
    if 0 in dims and math.prod(dim for dim in dims if dim) * element_bits // 8 > _MAX_ARRAY_BYTES:
        reason = f"shape {dims} overflows 64-bit sizes (numpy refuses it even when a dimension is 0)"
        raise load_error(source, label, reason)
    return math.prod(dims)


def raw_byte_count(tensor: TensorProto, source: str, label: str) -> int:
    """Exact raw_data length implied by dtype and shape (sub-byte types are packed)."""
    bits = _dtype_bits(tensor, source, label)
    if bits == 0:
        raise load_error(source, label, "string tensors cannot use raw_data or external data")
    return (_element_count(tensor, source, label) * bits + 7) // 8


def _typed_value_count(tensor: TensorProto, element_count: int) -> int:
    data_type = tensor.data_type
    if data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        return 2 * element_count
    bits = ELEMENT_BITS.get(data_type, 8)
    per_entry = 8 // bits if 0 < bits < 8 and 8 % bits == 0 else 1  # strings (bits 0): one per entry
    return -(-element_count // per_entry)


def check_inline_tensor(tensor: TensorProto, source: str, label: str, raw_bytes: int | None = None) -> None:
    """The stored values must be exactly what dtype and shape say, in exactly one field.

    ``raw_bytes`` spares a copy when the caller knows it: upb copies raw_data on every read.
    """
    _dtype_bits(tensor, source, label)
    element_count = _element_count(tensor, source, label)
    typed_fields = [name for name in _TYPED_FIELDS if len(getattr(tensor, name))]
    has_raw = tensor.HasField("raw_data")
    if len(tensor.external_data) or tensor.data_location == TensorProto.EXTERNAL:
        raise load_error(source, label, "has external_data entries without data_location EXTERNAL")
    if len(typed_fields) + has_raw > 1:
        fields = ", ".join((["raw_data"] if has_raw else []) + typed_fields)
        raise load_error(source, label, f"holds data in several fields at once ({fields})")
    if has_raw:
        expected_bytes = raw_byte_count(tensor, source, label)
        raw_bytes = len(tensor.raw_data) if raw_bytes is None else raw_bytes
        if raw_bytes != expected_bytes:
            shape = describe_tensor(tensor)
            reason = f"raw_data is {raw_bytes} bytes but {shape} needs {expected_bytes}"
            raise load_error(source, label, reason)
    elif typed_fields:
        field = typed_fields[0]
        expected_field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
        if field != expected_field:
            raise load_error(source, label, f"data in {field}, its dtype uses {expected_field}")
        count = len(getattr(tensor, field))
        expected_count = _typed_value_count(tensor, element_count)
        if count != expected_count:
            reason = f"{field} has {count} values, shape needs {expected_count}"
            raise load_error(source, label, reason)
    elif element_count > 0:
        raise load_error(source, label, f"no data for {element_count} elements")


# --------------------------------------------------------------------------- text fields

_TENSOR_MESSAGE_FIELDS = ("external_data", "metadata_props")


def check_text_fields(model: onnx.ModelProto, source: str) -> None:
    """Every ``string`` field must be valid UTF-8: protobuf hands invalid ones over as bytes,
    which later fail as a TypeError or UnicodeDecodeError far from the file.

    Runs after ``check_subgraph_depth`` (the walk is iterative anyway). Tensors are visited
    field by field, never through ListFields, which would copy their raw_data.
    """
    stack: list[tuple[Message, str]] = [(model, "model")]
    while stack:
        message, path = stack.pop()
        if isinstance(message, TensorProto):
            _check_text(message.name, f"{path}.name", source)
            _check_text(message.doc_string, f"{path}.doc_string", source)
            fields = [
                (message.DESCRIPTOR.fields_by_name[name], getattr(message, name)) for name in _TENSOR_MESSAGE_FIELDS
            ]
        else:
            fields = message.ListFields()
        for field, value in fields:
            if field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
                continue
            where = f"{path}.{field.name}"
            items = enumerate(value) if field.is_repeated else [(None, value)]
            for index, item in items:
                shown = where if index is None else f"{where}[{index}]"
                if field.type == FieldDescriptor.TYPE_STRING:
                    _check_text(item, shown, source)
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    stack.append((item, shown))


def _check_text(value: object, where: str, source: str) -> None:
    if not isinstance(value, str):
        shown = bytes(value)[:40] if isinstance(value, (bytes, bytearray)) else value
        raise load_error(source, where, f"text is not valid UTF-8: {shown!r}")


# --------------------------------------------------------------------------- graph limits

MAX_SUBGRAPH_DEPTH = 16
"""If/Loop/Scan bodies nested deeper than this are refused. Exporters write a few levels;
graphsurgeon, onnx.checker and onnxruntime all recurse once per level, and protobuf stops
parsing at 100 nested messages (about 30 levels), so a clear limit well below that is safer
than failing somewhere inside a library."""

MAX_CONSTANT_OF_SHAPE_BYTES = 2**31
"""A ConstantOfShape whose shape is a constant may produce at most this many bytes:
onnxruntime folds it when it creates a session and would allocate the whole tensor."""

_SHAPE_VALUES_LIMIT = 64
"""A constant with more values than this is not a shape; ConstantOfShape refuses it anyway."""

_DOMAIN_ALIASES = {"ai.onnx": ""}


def node_label(node: onnx.NodeProto) -> str:
    name = node.name or (node.output[0] if node.output else "")
    return f"node '{name}' ({node.op_type})"


def check_subgraph_depth(model: onnx.ModelProto, source: str) -> None:
    """Without recursion, so a hostile nesting depth cannot exhaust the stack first."""

    def too_deep(node: onnx.NodeProto) -> NoReturn:
        reason = f"subgraphs nested over the limit of {MAX_SUBGRAPH_DEPTH} levels"
        raise load_error(source, node_label(node), reason)

    for _ in walk_model(model, functions=True, training=True, max_depth=MAX_SUBGRAPH_DEPTH, too_deep=too_deep):
        pass


def _max_opset_versions() -> dict[str, int]:
    try:
        return {domain: high for domain, (_, high) in onnx.defs.C.schema_version_map().items()}
    except AttributeError:
        return {"": onnx.defs.onnx_opset_version()}


def check_opsets(model: onnx.ModelProto, source: str) -> None:
    """Each domain once; onnx's own domains no newer than this onnx knows (others: custom)."""
    known = _max_opset_versions()
    seen: set[str] = set()
    for opset in model.opset_import:
        domain = _DOMAIN_ALIASES.get(opset.domain, opset.domain)
        shown = f"opset_import '{opset.domain or 'ai.onnx'}'"
        if domain in seen:
            raise load_error(source, shown, "domain imported twice")
        seen.add(domain)
        if opset.version < 1:
            raise load_error(source, shown, f"version {opset.version} is not >= 1")
        if domain in known and opset.version > known[domain]:
            reason = f"version {opset.version} is newer than this onnx knows ({known[domain]})"
            raise load_error(source, shown, reason)


def check_graph_structure(model: onnx.ModelProto, source: str) -> None:
    """Dangling inputs, cycles and huge static ConstantOfShape, each named by its node.

    Runs after ``check_subgraph_depth``, so the walk is bounded. A subgraph sees the names and
    constants of every enclosing graph.
    """
    scopes: dict[int, tuple[frozenset[str], dict[str, TensorProto]]] = {}
    for site in walk_model(model, functions=False):
        outer, outer_constants = scopes[id(site.parent)] if site.parent is not None else (frozenset(), {})
        defined = defined_names(site.graph)
        constants = {**outer_constants, **_graph_constants(site.graph)}
        _check_graph(site.graph, outer | defined, constants, source)
        scopes[id(site)] = (outer | defined, constants)


def _graph_constants(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    constants = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    constants[node.output[0]] = attribute.t
                elif attribute.name == "value_ints":
                    constants[node.output[0]] = onnx.helper.make_tensor(
                        "", TensorProto.INT64, [len(attribute.ints)], list(attribute.ints)
                    )
    return constants


def _check_graph(
    graph: onnx.GraphProto, visible: frozenset[str], constants: dict[str, TensorProto], source: str
) -> None:
    for node in graph.node:
        for name in node.input:
            if name and name not in visible:
                reason = f"input '{name}' is produced by no node, initializer or graph input"
                raise load_error(source, node_label(node), reason)
        if node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx") and node.input:
            _check_constant_of_shape(node, constants.get(node.input[0]), source)
        _check_control_scalars(node, constants, source)
    _check_acyclic(graph, source)


def _check_constant_of_shape(node: onnx.NodeProto, shape_tensor: TensorProto | None, source: str) -> None:
    if shape_tensor is None or math.prod(shape_tensor.dims) > _SHAPE_VALUES_LIMIT:
        return
    shape = [int(value) for value in onnx.numpy_helper.to_array(shape_tensor).ravel()]
    value_type = TensorProto.FLOAT
    for attribute in node.attribute:
        if attribute.name == "value" and attribute.HasField("t"):
            value_type = attribute.t.data_type
    bits = ELEMENT_BITS.get(value_type) or 8
    size_bytes = (math.prod(max(dim, 0) for dim in shape) * bits + 7) // 8
    if size_bytes > MAX_CONSTANT_OF_SHAPE_BYTES:
        reason = (
            f"constant shape {shape} would materialize {size_bytes} bytes, over the limit "
            f"of {MAX_CONSTANT_OF_SHAPE_BYTES}"
        )
        raise load_error(source, node_label(node), reason)


_CONTROL_SCALARS = {"Loop": ("M", "cond"), "If": ("cond",)}
"""Inputs onnxruntime reads as one value without checking: an empty constant crashes it (SIGSEGV)."""


def _check_control_scalars(node: onnx.NodeProto, constants: dict[str, TensorProto], source: str) -> None:
    if node.domain not in ("", "ai.onnx"):
        return
    for role, name in zip(_CONTROL_SCALARS.get(node.op_type, ()), node.input, strict=False):  # roles: a prefix
        constant = constants.get(name) if name else None
        if constant is not None and math.prod(constant.dims) != 1:
            reason = (
                f"{node.op_type} input '{role}' must hold one value, but the constant '{name}' has "
                f"{describe_tensor(constant)} (onnxruntime crashes on it)"
            )
            raise load_error(source, node_label(node), reason)


def _check_acyclic(graph: onnx.GraphProto, source: str) -> None:
    """Kahn's algorithm; nodes left over lie on or behind a cycle, so walk back to find it."""
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    predecessors: list[set[int]] = []
    successors: list[list[int]] = [[] for _ in graph.node]
    for index, node in enumerate(graph.node):
        names = {name for name in node.input if name}
        for _, subgraph in proto_subgraphs(node):
            names |= names_read(subgraph, implicit_only=True)
        predecessors.append({producer[name] for name in names if name in producer})
        for other in sorted(predecessors[-1]):
            successors[other].append(index)
    waiting = [len(found) for found in predecessors]
    ready = [index for index, count in enumerate(waiting) if count == 0]
    while ready:
        for other in successors[ready.pop()]:
            waiting[other] -= 1
            if waiting[other] == 0:
                ready.append(other)
    remaining = {index for index, count in enumerate(waiting) if count > 0}
    if not remaining:
        return
    path: list[int] = []
    current = min(remaining)
    while current not in path:
        path.append(current)
        current = min(predecessors[current] & remaining)
    cycle = path[path.index(current) :][::-1]
    shown = " -> ".join(node_label(graph.node[index]) for index in [*cycle, cycle[0]])
    raise load_error(source, node_label(graph.node[cycle[0]]), f"nodes form a cycle: {shown}")


_RUNTIME_DOMAINS = (
    "",
    "ai.onnx",
    "ai.onnx.ml",
    "ai.onnx.preview",
    "ai.onnx.preview.training",
    "ai.onnx.training",
    "com.microsoft",
)


def custom_domain_ops(model: onnx.ModelProto) -> list[str]:
    """Sorted ``domain:op`` of every node neither onnx nor onnxruntime defines, in every graph and
    function body (a call of a model-local function is not one): passes leave them alone, and
    nothing can validate them."""
    local = {(function.domain, function.name) for function in model.functions}
    found: set[str] = set()
    for site in walk_model(model, functions=True):
        for node in site.graph.node:
            is_runtime = node.domain in _RUNTIME_DOMAINS or node.domain.startswith("com.microsoft.")
            if not is_runtime and (node.domain, node.op_type) not in local:
                found.add(f"{node.domain}:{node.op_type}")
    return sorted(found)
