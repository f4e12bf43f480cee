"""Weights holding NaN or +-Inf, for ``inspect``.

Compression amplifies them (an Inf in an embedding row gives the whole int8 row an infinite
scale, so it dequantizes to NaN), and validation on generated feeds rarely reads those rows,
so inspect lists them: tensor, and how many NaN, +Inf and -Inf it holds. The lossy passes leave
such tensors alone unless told otherwise (``passes.weight_guard``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from optimizer.fileio.lazy_io import is_lazy, map_array

_T = onnx.TensorProto
FLOAT_TYPES = frozenset(
    getattr(_T, name)
    for name in (
        "FLOAT",
        "DOUBLE",
        "FLOAT16",
        "BFLOAT16",
        "FLOAT8E4M3FN",
        "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2",
        "FLOAT8E5M2FNUZ",
        "FLOAT4E2M1",
    )
    if hasattr(_T, name)
)


@dataclass(frozen=True)
class NonFiniteTensor:
    """One weight with non-finite values (``tensor`` is graph-qualified outside the main graph)."""

    tensor: str
    count: int
    nan: int
    pos_inf: int
    neg_inf: int


def _dense(tensor: onnx.TensorProto | onnx.SparseTensorProto) -> np.ndarray | None:
    """The values of a float tensor (a sparse one: its non-zero values), else None."""
    if isinstance(tensor, onnx.SparseTensorProto):
        tensor = tensor.values
    if tensor.data_type not in FLOAT_TYPES:
        return None
    try:
        array = map_array(tensor) if is_lazy(tensor) else numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError, NotImplementedError, OSError):
        return None
    return np.asarray(array).astype(np.float32, copy=False) if array.dtype.kind != "f" else array


def non_finite_counts(name: str, tensor: onnx.TensorProto | onnx.SparseTensorProto) -> NonFiniteTensor | None:
    values = _dense(tensor)
    if values is None or values.size == 0 or bool(np.isfinite(values).all()):
        return None
    nan = int(np.count_nonzero(np.isnan(values)))
    pos_inf = int(np.count_nonzero(np.isposinf(values)))
    neg_inf = int(np.count_nonzero(np.isneginf(values)))
    return NonFiniteTensor(name, nan + pos_inf + neg_inf, nan, pos_inf, neg_inf)


def non_finite_tensors(named: list[tuple[str, onnx.TensorProto | onnx.SparseTensorProto]]) -> list[NonFiniteTensor]:
    """Every tensor of ``named`` holding NaN or Inf, in the given order."""
    found = (non_finite_counts(name, tensor) for name, tensor in named)
    return [entry for entry in found if entry is not None]


def non_finite_lines(entries: list[NonFiniteTensor]) -> list[tuple[str, ...]]:
    """Table rows for the text report (header first), or [] when every weight is finite."""
    if not entries:
        return []
    rows: list[tuple[str, ...]] = [("tensor", "non-finite", "NaN", "+Inf", "-Inf")]
    rows += [(e.tensor, str(e.count), str(e.nan), str(e.pos_inf), str(e.neg_inf)) for e in entries]
    return rows
