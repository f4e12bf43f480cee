"""4-bit tensors, two values per byte: no numpy type maps their packed bytes, so a spilled one is
referenced like any other tensor and read back unpacked (onnx's numpy form) on the rare access."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, numpy_helper

PACKED_4BIT = frozenset({TensorProto.INT4, TensorProto.UINT4})


def packed_dtype(data_type: int) -> np.dtype:
    """The numpy type onnx gives a 4-bit tensor's values (ml_dtypes' int4 or uint4)."""
    empty = TensorProto()
    empty.data_type, empty.raw_data = data_type, b""
    empty.dims.append(0)
    return numpy_helper.to_array(empty).dtype


def unpacked(tensor: TensorProto, raw: bytes) -> np.ndarray:
    """The values of ``tensor`` (its type and dims) stored as ``raw`` packed bytes."""
    inline = TensorProto()
    inline.data_type, inline.raw_data = tensor.data_type, raw
    inline.dims.extend(tensor.dims)
    return numpy_helper.to_array(inline)
