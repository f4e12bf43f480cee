"""Safe model loading (saving is ``optimizer.fileio.save``), and the size facts both sides use.

``load_model`` returns a self-contained ``ModelProto``: every external tensor is read into
``raw_data`` so no later code touches the file system again, and every tensor is checked
against its dtype and shape, because a hostile or broken file must fail here with a clear
message rather than deep inside a pass or onnxruntime. ``load_model_with_files(...,
lazy_above_bytes=...)`` makes the same checks on a large model but leaves its big external
tensors on disk as lazy references (``optimizer.fileio.lazy_io``), so memory stays bounded.
"""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
from collections.abc import Iterable

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import TensorProto

from optimizer.errors import ModelLoadError
from optimizer.fileio.external_data import ExternalDataReader, read_model_file
from optimizer.fileio.lazy_io import (
    LAZY_DTYPES,
    LAZY_TENSOR_MIN_BYTES,
    is_lazy,
    lazy_ref,
    make_lazy,
)
from optimizer.fileio.onnxruntime_ops import checker_view
from optimizer.fileio.packed import PACKED_4BIT
from optimizer.fileio.tensor_checks import (
    MAX_CONSTANT_OF_SHAPE_BYTES,
    MAX_SUBGRAPH_DEPTH,
    check_graph_structure,
    check_inline_tensor,
    check_opsets,
    check_subgraph_depth,
    check_text_fields,
    iter_tensors,
    load_error,
    payload_bytes,
)

__all__ = [
    "LAZY_LOAD_ABOVE_BYTES",
    "MAX_CONSTANT_OF_SHAPE_BYTES",
    "MAX_SUBGRAPH_DEPTH",
    "PROTOBUF_LIMIT_BYTES",
    "PROTOBUF_MARGIN_BYTES",
    "fits_one_message",
    "has_lazy_tensors",
    "load_model",
    "load_model_with_files",
    "model_size_bytes",
    "serialized_size_bytes",
]

PROTOBUF_LIMIT_BYTES = 2**31 - 1
"""protobuf refuses to serialize or parse a message larger than this."""

PROTOBUF_MARGIN_BYTES = 64 * 2**20
"""Automatic external data starts this far below the limit: sizes are partly estimated."""

LAZY_LOAD_ABOVE_BYTES = 256 * 2**20
"""optimize() keeps a model's external tensors on disk when they add up to more than this."""

_NO_FOLDER_REASON = (
    "references external data, but a model given as bytes or a proto has no "
    "folder to read it from; load it from its .onnx path instead"
)
_PROTO_SOURCE = "<ModelProto>"
_BYTES_SOURCE = "<bytes>"


def serialized_size_bytes(model: onnx.ModelProto) -> int:
    """Serialized size, for the 2 GB decision.

    upb's ByteSize encodes the whole message (and raises past 2 GB), so tensor payloads are
    first estimated from dtype and shape; only a model that may fit is measured exactly. A model
    with lazy tensors cannot become one message, so it counts as over the limit: callers that
    pick between bytes and a saved file then save it (streaming, with external data).
    """
    if has_lazy_tensors(model):
        return max(PROTOBUF_LIMIT_BYTES + 1, _lazy_payload_bytes(model))
    payload_total_bytes = sum(payload_bytes(tensor) for tensor, _ in iter_tensors(model))
    if payload_total_bytes > PROTOBUF_LIMIT_BYTES - PROTOBUF_MARGIN_BYTES:
        return payload_total_bytes
    try:
        return model.ByteSize()
    except EncodeError:
        return PROTOBUF_LIMIT_BYTES + 1


def fits_one_message(model: onnx.ModelProto) -> bool:
    """Whether ``model`` serializes as one protobuf message. Payloads under half the limit
    decide it without ByteSize, which costs as much as serializing (0.1 s for 90 MB)."""
    if has_lazy_tensors(model):
        return False
    if sum(payload_bytes(tensor) for tensor, _ in iter_tensors(model)) < PROTOBUF_LIMIT_BYTES // 2:
        return True
    return serialized_size_bytes(model) <= PROTOBUF_LIMIT_BYTES - PROTOBUF_MARGIN_BYTES


def model_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of what defines ``model``'s computation, at any size: each main-graph initializer's
    payload bytes as they are (serializing all of all-MiniLM-L6-v2 deterministically to hash it
    took 0.22 s, this 0.10 s), every other part serialized deterministically piece by piece. Equal
    models have equal digests; a lazy tensor counts by its file location, not its bytes."""
    digest = hashlib.sha256()

    def add(part: bytes) -> None:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)

    add(str(model.ir_version).encode())
    graph = model.graph
    add(str(len(graph.initializer)).encode())
    for tensor in graph.initializer:
        if not tensor.HasField("raw_data"):
            add(b"tensor " + tensor.SerializeToString(deterministic=True))
            continue
        header = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        header.data_location = tensor.data_location
        header.external_data.extend(tensor.external_data)
        if tensor.HasField("segment"):
            header.segment.CopyFrom(tensor.segment)
        add(b"raw " + header.SerializeToString(deterministic=True))
        add(tensor.raw_data)
    pieces = (graph.node, graph.input, graph.output, graph.value_info, graph.sparse_initializer)
    for messages in (*pieces, model.opset_import, model.functions):
        add(str(len(messages)).encode())
        for message in messages:
            add(message.SerializeToString(deterministic=True))
    return digest.hexdigest()


def _parse_model(data: bytes, shown: str) -> onnx.ModelProto:
    """Parse, then reject the garbage that protobuf happily accepts as a valid message."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        reason = str(error)
        if "MaxDepth" in reason:
            reason = (
                "messages nested deeper than protobuf parses (100 levels; about 30 levels "
                f"of subgraphs, where the limit is {MAX_SUBGRAPH_DEPTH})"
            )
        raise ModelLoadError(f"{shown}: not an ONNX model: {reason}") from error
    except MemoryError:
        raise ModelLoadError(f"{shown}: out of memory parsing {len(data)} bytes") from None
    _require_model_fields(model, shown)
    return model


def _require_model_fields(model: onnx.ModelProto, shown: str) -> None:
    """Also the limits that must hold before anything walks the graph recursively."""
    present = {
        "graph": model.HasField("graph"),
        "ir_version": model.ir_version > 0,
        "opset_import": len(model.opset_import) > 0,
    }
    missing = [field for field, is_present in present.items() if not is_present]
    if missing:
        raise ModelLoadError(f"{shown}: not an ONNX model: no {', '.join(missing)}")
    check_subgraph_depth(model, shown)
    check_text_fields(model, shown)
    check_opsets(model, shown)


def _inline_and_check_tensors(
    model: onnx.ModelProto, shown: str, reader: ExternalDataReader | None, lazy: bool = False
) -> None:
    """Read every external tensor into raw_data (only a file has a folder), check all.

    With ``lazy``, large external tensors pass the same checks but stay on disk as lazy
    references (``optimizer.fileio.lazy_io``); lazy references this process made are kept as they are.
    """
    for tensor, label in iter_tensors(model):
        raw_bytes = None
        if is_lazy(tensor):
            _check_lazy_tensor(tensor, shown, label)
            continue
        if tensor.data_location == TensorProto.EXTERNAL:
            if reader is None:
                raise load_error(shown, label, _NO_FOLDER_REASON)
            if tensor.HasField("raw_data"):
                raise load_error(shown, label, "has both raw_data and external data")
            if lazy and _stays_on_disk(tensor):
                identity, offset_bytes, length_bytes = reader.reference(tensor, label)
                _check_as_inline(tensor, shown, label, length_bytes)
                make_lazy(tensor, identity, offset_bytes, length_bytes)
                continue
            data = reader.read(tensor, label)
            raw_bytes = len(data)
            tensor.raw_data = data
            del data, tensor.external_data[:]
            tensor.ClearField("data_location")
        check_inline_tensor(tensor, shown, label, raw_bytes)


def _stays_on_disk(tensor: TensorProto) -> bool:
    if tensor.data_type not in LAZY_DTYPES or any(dim < 0 for dim in tensor.dims):
        return False
    return payload_bytes_from_shape(tensor) >= LAZY_TENSOR_MIN_BYTES


def payload_bytes_from_shape(tensor: TensorProto) -> int:
    itemsize = np.dtype(LAZY_DTYPES[tensor.data_type]).itemsize
    return math.prod(tensor.dims) * itemsize


def _check_as_inline(tensor: TensorProto, shown: str, label: str, length_bytes: int) -> None:
    """The checks an eager load makes once the bytes are in raw_data, without the bytes."""
    probe = TensorProto()
    probe.CopyFrom(tensor)
    del probe.external_data[:]
    probe.ClearField("data_location")
    probe.raw_data = b""
    check_inline_tensor(probe, shown, label, length_bytes)


def _check_lazy_tensor(tensor: TensorProto, shown: str, label: str) -> None:
    try:
        ref = lazy_ref(tensor)
    except ModelLoadError as error:
        raise load_error(shown, label, str(error)) from None
    if tensor.data_type not in LAZY_DTYPES and tensor.data_type not in PACKED_4BIT:
        raise load_error(shown, label, "lazy reference to a data type that is never kept lazy")
    _check_as_inline(tensor, shown, label, ref.length_bytes)


def _lazy_payload_bytes(model: onnx.ModelProto) -> int:
    return sum(
        int(entry.value)
        for tensor, _ in iter_tensors(model)
        if is_lazy(tensor)
        for entry in tensor.external_data
        if entry.key == "length"
    )


def has_lazy_tensors(model: onnx.ModelProto) -> bool:
    """True when some tensor's data stays on disk (a lazy load of a large model)."""
    return any(is_lazy(tensor) for tensor, _ in iter_tensors(model))


def model_size_bytes(model: onnx.ModelProto) -> int:
    """About what the model takes saved: its serialized size, lazy tensors included."""
    if not has_lazy_tensors(model):
        return serialized_size_bytes(model)
    return _lazy_payload_bytes(model) + _checking_copy(model).ByteSize()


def _checking_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without lazy data, each lazy tensor emptied, for onnx's structural checker."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor, _ in iter_tensors(copy):
        if is_lazy(tensor):
            del tensor.external_data[:], tensor.dims[:]
            tensor.ClearField("data_location")
            tensor.dims.append(0)
    return copy


def _run_onnx_checker(model: onnx.ModelProto, shown: str) -> None:
    """Our graph checks name the node; onnx's checker serializes, so only below 2 GB. Ops that only
    onnxruntime defines in the ONNX domain are left to onnxruntime (``checker_view``)."""
    check_graph_structure(model, shown)
    if has_lazy_tensors(model):
        model = _checking_copy(model)
    if not fits_one_message(model):
        return
    try:
        with checker_view(model):
            onnx.checker.check_model(model, full_check=False)
    except (onnx.checker.ValidationError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise ModelLoadError(f"{shown}: not a valid ONNX model: {reason}") from error


def _check_input_size(size_bytes: int, max_input_bytes: int | None, shown: str) -> None:
    if max_input_bytes is not None and size_bytes > max_input_bytes:
        raise ModelLoadError(f"{shown}: {size_bytes} bytes, over the limit of {max_input_bytes}")


def load_model(
    source: str | os.PathLike | bytes | onnx.ModelProto,
    *,
    max_input_bytes: int | None = None,
    allow_symlinks_under: Iterable[str | os.PathLike] = (),
) -> onnx.ModelProto:
    """A new, self-contained, checked ModelProto from a path, serialized bytes or a proto.

    External data may be a symlink only into ``allow_symlinks_under`` folders or, detected
    by its layout, the ``blobs`` folder of a Hugging Face cache (``optimizer.fileio.symlink_roots``).
    """
    if isinstance(source, (str, os.PathLike)):
        return load_model_with_files(
            source, max_input_bytes=max_input_bytes, allow_symlinks_under=allow_symlinks_under
        )[0]
    if isinstance(source, onnx.ModelProto):
        shown = _PROTO_SOURCE
        _check_input_size(serialized_size_bytes(source), max_input_bytes, shown)
        model = onnx.ModelProto()
        model.CopyFrom(source)
        _require_model_fields(model, shown)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        shown = _BYTES_SOURCE
        if len(source) == 0:
            raise ModelLoadError(f"{shown}: not an ONNX model: empty input")
        _check_input_size(len(source), max_input_bytes, shown)
        model = _parse_model(bytes(source), shown)
    else:
        raise ModelLoadError(f"cannot load a model from {type(source).__name__}")
    _inline_and_check_tensors(model, shown, None)
    _run_onnx_checker(model, shown)
    return model


def load_model_with_files(
    path: str | os.PathLike,
    *,
    max_input_bytes: int | None = None,
    lazy_above_bytes: int | None = None,
    allow_symlinks_under: Iterable[str | os.PathLike] = (),
) -> tuple[onnx.ModelProto, tuple[pathlib.Path, ...]]:
    """The model plus every file it was read from (real paths), so callers can refuse to
    overwrite them and, with ``optimizer.fileio.lazy_io.check_sources_unchanged``, notice that one
    changed since.

    When its external data adds up to more than ``lazy_above_bytes``, large external tensors
    are checked but not read: they stay lazy references to the verified files (memory stays
    bounded; ``save_model`` and ``optimizer.graph.convert`` understand them, onnxruntime does not).
    The model path may be a symlink (a Hugging Face snapshot); its external data is looked up
    next to the path as given. ``allow_symlinks_under``: see ``load_model``.
    """
    shown = os.fspath(path)
    real_path = os.path.realpath(shown)
    data = read_model_file(real_path, shown, max_input_bytes)
    model = _parse_model(data, shown)
    budget_bytes = None if max_input_bytes is None else max_input_bytes - len(data)
    del data
    folder = os.path.dirname(os.path.abspath(shown))
    lazy = lazy_above_bytes is not None and _declared_external_bytes(model) > lazy_above_bytes
    with ExternalDataReader(folder, shown, budget_bytes, allow_symlinks_under) as reader:
        _inline_and_check_tensors(model, shown, reader, lazy)
        reader.check_unchanged()
        external_paths = reader.paths()
    _run_onnx_checker(model, shown)
    return model, (pathlib.Path(real_path), *external_paths)


def _declared_external_bytes(model: onnx.ModelProto) -> int:
    """What the external tensors say they hold (checked later, one by one)."""
    total = 0
    for tensor, _ in iter_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL and tensor.data_type in LAZY_DTYPES:
            total += payload_bytes_from_shape(tensor) if all(dim >= 0 for dim in tensor.dims) else 0
    return total
