"""Rounding noise of 8-bit activations, per tensor, and the groups ranked by it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optimizer.verify.quant_noise import activation_noise, rank_groups
from tests.helpers.quantize_checks import heavy_tail_model, quantize
from tests.helpers.samples import seeded_feeds


def _qdq_identity(scale: float) -> onnx.ModelProto:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
        [
            numpy_helper.from_array(np.array(scale, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.uint8), "z"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_rounding_noise_matches_the_grid_and_saturation_is_not_counted():
    values = np.linspace(0.0, 2.0, 64, dtype=np.float32)
    fine = activation_noise(_qdq_identity(2.0 / 255), [{"x": values}])["x"]
    coarse = activation_noise(_qdq_identity(0.25), [{"x": values}])["x"]
    step = 0.25
    expected = (step**2 / 12) / float(np.mean(values.astype(np.float64) ** 2))
    assert fine < coarse and 0.3 * expected < coarse < 3 * expected
    clipped = activation_noise(_qdq_identity(0.001), [{"x": values}])["x"]  # grid [0, 0.255]: a folded Clip
    assert clipped < 1e-4


def test_the_group_that_rounds_worst_is_ranked_first():
    model = heavy_tail_model()
    result, _ = quantize(model, calibration=seeded_feeds(model, count=16, seed=3), mode="static")
    noise = activation_noise(result.model, seeded_feeds(model, count=4, seed=5))
    assert {"c1", "p1", "q1", "s1"} <= set(noise)
    assert noise["q1"] == max(noise.values())  # c^4: heavy-tailed
    ranked = rank_groups(result.model, noise)
    assert ranked[0][0] == "conv1" and ranked[0][1] >= noise["q1"]
    assert all(name != "conv2" for name, _ in ranked)  # its output is the graph's, never rounded
