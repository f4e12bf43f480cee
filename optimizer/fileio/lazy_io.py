"""Tensors that stay on disk: read-only memory maps of files this process has verified.

A large model is never read whole. ``load_model_with_files(..., lazy_above_bytes=...)`` checks
each external tensor exactly as an eager load does, then, instead of reading it, rewrites its
``external_data`` into a *lazy reference*: the location becomes a marker (starting with a NUL
byte, so onnx, onnxruntime or a plain ``open`` fail instead of resolving it against the working
folder) naming the verified file by path and identity (device, inode, size, mtime) plus offset
and length. Only files this process verified (the loader) or wrote (the export spill) are
trusted, so a marker in a hostile input points nowhere.

On use the file is opened again without following links and its identity (device, inode, size,
mtime, ctime) compared on the open descriptor before and after every read or copy: a file
swapped, rewritten or truncated since loading is an error, never silently other data. A user's
file is never memory-mapped, because truncating a mapped file kills the process with SIGBUS:
a pass sees a map of a private, already unlinked copy of the range (made in the kernel with
``copy_file_range``), which nobody else can truncate. Files this process wrote (the spill) are
mapped directly. ``check_sources_unchanged`` tells, before an output is published, whether any
file a load read has changed since.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import mmap
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict

import numpy as np
from onnx import TensorProto
from onnx_graphsurgeon.ir.tensor import LazyValues

from optimizer.errors import ModelLoadError
from optimizer.fileio.packed import PACKED_4BIT, packed_dtype, unpacked

__all__ = [
    "LAZY_DTYPES",
    "LAZY_TENSOR_MIN_BYTES",
    "SPILL_MIN_BYTES",
    "FileIdentity",
    "LazyRef",
    "MappedValues",
    "SpillFile",
    "check_sources_unchanged",
    "copy_range",
    "is_lazy",
    "lazy_ref",
    "make_lazy",
    "map_array",
    "mapped_tensor",
    "read_range",
    "remember_source",
    "spillable",
    "trust_file",
    "trust_identity",
]

LAZY_TENSOR_MIN_BYTES = 4096
"""Smaller external tensors are read at load: shapes and scalars are cheap, and checks read them."""

SPILL_MIN_BYTES = 64 * 1024
"""Arrays a pass created are written to the spill file at export from this size on."""

COPY_CHUNK_BYTES = 64 * 2**20

_MARKER = "\x00onnx-compress-lazy:"
_MARKER_PATTERN = re.compile(r"(\d+):(\d+):(\d+):(\d+):(\d+):(/.*)", re.DOTALL)
_OPEN_FILES_KEPT = 16
_SPILL_PREFIX = "onnx-compress-spill-"

LAZY_DTYPES: dict[int, type] = {
    TensorProto.FLOAT: np.float32,
    TensorProto.DOUBLE: np.float64,
    TensorProto.FLOAT16: np.float16,
    TensorProto.INT8: np.int8,
    TensorProto.UINT8: np.uint8,
    TensorProto.INT16: np.int16,
    TensorProto.UINT16: np.uint16,
    TensorProto.INT32: np.int32,
    TensorProto.UINT32: np.uint32,
    TensorProto.INT64: np.int64,
    TensorProto.UINT64: np.uint64,
    TensorProto.BOOL: np.bool_,
}
"""Dtypes whose stored bytes are exactly a numpy array; others (packed, bfloat16, float8) load eagerly."""

_NUMPY_TO_ONNX = {np.dtype(value): key for key, value in LAZY_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class FileIdentity:
    """A verified regular file: where it was, and what it was when verified."""

    path: str
    device: int
    inode: int
    size_bytes: int
    mtime_ns: int
    ctime_ns: int = 0

    @classmethod
    def of(cls, fd: int, path: str) -> FileIdentity:
        info = os.fstat(fd)
        return cls(os.path.abspath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def matches(self, info: os.stat_result) -> bool:
        found = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        return found == (self.device, self.inode, self.size_bytes, self.mtime_ns, self.ctime_ns)

    def check(self, fd: int, when: str) -> None:
        """Raise unless ``fd`` is still exactly this file: same inode, size, mtime and ctime."""
        if not self.matches(os.fstat(fd)):
            raise ModelLoadError(
                f"{self.path}: external data changed {when} (size, time or inode "
                "differ); refusing to use a file that is being rewritten"
            )


@dataclasses.dataclass(frozen=True)
class LazyRef:
    identity: FileIdentity
    offset_bytes: int
    length_bytes: int


_TRUSTED: set[FileIdentity] = set()
_OWN: set[FileIdentity] = set()
_OPEN: OrderedDict[FileIdentity, int] = OrderedDict()
_SOURCES: dict[str, FileIdentity] = {}


def trust_file(fd: int, path: str) -> FileIdentity:
    """Record a file whose checks passed on ``fd``: lazy references may now point into it."""
    return trust_identity(FileIdentity.of(fd, path))


def trust_identity(identity: FileIdentity) -> FileIdentity:
    _TRUSTED.add(identity)
    return identity


def remember_source(identity: FileIdentity) -> None:
    """A file a load read, as it was then: ``check_sources_unchanged`` compares against it."""
    _SOURCES[identity.path] = identity


def check_sources_unchanged(paths: object) -> None:
    """Raise ``ModelLoadError`` naming the first of ``paths`` a load read that differs now.

    For the end of a run: an input rewritten, truncated or replaced while a pass ran would
    otherwise leave an output made of old and new data. Paths no load read are ignored.
    """
    for path in map(os.fspath, paths):  # type: ignore[call-overload]
        identity = _SOURCES.get(os.path.abspath(path)) or _SOURCES.get(os.path.realpath(path))
        if identity is not None:
            check_identity(
                identity,
                f"{identity.path}: input file",
                "while onnx-compress was running (size, time or inode differ from the load); nothing was written",
            )


def check_identity(identity: FileIdentity, what: str, when: str) -> None:
    """Raise ``ModelLoadError`` ("WHAT is gone" / "WHAT changed WHEN") unless the file is as it was."""
    try:
        info = os.stat(identity.path, follow_symlinks=False)
    except OSError as error:
        raise ModelLoadError(f"{what} is gone: {error.strerror}") from error
    if not identity.matches(info):
        raise ModelLoadError(f"{what} changed {when}")


def make_lazy(tensor: TensorProto, identity: FileIdentity, offset_bytes: int, length_bytes: int) -> None:
    """Turn a checked external (or raw) tensor into a lazy reference; no data is read."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    where = (
        f"{_MARKER}{identity.device}:{identity.inode}:{identity.size_bytes}:"
        f"{identity.mtime_ns}:{identity.ctime_ns}:{identity.path}"
    )
    for key, value in (("location", where), ("offset", offset_bytes), ("length", length_bytes)):
        tensor.external_data.add(key=key, value=str(value))


def is_lazy(tensor: TensorProto) -> bool:
    if tensor.data_location != TensorProto.EXTERNAL:
        return False
    return any(entry.key == "location" and entry.value.startswith(_MARKER) for entry in tensor.external_data)


def lazy_ref(tensor: TensorProto) -> LazyRef:
    """The reference a lazy tensor holds; refused unless this process verified the file."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    match = _MARKER_PATTERN.fullmatch(entries.get("location", "")[len(_MARKER) :])
    numbers = [entries.get(key, "") for key in ("offset", "length")]
    if match is None or not all(text.isascii() and text.isdigit() for text in numbers):
        raise ModelLoadError(f"tensor '{tensor.name}': malformed lazy external data reference")
    device, inode, size_bytes, mtime_ns, ctime_ns = (int(group) for group in match.groups()[:5])
    identity = FileIdentity(match.group(6), device, inode, size_bytes, mtime_ns, ctime_ns)
    if identity not in _TRUSTED:
        raise ModelLoadError(
            f"tensor '{tensor.name}': lazy external data in {identity.path} was not "
            "loaded by this process; load the model from its path"
        )
    offset_bytes, length_bytes = (int(text) for text in numbers)
    if offset_bytes + length_bytes > identity.size_bytes:
        raise ModelLoadError(f"tensor '{tensor.name}': lazy reference beyond {identity.path}")
    return LazyRef(identity, offset_bytes, length_bytes)


def _open_trusted(identity: FileIdentity) -> int:
    """A descriptor of exactly the verified file (same inode, size, times), cached; checked
    again on every use, since the file may have been rewritten in place since."""
    if identity in _OPEN:
        _OPEN.move_to_end(identity)
        identity.check(_OPEN[identity], "since the model was loaded")
        return _OPEN[identity]
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(identity.path, flags)
    except OSError as error:
        raise ModelLoadError(f"{identity.path}: external data is gone: {error.strerror}") from error
    if not identity.matches(os.fstat(fd)):
        os.close(fd)
        raise ModelLoadError(f"{identity.path}: external data changed since the model was loaded")
    _OPEN[identity] = fd
    while len(_OPEN) > _OPEN_FILES_KEPT:
        os.close(_OPEN.popitem(last=False)[1])
    return fd


_MAPPED: dict[int, tuple[weakref.ref, TensorProto]] = {}


def map_array(tensor: TensorProto) -> np.ndarray:
    """A read-only array over the lazy tensor's bytes; unmapped when the array is dropped.

    Only files this process wrote are mapped in place; a user's file is copied first (see the
    module doc), so that no one truncating it can make a later access die with SIGBUS.
    """
    ref = lazy_ref(tensor)
    dtype = np.dtype(LAZY_DTYPES[tensor.data_type])
    shape = tuple(int(dim) for dim in tensor.dims)
    if ref.length_bytes == 0:
        return np.zeros(shape, dtype)
    if ref.identity in _OWN:
        fd = _open_trusted(ref.identity)
        start = ref.offset_bytes - ref.offset_bytes % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, ref.offset_bytes + ref.length_bytes - start, access=mmap.ACCESS_READ, offset=start)
    else:
        mapping, start = _private_copy(ref), ref.offset_bytes
    _LIVE_MAPS.add(mapping)
    _start_reclaimer()
    count = ref.length_bytes // dtype.itemsize
    array = np.frombuffer(mapping, dtype, count, ref.offset_bytes - start).reshape(shape)
    key = id(array)
    marker = TensorProto()
    marker.CopyFrom(tensor)
    _MAPPED[key] = (weakref.ref(array, functools.partial(_forget, key)), marker)
    return array


_LIVE_MAPS: weakref.WeakSet = weakref.WeakSet()
_RECLAIMER: dict[int, threading.Thread] = {}
RECLAIM_INTERVAL_S = 0.1


def _start_reclaimer() -> None:
    """Keep resident only the mapped pages touched in the last interval.

    A pass may hold maps of every weight while it reads them one by one; their pages are clean
    page cache, so dropping them from this process (MADV_DONTNEED on a read-only file map) costs
    a minor fault on the next read and keeps RSS near one tensor instead of the whole model.
    """
    pid = os.getpid()
    if pid in _RECLAIMER or not hasattr(mmap, "MADV_DONTNEED"):
        return
    thread = threading.Thread(target=_reclaim_forever, name="onnx-compress-reclaim", daemon=True)
    _RECLAIMER[pid] = thread
    thread.start()


def _reclaim_forever() -> None:
    while True:
        time.sleep(RECLAIM_INTERVAL_S)
        for mapping in list(_LIVE_MAPS):
            with contextlib.suppress(ValueError, OSError):
                mapping.madvise(mmap.MADV_DONTNEED)


def _forget(key: int, dead: weakref.ref) -> None:
    entry = _MAPPED.get(key)
    if entry is not None and entry[0] is dead:
        del _MAPPED[key]


def mapped_tensor(values: object) -> TensorProto | None:
    """The lazy tensor ``values`` maps unchanged (it is read-only), else None."""
    entry = _MAPPED.get(id(values))
    if entry is None or entry[0]() is not values:
        return None
    return entry[1]


class MappedValues(LazyValues):
    """onnx-graphsurgeon values of a lazy tensor: exported as the reference, loaded as a map.

    ``tensor`` is a fresh copy on every access, because the exporter renames what it gets.
    """

    def __init__(self, tensor: TensorProto) -> None:  # no super: it sets .tensor
        self._marker = TensorProto()
        self._marker.CopyFrom(tensor)
        self.shape = tuple(int(dim) for dim in tensor.dims)
        count = int(np.prod(self.shape, dtype=np.int64))
        if tensor.data_type in PACKED_4BIT:
            self.dtype = packed_dtype(tensor.data_type)
            self.nbytes = (count + 1) // 2
        else:
            self.dtype = np.dtype(LAZY_DTYPES[tensor.data_type])
            self.nbytes = count * self.dtype.itemsize

    @property
    def tensor(self) -> TensorProto:
        copy = TensorProto()
        copy.CopyFrom(self._marker)
        return copy

    def load(self) -> np.ndarray:
        if self._marker.data_type in PACKED_4BIT:
            return unpacked(self._marker, read_range(lazy_ref(self._marker)))
        return map_array(self._marker)

    def __str__(self) -> str:
        return f"MappedValues (shape={self.shape}, dtype={self.dtype})"


def _private_copy(ref: LazyRef) -> mmap.mmap:
    """A read-only map of a copy of the range in an unlinked file of this process's own."""
    in_fd = _open_trusted(ref.identity)
    copy_fd, copy_path = tempfile.mkstemp(dir=_spill_folder(), suffix=".copy")
    try:
        os.unlink(copy_path)
        _copy_bytes(in_fd, ref, copy_fd)
        ref.identity.check(in_fd, "while it was being read")
        return mmap.mmap(copy_fd, ref.length_bytes, access=mmap.ACCESS_READ)
    except OSError as error:
        raise ModelLoadError(f"{ref.identity.path}: cannot read external data: {error}") from error
    finally:
        os.close(copy_fd)


def read_range(ref: LazyRef) -> bytes:
    """The referenced bytes in memory: for small tensors and for saving a model inline."""
    fd = _open_trusted(ref.identity)
    chunks = []
    offset, remaining = ref.offset_bytes, ref.length_bytes
    while remaining > 0:
        chunk = os.pread(fd, min(remaining, COPY_CHUNK_BYTES), offset)
        if not chunk:
            raise ModelLoadError(f"{ref.identity.path}: external data ended early")
        chunks.append(chunk)
        offset, remaining = offset + len(chunk), remaining - len(chunk)
    ref.identity.check(fd, "while it was being read")
    return b"".join(chunks)


def copy_range(ref: LazyRef, out_fd: int) -> None:
    """Append the referenced bytes to ``out_fd`` in the kernel, or in 64 MB chunks; the source
    must be the same file, unchanged, before and after."""
    in_fd = _open_trusted(ref.identity)
    _copy_bytes(in_fd, ref, out_fd)
    ref.identity.check(in_fd, "while it was being copied")


def _copy_bytes(in_fd: int, ref: LazyRef, out_fd: int) -> None:
    offset, remaining = ref.offset_bytes, ref.length_bytes
    with contextlib.suppress(OSError, AttributeError):
        while remaining > 0:
            copied = os.copy_file_range(in_fd, out_fd, min(remaining, 2**30), offset)
            if copied <= 0:
                break
            offset, remaining = offset + copied, remaining - copied
    while remaining > 0:
        chunk = os.pread(in_fd, min(remaining, COPY_CHUNK_BYTES), offset)
        if not chunk:
            raise OSError(f"{ref.identity.path}: external data ended {remaining} bytes early")
        view = memoryview(chunk)
        while view:
            view = view[os.write(out_fd, view) :]
        offset, remaining = offset + len(chunk), remaining - len(chunk)


# ------------------------------------------------------------------------------ spill

_SPILL_FOLDER: dict[int, str] = {}


def _spill_folder() -> str:
    """This process's folder for exported arrays, removed at exit (or later, once we are gone)."""
    pid = os.getpid()
    if pid not in _SPILL_FOLDER:
        _remove_stale_spills(tempfile.gettempdir())
        folder = tempfile.mkdtemp(prefix=f"{_SPILL_PREFIX}{pid}-")
        _SPILL_FOLDER[pid] = folder
        atexit.register(shutil.rmtree, folder, True)
    return _SPILL_FOLDER[pid]


def _remove_stale_spills(parent: str) -> None:
    with contextlib.suppress(OSError):
        for entry in sorted(os.listdir(parent)):
            match = re.fullmatch(re.escape(_SPILL_PREFIX) + r"(\d+)-\w+", entry)
            if match and not process_alive(int(match.group(1))):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (temporary folders carry their owner's id)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SpillFile:
    """Arrays a pass made, written once, page-aligned, so the exported model can reference them."""

    def __init__(self) -> None:
        self._fd, self._path = tempfile.mkstemp(dir=_spill_folder(), suffix=".data")
        self._end_bytes = 0
        self._pending: list[tuple[TensorProto, int, int]] = []

    def add(self, values: np.ndarray | TensorProto, name: str) -> TensorProto:
        """Write an array or a raw tensor's bytes; the result is a lazy reference after ``close``."""
        tensor = TensorProto()
        if isinstance(values, TensorProto):
            for field, value in values.ListFields():  # all but raw_data: upb never frees a cleared field
                if field.name == "raw_data":
                    continue
                if hasattr(value, "extend"):
                    getattr(tensor, field.name).extend(value)
                elif field.message_type is not None:
                    getattr(tensor, field.name).CopyFrom(value)
                else:
                    setattr(tensor, field.name, value)
            data = np.frombuffer(values.raw_data, np.uint8)
        else:
            contiguous = np.ascontiguousarray(values)
            tensor.data_type = _NUMPY_TO_ONNX[contiguous.dtype]
            tensor.dims.extend(contiguous.shape)
            data = contiguous.reshape(-1).view(np.uint8)
        tensor.name = name
        offset = -(-self._end_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        view, position = data.data, offset
        while view:
            written = os.pwrite(self._fd, view[:COPY_CHUNK_BYTES], position)
            view, position = view[written:], position + written
        self._end_bytes = offset + data.nbytes
        self._pending.append((tensor, offset, data.nbytes))
        return tensor

    def close(self) -> None:
        try:
            identity = trust_file(self._fd, self._path)
            _OWN.add(identity)
        finally:
            os.close(self._fd)
        for tensor, offset, length in self._pending:
            make_lazy(tensor, identity, offset, length)


def spillable(values: object) -> np.ndarray | TensorProto | None:
    """What of a constant's values the spill file can hold: a large array or raw tensor."""
    if isinstance(values, np.ndarray):
        return values if values.dtype in _NUMPY_TO_ONNX and values.nbytes >= SPILL_MIN_BYTES else None
    if isinstance(values, LazyValues) and not isinstance(values, MappedValues):
        tensor = values.tensor
        is_raw = isinstance(tensor, TensorProto) and (
            tensor.data_type in LAZY_DTYPES or tensor.data_type in PACKED_4BIT
        )
        if is_raw and tensor.HasField("raw_data") and values.nbytes >= SPILL_MIN_BYTES:
            return tensor
    return None
