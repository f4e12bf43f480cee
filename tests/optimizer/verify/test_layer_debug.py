from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from optimizer.verify.layer_debug import debug_layers
from optimizer.fileio.model import load_model
from tests.conftest import MODELS_DIR, seeded_feeds


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
    candidate.graph.initializer.extend([numpy_helper.from_array(quantized, "w_q"), numpy_helper.from_array(scale, "w_s")])
    dq = helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w_dq"], axis=1, name="w_dequantize")
    index = list(candidate.graph.node).index(matmul)
    candidate.graph.node.insert(index, dq)
    matmul.input[1] = "w_dq"
    onnx.checker.check_model(candidate, full_check=True)
    expected = {"pruned": gemm, "quantized": matmul, "weight": weight, "dequantized": quantized * scale}
    return reference, candidate, expected


def test_compressed_layers_are_found_classified_and_ranked():
    reference, candidate, expected = compressed_mlp()
    report = debug_layers(reference, candidate, seeded_feeds(reference, count=3))
    by_node = {layer.node: layer for layer in report.layers}
    assert sorted(by_node) == sorted([expected["pruned"].name, expected["quantized"].name])
    pruned, quantized = by_node[expected["pruned"].name], by_node[expected["quantized"].name]
    assert pruned.kind == "pruned" and pruned.sparsity >= 0.5
    assert quantized.kind == "quantized" and quantized.bits == 8
    error = expected["dequantized"].astype(np.float64) - expected["weight"]
    want_sqnr = 10 * math.log10((expected["weight"].astype(np.float64) ** 2).sum() / (error ** 2).sum())
    assert quantized.weight_sqnr_db == np.float64(want_sqnr) or abs(quantized.weight_sqnr_db - want_sqnr) < 1e-6
    assert quantized.weight_sqnr_db > 35
    assert report.layers == sorted(report.layers, key=lambda l: l.output_sqnr_db)
    assert report.samples == 3
    assert "worst first" in report.summary() and report.to_rows()[0]["node"] == report.layers[0].node


def test_identical_models_have_no_compressed_layers():
    reference = load_model(MODELS_DIR / "cnn.onnx")
    report = debug_layers(reference, reference, seeded_feeds(reference, count=1))
    assert report.layers == [] and report.unmatched == []
