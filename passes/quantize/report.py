"""The honest part of the quantize report: bytes by dtype before and after, and a warning for
every weight still stored as float (excluded, too small, or read by an op left in float)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.graph.walk import iter_graphs
from optimizer.graph.weights import weight_values
from optimizer.pass_base import PassReport
from passes.quantize.common import bytes_by_dtype
from passes.quantize.options import QuantizeOptions
from passes.quantize.targets import weight_slots


def float_weights(root: gs.Graph) -> dict[str, int]:
    """Weights of Conv/MatMul/Gemm/Gather/... still stored as float: name -> bytes."""
    found: dict[str, int] = {}
    for graph in iter_graphs(root):
        for node in graph.nodes:
            for index in weight_slots(node):
                values = weight_values(node.inputs[index])
                if values is not None and np.asarray(values).dtype.kind == "f":
                    found[node.inputs[index].name] = int(np.asarray(values).nbytes)
    return dict(sorted(found.items()))


def finish_report(report: PassReport, options: QuantizeOptions, graph: gs.Graph, before: dict[str, int]) -> None:
    after = bytes_by_dtype(graph)
    total_before, total_after = sum(before.values()), sum(after.values())
    report.saved_bytes = max(0, total_before - total_after)
    report.details.update(
        {
            "mode": options.mode,
            "weight_type": options.weight_type,
            "bytes_by_dtype_before": before,
            "bytes_by_dtype_after": after,
            "bytes_before": total_before,
            "bytes_after": total_after,
        }
    )
    remaining = float_weights(graph)
    if remaining:
        size = sum(remaining.values())
        share = 100 * size / total_after if total_after else 0.0
        largest = sorted(remaining, key=lambda name: (-remaining[name], name))[:3]
        report.details.setdefault("warnings", []).append(
            f"{len(remaining)} weight(s), {size} bytes ({share:.1f}% of the stored bytes), are still stored as "
            f"float (largest: {', '.join(largest)}); 'skipped' says why"
        )
