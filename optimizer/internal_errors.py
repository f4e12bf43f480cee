"""Internal errors (exit 3) that say where they happened: the stage, and the pass when one ran.

A bug is never turned into a different exception: the stage and pass are attached to the original
exception (attributes plus a note that ``--debug`` tracebacks show), so the traceback is intact.
Stages are named explicitly where it is cheap (``internal_stage`` around each pass) and otherwise
read from the traceback: the innermost frame that is one of the stage functions below.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from optimizer.errors import OnnxCompressError
from optimizer.text import printable

_STAGE = "onnx_compress_stage"
_PASS = "onnx_compress_pass"

STAGE_FUNCTIONS: dict[tuple[str, str], str] = {
    ("optimizer.api", "_load"): "load",
    ("optimizer.fileio.model", "load_model"): "load",
    ("optimizer.fileio.model", "load_model_with_files"): "load",
    ("optimizer.api", "_check_writes"): "check outputs",
    ("optimizer.api", "build_passes"): "plan",
    ("optimizer.api", "plan_passes"): "plan",
    ("optimizer.api", "resolve_feeds"): "feeds",
    ("optimizer.api", "calibration_factory"): "calibration",
    ("optimizer.api", "_search_budget"): "accuracy budget",
    ("optimizer.pipeline", "run"): "run passes",
    ("optimizer.api", "_save_checked"): "publish",
    ("optimizer.api", "_save"): "publish",
    ("optimizer.api", "_publish"): "publish",
    ("optimizer.verify.validate", "compare"): "validate",
    ("optimizer.verify.isolation", "compare_isolated"): "validate",
    ("optimizer.verify.benchmark", "benchmark"): "benchmark",
    ("optimizer.api", "_add_fusion"): "fusion check",
    ("optimizer.verify.pass_bisect", "bisect_passes"): "bisect",
    ("optimizer.report.report", "write_report"): "report",
    ("optimizer.graph.inspection", "inspect_model"): "inspect",
    ("optimizer.verify.layer_debug", "debug_layers"): "per-layer debug",
    ("optimizer.calibration.sensitivity", "sensitivity_scan"): "sensitivity scan",
}


def mark_internal(error: BaseException, stage: str, pass_name: str | None = None) -> None:
    """Attach ``stage`` (and ``pass_name``) to ``error`` unless an inner stage already did."""
    if getattr(error, _STAGE, None) is not None:
        return
    setattr(error, _STAGE, stage)
    setattr(error, _PASS, pass_name)
    error.add_note(f"onnx-compress stage: {stage}" + (f", pass: {pass_name}" if pass_name else ""))


@contextmanager
def internal_stage(stage: str, pass_name: str | None = None) -> Iterator[None]:
    """Name the stage and pass on any unexpected exception raised inside (bad input is left alone)."""
    try:
        yield
    except OnnxCompressError:
        raise
    except Exception as error:
        mark_internal(error, stage, pass_name)
        raise


def error_stage(error: BaseException, default: str | None = None) -> tuple[str | None, str | None]:
    """(stage, pass) of an internal error: attached names, else the traceback's, else ``default``."""
    stage = getattr(error, _STAGE, None)
    if stage is not None:
        return stage, getattr(error, _PASS, None)
    return _traceback_stage(error.__traceback__) or default, None


def _traceback_stage(trace: TracebackType | None) -> str | None:
    found = None
    while trace is not None:
        frame = trace.tb_frame
        found = STAGE_FUNCTIONS.get((frame.f_globals.get("__name__", ""), frame.f_code.co_name), found)
        trace = trace.tb_next
    return found


def internal_error_message(error: BaseException, default_stage: str | None = None) -> str:
    """One line: ``internal error in pass 'p' (stage: s): Type: message (run with --debug ...)``."""
    stage, pass_name = error_stage(error, default_stage)
    where = f" in pass '{printable(pass_name)}'" if pass_name else ""
    where += f" (stage: {stage})" if stage else ""
    text = " ".join(str(error).split())
    return (f"internal error{where}: {type(error).__name__}: {printable(text)} "
            "(run with --debug for the traceback)")
