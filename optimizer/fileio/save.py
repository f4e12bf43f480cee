"""Atomic saving, with lazy and external tensors streamed into the new data file.

``save_model`` streams lazy tensors from their verified files into the new data file, with
the same layout an eager model gets. It writes through a temporary file in the target folder
and ``os.replace``, so the final path holds either the old file or the complete new one.
Loading lives in ``optimizer.fileio.model``; this module only writes.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import stat
from collections.abc import Callable, Iterable

import onnx
from google.protobuf.message import EncodeError
from onnx import TensorProto

from optimizer.errors import ModelLoadError, ModelSaveError
from optimizer.fileio.external_data import READ_CHUNK_BYTES, file_kind
from optimizer.fileio.lazy_io import (
    copy_range,
    is_lazy,
    lazy_ref,
    read_range,
)
from optimizer.fileio.model import (
    PROTOBUF_LIMIT_BYTES,
    PROTOBUF_MARGIN_BYTES,
    has_lazy_tensors,
    model_size_bytes,
)
from optimizer.fileio.output_files import check_apart, commit, data_file_name, file_digest, remove_dead_temps, temp_file
from optimizer.fileio.tensor_checks import iter_tensors

__all__ = ["EXTERNAL_ALIGNMENT_BYTES", "check_output_file", "check_output_target", "save_model"]

EXTERNAL_ALIGNMENT_BYTES = 4096
"""Each external tensor starts on a page boundary so runtimes can mmap it."""


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


def check_output_target(path: str | os.PathLike) -> None:
    """Before any work: the output's folder exists and is writable, and nothing but a regular file
    is in the way (so a run of minutes does not end in a save that cannot happen)."""
    target = pathlib.Path(os.path.abspath(os.fspath(path)))  # as save_model resolves it
    _check_output_folder(target.parent, target)
    check_output_file(target)


def check_output_file(path: pathlib.Path) -> None:
    """Refuse to write through a symlink or over anything that is not a regular file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise ModelSaveError(f"{path}: output exists and is {file_kind(info.st_mode)}")


def _needs_external_data(model: onnx.ModelProto, external_data: bool | None, target: pathlib.Path) -> bool:
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


def _write_temp(folder: pathlib.Path, final_name: str, write: Callable[[int], None]) -> str:
    """A complete, fsynced temporary file in ``folder`` (removed again if writing fails)."""
    fd, temp_path = temp_file(folder, final_name)
    try:
        try:
            write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_path)
        raise
    return temp_path


def _commit_atomically(
    target: pathlib.Path,
    model_bytes: bytes,
    protected: list[str],
    data_temp: str | None = None,
    data_name: str | None = None,
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


def _move_tensors_to_file(model: onnx.ModelProto, fd: int, location: str, threshold_bytes: int) -> None:
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
        data = tensor.raw_data if ref is None else b""
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
    data_temp = _write_temp(
        folder, f"{target.name}.data", lambda fd: _move_tensors_to_file(model_copy, fd, "", threshold_bytes)
    )
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
