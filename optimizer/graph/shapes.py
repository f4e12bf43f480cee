"""Shape inference on a model without copying its weights: large initializers become stubs.

(Writing the inferred shapes into quantized models as value_info was tried: onnxruntime then
fuses SkipLayerNormalization in all-MiniLM-L6-v2, and ran it 10% slower than Add +
LayerNormalization on this CPU, so outputs keep the value_info they had.)
"""

from __future__ import annotations

import onnx

STUB_ABOVE_BYTES = 4096
"""Main-graph initializers larger than this reach shape inference as dims and type only: shape
inference reads values only to propagate shapes (small int64 tensors), and copying 90 MB of
weights into and out of it took longer than the inference itself."""


def shapes_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference: large main-graph initializers without values."""
    copy = without_graph_body(model)
    graph = copy.graph
    source = model.graph
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    graph.sparse_initializer.extend(source.sparse_initializer)
    for tensor in source.initializer:
        if len(tensor.raw_data) > STUB_ABOVE_BYTES or tensor.data_location == onnx.TensorProto.EXTERNAL:
            graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        else:
            graph.initializer.append(tensor)
    return copy


def without_graph_body(model: onnx.ModelProto) -> onnx.ModelProto:
    """Model fields that are not the graph (opsets, local functions, metadata) without copying weights."""
    shell = onnx.ModelProto(
        ir_version=model.ir_version,
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
        doc_string=model.doc_string,
    )
    shell.opset_import.extend(model.opset_import)
    shell.metadata_props.extend(model.metadata_props)
    shell.functions.extend(model.functions)
    shell.graph.name = model.graph.name
    return shell
