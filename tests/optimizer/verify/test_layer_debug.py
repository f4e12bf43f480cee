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
