"""The one byte counter: the bytes a tensor's values take in the saved file (``stored_bytes``).

Sizes come from dims and the element width, so raw_data and typed-field storage give the same
answer and sub-byte types count packed (INT4 2 per byte, INT2 4 per byte, FLOAT6 6 bits). The width
table is the loader's (``optimizer.fileio.tensor_checks``), which checks raw_data lengths against it;
its ``payload_bytes`` is the other count, a deliberate upper bound of the protobuf message size.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from optimizer.fileio.tensor_checks import ELEMENT_BITS

PACKED_4BIT_TYPES = frozenset(
    getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, name)
)


PACKED_SUB_BYTE_TYPES = PACKED_4BIT_TYPES | frozenset(
    getattr(onnx.TensorProto, name) for name in ("INT2", "UINT2") if hasattr(onnx.TensorProto, name)
)


def element_bits(data_type: int) -> int:
    """Bits per element; 0 for strings and for codes this onnx does not know (they count 0 bytes)."""
    return ELEMENT_BITS.get(data_type, 0)


def stored_bytes(tensor: onnx.TensorProto | onnx.SparseTensorProto | gs.Constant) -> int:
    """Bytes the values take when saved: a sparse tensor stores its values and indices, a string
    tensor its strings; a graphsurgeon Constant counts its stored proto when it still holds one
    (lazy), else its numpy array."""
    if isinstance(tensor, gs.Constant):
        values = tensor._values
        if isinstance(values, LazyValues):
            return stored_bytes(values.tensor)
        return int(np.asarray(values).nbytes)
    if isinstance(tensor, onnx.SparseTensorProto):
        return stored_bytes(tensor.values) + stored_bytes(tensor.indices)
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(item) for item in tensor.string_data)
    count = math.prod(int(dim) for dim in tensor.dims)
    return (count * element_bits(tensor.data_type) + 7) // 8


def tensor_proto_dtype(tensor: onnx.TensorProto | onnx.SparseTensorProto) -> int:
    """The ONNX element type of a dense or sparse tensor proto."""
    return tensor.values.data_type if isinstance(tensor, onnx.SparseTensorProto) else tensor.data_type
