"""Small models built in code for more than one test module."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optimizer.fileio.model import load_model
from tests.helpers.samples import MODELS_DIR


def compressed_mlp() -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    """fc1 weight: half its columns zeroed (pruned); mm2 weight: int8 per-column via DequantizeLinear."""
    reference = load_model(MODELS_DIR / "mlp.onnx")
    candidate = onnx.ModelProto()
    candidate.CopyFrom(reference)
    gemm = next(n for n in candidate.graph.node if n.op_type == "Gemm")
    matmul = next(n for n in candidate.graph.node if n.op_type == "MatMul")
    inits = {t.name: t for t in candidate.graph.initializer}
    pruned = numpy_helper.to_array(inits[gemm.input[1]]).copy()
    pruned[:, ::2] = 0
    inits[gemm.input[1]].CopyFrom(numpy_helper.from_array(pruned, gemm.input[1]))
    weight = numpy_helper.to_array(inits[matmul.input[1]])
    scale = (np.abs(weight).max(0) / 127).astype(np.float32)
    quantized = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    candidate.graph.initializer.extend([numpy_helper.from_array(quantized, "w_q"),
                                        numpy_helper.from_array(scale, "w_s")])
    dq = helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w_dq"], axis=1, name="w_dequantize")
    index = list(candidate.graph.node).index(matmul)
    candidate.graph.node.insert(index, dq)
    matmul.input[1] = "w_dq"
    onnx.checker.check_model(candidate, full_check=True)
    expected = {"pruned": gemm, "quantized": matmul, "weight": weight, "dequantized": quantized * scale}
    return reference, candidate, expected


def matmul_model(kind: str) -> onnx.ModelProto:
    """A 64x96 MatMul as "fp32", "weight-only" (DequantizeLinear weight) or dynamic (MatMulInteger) graph."""
    k, n = 64, 96
    weight = (np.random.default_rng(0).standard_normal((k, n)) * 0.05).astype(np.float32)
    scale = (np.abs(weight).max(0) / 127).astype(np.float32)
    quantized = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, k])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, n])]
    if kind == "fp32":
        nodes, inits = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [_array(weight, "W")]
    elif kind == "weight-only":
        nodes = [helper.make_node("DequantizeLinear", ["Wq", "Ws"], ["W"], axis=1, name="dq"),
                 helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
        inits = [_array(quantized, "Wq"), _array(scale, "Ws")]
    else:
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql"),
                 helper.make_node("MatMulInteger", ["xq", "Wq", "xz", "wz"], ["yi"], name="mmi"),
                 helper.make_node("Cast", ["yi"], ["yf"], to=TensorProto.FLOAT, name="cast"),
                 helper.make_node("Mul", ["xs", "Ws"], ["sc"], name="scale"),
                 helper.make_node("Mul", ["yf", "sc"], ["y"], name="rescale")]
        inits = [_array(quantized, "Wq"), _array(scale, "Ws"), _array(np.zeros(n, np.int8), "wz")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _array(values: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(values, name)
