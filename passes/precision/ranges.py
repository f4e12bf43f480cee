"""Largest |value| of every float tensor of the main graph, for choosing float32 islands by range."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from optimizer.calibration.decoder_io import empty_cache_shapes
from optimizer.calibration.feeds import generate_feeds, model_input_specs
from optimizer.calibration.observe import probe_model
from optimizer.calibration.ranges import collect_ranges
from optimizer.pass_base import PassContext, PassReport

GENERATED_SAMPLES = 4


def float_ranges(graph: gs.Graph, types: dict[str, int], context: PassContext, report: PassReport) -> dict[str, float]:
    """Name -> largest |x| over the calibration data (or seeded generated samples when there is
    none: the report says so); main-graph float32 node outputs only."""
    names = [t.name for node in graph.nodes for t in node.outputs if types.get(t.name) == onnx.TensorProto.FLOAT]
    if not names:
        return {}
    model = probe_model(graph, [])
    if context.calibration is not None:
        feeds, source = context.calibration, "calibration data"
    else:
        specs = model_input_specs(model)
        shapes = empty_cache_shapes(specs, context.model_folder, {})  # a decoder: an empty cache that fits
        generated = generate_feeds(specs, count=GENERATED_SAMPLES, shapes=shapes)
        feeds, source = (lambda: iter(generated)), f"{GENERATED_SAMPLES} generated samples (no calibration data)"
    result = collect_ranges(
        model, names, feeds, method="minmax", provider=context.provider, timeout_s=context.timeout_s,
        stage="float16 ranges",
    )  # fmt: skip
    report.details["ranges"] = {"source": source, "samples": result.samples, "tensors": len(result.ranges)}
    return {name: max(abs(r.low), abs(r.high)) for name, r in result.ranges.items()}
