"""Reading external tensor data from files inside the model's folder, and nowhere else.

A location may not leave the folder (no absolute path, '..' or symlink, except a symlink into
a root ``optimizer.fileio.symlink_roots`` allows), and its size counts against ``max_input_bytes``.
Each file's identity (inode, size, mtime, ctime) is recorded when it is first opened and
checked before and after every read, so a file rewritten while the model loads is an error.
Only a few descriptors stay open at a time (a model may have thousands of data files). The
plain file helpers here (kind, identity, chunked pread) serve model-file reading as well.
"""

from __future__ import annotations

import os
import pathlib
import resource
import stat
from collections import OrderedDict
from collections.abc import Iterable

from onnx import TensorProto

from optimizer.errors import ModelLoadError
from optimizer.fileio.lazy_io import FileIdentity, check_identity, remember_source, trust_identity
from optimizer.fileio.symlink_roots import resolve_allowed_symlink, symlink_roots
from optimizer.fileio.tensor_checks import describe_tensor, load_error, raw_byte_count

__all__ = [
    "MEMORY_COPIES",
    "READ_CHUNK_BYTES",
    "ExternalDataReader",
    "check_fits_in_memory",
    "file_kind",
    "memory_available_bytes",
    "memory_headroom_bytes",
    "read_exactly",
    "read_model_file",
    "same_file",
    "stat_regular_file",
]

READ_CHUNK_BYTES = 2**30

_MAX_NUMBER_DIGITS = 19
"""An offset or length past int64 (19 digits) cannot point into a file."""

MEMORY_COPIES = 2
"""Bytes read are held about twice at the peak (the read buffer, then protobuf's own copy)."""

_FILE_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symlink",
}


def file_kind(mode: int) -> str:
    return _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def stat_regular_file(path: str) -> tuple[os.stat_result | None, str]:
    """Stat ``path`` without opening it (opening a FIFO would block, a device could be read
    forever): its stat, or None and why it cannot be read ("No such file...", "a FIFO", ...)."""
    try:
        info = os.stat(path)
    except OSError as error:
        return None, str(error.strerror or error)
    if not stat.S_ISREG(info.st_mode):
        return None, file_kind(info.st_mode)
    return info, ""


def same_file(before: os.stat_result, after: os.stat_result) -> bool:
    same_inode = (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)
    return same_inode and stat.S_ISREG(after.st_mode)


def memory_headroom_bytes() -> int | None:
    """What this process may still allocate: physical memory, or less under RLIMIT_AS."""
    try:
        page_bytes = os.sysconf("SC_PAGE_SIZE")
        headroom = page_bytes * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return None
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft_limit != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm", "rb") as statm:
                used_bytes = int(statm.read().split()[0]) * page_bytes
        except (OSError, ValueError, IndexError):
            used_bytes = 0
        headroom = min(headroom, soft_limit - used_bytes)
    return max(headroom, 0)


def memory_available_bytes() -> int | None:
    """Memory that can be allocated now without swapping or hitting a limit: the least of Linux's
    MemAvailable, the cgroup v2 limit left (memory.max - memory.current) and ``memory_headroom_bytes``;
    None when none of them can be read."""
    found = [value for value in (_meminfo_available(), _cgroup_left(), memory_headroom_bytes()) if value is not None]
    return max(min(found), 0) if found else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_left() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as limit_file:
            limit = limit_file.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as current_file:
            return int(limit) - int(current_file.read().strip())
    except (OSError, ValueError):
        return None


def check_fits_in_memory(size_bytes: int, shown: str) -> None:
    """Refuse before allocating: a hostile size must be a clear error, not a MemoryError."""
    headroom = memory_headroom_bytes()
    if headroom is not None and MEMORY_COPIES * size_bytes > headroom:
        raise ModelLoadError(
            f"{shown}: needs about {MEMORY_COPIES * size_bytes} bytes of memory, "
            f"more than the {headroom} bytes this process can allocate"
        )


def read_exactly(fd: int, length_bytes: int, offset_bytes: int) -> bytes:
    """pread in chunks, since one read returns at most ~2 GB on Linux."""
    chunks: list[bytes] = []
    remaining = length_bytes
    while remaining > 0:
        chunk = os.pread(fd, min(remaining, READ_CHUNK_BYTES), offset_bytes)
        if not chunk:
            raise OSError(f"file ended {remaining} bytes early")
        chunks.append(chunk)
        offset_bytes += len(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_model_file(real_path: str, shown: str, max_input_bytes: int | None) -> bytes:
    """Stat before opening so a FIFO or device is never opened, then read it in one go."""
    before, problem = stat_regular_file(real_path)
    if before is None:
        raise ModelLoadError(f"{shown}: cannot read model: {problem}")
    if before.st_size == 0:
        raise ModelLoadError(f"{shown}: not an ONNX model: empty file")
    if max_input_bytes is not None and before.st_size > max_input_bytes:
        raise ModelLoadError(f"{shown}: {before.st_size} bytes, over the limit of {max_input_bytes}")
    check_fits_in_memory(before.st_size, shown)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(real_path, flags)
        try:
            if not same_file(before, os.fstat(fd)):
                raise ModelLoadError(f"{shown}: file changed while it was being opened")
            identity = FileIdentity.of(fd, real_path)
            data = read_exactly(fd, before.st_size, 0)
            if not identity.matches(os.fstat(fd)) or identity.size_bytes != before.st_size:
                raise ModelLoadError(f"{shown}: file changed while it was being read")
            remember_source(identity)
            return data
        finally:
            os.close(fd)
    except OSError as error:
        raise ModelLoadError(f"{shown}: cannot read model: {error}") from error
    except MemoryError:
        raise ModelLoadError(f"{shown}: out of memory reading {before.st_size} bytes") from None


def _external_entries(tensor: TensorProto, source: str, label: str) -> tuple[str, int, int | None]:
    """(location, offset, length or None) from the key/value list, strictly parsed."""
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in entries:
            raise load_error(source, label, f"external data key '{entry.key}' given twice")
        entries[entry.key] = entry.value
    if "location" not in entries:
        raise load_error(source, label, "external data has no location")
    numbers: dict[str, int | None] = {}
    for key in ("offset", "length"):
        text = entries.get(key)
        if text is not None and not (text.isascii() and text.isdigit() and len(text) <= _MAX_NUMBER_DIGITS):
            shown = text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
            reason = f"external data {key} {shown!r} is not a number >= 0 of at most {_MAX_NUMBER_DIGITS} digits"
            raise load_error(source, label, reason)
        numbers[key] = None if text is None else int(text)
    return entries["location"], numbers["offset"] or 0, numbers["length"]


def _location_parts(location: str, source: str, label: str) -> list[str]:
    """Split a location into plain names; anything that could leave the folder is refused, and
    so is what onnxruntime refuses: a location ending in '/' or '/.' (it names a folder)."""
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
    if reason is None and location.split("/")[-1] in ("", "."):
        reason = "ends in '/' or '/.' (onnxruntime refuses it)"
    if reason is not None:
        raise load_error(source, label, f"external data location {location!r} {reason}")
    return parts


_OPEN_FILES_KEPT = 16
"""Descriptors kept open at once; others are reopened (and their identity checked) on use."""

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class ExternalDataReader:
    """Reads external tensor data from files inside one folder (or allowed symlink roots)."""

    def __init__(
        self, folder: str, source: str, budget_bytes: int | None, allow_symlinks_under: Iterable[str | os.PathLike] = ()
    ) -> None:
        self._folder = os.path.realpath(folder)
        self._roots = symlink_roots(folder, allow_symlinks_under)
        self._source = source
        self._budget_bytes = budget_bytes
        self._files: dict[tuple[str, ...], FileIdentity] = {}
        self._open_fds: OrderedDict[tuple[str, ...], int] = OrderedDict()

    def __enter__(self) -> ExternalDataReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for fd in self._open_fds.values():
            os.close(fd)
        self._open_fds.clear()

    def paths(self) -> tuple[pathlib.Path, ...]:
        return tuple(pathlib.Path(identity.path) for identity in self._files.values())

    def check_unchanged(self) -> None:
        """Every file read is still the file it was when first opened; remembered for later."""
        for identity in self._files.values():
            check_identity(
                identity, f"{self._source}: external file {identity.path}", "while the model was being loaded"
            )
            remember_source(identity)

    def read(self, tensor: TensorProto, label: str) -> bytes:
        key, shown, offset_bytes, length_bytes = self.locate(tensor, label)
        identity = self._files[key]
        try:
            fd = self._descriptor(key)
            identity.check(fd, "while the model was being loaded")
            data = read_exactly(fd, length_bytes, offset_bytes)
            identity.check(fd, "while the model was being loaded")
            return data
        except OSError as error:
            raise ModelLoadError(f"{shown}: cannot read: {error}") from error
        except MemoryError:
            raise ModelLoadError(f"{shown}: out of memory reading {length_bytes} bytes") from None
        except ModelLoadError as error:
            raise ModelLoadError(f"{self._source}: {label}: {error}") from None

    def reference(self, tensor: TensorProto, label: str) -> tuple[FileIdentity, int, int]:
        """The same checks as ``read``, but the bytes stay on disk: (verified file, offset, length)."""
        key, _, offset_bytes, length_bytes = self.locate(tensor, label)
        return trust_identity(self._files[key]), offset_bytes, length_bytes

    def locate(self, tensor: TensorProto, label: str) -> tuple[tuple[str, ...], str, int, int]:
        """Check the reference against the file and the tensor: (file key, shown name, offset, length)."""
        location, offset_bytes, length_bytes = _external_entries(tensor, self._source, label)
        parts = _location_parts(location, self._source, label)
        expected_bytes = raw_byte_count(tensor, self._source, label)
        identity = self._identity(parts, location, label)
        size_bytes = identity.size_bytes
        shown = f"{self._source}: {label}: external file {identity.path}"
        if length_bytes is None:
            length_bytes = max(size_bytes - offset_bytes, 0)
        if offset_bytes + length_bytes > size_bytes or offset_bytes > size_bytes:
            raise ModelLoadError(
                f"{shown}: offset {offset_bytes} + length {length_bytes} is beyond its {size_bytes} bytes"
            )
        if length_bytes != expected_bytes:
            raise ModelLoadError(
                f"{shown}: length {length_bytes} bytes does not match "
                f"{describe_tensor(tensor)} ({expected_bytes} bytes)"
            )
        check_fits_in_memory(length_bytes, shown)
        return tuple(parts), shown, offset_bytes, length_bytes

    def _identity(self, parts: list[str], location: str, label: str) -> FileIdentity:
        key = tuple(parts)
        if key not in self._files:
            path = os.path.join(self._folder, *parts)
            real = os.path.realpath(path)
            if not _inside(real, self._folder) and not any(_inside(real, root) for root in self._roots):
                reason = f"external data {location!r} resolves outside {self._folder}"
                raise load_error(self._source, label, reason)
            try:
                fd, identity = self._open_inside_folder(parts)
            except OSError as error:
                reason = f"cannot open external data {path}: {error.strerror or error}"
                raise load_error(self._source, label, reason) from error
            except ValueError as error:
                raise load_error(self._source, label, f"external data {location!r} ({path}) {error}") from None
            self._files[key] = identity
            self._keep_open(key, fd)
            self._charge(identity.size_bytes, identity.path, label)
        return self._files[key]

    def _descriptor(self, key: tuple[str, ...]) -> int:
        """An open descriptor of the file, reopened by its real path if it was closed."""
        if key in self._open_fds:
            self._open_fds.move_to_end(key)
            return self._open_fds[key]
        fd = os.open(self._files[key].path, _READ_FLAGS)
        self._keep_open(key, fd)
        return fd

    def _keep_open(self, key: tuple[str, ...], fd: int) -> None:
        self._open_fds[key] = fd
        while len(self._open_fds) > _OPEN_FILES_KEPT:
            os.close(self._open_fds.popitem(last=False)[1])

    def _open_inside_folder(self, parts: list[str]) -> tuple[int, FileIdentity]:
        """Walk with dir fds and O_NOFOLLOW so no symlink or swapped file can be followed; only
        the file itself may be a symlink, into an allowed root (see ``optimizer.fileio.symlink_roots``)."""
        dir_fd = os.open(self._folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                info = os.stat(part, dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISDIR(info.st_mode):
                    raise ValueError(f"has a parent '{part}' that is {file_kind(info.st_mode)}")
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                next_fd = os.open(part, flags, dir_fd=dir_fd)
                os.close(dir_fd)
                dir_fd = next_fd
            before = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
            path = os.path.join(self._folder, *parts)
            if stat.S_ISLNK(before.st_mode):
                return _open_regular(resolve_allowed_symlink(path, self._roots), None)
            return _open_regular(path, (before, parts[-1], dir_fd))
        finally:
            os.close(dir_fd)

    def _charge(self, size_bytes: int, path: str, label: str) -> None:
        if self._budget_bytes is not None:
            self._budget_bytes -= size_bytes
            if self._budget_bytes < 0:
                reason = f"external data {path} takes the input over max_input_bytes"
                raise load_error(self._source, label, reason)


def _inside(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


def _open_regular(path: str, in_folder: tuple[os.stat_result, str, int] | None) -> tuple[int, FileIdentity]:
    """Open a regular, singly linked file without following a link; (fd, identity)."""
    before = os.stat(path, follow_symlinks=False) if in_folder is None else in_folder[0]
    if not stat.S_ISREG(before.st_mode):
        raise ValueError(f"is {file_kind(before.st_mode)}" + ("" if in_folder else f" ({path})"))
    if before.st_nlink > 1:
        raise ValueError(f"is a hard link ({before.st_nlink} links)")
    fd = os.open(path, _READ_FLAGS) if in_folder is None else os.open(in_folder[1], _READ_FLAGS, dir_fd=in_folder[2])
    if not same_file(before, os.fstat(fd)):
        os.close(fd)
        raise ValueError("changed while it was being opened")
    return fd, FileIdentity.of(fd, os.path.realpath(path))
