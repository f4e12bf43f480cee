"""What optimize() adds to a report after the output is published: what onnxruntime runs (the
fusion check, never fatal) and a note when pruning left the file as large as it was."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx

from optimizer.fileio.model import fits_one_message
from optimizer.fileio.output_files import warn
from optimizer.pass_base import Pass
from optimizer.report.report import Report
from optimizer.verify.fusion import check_fusion
from optimizer.verify.isolation import run_isolated

ISOLATED_FUSION_ABOVE_BYTES = 256 * 2**20
"""Outputs from this size on are checked in a child process (a 1B-parameter int4 decoder's session
took 1 GB more on top of the tool's own 1.7 GB); smaller ones here (a child costs about a second)."""


def size_notes(chosen: Sequence[Pass], report: Report) -> None:
    """Say so when unstructured pruning left the file about as large as it was (dense zeros)."""
    pruned = [p for p in chosen if p.name == "prune" and getattr(p, "storage", "dense") != "sparse"]
    before, after = report.input, report.output
    if not pruned or before is None or after is None or after.size_bytes < 0.95 * before.size_bytes:
        return
    report.notes.append(
        f"pruning zeroed weights but the file is {after.size_bytes:,} bytes (input {before.size_bytes:,}): "
        "zeros in dense tensors take as many bytes; use --sparse-storage auto, or compress the file (gzip)"
    )


def add_fusion(report: Report, model: onnx.ModelProto | Path, provider: str) -> None:
    if isinstance(model, onnx.ModelProto) and not fits_one_message(model):
        report.notes.append("fusion check skipped: the model exceeds 2 GB and was not written")
        return
    try:
        size = report.output.size_bytes if report.output is not None else 0  # measured when it was published
        if isinstance(model, Path) and size > ISOLATED_FUSION_ABOVE_BYTES:
            # its own process: onnxruntime's session of a large model is not added to the tool's memory
            fusion = run_isolated(check_fusion, model, provider, timeout_s=None, label="the fusion check")
        else:
            fusion = check_fusion(model, provider)
    except Exception as error:  # the output is written and validated: any failure here is a warning only
        message = f"fusion check failed (the output is written and valid): {type(error).__name__}: {error}"
        report.notes.append(message)
        warn(message)
        return
    report.fusion = fusion.to_dict()
    report.notes.extend(f"fusion check: {warning}" for warning in fusion.warnings)
