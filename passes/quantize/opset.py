"""Raising a graph's opset when a quantized form needs it (per-channel DequantizeLinear: 13,
4-bit types and blocked quantization: 21).

Bumping the number alone is wrong whenever an op changed meaning in between (Squeeze, Split and
ReduceSum take axes as inputs from 13 on, Softmax's axis semantics changed in 13), so the graph
goes through onnx's version converter, which rewrites those nodes.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from optimizer.errors import PassError
from optimizer.fileio.onnxruntime_ops import hide_from_converter, unhide_after_conversion
from optimizer.graph.convert import dropped_initializers, export_model, import_graph
from optimizer.graph.interface import copy_interface_records
from optimizer.graph.opsets import DEFAULT_DOMAINS
from optimizer.graph.sparse_storage import mark_sparse_sources, to_dense_initializers
from optimizer.pass_base import PassReport


def ensure_opset(graph: gs.Graph, required: int, report: PassReport) -> gs.Graph:
    """``graph`` itself when its opset suffices, else a converted copy at opset ``required``."""
    current = int(graph.opset)
    if current >= required:
        return graph
    template = onnx.ModelProto()
    template.ir_version = 8
    template.opset_import.extend(graph.import_domains or [onnx.helper.make_opsetid("", current)])
    model = export_model(graph, template)
    sparse = list(model.graph.sparse_initializer)
    hidden = hide_from_converter(model)
    try:
        converted = version_converter.convert_version(to_dense_initializers(model) if sparse else model, required)
    except Exception as error:  # the converter raises bare RuntimeErrors naming the op
        raise PassError(
            f"quantize needs opset {required} (model has {current}) and onnx's version "
            f"converter failed: {' '.join(str(error).split())[:300]}"
        ) from error
    _keep_custom_domains(model, converted)
    if hidden:
        unhide_after_conversion(converted)
    new_graph = import_graph(converted)
    mark_sparse_sources(list(new_graph.tensors().values()), sparse)
    new_graph.dropped_initializers = dropped_initializers(graph)
    copy_interface_records(graph, new_graph)
    report.details["opset"] = {
        "before": current,
        "after": required,
        "why": "per-channel DequantizeLinear needs 13, 4-bit and blocked need 21",
    }
    return new_graph


def _keep_custom_domains(source: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    present = {entry.domain for entry in converted.opset_import}
    for entry in source.opset_import:
        if entry.domain not in DEFAULT_DOMAINS and entry.domain not in present:
            converted.opset_import.append(entry)
