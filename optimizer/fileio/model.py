"""Safe model loading and atomic saving, with external data handled in both directions.

``load_model`` returns a self-contained ``ModelProto``: every external tensor is read into
``raw_data`` so no later code touches the file system again, and every tensor is checked
against its dtype and shape, because a hostile or broken file must fail here with a clear
message rather than deep inside a pass or onnxruntime. ``load_model_with_files(...,
lazy_above_bytes=...)`` makes the same checks on a large model but leaves its big external
tensors on disk as lazy references (``optimizer.fileio.lazy_io``), so memory stays bounded.

``save_model`` streams lazy tensors from their verified files into the new data file, with
the same layout an eager model gets. It writes through a temporary file in the target folder
and ``os.replace``, so the final path holds either the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import stat
from collections.abc import Callable, Iterable

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import TensorProto

from optimizer.errors import ModelLoadError, ModelSaveError
from optimizer.fileio.external_data import READ_CHUNK_BYTES, ExternalDataReader, file_kind, read_model_file
from optimizer.fileio.lazy_io import (
    LAZY_DTYPES, LAZY_TENSOR_MIN_BYTES, copy_range, is_lazy, lazy_ref, make_lazy, read_range,
)  # fmt: skip
from optimizer.fileio.output_files import check_apart, commit, data_file_name, file_digest, remove_dead_temps, temp_file
from optimizer.fileio.tensor_checks import (
    MAX_CONSTANT_OF_SHAPE_BYTES, MAX_SUBGRAPH_DEPTH, check_graph_structure, check_inline_tensor,
    check_opsets, check_subgraph_depth, check_text_fields, iter_tensors, load_error, payload_bytes,
)  # fmt: skip

__all__ = [
    "EXTERNAL_ALIGNMENT_BYTES", "MAX_CONSTANT_OF_SHAPE_BYTES", "MAX_SUBGRAPH_DEPTH",
    "LAZY_LOAD_ABOVE_BYTES", "PROTOBUF_LIMIT_BYTES", "PROTOBUF_MARGIN_BYTES", "has_lazy_tensors",
    "fits_one_message", "load_model", "load_model_with_files", "model_size_bytes", "save_model", "serialized_size_bytes",
]  # fmt: skip

PROTOBUF_LIMIT_BYTES = 2**31 - 1
"""protobuf refuses to serialize or parse a message larger than this."""

PROTOBUF_MARGIN_BYTES = 64 * 2**20
"""Automatic external data starts this far below the limit: sizes are partly estimated."""

LAZY_LOAD_ABOVE_BYTES = 256 * 2**20
"""optimize() keeps a model's external tensors on disk when they add up to more than this."""

EXTERNAL_ALIGNMENT_BYTES = 4096
"""Each external tensor starts on a page boundary so runtimes can mmap it."""

_NO_FOLDER_REASON = ("references external data, but a model given as bytes or a proto has no "
                     "folder to read it from; load it from its .onnx path instead")  # fmt: skip
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


def _parse_model(data: bytes, shown: str) -> onnx.ModelProto:
    """Parse, then reject the garbage that protobuf happily accepts as a valid message."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        reason = str(error)
        if "MaxDepth" in reason:
            reason = ("messages nested deeper than protobuf parses (100 levels; about 30 levels "
                      f"of subgraphs, where the limit is {MAX_SUBGRAPH_DEPTH})")  # fmt: skip
        raise ModelLoadError(f"{shown}: not an ONNX model: {reason}") from error
    except MemoryError:
        raise ModelLoadError(f"{shown}: out of memory parsing {len(data)} bytes") from None
    _require_model_fields(model, shown)
    return model


def _require_model_fields(model: onnx.ModelProto, shown: str) -> None:
    """Also the limits that must hold before anything walks the graph recursively."""
    present = {"graph": model.HasField("graph"), "ir_version": model.ir_version > 0,
               "opset_import": len(model.opset_import) > 0}  # fmt: skip
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
    if tensor.data_type not in LAZY_DTYPES:
        raise load_error(shown, label, "lazy reference to a data type that is never kept lazy")
    _check_as_inline(tensor, shown, label, ref.length_bytes)


def _lazy_payload_bytes(model: onnx.ModelProto) -> int:
    return sum(int(entry.value) for tensor, _ in iter_tensors(model) if is_lazy(tensor)
               for entry in tensor.external_data if entry.key == "length")  # fmt: skip


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
    """Our graph checks name the node; onnx's checker serializes, so only below 2 GB."""
    check_graph_structure(model, shown)
    if has_lazy_tensors(model):
        model = _checking_copy(model)
    if not fits_one_message(model):
        return
    try:
        onnx.checker.check_model(model, full_check=False)
    except (onnx.checker.ValidationError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise ModelLoadError(f"{shown}: not a valid ONNX model: {reason}") from error


def _check_input_size(size_bytes: int, max_input_bytes: int | None, shown: str) -> None:
    if max_input_bytes is not None and size_bytes > max_input_bytes:
        raise ModelLoadError(f"{shown}: {size_bytes} bytes, over the limit of {max_input_bytes}")


def load_model(
    source: str | os.PathLike | bytes | onnx.ModelProto, *, max_input_bytes: int | None = None,
    allow_symlinks_under: Iterable[str | os.PathLike] = (),
) -> onnx.ModelProto:
    """A new, self-contained, checked ModelProto from a path, serialized bytes or a proto.

    External data may be a symlink only into ``allow_symlinks_under`` folders or, detected
    by its layout, the ``blobs`` folder of a Hugging Face cache (``optimizer.fileio.symlink_roots``).
    """
    if isinstance(source, (str, os.PathLike)):
        return load_model_with_files(source, max_input_bytes=max_input_bytes,
                                     allow_symlinks_under=allow_symlinks_under)[0]
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
    path: str | os.PathLike, *, max_input_bytes: int | None = None,
    lazy_above_bytes: int | None = None, allow_symlinks_under: Iterable[str | os.PathLike] = (),
) -> tuple[onnx.ModelProto, tuple[pathlib.Path, ...]]:
    """The model plus every file it was read from (real paths), so callers can refuse to
    overwrite them and, with ``optimizer.fileio.lazy_io.check_sources_unchanged``, notice that one
    changed since.

    When its external data adds up to more than ``lazy_above_bytes``, large external tensors
    are checked but not read: they stay lazy references to the verified files (memory stays
    bounded; ``save_model`` and ``optimizer.graph.core`` understand them, onnxruntime does not).
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


def _check_output_folder(folder: pathlib.Path, target: pathlib.Path) -> None:
    try:
        info = os.stat(folder)
    except FileNotFoundError:
        raise ModelSaveError(f"{target}: output folder {folder} does not exist") from None
    except OSError as error:
        raise ModelSaveError(f"{target}: output folder {folder}: {error.strerror}") from error
    if not stat.S_ISDIR(info.st_mode):
        raise ModelSaveError(f"{target}: output folder {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ModelSaveError(f"{target}: output folder {folder} is not writable")


def check_output_file(path: pathlib.Path) -> None:
    """Refuse to write through a symlink or over anything that is not a regular file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise ModelSaveError(f"{path}: output exists and is {file_kind(info.st_mode)}")


def _needs_external_data(
    model: onnx.ModelProto, external_data: bool | None, target: pathlib.Path
) -> bool:
    """Automatic: above the limit, or when tensors are lazy (they stay out of memory)."""
    size_bytes = model_size_bytes(model)
    if external_data is None:
        return has_lazy_tensors(model) or size_bytes > PROTOBUF_LIMIT_BYTES - PROTOBUF_MARGIN_BYTES
    if not external_data and size_bytes > PROTOBUF_LIMIT_BYTES:
        reason = f"model is {size_bytes} bytes, over protobuf's 2 GB limit; use external data"
        raise ModelSaveError(f"{target}: {reason}")
    return external_data


def _reject_unresolved_external(model: onnx.ModelProto, target: pathlib.Path) -> list[str]:
    """Lazy tensors are fine (their verified files are returned); other external data is not."""
    sources: set[str] = set()
    for tensor, label in iter_tensors(model):
        if is_lazy(tensor):
            try:
                sources.add(lazy_ref(tensor).identity.path)
            except ModelLoadError as error:
                raise ModelSaveError(f"{target}: {label}: {error}") from None
        elif tensor.data_location == TensorProto.EXTERNAL:
            reason = f"{label} still references external data; load it with load_model first"
            raise ModelSaveError(f"{target}: {reason}")
    return sorted(sources)


def _resolve_lazy_inline(model: onnx.ModelProto, threshold_bytes: int | None) -> None:
    """Read lazy tensors back into raw_data: all of them, or those below ``threshold_bytes``."""
    for tensor, _ in iter_tensors(model):
        if is_lazy(tensor):
            ref = lazy_ref(tensor)
            if threshold_bytes is None or ref.length_bytes < threshold_bytes:
                del tensor.external_data[:]
                tensor.ClearField("data_location")
                tensor.raw_data = read_range(ref)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:READ_CHUNK_BYTES])
        view = view[written:]


def _new_file_mode() -> int:
    """Temp files are created 0o600; give the final file the mode open() would have."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _write_temp(folder: pathlib.Path, final_name: str, write: Callable[[int], None]) -> str:
    """A complete, fsynced temporary file in ``folder`` (removed again if writing fails)."""
    fd, temp_path = temp_file(folder, final_name)
    try:
        try:
            write(fd)
            os.fchmod(fd, _new_file_mode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_path)
        raise
    return temp_path


def _commit_atomically(
    target: pathlib.Path, model_bytes: bytes, protected: list[str],
    data_temp: str | None = None, data_name: str | None = None,
) -> None:
    """Write the model to a temp, then move the data file in and os.replace the model.

    Replacing the model is the one commit point (see optimizer.fileio.output_files): nothing is
    unlinked before it, so the final path always holds a complete model with its data.
    """
    model_temp = _write_temp(target.parent, target.name, lambda fd: _write_all(fd, model_bytes))
    try:
        commit(target, model_temp, data_temp, data_name, protected)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(model_temp)


def _move_tensors_to_file(
    model: onnx.ModelProto, fd: int, location: str, threshold_bytes: int
) -> None:
    """Write big tensors to fd, page-aligned, and point the tensors at it.

    raw_data is written from memory and lazy tensors are copied from their files, in one
    order and layout, so a lazy and an eager model give the same bytes.
    """
    _resolve_lazy_inline(model, threshold_bytes)
    end_bytes = 0
    for tensor, _ in iter_tensors(model):
        ref = lazy_ref(tensor) if is_lazy(tensor) else None
        if ref is None and not tensor.HasField("raw_data"):
            continue
        data = tensor.raw_data if ref is None else None
        length_bytes = len(data) if ref is None else ref.length_bytes
        if length_bytes < threshold_bytes:
            continue
        offset_bytes = -(-end_bytes // EXTERNAL_ALIGNMENT_BYTES) * EXTERNAL_ALIGNMENT_BYTES
        _write_all(fd, bytes(offset_bytes - end_bytes))
        if ref is None:
            _write_all(fd, data)
        else:
            copy_range(ref, fd)
            del tensor.external_data[:]
        del data
        end_bytes = offset_bytes + length_bytes
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset_bytes), ("length", length_bytes)):
            tensor.external_data.add(key=key, value=str(value))


def _serialize(model: onnx.ModelProto, target: pathlib.Path) -> bytes:
    try:
        return model.SerializeToString(deterministic=True)
    except EncodeError as error:
        reason = "over protobuf's 2 GB limit (only raw_data tensors can go to external data)"
        raise ModelSaveError(f"{target}: {reason}") from error


def _write_with_external_data(
    model: onnx.ModelProto, target: pathlib.Path, threshold_bytes: int, protected: list[str]
) -> None:
    """Lay big tensors out in a fresh data file named by its content; the caller's model is
    copied, not changed."""
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    folder = target.parent
    data_temp = _write_temp(folder, f"{target.name}.data",
                            lambda fd: _move_tensors_to_file(model_copy, fd, "", threshold_bytes))
    try:
        data_name = data_file_name(target.name, file_digest(data_temp))
        for tensor, _ in iter_tensors(model_copy):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data_name
        check_output_file(folder / data_name)
        check_apart([folder / data_name], protected, "an input file")
        _commit_atomically(target, _serialize(model_copy, target), protected, data_temp, data_name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(data_temp)


def _inline_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _resolve_lazy_inline(copy, None)
    return copy


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protected_paths: Iterable[str | os.PathLike] = (),
    size_threshold_bytes: int = 1024,
) -> pathlib.Path:
    """Write atomically, refusing to touch inputs; external data when asked or above 2 GB.

    With external data, tensors of at least ``size_threshold_bytes`` go to ``{name}.{hash}.data``
    next to the model (see optimizer.fileio.output_files), which records that name. Temps that
    provably dead writers left in the folder are removed first.
    """
    if not isinstance(model, onnx.ModelProto):
        raise ModelSaveError(f"{os.fspath(path)}: not an onnx.ModelProto: {type(model).__name__}")
    target = pathlib.Path(os.path.abspath(os.fspath(path)))
    folder = target.parent
    _check_output_folder(folder, target)
    check_output_file(target)
    lazy_sources = _reject_unresolved_external(model, target)
    use_external = _needs_external_data(model, external_data, target)
    protected = [*(os.fspath(path) for path in protected_paths), *lazy_sources]
    check_apart([target], protected, "an input file")
    try:
        remove_dead_temps(folder)
        if use_external:
            _write_with_external_data(model, target, size_threshold_bytes, protected)
        else:
            if lazy_sources:
                model = _inline_copy(model)
            _commit_atomically(target, _serialize(model, target), protected)
    except (OSError, EncodeError, ValueError, ModelLoadError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ModelSaveError(f"{target}: cannot write (folder {folder}): {reason}") from error
    return target
