"""What the tool writes next to an output, and how it is replaced without losing anything.

Ownership. Every temporary file (``.NAME.tmp-PID-START-RANDOM``) and staging folder
(``.onnx-compress-PID-START-RANDOM``) carries its writer's process id and start time (field 22
of ``/proc/PID/stat``). A later run removes one only when its owner is provably dead: no
process has that id, or the process with that id started at another time (the id was reused).
Temporaries of older versions carry no start time and are left alone.

External data. Big tensors go to ``NAME.HASH.data`` (``HASH``: the first 16 hex digits of the
SHA-256 of its bytes), and the model records that name. The data file is in place before the
model is ``os.replace``d, so replacing the model is the single commit point: readers see the
old model with its old data or the new model with its new data, never a mix. Identical
outputs get identical names and bytes. The tool treats a data file as its own only when the
model it replaces at ``NAME`` records it and its name has that exact pattern; such a file is
removed once the new model is in place (unless it is an input). Any other file (``NAME.data``
included) is never replaced or removed. Writers to one folder take an exclusive ``flock`` on
the folder while they commit, so concurrent runs cannot remove each other's data file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from optimizer.errors import ModelSaveError
from optimizer.fileio.lazy_io import process_alive
from optimizer.text import escape_control

NAME_MAX_BYTES = 255
"""File names are limited to 255 bytes on Linux file systems."""

TEMP_STEM_MAX_BYTES = 100
DIGEST_HEX_CHARS = 16
STAGING_PREFIX = ".onnx-compress-"
PREVIOUS_MODEL_MAX_BYTES = 256 * 2**20
"""A model with external data is small; a larger file at the output is not read for names."""

_TEMP_PATTERN = re.compile(r"\..*\.tmp-(\d+)-(\d+)-[a-z0-9_]{8}", re.DOTALL)
_STAGING_PATTERN = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)-(\d+)-[a-z0-9_]{8}")
_DATA_SUFFIX_CHARS = 1 + DIGEST_HEX_CHARS + len(".data")
_HASH_CHUNK_BYTES = 16 * 2**20
_log = logging.getLogger("onnx_compress")


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read()
    except OSError:
        return None
    fields = text[text.rfind(b")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def owner_tag() -> str:
    """PID-START of this process, as written into the names of what it leaves while it runs."""
    pid = os.getpid()
    return f"{pid}-{process_start_ticks(pid) or 0}"


def owner_dead(pid: int, start_ticks: int) -> bool:
    """True only when the owner is provably gone: no such process, or the id was reused."""
    if not process_alive(pid):
        return True
    now = process_start_ticks(pid)
    return start_ticks != 0 and now is not None and now != start_ticks


def _cut(name: str, max_bytes: int) -> str:
    """``name`` cut to at most ``max_bytes`` bytes (a cut character stays as its raw bytes)."""
    return os.fsdecode(os.fsencode(name)[:max_bytes])


def temp_file(folder: Path, final_name: str) -> tuple[int, str]:
    """A new temporary file for ``final_name`` in ``folder``; its name fits in 255 bytes.

    mkstemp creates it 0600; it gets the mode ``open()`` would give (0666 less the umask), so every
    file renamed into place (models, data files, reports) has the permissions the user expects."""
    prefix = f".{_cut(final_name, TEMP_STEM_MAX_BYTES)}.tmp-{owner_tag()}-"
    descriptor, path = tempfile.mkstemp(dir=folder, prefix=prefix)
    try:
        os.fchmod(descriptor, new_file_mode())
    except OSError:
        os.close(descriptor)
        os.unlink(path)
        raise
    return descriptor, path


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def staging_prefix() -> str:
    return f"{STAGING_PREFIX}{owner_tag()}-"


def remove_dead_temps(folder: Path) -> None:
    """Remove temporary files in ``folder`` whose writer is provably dead."""
    for path in _dead_entries(folder, _TEMP_PATTERN, stat.S_ISREG):
        with contextlib.suppress(OSError):
            os.unlink(path)


def remove_dead_staging(folder: Path) -> list[Path]:
    """Staging folders whose owner is provably dead; returned for the caller to remove."""
    return _dead_entries(folder, _STAGING_PATTERN, stat.S_ISDIR)


def _dead_entries(folder: Path, pattern: re.Pattern[str], is_kind: Callable[[int], bool]) -> list[Path]:
    """Entries named by ``pattern`` (pid and start time of their writer), of the kind asked for
    (never following a link), whose writer is no longer running."""
    dead = []
    for entry in sorted(os.listdir(folder)):
        match = pattern.fullmatch(entry)
        if match is None or not owner_dead(int(match.group(1)), int(match.group(2))):
            continue
        with contextlib.suppress(OSError):
            if is_kind(os.lstat(folder / entry).st_mode):
                dead.append(folder / entry)
    return dead


def data_file_name(model_name: str, digest_hex: str) -> str:
    """``NAME.HASH.data``, with NAME cut so the whole name fits in 255 bytes."""
    return f"{_cut(model_name, NAME_MAX_BYTES - _DATA_SUFFIX_CHARS)}.{digest_hex[:DIGEST_HEX_CHARS]}.data"


def is_our_data_name(model_name: str, location: str) -> bool:
    stem = re.escape(_cut(model_name, NAME_MAX_BYTES - _DATA_SUFFIX_CHARS))
    return re.fullmatch(stem + rf"\.[0-9a-f]{{{DIGEST_HEX_CHARS}}}\.data", location) is not None


def file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def data_locations(model: onnx.ModelProto) -> list[str]:
    """Every external-data location a model records, sorted."""
    from optimizer.fileio.tensor_checks import iter_tensors

    found: set[str] = set()
    for tensor, _ in iter_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            found.update(item.value for item in tensor.external_data if item.key == "location")
    return sorted(found)


def previous_data_files(target: Path) -> list[str]:
    """Data files the model now at ``target`` records, when they have our pattern."""
    try:
        info = os.lstat(target)
        if not stat.S_ISREG(info.st_mode) or info.st_size > PREVIOUS_MODEL_MAX_BYTES:
            return []
        model = onnx.load_model(str(target), load_external_data=False)
    except (OSError, DecodeError, ValueError, RuntimeError, RecursionError):
        return []  # not a model we can read: then it records no data file of ours
    return [name for name in data_locations(model) if is_our_data_name(target.name, name)]


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself, held while a writer commits there."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def is_same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Same file by spelling, symlinks or hard links (the output's alias rules)."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def check_apart(writes: Iterable[str | os.PathLike], reads: Iterable[str | os.PathLike], what: str) -> None:
    """Refuse (before any work) a file to write that is one of ``reads`` (described by ``what``)."""
    read_list = list(reads)
    for written in writes:
        for read in read_list:
            if is_same_file(written, read):
                raise ModelSaveError(f"{os.fspath(written)}: refusing to overwrite '{os.fspath(read)}', {what}")


def folder_files(source: object) -> list[Path]:
    """A data folder and the files in it: a run reads them, so it must never write them."""
    if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(source):
        return []
    return [Path(source), *(Path(source) / name for name in sorted(os.listdir(source)))]


def commit(
    target: Path,
    model_source: str | os.PathLike,
    data_source: str | os.PathLike | None,
    data_name: str | None,
    protected: Iterable[str | os.PathLike],
) -> None:
    """Move the data file (if any) in, then replace the model: one commit point, under the lock."""
    folder = target.parent
    kept = list(protected)
    with folder_lock(folder):
        previous = previous_data_files(target)
        placed = None
        if data_source is not None and data_name is not None:
            placed = folder / data_name
            existed = os.path.lexists(placed)
            os.replace(data_source, placed)
        try:
            os.replace(model_source, target)
        except OSError:
            if placed is not None and not existed:
                with contextlib.suppress(OSError):
                    os.unlink(placed)
            raise
        fsync_folder(folder)
        for name in previous:
            old = folder / name
            if name != data_name and not any(is_same_file(old, path) for path in kept):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(old)
        fsync_folder(folder)


def fsync_folder(folder: Path) -> None:
    """Make the renames durable; best effort, as some file systems cannot fsync a folder."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def warn(message: str) -> None:
    _log.warning("warning: %s", escape_control(message))
