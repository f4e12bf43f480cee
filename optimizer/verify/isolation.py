"""Run onnxruntime in a child process, so that a crash, a hang or a runaway allocation inside
onnxruntime becomes a ``RuntimeSessionError`` with a clear message instead of killing or freezing
the tool (and a half-written report with it).

The child is started with multiprocessing's 'spawn' context: it shares no threads or onnxruntime
state with the parent, and works the same on Linux, macOS and Windows. Its stdout and stderr go
to a temporary file whose last line is quoted when it dies, since that is where onnxruntime
writes before aborting. The child dies with its parent (``die_with_parent``), so killing the tool
mid-validation leaves no onnxruntime process behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from optimizer.calibration.feeds import Feed
from optimizer.errors import OnnxCompressError, RuntimeSessionError
from optimizer.verify.runtime import DEFAULT_TIMEOUT_S, ModelSource, model_label
from optimizer.verify.validate import Comparison, compare

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "NOT_VALIDATED",
    "compare_isolated",
    "die_with_parent",
    "run_comparison",
    "run_isolated",
]

NOT_VALIDATED = "not validated"
"""Every isolation failure says so, so that a user never mistakes it for a passing check."""

_STOP_GRACE_S = 5.0
_OUTPUT_TAIL_BYTES = 4096
_PR_SET_PDEATHSIG = 1
EXIT_PARENT_GONE = 75
"""Exit code of a child that ended because its parent went away."""


@contextlib.contextmanager
def spawn_without_main_script() -> Iterator[None]:
    """Children started inside do not re-run the parent's ``__main__`` script.

    A 'spawn' child imports the parent's main module to unpickle what it was sent; for a plain
    script without a ``__name__ == "__main__"`` guard (a notebook export, a README example) that
    re-runs the whole script, and the child dies before it starts. Everything a child here runs
    lives in importable modules, so the script is hidden while it starts (``python -m`` mains,
    which have a ``__spec__``, are imported by name and are left as they are).
    """
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if main is None or script is None or getattr(main, "__spec__", None) is not None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = script


def compare_isolated(
    reference_path: ModelSource,
    candidate_path: ModelSource,
    feeds: Iterable[Feed],
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    max_memory_bytes: int | None = None,
    **settings: Any,
) -> Comparison:
    """``optimizer.verify.validate.compare`` in a child process; same arguments (``settings``:
    tolerance, provider, output_kinds), same result.

    A crash, a timeout or ``max_memory_bytes`` (RLIMIT_AS of the child) exceeded raise
    ``RuntimeSessionError``, and so does onnxruntime refusing a model, with "not validated"
    added; other errors of ``compare`` (bad feeds, bad tolerance) are raised unchanged. Pass
    paths: a ModelProto is copied to the child.
    """
    label = f"comparing {model_label(candidate_path)} with {model_label(reference_path)}"
    try:
        return run_isolated(
            _compare_in_child,
            reference_path,
            candidate_path,
            list(feeds),
            {**settings, "timeout_s": timeout_s},
            timeout_s=timeout_s,
            label=label,
            max_memory_bytes=max_memory_bytes,
        )
    except RuntimeSessionError as error:
        if str(error).endswith(NOT_VALIDATED):
            raise
        raise type(error)(f"{error}; {NOT_VALIDATED}") from error


def run_comparison(
    reference: ModelSource,
    candidate: ModelSource,
    feeds: Iterable[Feed],
    *,
    isolate: bool,
    max_memory_bytes: int | None = None,
    **settings: Any,
) -> Comparison:
    """``compare`` in a child process (``isolate``, see ``compare_isolated``) or in this one;
    ``settings`` are compare's keyword arguments (tolerance, provider, timeout_s, output_kinds)."""
    if isolate:
        return compare_isolated(reference, candidate, feeds, max_memory_bytes=max_memory_bytes, **settings)
    return compare(reference, candidate, feeds, **settings)


def _compare_in_child(
    reference_path: ModelSource, candidate_path: ModelSource, feeds: list[Feed], settings: dict[str, Any]
) -> Comparison:
    """``compare`` with its own per-run limit, so that ``timeout_s=None`` means no limit at all."""
    return compare(reference_path, candidate_path, feeds, **settings)


def run_isolated(
    function: Callable[..., Any],
    *args: Any,
    timeout_s: float | None,
    label: str,
    max_memory_bytes: int | None = None,
    **kwargs: Any,
) -> Any:
    """``function(*args, **kwargs)`` in a spawned child; its result or its error, re-raised.

    ``function`` and its arguments must be picklable (a module-level function). The child's
    ``OnnxCompressError`` is raised as is; a death by signal, a non-zero exit without a result,
    a timeout or a MemoryError become ``RuntimeSessionError``; any other exception in the child
    is a bug and becomes ``RuntimeError`` (exit code 3 in the CLI).
    """
    if timeout_s is not None and not timeout_s > 0:
        raise RuntimeSessionError(f"timeout must be > 0 seconds or None, got {timeout_s!r}")
    if timeout_s is not None and math.isinf(timeout_s):
        timeout_s = None
    context = multiprocessing.get_context("spawn")
    with tempfile.NamedTemporaryFile(prefix="onnx-compress-child-", suffix=".log") as log:
        receiver, sender = context.Pipe(duplex=False)
        lifeline, lifeline_end = context.Pipe(duplex=False)
        child = context.Process(
            target=_child_main,
            name="onnx-compress-isolated",
            daemon=True,
            args=(sender, (lifeline, os.getpid()), log.name, max_memory_bytes, function, args, kwargs),
        )
        try:
            with spawn_without_main_script():
                child.start()
            sender.close()
            lifeline.close()
            outcome = _wait(receiver, child, timeout_s, label, log.name)
        finally:
            _stop(child)
            receiver.close()
            lifeline_end.close()
    return _unpack(outcome, label)


def die_with_parent(lifeline, parent_pid: int) -> None:
    """Called first in a child process: end it as soon as its parent ends, however the parent died.

    ``lifeline`` is the read end of a pipe whose write end only the parent holds. On Linux the
    kernel sends SIGKILL when the parent exits (PR_SET_PDEATHSIG; checked against ``parent_pid``
    afterwards, in case the parent died first); everywhere, a daemon thread ends the process when
    the pipe reaches end of file, which it does when the parent's end is closed or the parent dies.
    """
    _set_parent_death_signal()
    if os.getppid() != parent_pid:
        os._exit(EXIT_PARENT_GONE)
    threading.Thread(target=_exit_at_end_of_file, args=(lifeline,), name="onnx-compress-lifeline", daemon=True).start()


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the lifeline thread still ends the child
        pass


def _exit_at_end_of_file(lifeline) -> None:
    try:
        while True:
            lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    os._exit(EXIT_PARENT_GONE)


def _wait(receiver, child, timeout_s: float | None, label: str, log_path: str) -> tuple:
    """The child's message, or an error saying how it died; a closed pipe means it died."""
    if not receiver.poll(timeout_s):
        _stop(child)
        raise RuntimeSessionError(
            f"onnxruntime did not finish {label} within {timeout_s:g} s and was stopped"
            f"{_quote_tail(log_path)}; {NOT_VALIDATED}"
        )
    try:
        return receiver.recv()
    except (EOFError, OSError):
        child.join(_STOP_GRACE_S)
    raise RuntimeSessionError(
        f"onnxruntime {_describe_exit(child.exitcode)} while {label}{_quote_tail(log_path)}; {NOT_VALIDATED}"
    )


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"crashed ({name})"
    return f"exited with code {exitcode} without a result"


def _quote_tail(log_path: str) -> str:
    """The child's last output line, quoted: onnxruntime's own words before it died."""
    try:
        with open(log_path, "rb") as log:
            log.seek(max(os.fstat(log.fileno()).st_size - _OUTPUT_TAIL_BYTES, 0))
            lines = [line.strip() for line in log.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    return f" (last output: {' '.join(lines[-1].split())!r})" if lines else ""


def _unpack(outcome: tuple, label: str) -> Any:
    kind, payload = outcome
    if kind == "ok":
        return payload
    if kind == "error":
        raise payload
    name, message = payload
    if name == "MemoryError":
        raise RuntimeSessionError(f"out of memory while {label}; {NOT_VALIDATED}")
    raise RuntimeError(f"child process {label} raised {name}: {message}")


def _stop(child) -> None:
    if child.is_alive():
        child.terminate()
        child.join(_STOP_GRACE_S)
    if child.is_alive():
        child.kill()
    if child.pid is not None:
        child.join()


def _child_main(sender, parent: tuple, log_path: str, max_memory_bytes: int | None, function, args, kwargs) -> None:
    """Runs in the child: tie its life to the parent's, route output to the log, cap memory, run,
    send one message back."""
    die_with_parent(*parent)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    if max_memory_bytes is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (max_memory_bytes, max_memory_bytes))
    try:
        outcome: tuple = ("ok", function(*args, **kwargs))
    except OnnxCompressError as error:
        outcome = ("error", error)
    except BaseException as error:  # reported to the parent, which decides what it means
        outcome = ("failed", (type(error).__name__, " ".join(str(error).split())))
    try:
        sender.send(outcome)
    except Exception as error:  # e.g. an unpicklable result
        sender.send(("failed", (type(error).__name__, f"result could not be sent back: {error}")))
    sender.close()
