"""Safe model loading and atomic saving, with external data handled in both directions.

``load_model`` returns a self-contained ``ModelProto``: every external tensor is read into
``raw_data`` so no later code touches the file system again, and every tensor is checked
against its dtype and shape, because a hostile or broken file must fail here with a clear
message rather than deep inside a pass or onnxruntime.

``save_model`` writes through a temporary file in the target folder and ``os.replace``, so
the final path holds either the old file or the complete new one, never a partial write.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import TensorProto

from optimizer.errors import ModelLoadError, ModelSaveError

__all__ = [
    "EXTERNAL_ALIGNMENT_BYTES", "PROTOBUF_LIMIT_BYTES", "PROTOBUF_MARGIN_BYTES",
    "load_model", "load_model_with_files", "save_model", "serialized_size_bytes",
]  # fmt: skip

PROTOBUF_LIMIT_BYTES = 2**31 - 1
"""protobuf refuses to serialize or parse a message larger than this."""

PROTOBUF_MARGIN_BYTES = 64 * 2**20
"""Automatic external data starts this far below the limit, since ByteSize is an estimate."""

EXTERNAL_ALIGNMENT_BYTES = 4096
"""Each external tensor starts on a page boundary so runtimes can mmap it."""

_Labelled = tuple[TensorProto, str]
_READ_CHUNK_BYTES = 2**30
_TEMP_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
_TEMP_SUFFIX_CHARS = 8
_NO_FOLDER_REASON = ("references external data, but a model given as bytes or a proto has no "
                     "folder to read it from; load it from its .onnx path instead")  # fmt: skip
_PROTO_SOURCE = "<ModelProto>"
_BYTES_SOURCE = "<bytes>"

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


def serialized_size_bytes(model: onnx.ModelProto) -> int:
    """Serialized size, for the 2 GB decision.

    upb's ByteSize encodes the whole message (and raises past 2 GB), so tensor payloads are
    first estimated from dtype and shape; only a model that may fit is measured exactly.
    """
    payload_bytes = sum(_payload_bytes(tensor) for tensor, _ in _iter_tensors(model))
    if payload_bytes > PROTOBUF_LIMIT_BYTES - PROTOBUF_MARGIN_BYTES:
        return payload_bytes
    try:
        return model.ByteSize()
    except EncodeError:
        return PROTOBUF_LIMIT_BYTES + 1


def _payload_bytes(tensor: TensorProto) -> int:
    """Data bytes of a tensor from dtype and shape, since upb copies raw_data on every read."""
    if tensor.HasField("raw_data"):
        bits = _ELEMENT_BITS.get(tensor.data_type)
        if not bits or any(dim < 0 for dim in tensor.dims):
            return len(tensor.raw_data)
        return (math.prod(tensor.dims) * bits + 7) // 8
    numeric_fields = [field for field in _TYPED_FIELDS if field != "string_data"]
    numeric_count = sum(len(getattr(tensor, field)) for field in numeric_fields)
    return 8 * numeric_count + sum(len(value) for value in tensor.string_data)



def _iter_tensors(model: onnx.ModelProto) -> Iterator[_Labelled]:
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



def _load_error(source: str, label: str, reason: str) -> ModelLoadError:
    return ModelLoadError(f"{source}: {label}: {reason}")


def _describe(tensor: TensorProto) -> str:
    return f"shape {list(tensor.dims)} of {TensorProto.DataType.Name(tensor.data_type)}"


def _dtype_bits(tensor: TensorProto, source: str, label: str) -> int:
    bits = _ELEMENT_BITS.get(tensor.data_type)
    if bits is None:
        raise _load_error(source, label, f"unknown data type {tensor.data_type}")
    return bits


def _element_count(tensor: TensorProto, source: str, label: str) -> int:
    dims = list(tensor.dims)
    if any(dim < 0 for dim in dims):
        raise _load_error(source, label, f"negative dimension in shape {dims}")
    return math.prod(dims)


def _raw_byte_count(tensor: TensorProto, source: str, label: str) -> int:
    """Exact raw_data length implied by dtype and shape (sub-byte types are packed)."""
    bits = _dtype_bits(tensor, source, label)
    if bits == 0:
        raise _load_error(source, label, "string tensors cannot use raw_data or external data")
    return (_element_count(tensor, source, label) * bits + 7) // 8


def _typed_value_count(tensor: TensorProto, element_count: int) -> int:
    data_type = tensor.data_type
    if data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        return 2 * element_count
    bits = _ELEMENT_BITS.get(data_type, 8)
    per_entry = 8 // bits if bits < 8 and 8 % bits == 0 else 1
    return -(-element_count // per_entry)


def _check_inline_tensor(
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
        raise _load_error(source, label, "has external_data entries without data_location EXTERNAL")
    if len(typed_fields) + has_raw > 1:
        fields = ", ".join((["raw_data"] if has_raw else []) + typed_fields)
        raise _load_error(source, label, f"holds data in several fields at once ({fields})")
    if has_raw:
        expected_bytes = _raw_byte_count(tensor, source, label)
        raw_bytes = len(tensor.raw_data) if raw_bytes is None else raw_bytes
        if raw_bytes != expected_bytes:
            reason = f"raw_data is {raw_bytes} bytes but {_describe(tensor)} needs {expected_bytes}"
            raise _load_error(source, label, reason)
    elif typed_fields:
        field = typed_fields[0]
        expected_field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
        if field != expected_field:
            raise _load_error(source, label, f"data in {field}, its dtype uses {expected_field}")
        count = len(getattr(tensor, field))
        expected_count = _typed_value_count(tensor, element_count)
        if count != expected_count:
            reason = f"{field} has {count} values, shape needs {expected_count}"
            raise _load_error(source, label, reason)
    elif element_count > 0:
        raise _load_error(source, label, f"no data for {element_count} elements")



_FILE_KINDS = {
    stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symlink",
}  # fmt: skip


def _file_kind(mode: int) -> str:
    return _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _same_file(before: os.stat_result, after: os.stat_result) -> bool:
    same_inode = (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)
    return same_inode and stat.S_ISREG(after.st_mode)


def _read_exactly(fd: int, length_bytes: int, offset_bytes: int) -> bytes:
    """pread in chunks, since one read returns at most ~2 GB on Linux."""
    chunks: list[bytes] = []
    remaining = length_bytes
    while remaining > 0:
        chunk = os.pread(fd, min(remaining, _READ_CHUNK_BYTES), offset_bytes)
        if not chunk:
            raise OSError(f"file ended {remaining} bytes early")
        chunks.append(chunk)
        offset_bytes += len(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _read_model_file(real_path: str, shown: str, max_input_bytes: int | None) -> bytes:
    """Stat before opening so a FIFO or device is never opened, then read it in one go."""
    try:
        before = os.stat(real_path)
    except OSError as error:
        raise ModelLoadError(f"{shown}: cannot read model: {error.strerror}") from error
    if not stat.S_ISREG(before.st_mode):
        raise ModelLoadError(f"{shown}: cannot read model: {_file_kind(before.st_mode)}")
    if before.st_size == 0:
        raise ModelLoadError(f"{shown}: not an ONNX model: empty file")
    _check_input_size(before.st_size, max_input_bytes, shown)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(real_path, flags)
        try:
            if not _same_file(before, os.fstat(fd)):
                raise ModelLoadError(f"{shown}: file changed while it was being opened")
            return _read_exactly(fd, before.st_size, 0)
        finally:
            os.close(fd)
    except OSError as error:
        raise ModelLoadError(f"{shown}: cannot read model: {error}") from error


def _parse_model(data: bytes, shown: str) -> onnx.ModelProto:
    """Parse, then reject the garbage that protobuf happily accepts as a valid message."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise ModelLoadError(f"{shown}: not an ONNX model: {error}") from error
    _require_model_fields(model, shown)
    return model


def _require_model_fields(model: onnx.ModelProto, shown: str) -> None:
    present = {"graph": model.HasField("graph"), "ir_version": model.ir_version > 0,
               "opset_import": len(model.opset_import) > 0}  # fmt: skip
    missing = [field for field, is_present in present.items() if not is_present]
    if missing:
        raise ModelLoadError(f"{shown}: not an ONNX model: no {', '.join(missing)}")



def _external_entries(tensor: TensorProto, source: str, label: str) -> tuple[str, int, int | None]:
    """(location, offset, length or None) from the key/value list, strictly parsed."""
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in entries:
            raise _load_error(source, label, f"external data key '{entry.key}' given twice")
        entries[entry.key] = entry.value
    if "location" not in entries:
        raise _load_error(source, label, "external data has no location")
    numbers: dict[str, int | None] = {}
    for key in ("offset", "length"):
        text = entries.get(key)
        if text is not None and not (text.isascii() and text.isdigit()):
            raise _load_error(source, label, f"external data {key} {text!r} is not a number >= 0")
        numbers[key] = None if text is None else int(text)
    return entries["location"], numbers["offset"] or 0, numbers["length"]


def _location_parts(location: str, source: str, label: str) -> list[str]:
    """Split a location into plain names; anything that could leave the folder is refused."""
    reason = None
    if any(ord(char) < 32 or ord(char) == 127 for char in location):
        reason = "contains control characters"
    elif "\\" in location:
        reason = "contains a backslash"
    elif location.startswith("/") or os.path.isabs(location):
        reason = "is an absolute path"
    elif len(location) >= 2 and location[1] == ":":
        reason = "starts with a drive letter"
    parts = [part for part in location.split("/") if part not in ("", ".")]
    if reason is None and ".." in parts:
        reason = "contains '..'"
    if reason is None and not parts:
        reason = "names no file"
    if reason is not None:
        raise _load_error(source, label, f"external data location {location!r} {reason}")
    return parts


class _ExternalDataReader:
    """Reads external tensor data from files inside one folder, opening each file once."""

    def __init__(self, folder: str, source: str, budget_bytes: int | None) -> None:
        self._folder = os.path.realpath(folder)
        self._source = source
        self._budget_bytes = budget_bytes
        self._open_files: dict[tuple[str, ...], tuple[int, int, str]] = {}

    def __enter__(self) -> _ExternalDataReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for fd, _, _ in self._open_files.values():
            os.close(fd)
        self._open_files.clear()

    def paths(self) -> tuple[pathlib.Path, ...]:
        return tuple(pathlib.Path(path) for _, _, path in self._open_files.values())

    def read(self, tensor: TensorProto, label: str) -> bytes:
        location, offset_bytes, length_bytes = _external_entries(tensor, self._source, label)
        parts = _location_parts(location, self._source, label)
        expected_bytes = _raw_byte_count(tensor, self._source, label)
        fd, size_bytes, path = self._open(parts, location, label)
        shown = f"{self._source}: {label}: external file {path}"
        if length_bytes is None:
            length_bytes = max(size_bytes - offset_bytes, 0)
        if offset_bytes + length_bytes > size_bytes or offset_bytes > size_bytes:
            raise ModelLoadError(f"{shown}: offset {offset_bytes} + length {length_bytes} is "
                                 f"beyond its {size_bytes} bytes")  # fmt: skip
        if length_bytes != expected_bytes:
            raise ModelLoadError(f"{shown}: length {length_bytes} bytes does not match "
                                 f"{_describe(tensor)} ({expected_bytes} bytes)")  # fmt: skip
        try:
            return _read_exactly(fd, length_bytes, offset_bytes)
        except OSError as error:
            raise ModelLoadError(f"{shown}: cannot read: {error}") from error

    def _open(self, parts: list[str], location: str, label: str) -> tuple[int, int, str]:
        key = tuple(parts)
        if key not in self._open_files:
            path = os.path.join(self._folder, *parts)
            real = os.path.realpath(path)
            if os.path.commonpath([real, self._folder]) != self._folder or real == self._folder:
                reason = f"external data {location!r} resolves outside {self._folder}"
                raise _load_error(self._source, label, reason)
            try:
                fd, size_bytes = self._open_inside_folder(parts)
            except OSError as error:
                reason = f"cannot open external data {path}: {error.strerror}"
                raise _load_error(self._source, label, reason) from error
            except ValueError as error:
                raise _load_error(self._source, label, f"external data {path} {error}") from None
            self._open_files[key] = (fd, size_bytes, path)
            self._charge(size_bytes, path, label)
        return self._open_files[key]

    def _open_inside_folder(self, parts: list[str]) -> tuple[int, int]:
        """Walk with dir fds and O_NOFOLLOW so no symlink or swapped file can be followed."""
        dir_fd = os.open(self._folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                info = os.stat(part, dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISDIR(info.st_mode):
                    raise ValueError(f"has a parent '{part}' that is {_file_kind(info.st_mode)}")
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                next_fd = os.open(part, flags, dir_fd=dir_fd)
                os.close(dir_fd)
                dir_fd = next_fd
            before = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(before.st_mode):
                raise ValueError(f"is {_file_kind(before.st_mode)}")
            if before.st_nlink > 1:
                raise ValueError(f"is a hard link ({before.st_nlink} links)")
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(parts[-1], flags, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        after = os.fstat(fd)
        if not _same_file(before, after):
            os.close(fd)
            raise ValueError("changed while it was being opened")
        return fd, after.st_size

    def _charge(self, size_bytes: int, path: str, label: str) -> None:
        if self._budget_bytes is not None:
            self._budget_bytes -= size_bytes
            if self._budget_bytes < 0:
                reason = f"external data {path} takes the input over max_input_bytes"
                raise _load_error(self._source, label, reason)


def _inline_and_check_tensors(
    model: onnx.ModelProto, shown: str, reader: _ExternalDataReader | None
) -> None:
    """Read every external tensor into raw_data (only a file has a folder), check all."""
    for tensor, label in _iter_tensors(model):
        raw_bytes = None
        if tensor.data_location == TensorProto.EXTERNAL:
            if reader is None:
                raise _load_error(shown, label, _NO_FOLDER_REASON)
            if tensor.HasField("raw_data"):
                raise _load_error(shown, label, "has both raw_data and external data")
            data = reader.read(tensor, label)
            raw_bytes = len(data)
            tensor.raw_data = data
            del data, tensor.external_data[:]
            tensor.ClearField("data_location")
        _check_inline_tensor(tensor, shown, label, raw_bytes)



def _run_onnx_checker(model: onnx.ModelProto, shown: str) -> None:
    """onnx's checker serializes the model, so it only runs below protobuf's limit."""
    if serialized_size_bytes(model) > PROTOBUF_LIMIT_BYTES - PROTOBUF_MARGIN_BYTES:
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
    source: str | os.PathLike | bytes | onnx.ModelProto, *, max_input_bytes: int | None = None
) -> onnx.ModelProto:
    """A new, self-contained, checked ModelProto from a path, serialized bytes or a proto."""
    if isinstance(source, (str, os.PathLike)):
        return load_model_with_files(source, max_input_bytes=max_input_bytes)[0]
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
    path: str | os.PathLike, *, max_input_bytes: int | None = None
) -> tuple[onnx.ModelProto, tuple[pathlib.Path, ...]]:
    """The model plus every file it was read from, so callers can refuse to overwrite them."""
    shown = os.fspath(path)
    real_path = os.path.realpath(shown)
    data = _read_model_file(real_path, shown, max_input_bytes)
    model = _parse_model(data, shown)
    budget_bytes = None if max_input_bytes is None else max_input_bytes - len(data)
    del data
    folder = os.path.dirname(os.path.abspath(shown))
    with _ExternalDataReader(folder, shown, budget_bytes) as reader:
        _inline_and_check_tensors(model, shown, reader)
        external_paths = reader.paths()
    _run_onnx_checker(model, shown)
    return model, (pathlib.Path(real_path), *external_paths)



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


def _check_output_file(path: pathlib.Path) -> None:
    """Refuse to write through a symlink or over anything that is not a regular file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise ModelSaveError(f"{path}: output exists and is {_file_kind(info.st_mode)}")


def _is_same_path(first: pathlib.Path, second: str) -> bool:
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _check_protected(
    outputs: list[pathlib.Path], protected_paths: Iterable[str | os.PathLike]
) -> None:
    for protected in map(os.fspath, protected_paths):
        for output in outputs:
            if _is_same_path(output, protected):
                raise ModelSaveError(f"{output}: refusing to overwrite {protected}, an input file")


def _needs_external_data(
    model: onnx.ModelProto, external_data: bool | None, target: pathlib.Path
) -> bool:
    size_bytes = serialized_size_bytes(model)
    if external_data is None:
        return size_bytes > PROTOBUF_LIMIT_BYTES - PROTOBUF_MARGIN_BYTES
    if not external_data and size_bytes > PROTOBUF_LIMIT_BYTES:
        reason = f"model is {size_bytes} bytes, over protobuf's 2 GB limit; use external data"
        raise ModelSaveError(f"{target}: {reason}")
    return external_data


def _reject_unresolved_external(model: onnx.ModelProto, target: pathlib.Path) -> None:
    for tensor, label in _iter_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            reason = f"{label} still references external data; load it with load_model first"
            raise ModelSaveError(f"{target}: {reason}")


def _remove_stale_temps(folder: pathlib.Path, names: list[str]) -> None:
    """Drop temps an earlier, killed save left for these exact names (mkstemp pattern)."""
    prefixes = [f".{name}.tmp-" for name in names]
    for entry in os.listdir(folder):
        for prefix in prefixes:
            suffix = entry[len(prefix) :]
            is_ours = len(suffix) == _TEMP_SUFFIX_CHARS and set(suffix) <= _TEMP_NAME_CHARS
            if entry.startswith(prefix) and is_ours:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(folder / entry)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:_READ_CHUNK_BYTES])
        view = view[written:]


def _new_file_mode() -> int:
    """Temp files are created 0o600; give the final file the mode open() would have."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _commit_atomically(
    folder: pathlib.Path, writers: list[tuple[pathlib.Path, Callable[[int], None]]]
) -> None:
    """Write each file to a temp in the folder, fsync all, then os.replace them in order."""
    pending: list[tuple[str, pathlib.Path]] = []
    try:
        for final_path, write in writers:
            fd, temp_path = tempfile.mkstemp(dir=folder, prefix=f".{final_path.name}.tmp-")
            pending.append((temp_path, final_path))
            try:
                write(fd)
                os.fchmod(fd, _new_file_mode())
                os.fsync(fd)
            finally:
                os.close(fd)
        while pending:
            temp_path, final_path = pending[0]
            os.replace(temp_path, final_path)
            pending.pop(0)
    finally:
        for temp_path, _ in pending:
            with contextlib.suppress(OSError):
                os.unlink(temp_path)
    with contextlib.suppress(OSError):
        _fsync_folder(folder)


def _fsync_folder(folder: pathlib.Path) -> None:
    """Make the renames durable; best effort, as some file systems cannot fsync a folder."""
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


def _move_tensors_to_file(
    model: onnx.ModelProto, fd: int, location: str, threshold_bytes: int
) -> None:
    """Write raw_data of big tensors to fd, page-aligned, and point the tensors at it."""
    end_bytes = 0
    for tensor, _ in _iter_tensors(model):
        if not tensor.HasField("raw_data"):
            continue
        data = tensor.raw_data
        if len(data) < threshold_bytes:
            continue
        offset_bytes = -(-end_bytes // EXTERNAL_ALIGNMENT_BYTES) * EXTERNAL_ALIGNMENT_BYTES
        _write_all(fd, bytes(offset_bytes - end_bytes))
        _write_all(fd, data)
        end_bytes = offset_bytes + len(data)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset_bytes), ("length", len(data))):
            tensor.external_data.add(key=key, value=str(value))


def _serialize(model: onnx.ModelProto, target: pathlib.Path) -> bytes:
    try:
        return model.SerializeToString(deterministic=True)
    except EncodeError as error:
        reason = "over protobuf's 2 GB limit even with raw_data moved out (typed data stays)"
        raise ModelSaveError(f"{target}: {reason}") from error


def _write_with_external_data(
    model: onnx.ModelProto, target: pathlib.Path, data_target: pathlib.Path, threshold_bytes: int
) -> None:
    """Lay big tensors out in a fresh data file; the caller's model is copied, not changed."""
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)

    def write_data(fd: int) -> None:
        _move_tensors_to_file(model_copy, fd, data_target.name, threshold_bytes)

    def write_model(fd: int) -> None:
        _write_all(fd, _serialize(model_copy, target))

    _commit_atomically(target.parent, [(data_target, write_data), (target, write_model)])


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protected_paths: Iterable[str | os.PathLike] = (),
    size_threshold_bytes: int = 1024,
) -> pathlib.Path:
    """Write atomically, refusing to touch inputs; external data when asked or above 2 GB.

    With external data, tensors of at least ``size_threshold_bytes`` go to ``{name}.data``
    next to the model, which is always rewritten whole. Temps left by a killed earlier save
    to the same name are removed first.
    """
    if not isinstance(model, onnx.ModelProto):
        raise ModelSaveError(f"{os.fspath(path)}: not an onnx.ModelProto: {type(model).__name__}")
    target = pathlib.Path(os.path.abspath(os.fspath(path)))
    folder = target.parent
    data_target = folder / f"{target.name}.data"
    _check_output_folder(folder, target)
    _check_output_file(target)
    _reject_unresolved_external(model, target)
    use_external = _needs_external_data(model, external_data, target)
    outputs = [data_target, target] if use_external else [target]
    _check_protected(outputs, protected_paths)
    if use_external:
        _check_output_file(data_target)
    try:
        _remove_stale_temps(folder, [target.name, data_target.name])
        if use_external:
            _write_with_external_data(model, target, data_target, size_threshold_bytes)
        else:
            model_bytes = _serialize(model, target)
            _commit_atomically(folder, [(target, lambda fd: _write_all(fd, model_bytes))])
    except (OSError, EncodeError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ModelSaveError(f"{target}: cannot write (folder {folder}): {reason}") from error
    return target
