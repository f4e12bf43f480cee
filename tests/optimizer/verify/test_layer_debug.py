from __future__ import annotations

import math

import numpy as np

from optimizer.fileio.model import load_model
from optimizer.verify.layer_debug import debug_layers
from tests.helpers.builders import compressed_mlp
from tests.helpers.samples import MODELS_DIR, seeded_feeds


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
    assert report.layers == sorted(report.layers, key=lambda layer: layer.output_sqnr_db)
    assert report.samples == 3
    assert "worst first" in report.summary() and report.to_rows()[0]["node"] == report.layers[0].node


def test_identical_models_have_no_compressed_layers():
    reference = load_model(MODELS_DIR / "cnn.onnx")
    report = debug_layers(reference, reference, seeded_feeds(reference, count=1))
    assert report.layers == [] and report.unmatched == []


def test_a_node_that_absorbed_its_relu_is_compared_by_its_own_output():
    """Static int8 drops a Relu whose range the uint8 output already clips: the Gemm then writes the
    Relu's tensor. It is still found (by name), and its output is compared with the reference Gemm's
    own output (before the Relu), not with the Relu's."""
    from optimizer.pass_base import PassContext
    from optimizer.pipeline import Pipeline
    from passes.quantize.quantize_pass import QuantizePass

    reference = load_model(MODELS_DIR / "mlp.onnx")
    feeds = seeded_feeds(reference, count=3)
    context = PassContext(calibration=lambda: iter(feeds))
    candidate = Pipeline([QuantizePass(mode="static")], context=context).run(reference).model
    assert "relu1" not in {node.name for node in candidate.graph.node}
    report = debug_layers(reference, candidate, feeds)
    by_node = {layer.node: layer for layer in report.layers}
    assert sorted(by_node) == ["fc1.gemm", "fc2.matmul", "fc3.gemm"] and report.unmatched == []
    fc1 = by_node["fc1.gemm"]
    assert fc1.output == "fc1.out" and fc1.candidate_output == "relu1.out"
    assert fc1.output_cosine > 0.99 and fc1.output_sqnr_db > 25


def test_a_conv_with_its_batchnorm_folded_in_is_judged_against_the_folded_weight():
    """Static int8 folds a BatchNormalization into the Conv before it: the candidate's int8 weight is
    the folded one, so comparing it with the bare reference weight gave 0-5 dB on PP-OCRv4 det."""
    from optimizer.pass_base import PassContext
    from optimizer.pipeline import Pipeline
    from passes.quantize.quantize_pass import QuantizePass

    reference = load_model(MODELS_DIR / "cnn.onnx")
    feeds = seeded_feeds(reference, count=3)
    context = PassContext(calibration=lambda: iter(feeds))
    candidate = Pipeline([QuantizePass(mode="static")], context=context).run(reference).model
    assert not any(node.op_type == "BatchNormalization" for node in candidate.graph.node)
    folded = {n.input[0] for n in reference.graph.node if n.op_type == "BatchNormalization"}
    report = debug_layers(reference, candidate, feeds)
    convs = [layer for layer in report.layers if layer.output in folded]
    assert convs and all(layer.weight_sqnr_db is not None and layer.weight_sqnr_db > 30 for layer in convs), [
        (layer.node, layer.weight_sqnr_db) for layer in convs
    ]
