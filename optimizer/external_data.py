"""Reading external tensor data from files inside the model's folder, and nowhere else.

A location may not leave the folder (no absolute path, '..' or symlink), each file is opened
once without following links, and its size counts against ``max_input_bytes``. The plain
file helpers here (kind, identity, chunked pread) serve model-file reading as well.
"""

from __future__ import annotations

import os
import pathlib
import resource
import stat

from onnx import TensorProto

from optimizer.errors import ModelLoadError
from optimizer.lazy_io import FileIdentity, trust_file
from optimizer.tensor_checks import describe_tensor, load_error, raw_byte_count

__all__ = [
    "MEMORY_COPIES", "READ_CHUNK_BYTES", "ExternalDataReader", "check_fits_in_memory", "file_kind",
    "memory_headroom_bytes", "read_exactly", "same_file",
]  # fmt: skip

READ_CHUNK_BYTES = 2**30

MEMORY_COPIES = 2
"""Bytes read are held about twice at the peak (the read buffer, then protobuf's own copy)."""

_FILE_KINDS = {
    stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symlink",
}  # fmt: skip


def file_kind(mode: int) -> str:
    return _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


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


def check_fits_in_memory(size_bytes: int, shown: str) -> None:
    """Refuse before allocating: a hostile size must be a clear error, not a MemoryError."""
    headroom = memory_headroom_bytes()
    if headroom is not None and MEMORY_COPIES * size_bytes > headroom:
        raise ModelLoadError(f"{shown}: needs about {MEMORY_COPIES * size_bytes} bytes of memory, "
                             f"more than the {headroom} bytes this process can allocate")


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
        if text is not None and not (text.isascii() and text.isdigit()):
            raise load_error(source, label, f"external data {key} {text!r} is not a number >= 0")
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
        raise load_error(source, label, f"external data location {location!r} {reason}")
    return parts


class ExternalDataReader:
    """Reads external tensor data from files inside one folder, opening each file once."""

    def __init__(self, folder: str, source: str, budget_bytes: int | None) -> None:
        self._folder = os.path.realpath(folder)
        self._source = source
        self._budget_bytes = budget_bytes
        self._open_files: dict[tuple[str, ...], tuple[int, int, str]] = {}

    def __enter__(self) -> ExternalDataReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for fd, _, _ in self._open_files.values():
            os.close(fd)
        self._open_files.clear()

    def paths(self) -> tuple[pathlib.Path, ...]:
        return tuple(pathlib.Path(path) for _, _, path in self._open_files.values())

    def read(self, tensor: TensorProto, label: str) -> bytes:
        fd, shown, offset_bytes, length_bytes = self.locate(tensor, label)
        try:
            return read_exactly(fd, length_bytes, offset_bytes)
        except OSError as error:
            raise ModelLoadError(f"{shown}: cannot read: {error}") from error
        except MemoryError:
            raise ModelLoadError(f"{shown}: out of memory reading {length_bytes} bytes") from None

    def reference(self, tensor: TensorProto, label: str) -> tuple[FileIdentity, int, int]:
        """The same checks as ``read``, but the bytes stay on disk: (verified file, offset, length)."""
        fd, _, offset_bytes, length_bytes = self.locate(tensor, label)
        path = next(path for open_fd, _, path in self._open_files.values() if open_fd == fd)
        return trust_file(fd, path), offset_bytes, length_bytes

    def locate(self, tensor: TensorProto, label: str) -> tuple[int, str, int, int]:
        """Check the reference against the file and the tensor: (fd, shown name, offset, length)."""
        location, offset_bytes, length_bytes = _external_entries(tensor, self._source, label)
        parts = _location_parts(location, self._source, label)
        expected_bytes = raw_byte_count(tensor, self._source, label)
        fd, size_bytes, path = self._open(parts, location, label)
        shown = f"{self._source}: {label}: external file {path}"
        if length_bytes is None:
            length_bytes = max(size_bytes - offset_bytes, 0)
        if offset_bytes + length_bytes > size_bytes or offset_bytes > size_bytes:
            raise ModelLoadError(f"{shown}: offset {offset_bytes} + length {length_bytes} is "
                                 f"beyond its {size_bytes} bytes")  # fmt: skip
        if length_bytes != expected_bytes:
            raise ModelLoadError(f"{shown}: length {length_bytes} bytes does not match "
                                 f"{describe_tensor(tensor)} ({expected_bytes} bytes)")  # fmt: skip
        check_fits_in_memory(length_bytes, shown)
        return fd, shown, offset_bytes, length_bytes

    def _open(self, parts: list[str], location: str, label: str) -> tuple[int, int, str]:
        key = tuple(parts)
        if key not in self._open_files:
            path = os.path.join(self._folder, *parts)
            real = os.path.realpath(path)
            if os.path.commonpath([real, self._folder]) != self._folder or real == self._folder:
                reason = f"external data {location!r} resolves outside {self._folder}"
                raise load_error(self._source, label, reason)
            try:
                fd, size_bytes = self._open_inside_folder(parts)
            except OSError as error:
                reason = f"cannot open external data {path}: {error.strerror}"
                raise load_error(self._source, label, reason) from error
            except ValueError as error:
                raise load_error(self._source, label, f"external data {path} {error}") from None
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
                    raise ValueError(f"has a parent '{part}' that is {file_kind(info.st_mode)}")
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                next_fd = os.open(part, flags, dir_fd=dir_fd)
                os.close(dir_fd)
                dir_fd = next_fd
            before = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(before.st_mode):
                raise ValueError(f"is {file_kind(before.st_mode)}")
            if before.st_nlink > 1:
                raise ValueError(f"is a hard link ({before.st_nlink} links)")
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(parts[-1], flags, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        after = os.fstat(fd)
        if not same_file(before, after):
            os.close(fd)
            raise ValueError("changed while it was being opened")
        return fd, after.st_size

    def _charge(self, size_bytes: int, path: str, label: str) -> None:
        if self._budget_bytes is not None:
            self._budget_bytes -= size_bytes
            if self._budget_bytes < 0:
                reason = f"external data {path} takes the input over max_input_bytes"
                raise load_error(self._source, label, reason)
