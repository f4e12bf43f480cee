""".npz feed files, read safely: regular files only, sizes checked from headers before reading.

``np.load`` would block forever on a FIFO, allocate whatever a 200-byte header declares, inflate
a zip bomb unchecked and return a plain array for a ``.npy`` renamed ``.npz``. Here a file is
stat'ed before it is opened (never a FIFO or device), opened non-blocking and checked again on
the descriptor; every member's declared size (zip header, then the ``.npy`` header's shape x
dtype) is checked against the member's real size, ``MAX_NPZ_FILE_BYTES`` and free memory
before a byte of array data is read. Every error names the file and the key.
"""

from __future__ import annotations

import ast
import math
import os
import stat
import zipfile
from typing import IO

import numpy as np

from optimizer.errors import FeedError
from optimizer.fileio.external_data import MEMORY_COPIES, memory_headroom_bytes, stat_regular_file

__all__ = ["MAX_DEFLATE_RATIO", "MAX_NPZ_FILE_BYTES", "check_regular_file", "read_npz_file"]

MAX_NPZ_FILE_BYTES = 2**31
"""Arrays one .npz file (one sample) may hold at most, uncompressed."""

MAX_DEFLATE_RATIO = 1100
"""deflate cannot compress better than about 1032:1; a header claiming more is lying."""

_NPY_MAGIC = b"\x93NUMPY"
_MAX_NPY_HEADER_BYTES = 2**20


def read_npz_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of one .npz file, in member order."""
    shown = os.fspath(path)
    fd = _open_regular(shown)
    with os.fdopen(fd, "rb") as stream:
        if stream.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
            raise FeedError(f"feeds file {shown!r} is a .npy file, not an .npz archive; save with np.savez")
        stream.seek(0)
        try:
            with zipfile.ZipFile(stream) as archive:
                members = _checked_members(archive, shown)
                return {key: _read_member(archive, member, shown, key) for key, member in members}
        except (
            zipfile.BadZipFile,
            zipfile.LargeZipFile,
            EOFError,
            OSError,
            ValueError,
            NotImplementedError,
            RuntimeError,
        ) as error:
            raise FeedError(f"cannot read feeds file {shown!r}: {error}") from error


def check_regular_file(path: str | os.PathLike) -> os.stat_result:
    """Stat (never open) a feeds file: a FIFO, device or folder is refused by name."""
    shown = os.fspath(path)
    info, problem = stat_regular_file(shown)
    if info is None:
        raise FeedError(f"cannot read feeds file {shown!r}: {problem}")
    return info


def _open_regular(shown: str) -> int:
    before = check_regular_file(shown)
    try:
        fd = os.open(shown, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise FeedError(f"cannot read feeds file {shown!r}: {error.strerror or error}") from error
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(after.st_mode):
        os.close(fd)
        raise FeedError(f"feeds file {shown!r} changed while it was being opened")
    return fd


def _checked_members(archive: zipfile.ZipFile, shown: str) -> list[tuple[str, zipfile.ZipInfo]]:
    """(key, member) pairs after the zip-level checks: names, sizes, ratios, total."""
    members: list[tuple[str, zipfile.ZipInfo]] = []
    total_bytes = 0
    for member in archive.infolist():
        key = member.filename.removesuffix(".npy")
        where = f"feeds file {shown!r}, key {key!r}"
        if not member.filename.endswith(".npy") or member.is_dir():
            raise FeedError(f"{where}: member {member.filename!r} is not a .npy array")
        if any(key == seen for seen, _ in members):
            raise FeedError(f"{where}: key given twice")
        if member.compress_type == zipfile.ZIP_STORED and member.file_size != member.compress_size:
            raise FeedError(
                f"{where}: stored member declares {member.file_size} bytes but holds {member.compress_size}"
            )
        ratio = member.file_size / max(member.compress_size, 1)
        if member.compress_type == zipfile.ZIP_DEFLATED and ratio > MAX_DEFLATE_RATIO:
            raise FeedError(
                f"{where}: declares {member.file_size} bytes from {member.compress_size} "
                f"compressed, more than deflate can produce (a zip bomb?)"
            )
        total_bytes += member.file_size
        _check_budget(total_bytes, where)
        members.append((key, member))
    if not members:
        raise FeedError(f"feeds file {shown!r} holds no arrays")
    return members


def _check_budget(size_bytes: int, where: str) -> None:
    if size_bytes > MAX_NPZ_FILE_BYTES:
        raise FeedError(
            f"{where}: arrays add up to {size_bytes} bytes, over the limit of {MAX_NPZ_FILE_BYTES} per .npz file"
        )
    headroom = memory_headroom_bytes()
    if headroom is not None and MEMORY_COPIES * size_bytes > headroom:
        raise FeedError(
            f"{where}: needs about {MEMORY_COPIES * size_bytes} bytes of memory, more "
            f"than the {headroom} bytes this process can allocate"
        )


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, shown: str, key: str) -> np.ndarray:
    """The .npy header's shape x dtype must account for exactly the member's size."""
    where = f"feeds file {shown!r}, key {key!r}"
    with archive.open(member) as stream:
        try:
            dtype, shape, fortran_order, header_bytes = _npy_header(stream)
        except ValueError as error:
            raise FeedError(f"{where}: not a valid .npy array: {error}") from None
        if dtype.hasobject:
            raise FeedError(f"{where}: holds Python objects (pickles are never loaded)")
        data_bytes = math.prod(shape) * dtype.itemsize
        if header_bytes + data_bytes != member.file_size:
            raise FeedError(
                f"{where}: header declares shape {list(shape)} of {dtype} ({data_bytes} "
                f"bytes) but the member holds {member.file_size - header_bytes}"
            )
        _check_budget(data_bytes, where)
        array = np.empty(shape, dtype, order="F" if fortran_order else "C")
        view = memoryview(array.reshape(-1, order="A").view(np.uint8).data) if data_bytes else memoryview(b"")
        filled = 0
        while filled < data_bytes:
            count = stream.readinto(view[filled:])  # type: ignore[attr-defined]
            if not count:
                raise FeedError(f"{where}: array data ends {data_bytes - filled} bytes early")
            filled += count
    return array


def _npy_header(stream: IO[bytes]) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran order, header length in bytes) of a .npy stream."""
    start = stream.read(len(_NPY_MAGIC) + 2)
    if len(start) < len(_NPY_MAGIC) + 2 or not start.startswith(_NPY_MAGIC):
        raise ValueError("no .npy magic")
    major = start[-2]
    length_bytes = {1: 2, 2: 4, 3: 4}.get(major)
    if length_bytes is None:
        raise ValueError(f"unknown .npy format version {major}")
    header_length = int.from_bytes(stream.read(length_bytes), "little")
    if header_length > _MAX_NPY_HEADER_BYTES:
        raise ValueError(f"header of {header_length} bytes")
    header = stream.read(header_length)
    if len(header) != header_length:
        raise ValueError("header ends early")
    encoding = "utf8" if major == 3 else "latin1"
    dtype, shape, fortran_order = _parse_header(header.decode(encoding))
    return dtype, shape, fortran_order, len(start) + length_bytes + header_length


def _parse_header(text: str) -> tuple[np.dtype, tuple[int, ...], bool]:
    """The header dict, parsed as a literal (never evaluated), as numpy itself does."""
    try:
        header = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as error:
        raise ValueError(f"unreadable header: {error}") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise ValueError("header is not a dict of descr, fortran_order and shape")
    shape, fortran_order = header["shape"], header["fortran_order"]
    if not isinstance(shape, tuple) or not all(isinstance(dim, int) and dim >= 0 for dim in shape):
        raise ValueError(f"shape {shape!r} is not a tuple of sizes >= 0")
    if not isinstance(fortran_order, bool):
        raise ValueError(f"fortran_order {fortran_order!r} is not a bool")  # a bad value in the file
    try:
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"dtype {header['descr']!r}: {error}") from None
    return dtype, shape, fortran_order
