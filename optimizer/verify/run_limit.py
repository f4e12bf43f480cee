"""The time limit on onnxruntime runs: one watchdog thread that stops runs past their deadline.

onnxruntime checks ``RunOptions.terminate`` between node executions, Loop and Scan iterations
included, and ends the run with an error when it is set. So a single daemon thread that sets the
flag of every run past its deadline bounds all in-process runs (calibration, GPTQ, benchmark,
sensitivity, per-layer debug, validation without isolation), at the cost of a lock per run and
without copying the model to a child process. One kernel that is itself very long (a huge MatMul)
still runs to its end before the flag is seen; ``optimizer.verify.isolation`` remains the tool for that,
and for crashes.

This module imports neither onnx nor onnxruntime, so ``pass_base`` can name the default.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from typing import Protocol

from optimizer.errors import OptionError, RuntimeSessionError

DEFAULT_TIMEOUT_S = 600.0
"""Ten minutes per onnxruntime run (validation: the whole comparison); generous for a large model
on CPU, short of forever. The CLI's ``--timeout``."""


class RunTimeoutError(RuntimeSessionError):
    """An onnxruntime run went past its stage's time limit and was stopped (exit code 2)."""

    def naming(self, model: object | None) -> RunTimeoutError:
        """The same error with ``model`` (the user's file) named first, unless it already is."""
        text = str(self)
        if model is None or text.startswith(f"{model}: "):
            return self
        return RunTimeoutError(f"{model}: {text}")


def timeout_error(stage: str, timeout_s: float, label: str) -> RunTimeoutError:
    return RunTimeoutError(
        f"{stage} did not finish within {timeout_s:g} s (onnxruntime run of {label} timed out; raise --timeout)"
    )


def checked_timeout(timeout_s: float | None) -> float | None:
    """``timeout_s`` as the watchdog takes it: a positive number of seconds, or None (no limit).

    Infinity means no limit; zero, negative numbers, NaN and non-numbers are refused.
    """
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise OptionError(f"timeout must be a number of seconds > 0 or None, got {timeout_s!r}")
    return None if math.isinf(timeout_s) else float(timeout_s)


class Terminable(Protocol):
    terminate: bool


class _Watchdog:
    """Deadlines of the runs in flight; a daemon thread sets ``terminate`` on each one that passes.

    The thread sleeps until the earliest deadline, so an idle tool costs nothing; it is started on
    first use in each process (a forked child starts its own).
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._deadlines: dict[int, tuple[float, Terminable]] = {}
        self._tokens = itertools.count()
        self._wake_at = math.inf
        self._pid: int | None = None

    def arm(self, options: Terminable, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        with self._condition:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._watch, name="onnx-compress-run-watchdog", daemon=True).start()
            token = next(self._tokens)
            self._deadlines[token] = (deadline, options)
            if deadline < self._wake_at:
                self._condition.notify()
        return token

    def disarm(self, token: int) -> None:
        with self._condition:
            self._deadlines.pop(token, None)

    def _watch(self) -> None:
        with self._condition:
            while True:
                now = time.monotonic()
                for token, (deadline, options) in list(self._deadlines.items()):
                    if deadline <= now:
                        options.terminate = True
                        del self._deadlines[token]
                self._wake_at = min((deadline for deadline, _ in self._deadlines.values()), default=math.inf)
                self._condition.wait(None if math.isinf(self._wake_at) else self._wake_at - now)

    def _after_fork(self) -> None:
        """A forked child has no watchdog thread and may have inherited a held lock: start afresh."""
        self.__init__()  # type: ignore[misc]


_WATCHDOG = _Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WATCHDOG._after_fork)


def arm(options: Terminable, timeout_s: float | None) -> int | None:
    """Set ``options.terminate`` once ``timeout_s`` (checked) has passed; None: no limit."""
    limit = checked_timeout(timeout_s)
    return None if limit is None else _WATCHDOG.arm(options, limit)


def disarm(token: int | None) -> None:
    """Cancel an ``arm`` whose run has ended (harmless after the deadline passed)."""
    if token is not None:
        _WATCHDOG.disarm(token)
