"""ONNX operator domains and opset bookkeeping shared by the graph layer and the passes."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

DEFAULT_DOMAINS = (None, "", "ai.onnx")
"""The spellings of the default ONNX domain (onnx-graphsurgeon may leave it unset)."""


def merge_opsets(template: onnx.ModelProto, graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Keep every opset ``template`` declared (custom domains included), the graph's own opset, and
    raise the IR version only when the opsets need it."""
    versions: dict[str, int] = {}
    for entry in list(template.opset_import) + list(model.opset_import):
        domain = "" if entry.domain in DEFAULT_DOMAINS else entry.domain
        versions[domain] = max(versions.get(domain, 0), entry.version)
    if graph.opset:
        versions[""] = int(graph.opset)
    del model.opset_import[:]
    for domain in [entry.domain for entry in template.opset_import] + sorted(versions):
        key = "" if domain in DEFAULT_DOMAINS else domain
        if key in versions:
            model.opset_import.append(onnx.helper.make_opsetid(domain, versions.pop(key)))
    minimum_ir = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(template.ir_version, minimum_ir)
