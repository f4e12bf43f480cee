"""The fusion check reads what onnxruntime really runs (graph facts, not timings)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from optimizer.verify.fusion import analyse, check_fusion
from tests.helpers.builders import matmul_model

RNG = np.random.default_rng(0)


def array(values, name):
    return numpy_helper.from_array(values, name)


def conv_model(static: bool, integer: bool = False) -> onnx.ModelProto:
    weight = (RNG.standard_normal((16, 8, 3, 3)) * 0.1).astype(np.float32)
    scale = (np.abs(weight).reshape(16, -1).max(1) / 127).astype(np.float32)
    quantized = np.clip(np.round(weight / scale[:, None, None, None]), -127, 127).astype(np.int8)
    inputs = [helper.make_tensor_value_info("x", T.FLOAT, [1, 8, 16, 16])]
    outputs = [
        helper.make_tensor_value_info("y", T.FLOAT, [1, 16, 16 if not integer else 14, 16 if not integer else 14])
    ]
    inits = [array(quantized, "Wq"), array(scale, "Ws")]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "Ws"], ["W"], axis=0, name="dqw")]
    if integer:
        nodes = [helper.make_node("ConvInteger", ["xq", "Wq"], ["yi"], name="convint"),
                 helper.make_node("Cast", ["yi"], ["y"], to=T.FLOAT, name="cast")]
        inputs = [helper.make_tensor_value_info("xq", T.UINT8, [1, 8, 16, 16])]
        inits = [array(quantized, "Wq")]
    elif static:
        inits += [array(np.float32(0.05), "xs"), array(np.uint8(128), "xz"),
                  array(np.float32(0.1), "ys"), array(np.uint8(128), "yz")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="qx"),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
                  helper.make_node("Conv", ["xd", "W"], ["yf"], pads=[1, 1, 1, 1], name="conv"),
                  helper.make_node("QuantizeLinear", ["yf", "ys", "yz"], ["yq"], name="qy"),
                  helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="dqy")]
    else:
        nodes.append(helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1], name="conv"))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_weight_only_matmul_runs_as_matmulnbits():
    report = check_fusion(matmul_model("weight-only"))
    assert report.quantized_groups_written == 1
    assert report.integer_kernels == {"MatMulNBits": 1}
    assert report.float_after_dequantize == [] and not report.likely_slower


def test_dynamic_pattern_runs_as_dynamic_quantize_matmul():
    report = check_fusion(matmul_model("dynamic"))
    assert "DynamicQuantizeMatMul" in report.integer_kernels or "MatMulIntegerToFloat" in report.integer_kernels
    assert "MatMulInteger" not in report.run_ops


def test_static_qdq_conv_runs_as_qlinearconv(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(static=True), path)
    report = check_fusion(path)
    assert report.integer_kernels.get("QLinearConv") == 1
    assert report.provider_used == "CPUExecutionProvider"


def test_weight_only_conv_stays_dequantize_plus_float_conv():
    report = check_fusion(conv_model(static=False))
    assert report.integer_kernels == {}
    assert [(e["op"], e["operand"]) for e in report.float_after_dequantize] in ([("Conv", "weight")],
                                                                                 [("FusedConv", "weight")])
    assert not report.likely_slower
    assert "stayed DequantizeLinear + float op" in report.summary()


def test_conv_integer_is_flagged_slower():
    report = check_fusion(conv_model(static=False, integer=True))
    assert report.likely_slower and "ConvInteger" in report.warnings[0]


def test_activation_dequantized_into_float_op_is_flagged():
    written = conv_model(static=True)
    run = onnx.ModelProto()
    run.CopyFrom(written)
    report = analyse(written, run, "m", "CPUExecutionProvider")
    assert report.quantized_groups_written == 1
    assert report.float_after_dequantize[0]["operand"] == "activation"
    assert any("activations" in w for w in report.warnings)


def test_plain_float_model_has_nothing_quantized():
    report = check_fusion(matmul_model("fp32"))
    assert report.quantized_groups_written == 0 and report.integer_kernels == {} and not report.warnings
    assert report.to_dict()["likely_slower"] is False
