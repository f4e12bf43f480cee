"""Wanda's bias correction: each removed weight's mean contribution on the calibration data
(w x the mean of its input feature) moves into its layer's bias, so every output keeps its mean."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes  # noqa: F401
from optimizer.pass_base import PassContext
from tests.helpers.runtime import run_model
from tests.passes.prune.test_prune import prune, weights_of

K, N = 32, 24


def shifted_feeds(count: int, seed: int, inputs: dict[str, float], shape=(16, K)) -> list[dict[str, np.ndarray]]:
    """Inputs with a per-feature mean far from 0 (after a GELU or a LayerNorm shift, most are)."""
    rng = np.random.default_rng(seed)
    means = {name: offset + np.random.default_rng(11).standard_normal(shape[1]) for name, offset in inputs.items()}
    return [
        {name: (means[name] + rng.standard_normal(shape)).astype(np.float32) for name in inputs}
        for _ in range(count)
    ]


def model_of(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def array(name: str, shape, seed: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def linear_with_bias() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "b"], ["y"], name="add"),
    ]
    return model_of(nodes, [("x", ["n", K])], [("y", ["n", N])], [array("w", (K, N), 1), array("b", (N,), 2)])


def output_means(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    """Per output, the mean of each channel (the last axis of a matrix, axis 1 of an image)."""
    runs = run_model(model, feeds)
    channels_last = [[np.moveaxis(value, 1, -1) if value.ndim == 4 else value for value in run] for run in runs]
    return [
        np.concatenate([run[i].reshape(-1, run[i].shape[-1]) for run in channels_last]).mean(0)
        for i in range(len(runs[0]))
    ]


def context(feeds) -> PassContext:
    return PassContext(calibration=lambda: iter(feeds))


def test_matmul_bias_gets_the_removed_weights_mean_contribution():
    model, feeds = linear_with_bias(), shifted_feeds(8, 0, {"x": 3.0})
    corrected, report, _ = prune(model, context(feeds), mode="wanda", sparsity=0.5, min_elements=16)
    plain, _, _ = prune(model, context(feeds), mode="wanda", sparsity=0.5, min_elements=16, bias_correction="off")
    original, after = weights_of(model), weights_of(corrected)
    assert np.array_equal(after["w"], weights_of(plain)["w"])  # the same zeros; only the bias differs
    mean_x = np.concatenate([feed["x"] for feed in feeds]).astype(np.float64).mean(0)
    expected = original["b"] + mean_x @ (original["w"].astype(np.float64) - after["w"])
    assert np.allclose(after["b"], expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(weights_of(plain)["b"], original["b"])
    assert report["counts"]["biases_corrected"] == 1
    want = output_means(model, feeds)[0]
    assert np.allclose(output_means(corrected, feeds)[0], want, atol=1e-3)
    assert not np.allclose(output_means(plain, feeds)[0], want, atol=1e-1)
    held_out = shifted_feeds(4, 9, {"x": 3.0})
    assert error(model, corrected, held_out) < 0.5 * error(model, plain, held_out)


def error(reference, candidate, feeds) -> float:
    expected = np.concatenate([r[0] for r in run_model(reference, feeds)])
    actual = np.concatenate([r[0] for r in run_model(candidate, feeds)])
    return float(np.linalg.norm(expected - actual) / np.linalg.norm(expected))


def test_gemm_and_conv_without_bias_get_one_scaled_by_alpha_and_beta():
    """Gemm alpha=2, beta=0.5 with no C; a grouped 1x1 Conv with no bias: both get a new bias input
    (the Conv with bias_correction=all only)."""
    nodes = [
        helper.make_node("Gemm", ["x", "g"], ["gy"], name="gemm", transB=1, alpha=2.0, beta=0.5),
        helper.make_node("Conv", ["img", "c"], ["cy"], name="conv", group=2),
    ]
    model = model_of(nodes, [("x", ["n", K]), ("img", [1, 8, 6, 6])], [("gy", ["n", N]), ("cy", [1, 8, 6, 6])],
                     [array("g", (N, K), 3), array("c", (8, 4, 1, 1), 4)])
    images = shifted_feeds(8, 1, {"img": 2.0}, (36, 8))  # 36 pixels x 8 channels
    feeds = [
        {**matrix, "img": np.ascontiguousarray(image["img"].T.reshape(1, 8, 6, 6))}
        for matrix, image in zip(shifted_feeds(8, 0, {"x": 3.0}), images, strict=True)
    ]
    default, report, _ = prune(model, context(feeds), mode="wanda", sparsity=0.5, min_elements=16)
    assert report["counts"]["biases_corrected"] == 1  # by default MatMul and Gemm layers only
    assert {node.name: len(node.input) for node in default.graph.node} == {"gemm": 3, "conv": 2}
    corrected, report, _ = prune(model, context(feeds), mode="wanda", sparsity=0.5, min_elements=16,
                                 bias_correction="all")
    assert report["counts"]["biases_corrected"] == 2
    for node in corrected.graph.node:
        assert len(node.input) == 3, node.name
    for got, want in zip(output_means(corrected, feeds), output_means(model, feeds), strict=True):
        assert np.allclose(got, want, atol=1e-3)
    onnx.checker.check_model(corrected, full_check=True)


def test_a_shared_weight_corrects_each_readers_bias_with_its_own_input_mean():
    nodes = [
        helper.make_node("MatMul", ["x1", "w"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["y1"], name="add1"),
        helper.make_node("MatMul", ["x2", "w"], ["m2"], name="mm2"),
        helper.make_node("Add", ["b2", "m2"], ["y2"], name="add2"),
    ]
    model = model_of(nodes, [("x1", ["n", K]), ("x2", ["n", K])], [("y1", ["n", N]), ("y2", ["n", N])],
                     [array("w", (K, N), 1), array("b1", (N,), 2), array("b2", (N,), 3)])
    feeds = shifted_feeds(8, 0, {"x1": 3.0, "x2": -5.0})
    corrected, report, _ = prune(model, context(feeds), mode="wanda", sparsity=0.5, min_elements=16)
    assert report["counts"]["biases_corrected"] == 2
    for got, want in zip(output_means(corrected, feeds), output_means(model, feeds), strict=True):
        assert np.allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("case", ["no_add", "shared_bias"])
def test_a_layer_whose_bias_cannot_change_is_named_with_the_reason(case):
    if case == "no_add":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
        inits, outputs, reason = [array("w", (K, N), 1)], [("y", ["n", N])], "'mm' is not followed by one Add"
    else:
        nodes = [
            helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
            helper.make_node("Add", ["mm", "b"], ["y"], name="add"),
            helper.make_node("Add", ["x2", "b"], ["z"], name="other"),
        ]
        inits, outputs = [array("w", (K, N), 1), array("b", (N,), 2)], [("y", ["n", N]), ("z", ["n", N])]
        reason = "adds no float32 constant"
    inputs = [("x", ["n", K])] + ([("x2", ["n", N])] if case == "shared_bias" else [])
    model = model_of(nodes, inputs, outputs, inits)
    feeds = shifted_feeds(4, 0, {"x": 3.0})
    if case == "shared_bias":
        for feed in feeds:
            feed["x2"] = np.zeros((16, N), np.float32)
    corrected, report, modified = prune(model, context(feeds), mode="wanda", sparsity=0.5, min_elements=16)
    assert modified and reason in report["details"]["bias_not_corrected"]["mm"]
    assert report["counts"].get("biases_corrected", 0) == 0
    assert len(corrected.graph.initializer) == len(inits)
    if case == "shared_bias":
        assert np.array_equal(weights_of(corrected)["b"], weights_of(model)["b"])


def test_nm_ranked_by_wanda_corrects_too_and_a_rerun_changes_nothing():
    model, feeds = linear_with_bias(), shifted_feeds(8, 0, {"x": 3.0})
    corrected, report, _ = prune(model, context(feeds), mode="nm", criterion="wanda", min_elements=16)
    assert report["counts"]["biases_corrected"] == 1
    assert np.allclose(output_means(corrected, feeds)[0], output_means(model, feeds)[0], atol=1e-3)
    again, _, changed = prune(corrected, context(feeds), mode="nm", criterion="wanda", min_elements=16)
    assert not changed and again.SerializeToString() == corrected.SerializeToString()
