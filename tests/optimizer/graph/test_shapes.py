"""Shape inference copies: weights as stubs, everything shape inference reads unchanged."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optimizer.graph.shapes import STUB_ABOVE_BYTES, shapes_only


def _model() -> onnx.ModelProto:
    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
                              [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_shape_inference_sees_large_weights_as_stubs_and_everything_else_unchanged():
    model = _model()
    copy = shapes_only(model)
    assert len(model.graph.initializer[0].raw_data) > STUB_ABOVE_BYTES and not copy.graph.initializer[0].raw_data
    assert list(copy.graph.initializer[0].dims) == [64, 32]
    assert copy.graph.node == model.graph.node and copy.graph.value_info == model.graph.value_info
    inferred = onnx.shape_inference.infer_shapes(copy, strict_mode=False, data_prop=True)
    (h,) = inferred.graph.value_info  # the MatMul output, from the stub's dims
    assert [d.dim_param or d.dim_value for d in h.type.tensor_type.shape.dim] == ["batch", 32]
