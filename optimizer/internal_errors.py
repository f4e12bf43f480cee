"""Errors that say where they happened: the stage, the pass when one ran, and the node or tensor.

A bug is never turned into a different exception: the stage, pass and target are attached to the
original exception (attributes plus a note that ``--debug`` tracebacks show), so the traceback is
intact. Everything is named explicitly, nothing is guessed from the traceback: ``stage("validate")``
around each of optimize()'s stages, ``internal_stage`` around each pass (naming it), ``working_on``
around a pass's work on one node or tensor, and the CLI command as the default for everything else.

A failing pass is reported as ``pass 'NAME' failed on node X: ...``: exit 3 for a bug (``--debug``
shows the traceback), exit 2 for a ``PassError`` (a graph the pass cannot handle is bad input).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from optimizer.errors import OnnxCompressError, PassError
from optimizer.text import printable

_STAGE = "onnx_compress_stage"
_PASS = "onnx_compress_pass"
_TARGET = "onnx_compress_target"


def mark_internal(error: BaseException, stage: str, pass_name: str | None = None) -> None:
    """Attach ``stage`` (and ``pass_name``) to ``error`` unless an inner stage already did."""
    if getattr(error, _STAGE, None) is not None:
        return
    setattr(error, _STAGE, stage)
    setattr(error, _PASS, pass_name)
    error.add_note(f"onnx-compress stage: {stage}" + (f", pass: {pass_name}" if pass_name else ""))


@contextmanager
def internal_stage(stage: str, pass_name: str | None = None) -> Iterator[None]:
    """Name the stage and pass on any unexpected exception raised inside; bad input keeps its class
    and exit code 2, and only a PassError learns the pass it came from."""
    try:
        yield
    except PassError as error:
        if pass_name is not None and getattr(error, _PASS, None) is None:
            setattr(error, _PASS, pass_name)
        raise
    except OnnxCompressError:
        raise
    except Exception as error:
        mark_internal(error, stage, pass_name)
        raise


def stage(name: str) -> AbstractContextManager[None]:
    """Name the stage on any unexpected exception raised inside; an inner name (a pass's) wins."""
    return internal_stage(name)


@contextmanager
def working_on(kind: str, name: str) -> Iterator[None]:
    """Name the node or tensor (``kind`` "node" or "tensor") a pass was working on when it failed."""
    try:
        yield
    except Exception as error:
        if getattr(error, _TARGET, None) is None:
            setattr(error, _TARGET, f"{kind} {name}")
        raise


def error_stage(error: BaseException, default: str | None = None) -> tuple[str | None, str | None]:
    """(stage, pass) of an internal error: the names attached by ``stage``, else ``default``."""
    return getattr(error, _STAGE, None) or default, getattr(error, _PASS, None)


def _pass_failed(pass_name: str, error: BaseException) -> str:
    target = getattr(error, _TARGET, None)
    return f"pass '{printable(pass_name)}' failed" + (f" on {printable(target)}" if target else "")


def bad_input_message(error: OnnxCompressError) -> str:
    """The message of an exit-2 error; a PassError starts with ``pass 'NAME' failed on node X``."""
    text = " ".join(str(error).split())
    pass_name = getattr(error, _PASS, None)
    if not isinstance(error, PassError) or pass_name is None:
        return printable(text)
    if text.startswith(f"pass '{pass_name}'") and getattr(error, _TARGET, None) is None:
        return printable(text)
    return f"{_pass_failed(pass_name, error)}: {printable(text)}"


def internal_error_message(error: BaseException, default_stage: str | None = None) -> str:
    """One line: ``pass 'p' failed on node n: Type: message (internal error, stage: s; run with
    --debug ...)``, or ``internal error (stage: s): Type: message (...)`` outside a pass."""
    stage_name, pass_name = error_stage(error, default_stage)
    text = f"{type(error).__name__}: {printable(' '.join(str(error).split()))}"
    if pass_name:
        return (
            f"{_pass_failed(pass_name, error)}: {text} (internal error, stage: {stage_name}; "
            "run with --debug for the traceback)"
        )
    where = f" (stage: {stage_name})" if stage_name else ""
    return f"internal error{where}: {text} (run with --debug for the traceback)"
