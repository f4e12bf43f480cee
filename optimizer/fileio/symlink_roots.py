"""Where a symlinked external-data file may point: folders the user names, and the ``blobs``
folder of a Hugging Face cache.

The Hugging Face hub stores ``models--ORG--NAME/snapshots/REV/FILE`` as a symlink to
``../../blobs/HASH``, so a model downloaded there could not be read under a no-symlinks rule.
A symlink is followed hop by hop, and every hop must land inside one of the allowed roots; a
symlink to anywhere else (``/etc/passwd``, a sibling folder, a chain that leaves the root and
comes back) stays refused.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from optimizer.errors import ModelLoadError

__all__ = ["MAX_SYMLINK_HOPS", "hugging_face_blobs", "resolve_allowed_symlink", "symlink_roots"]

MAX_SYMLINK_HOPS = 40
"""Like the kernel's own limit on a chain of symlinks."""

_HUB_PREFIXES = ("models--", "datasets--", "spaces--")


def hugging_face_blobs(folder: str) -> str | None:
    """``.../models--ORG--NAME/blobs`` when ``folder`` lies in that repo's ``snapshots/REV``."""
    parts = os.path.abspath(folder).split(os.sep)
    for index in range(len(parts) - 2, 0, -1):
        if parts[index] == "snapshots" and parts[index - 1].startswith(_HUB_PREFIXES):
            return os.sep.join([*parts[:index], "blobs"])
    return None


def symlink_roots(folder: str, allowed: Iterable[str | os.PathLike]) -> tuple[str, ...]:
    """Real paths of the folders symlinks from ``folder`` may point into.

    A folder the user named must exist (a typo would otherwise refuse the symlink with a reason
    that hides it); a detected Hugging Face ``blobs`` folder is used only when it exists.
    """
    candidates = [os.fspath(root) for root in allowed]
    for root in candidates:
        if not os.path.isdir(root):
            raise ModelLoadError(f"--allow-symlinks-under {root!r}: no such folder")
    for seen in (folder, os.path.realpath(folder)):
        blobs = hugging_face_blobs(seen)
        if blobs is not None:
            candidates.append(blobs)
    roots = []
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if os.path.isdir(real) and real not in roots:
            roots.append(real)
    return tuple(roots)


def _inside(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root


def resolve_allowed_symlink(path: str, roots: tuple[str, ...]) -> str:
    """The real path ``path`` (a symlink) leads to; ValueError unless every hop stays in a root."""
    if not roots:
        raise ValueError(
            "is a symlink (allowed only into --allow-symlinks-under DIR or a Hugging Face cache's blobs folder)"
        )
    current = path
    for _ in range(MAX_SYMLINK_HOPS):
        target = os.readlink(current)
        joined = os.path.join(os.path.dirname(current), target)
        name = os.path.basename(joined)
        if name in ("", ".", ".."):
            raise ValueError(f"is a symlink to {target!r}, which names no file")
        current = os.path.join(os.path.realpath(os.path.dirname(joined)), name)
        if not any(_inside(current, root) for root in roots):
            raise ValueError(f"is a symlink to {current}, outside the allowed folders {', '.join(roots)}")
        if not stat.S_ISLNK(os.lstat(current).st_mode):
            return current
    raise ValueError(f"is a chain of more than {MAX_SYMLINK_HOPS} symlinks")
