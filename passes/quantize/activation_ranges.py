"""Activation ranges for static mode: calibrated once per tensor, inherited where an op only moves
values (one scale and zero point on both sides, which onnxruntime needs to drop the DQ/Q pair).

Calibration statistics (histograms, or min/max) are kept in the pass context's memo, keyed by the
float graph, the statistic's family and the samples: a second static build on the same context
(auto mode trying percentile 100, or backing a few groups off to weight-only int8) runs the model
only for tensors it has not seen, and reads any percentile off the same histograms.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.calibration.observe import probe_model
from optimizer.calibration.ranges import Statistic, collect_ranges, statistic_family, statistic_range
from optimizer.fileio.model import model_digest
from optimizer.graph.weights import weight_values
from optimizer.pass_base import PassContext, PassReport
from passes.quantize.common import too_wide_for_8_bits
from passes.quantize.integer_forms import rescale_factor, rescaled_input
from passes.quantize.options import QuantizeOptions

SAME_RANGE_OPS = (
    "Transpose",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "MaxPool",
    "Slice",
    "Pad",
    "DepthToSpace",
    "SpaceToDepth",
    "Resize",
)


def inherited_ranges(neighbors: list[gs.Node], rescales: bool) -> dict[str, tuple[str, float]]:
    """Outputs that take their input's range (times a factor), in graph order: ops that only move,
    select or interpolate values (factor 1), and positive scalar Mul/Div (folded into the scale
    later). onnxruntime drops DequantizeLinear -> op -> QuantizeLinear only when both sides have
    the same scale and zero point, and calibrating the same values twice costs time."""
    inherited: dict[str, tuple[str, float]] = {}
    for node in neighbors:
        factor = rescale_factor(node) if rescales else None
        if factor is not None and node.outputs[0].name:
            inherited[node.outputs[0].name] = (rescaled_input(node).name, factor)
            continue
        if node.op not in SAME_RANGE_OPS or len(node.outputs) != 1 or not node.outputs[0].name:
            continue
        if node.op == "Resize" and node.attrs.get("mode", "nearest") == "cubic":
            continue  # cubic interpolation overshoots
        if node.op == "Pad" and node.attrs.get("mode", "constant") == "constant" and len(node.inputs) > 2:
            fill = weight_values(node.inputs[2]) if node.inputs[2].name else None
            if fill is None or np.any(np.asarray(fill) != 0):
                continue
        if node.op == "Pad" and float(node.attrs.get("value", 0.0)) != 0.0:
            continue
        inherited[node.outputs[0].name] = (node.inputs[0].name, 1.0)
    return inherited


def calibrate_activations(
    graph: gs.Graph, candidates: list[str], options: QuantizeOptions, report: PassReport, context: PassContext
) -> dict[str, tuple[float, float]]:
    model = probe_model(graph, [])
    known: dict[str, tuple[Statistic, int] | None] = context.memo.setdefault(
        calibration_key(model, options, context), {}
    )
    missing = [name for name in candidates if name not in known]
    details: dict[str, Any] = {"method": options.calibration_method, "reused": len(candidates) - len(missing)}
    if missing:
        result = collect_ranges(
            model,
            missing,
            lambda: context.calibration_feeds("quantize"),
            method=options.calibration_method,
            percentile=options.percentile,
            symmetric=options.symmetric_activations,
            provider=context.provider,
            progress=context.progress,
            max_samples=options.calibration_samples or None,
            timeout_s=context.timeout_s,
            stage="static calibration",
            keep_statistics=True,
        )
        known.update(dict.fromkeys(missing))
        known.update(result.statistics)
        details.update(samples=result.samples, seconds=round(result.seconds, 3), notes=result.notes)
    found = {name: known[name] for name in candidates if known[name] is not None}
    report.details["calibration"] = {**details, "tensors": len(found)}
    usable = {}
    for name, kept in found.items():
        assert kept is not None
        low, high = statistic_range(
            kept[0],
            method=options.calibration_method,
            percentile=options.percentile,
            symmetric=options.symmetric_activations,
        )
        if too_wide_for_8_bits(low, high):
            report.skip("tensor", name, f"calibrated range [{low:.3g}, {high:.3g}] is too wide for 8 bits; kept float")
            continue
        usable[name] = (low, high)
    return usable


def calibration_key(model: onnx.ModelProto, options: QuantizeOptions, context: PassContext) -> str:
    """What the statistics depend on: the float graph, the statistic's family (any percentile reads
    off one histogram), the samples read and where they ran."""
    settings = (statistic_family(options.calibration_method), options.calibration_samples, context.provider)
    return f"quantize.static.statistics:{model_digest(model)}:{settings!r}"
