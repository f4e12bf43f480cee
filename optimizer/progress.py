"""The one progress bar: drawn on stderr when the caller asks for it and stderr is a terminal; in
a log (stderr a pipe or a file) it writes one line per stage when the stage ends instead, since a
bar's carriage returns would fill the log."""

from __future__ import annotations

import sys
import time
from types import TracebackType

from tqdm import tqdm

__all__ = ["StageLine", "progress_bar"]


class StageLine:
    """Counts like a tqdm bar and writes ``desc: N unit(s) in S s`` to stderr once, at the end."""

    def __init__(self, desc: str, unit: str) -> None:
        self.desc, self.unit, self.n = desc, unit, 0
        self._started, self._closed = time.perf_counter(), False

    def update(self, amount: int = 1) -> None:
        self.n += amount

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        elapsed = time.perf_counter() - self._started
        print(f"{self.desc}: {self.n} {self.unit}(s) in {elapsed:.1f} s", file=sys.stderr, flush=True)

    def __enter__(self) -> StageLine:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if error is None:  # a failed stage ends in its one-line error only
            self.close()
        self._closed = True


def progress_bar(*, total: int | None, desc: str, unit: str, enabled: bool) -> tqdm | StageLine:
    """A tqdm bar on a terminal; a ``StageLine`` when stderr is a pipe or file; disabled (every
    update a no-op) when not ``enabled``."""
    on_terminal = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    if enabled and not on_terminal:
        return StageLine(desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)
