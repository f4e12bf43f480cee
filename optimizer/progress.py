"""The one progress bar: drawn on stderr only when the caller asks for it and stderr is a terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(*, total: int | None, desc: str, unit: str, enabled: bool) -> tqdm:
    """A tqdm bar; disabled (every update a no-op) when not ``enabled`` or stderr is a pipe or file."""
    on_terminal = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and on_terminal))
