"""Storing pruned weights as ONNX sparse initializers, where that is smaller, and measuring size.

A zeroed weight does not shrink a dense file. ONNX's SparseTensorProto stores the non-zero
values plus their linearized positions as int64 (onnx's checker rejects any other index type;
onnxruntime 1.32 loads int64, int32 and int16 but not uint8), so one float32 non-zero costs
4 + 8 = 12 bytes against 4 dense: sparse storage pays only above 2/3 sparsity (float16: 5/6).
Gzip of the dense file already captures much of the zeros' worth, so ``size_report`` gives
both.

The conversion works on a saved ``ModelProto``, not inside a pass: onnx 1.23's full checker
(shape inference) sees a sparse initializer as rank 0 and rejects the model, so models with
sparse initializers pass ``onnx.checker.check_model`` without ``full_check`` only, and
onnxruntime densifies them at load time (no speed-up, only a smaller file).
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import SparseValues

from optimizer.errors import ModelLoadError, OptionError
from optimizer.fileio.lazy_io import is_lazy, map_array

INDEX_BYTES = 8
STORAGE_CHOICES = ("dense", "sparse", "auto")
GZIP_LEVEL = 6
FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)
"""Initializers that may be stored sparse; others are kept without reading them (a spilled 4-bit
tensor has no numpy view)."""


def sparse_bytes(values: np.ndarray) -> int:
    """Payload bytes of ``values`` as a sparse tensor: non-zeros plus int64 linear indices."""
    return int(np.count_nonzero(values)) * (values.dtype.itemsize + INDEX_BYTES)


def storage_choice(values: np.ndarray, storage: Literal["dense", "sparse", "auto"]) -> dict[str, object]:
    """Dense and sparse payload sizes and the form ``storage`` picks ("auto": the smaller)."""
    if storage not in STORAGE_CHOICES:
        raise OptionError(f"storage must be one of {', '.join(STORAGE_CHOICES)}, got {storage!r}")
    dense, sparse = int(values.nbytes), sparse_bytes(values)
    stored_as = storage if storage != "auto" else ("sparse" if sparse < dense else "dense")
    return {"dense_bytes": dense, "sparse_bytes": sparse, "stored_as": stored_as}


def to_sparse_initializers(
    model: onnx.ModelProto,
    *,
    names: Sequence[str] | None = None,
    storage: Literal["sparse", "auto"] = "auto",
) -> tuple[onnx.ModelProto, dict[str, dict[str, object]]]:
    """A copy of ``model`` with main-graph float initializers stored sparse.

    ``names`` limits the candidates (default: every float initializer); with "auto" only
    those that get smaller are converted. Returns the model and the choice per candidate.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    wanted = None if names is None else set(names)
    decisions: dict[str, dict[str, object]] = {}
    kept = []
    for tensor in graph.initializer:
        if (wanted is not None and tensor.name not in wanted) or tensor.data_type not in FLOAT_TYPES:
            kept.append(tensor)
            continue
        values = map_array(tensor) if is_lazy(tensor) else numpy_helper.to_array(tensor)
        decision = storage_choice(values, storage)
        decisions[tensor.name] = decision
        if decision["stored_as"] == "sparse":
            graph.sparse_initializer.append(_sparse_tensor(tensor.name, values))
        else:
            kept.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return result, decisions


def _sparse_tensor(name: str, values: np.ndarray) -> onnx.SparseTensorProto:
    flat = values.ravel()
    positions = np.flatnonzero(flat).astype(np.int64)
    return onnx.helper.make_sparse_tensor(
        numpy_helper.from_array(flat[positions], name),
        numpy_helper.from_array(positions, f"{name}.indices"),
        list(values.shape),
    )


def to_dense_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose main-graph sparse initializers are dense again."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    for sparse in graph.sparse_initializer:
        graph.initializer.append(numpy_helper.from_array(sparse_to_dense(sparse), sparse.values.name))
    del graph.sparse_initializer[:]
    return result


def sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array a sparse tensor stands for, in its own dtype; bad indices are a
    ModelLoadError naming the tensor."""
    name, shape = sparse.values.name, tuple(int(d) for d in sparse.dims)
    values = numpy_helper.to_array(sparse.values).reshape(-1)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    size = int(np.prod(shape, dtype=np.int64))
    try:
        if indices.ndim == 2:
            indices = np.ravel_multi_index(tuple(indices.T), shape)
        if indices.shape != values.shape or (indices.size and (indices.min() < 0 or indices.max() >= size)):
            raise ValueError("indices do not match the values or the shape")
    except ValueError as error:
        raise ModelLoadError(f"sparse initializer '{name}': {error}") from error
    dense = np.zeros(size, dtype=values.dtype)
    dense[indices] = values
    return dense.reshape(shape)


class SparseWeightValues(SparseValues):
    """onnx-graphsurgeon values of a sparse initializer, loaded in the dtype it declares.

    onnx-graphsurgeon's own loader returns float64 and ignores ``raw_data``, so a pass reading a
    sparse weight would see zeros of the wrong type.
    """

    def load(self) -> np.ndarray:
        return sparse_to_dense(self.tensor)


def wrap_sparse_constants(constants: Sequence[gs.Constant]) -> None:
    """Give sparse initializers a correct loader, and remember their proto for export."""
    for constant in constants:
        if isinstance(constant._values, SparseValues):
            constant._values = SparseWeightValues(constant._values.tensor)
            constant.sparse_source = constant._values.tensor


def restore_unchanged_sparse(constants: Sequence[gs.Constant]) -> None:
    """Sparse initializers a pass read but did not change are exported sparse again."""
    for constant in constants:
        source = getattr(constant, "sparse_source", None)
        values = constant._values
        if source is None or not isinstance(values, np.ndarray):
            continue
        original = sparse_to_dense(source)
        if (
            values.dtype == original.dtype
            and values.shape == original.shape
            and np.array_equal(values, original, equal_nan=values.dtype.kind == "f")
        ):
            constant._values = SparseWeightValues(source)


def size_report(model: onnx.ModelProto) -> dict[str, int]:
    """Serialized size and its gzip size (what a download or a zip archive would take)."""
    data = model.SerializeToString(deterministic=True)
    return {"raw_bytes": len(data), "gzip_bytes": len(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0))}


def mark_sparse_sources(constants: Sequence[gs.Constant], sources: Sequence[onnx.SparseTensorProto]) -> None:
    """Constants that were densified for a tool that cannot read sparse initializers (onnx's
    version converter) become sparse again, by name."""
    by_name = {source.values.name: source for source in sources}
    for constant in constants:
        source = by_name.get(constant.name)
        if source is not None and not isinstance(constant._values, SparseValues):
            constant._values = SparseWeightValues(source)
            constant.sparse_source = source
