"""Bits per weight: stored bytes of what the passes changed over the elements they replaced."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optimizer.graph.bit_count import measure_bits
from tests.helpers.quantize_checks import quantize

RNG = np.random.default_rng(5)


def two_layer_model() -> onnx.ModelProto:
    """x -> MatMul(W1, an initializer) -> Add(bias) -> MatMul(W2, a Constant node) -> y."""
    w1 = numpy_helper.from_array(RNG.standard_normal((256, 256)).astype(np.float32), "W1")
    bias = numpy_helper.from_array(RNG.standard_normal(256).astype(np.float32), "bias")
    w2 = numpy_helper.from_array(RNG.standard_normal((256, 128)).astype(np.float32), "W2")
    nodes = [
        helper.make_node("Constant", [], ["W2"], name="w2_const", value=w2),
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "bias"], ["hb"], name="fc1_bias"),
        helper.make_node("MatMul", ["hb", "W2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])],
        [w1, bias],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_4bit_blocks_of_32_cost_their_scales_and_zero_points():
    model = two_layer_model()
    compressed = quantize(model, weight_type="int4", mode="weights", block_size=32)[0].model
    measure = measure_bits(model, compressed)
    elements = 256 * 256 + 256 * 128
    # uint4 values + one float16 scale and one uint4 zero point per 32 weights: 4 + 0.5 + 0.125
    assert measure.weight_elements == elements
    assert measure.weight_bytes == elements // 2 + elements // 32 * 2 + elements // 32 // 2
    assert measure.bits_per_weight == 4.625
    assert measure.parameters == elements + 256  # the bias is a parameter ...
    assert measure.stored_bytes == measure.weight_bytes + 256 * 4  # ... stored as it was
    assert measure.bits_per_parameter > measure.bits_per_weight


def test_a_model_left_alone_has_no_compressed_weights():
    model = two_layer_model()
    measure = measure_bits(model, model)
    assert measure.weight_elements == 0 and measure.weight_bytes == 0 and measure.bits_per_weight == 0.0
    assert measure.bits_per_parameter == 32.0


def test_8bit_per_channel_weights():
    model = two_layer_model()
    compressed = quantize(model, weight_type="int8", mode="weights")[0].model
    measure = measure_bits(model, compressed)
    elements = 256 * 256 + 256 * 128
    assert 8.0 < measure.bits_per_weight < 8.2  # int8 values, a float scale per output channel
    assert measure.to_dict()["weight_elements"] == elements
