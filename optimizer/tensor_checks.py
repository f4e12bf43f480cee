"""Every tensor of a model, its byte count, and checks that its data matches dtype and shape.

A hostile or broken file must fail at load time with a message that names the tensor, so
each check raises ``ModelLoadError`` as ``"{source}: {label}: {reason}"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import onnx
from onnx import TensorProto

from optimizer.errors import ModelLoadError

__all__ = [
    "check_inline_tensor", "describe_tensor", "iter_tensors", "load_error", "payload_bytes",
    "raw_byte_count",
]  # fmt: skip

_Labelled = tuple[TensorProto, str]

_TYPED_FIELDS = (
    "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"
)
_PACKED_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2, "FLOAT6E2M3": 6,
                "FLOAT6E3M2": 6}  # fmt: skip
_ELEMENT_BITS = {
    value: 0 if name == "STRING" else _PACKED_BITS.get(
        name, 8 * onnx.helper.tensor_dtype_to_np_dtype(value).itemsize
    )
    for name, value in TensorProto.DataType.items()
    if value != TensorProto.UNDEFINED
}
"""Bits per element of every dtype this onnx knows; 0 for strings (no fixed width)."""


def payload_bytes(tensor: TensorProto) -> int:
    """Data bytes of a tensor from dtype and shape, since upb copies raw_data on every read."""
    if tensor.HasField("raw_data"):
        bits = _ELEMENT_BITS.get(tensor.data_type)
        if not bits or any(dim < 0 for dim in tensor.dims):
            return len(tensor.raw_data)
        return (math.prod(tensor.dims) * bits + 7) // 8
    numeric_fields = [field for field in _TYPED_FIELDS if field != "string_data"]
    numeric_count = sum(len(getattr(tensor, field)) for field in numeric_fields)
    return 8 * numeric_count + sum(len(value) for value in tensor.string_data)


def iter_tensors(model: onnx.ModelProto) -> Iterator[_Labelled]:
    """Every tensor in the model with a label for messages, in a deterministic order."""
    yield from _iter_graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _iter_node_tensors(node)
        for attribute in function.attribute_proto:
            where = f"default attribute '{attribute.name}' of function '{function.name}'"
            yield from _iter_attribute_tensors(attribute, where)
    for training_info in model.training_info:
        yield from _iter_graph_tensors(training_info.initialization)
        yield from _iter_graph_tensors(training_info.algorithm)


def _iter_graph_tensors(graph: onnx.GraphProto) -> Iterator[_Labelled]:
    for tensor in graph.initializer:
        yield tensor, f"tensor '{tensor.name}'"
    for sparse in graph.sparse_initializer:
        yield from _iter_sparse_parts(sparse, f"sparse initializer '{sparse.values.name}'")
    for node in graph.node:
        yield from _iter_node_tensors(node)


def _iter_node_tensors(node: onnx.NodeProto) -> Iterator[_Labelled]:
    node_name = node.name or (node.output[0] if node.output else node.op_type)
    for attribute in node.attribute:
        where = f"attribute '{attribute.name}' of node '{node_name}'"
        yield from _iter_attribute_tensors(attribute, where)


def _iter_attribute_tensors(attribute: onnx.AttributeProto, where: str) -> Iterator[_Labelled]:
    if attribute.HasField("t"):
        yield attribute.t, _tensor_label(attribute.t, where)
    for tensor in attribute.tensors:
        yield tensor, _tensor_label(tensor, where)
    if attribute.HasField("sparse_tensor"):
        yield from _iter_sparse_parts(attribute.sparse_tensor, where)
    for sparse in attribute.sparse_tensors:
        yield from _iter_sparse_parts(sparse, where)
    if attribute.HasField("g"):
        yield from _iter_graph_tensors(attribute.g)
    for graph in attribute.graphs:
        yield from _iter_graph_tensors(graph)


def _iter_sparse_parts(sparse: onnx.SparseTensorProto, where: str) -> Iterator[_Labelled]:
    yield from ((sparse.values, f"values of {where}"), (sparse.indices, f"indices of {where}"))


def _tensor_label(tensor: TensorProto, where: str) -> str:
    return f"tensor '{tensor.name}' ({where})" if tensor.name else f"unnamed tensor ({where})"


def load_error(source: str, label: str, reason: str) -> ModelLoadError:
    return ModelLoadError(f"{source}: {label}: {reason}")


def describe_tensor(tensor: TensorProto) -> str:
    return f"shape {list(tensor.dims)} of {TensorProto.DataType.Name(tensor.data_type)}"


def _dtype_bits(tensor: TensorProto, source: str, label: str) -> int:
    bits = _ELEMENT_BITS.get(tensor.data_type)
    if bits is None:
        raise load_error(source, label, f"unknown data type {tensor.data_type}")
    return bits


def _element_count(tensor: TensorProto, source: str, label: str) -> int:
    dims = list(tensor.dims)
    if any(dim < 0 for dim in dims):
        raise load_error(source, label, f"negative dimension in shape {dims}")
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
    bits = _ELEMENT_BITS.get(data_type, 8)
    per_entry = 8 // bits if bits < 8 and 8 % bits == 0 else 1
    return -(-element_count // per_entry)


def check_inline_tensor(
    tensor: TensorProto, source: str, label: str, raw_bytes: int | None = None
) -> None:
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
