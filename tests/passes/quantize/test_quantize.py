"""quantize pass, weights and dynamic modes (static mode: test_quantize_static.py)."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes
import passes.quantize.gptq as gptq_module
import passes.quantize.quantize_pass  # noqa: F401  (registers the pass until passes/__init__ lists it)
from optimizer.cli import main
from optimizer.errors import OptionError, PassError
from optimizer.fileio.model import load_model
from optimizer.registry import create_pass
from tests.helpers.quantize_checks import initializers, quantize
from tests.helpers.runtime import max_abs_error, open_session, ort_runs, run_model
from tests.helpers.samples import MODELS_DIR, seeded_feeds


def all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attribute.g)


def nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for g in all_graphs(model.graph) for n in g.node]


def run_unoptimized(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    """First output with onnxruntime's graph optimizations off: DequantizeLinear's own arithmetic."""
    session = open_session(model, graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return session.run(None, feed)[0]


def matmul_model(weight: np.ndarray, opset: int = 17, gelu: bool = False) -> onnx.ModelProto:
    k, n = weight.shape
    pre = [helper.make_node("Erf", ["x"], ["e"]), helper.make_node("Mul", ["x", "e"], ["h"])] if gelu else []
    graph = helper.make_graph(
        pre + [helper.make_node("MatMul", ["h" if gelu else "x", "W"], ["y"], name="fc")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def weight(shape, seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 0.1).astype(np.float32)


# ---------------------------------------------------------------- weights mode

def test_weight_only_int8_integers_equal_numpy_round_half_even_and_logits_bound():
    model = load_model(MODELS_DIR / "mlp.onnx")
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    result, report = quantize(model, mode="weights")
    stored = initializers(result.model)
    quantized = [name for name in stored if name.endswith("_quantized")]
    assert len(quantized) == 3 and report["counts"]["weights_int8"] == 3
    for name in quantized:
        assert stored[name].data_type == TensorProto.INT8
        original = originals[name[: -len("_quantized")]]
        axis = 1 if original.shape == (128, 128) or (original.shape[0] != 10 and original.shape[1] == 10) else 0
        scale = np.abs(original).max(axis=1 - axis) / np.float32(127)
        shape = [1, 1]
        shape[axis] = -1
        expected = np.clip(np.rint(original / scale.reshape(shape).astype(np.float32)), -127, 127).astype(np.int8)
        np.testing.assert_array_equal(numpy_helper.to_array(stored[name]), expected)
    error = max_abs_error(model, result.model, seeded_feeds(model, count=8))
    assert error <= 0.05, error  # measured 0.027 (logits of magnitude ~1-3) on 8 seeded feeds


def test_weight_only_int8_matmul_is_folded_at_load_by_default(tmp_path):
    model = matmul_model(weight((64, 32)))
    result, report = quantize(model, mode="weights")
    assert report["counts"]["weight_only_fold"] == 1
    assert ort_runs(result.model, tmp_path) == Counter({"MatMul": 1})


def test_weight_only_matmul_as_dequantize_linear_runs_matmulnbits_and_is_bit_exact(tmp_path):
    w = weight((64, 32))
    model = matmul_model(w)
    result, _ = quantize(model, mode="weights", weight_only_form="dequantize_linear")
    stored = initializers(result.model)
    q, scale = numpy_helper.to_array(stored["W_quantized"]), numpy_helper.to_array(stored["W_scale"])
    assert ort_runs(result.model, tmp_path)["MatMulNBits"] == 1
    restored = run_unoptimized(result.model, {"x": np.eye(64, dtype=np.float32)})
    np.testing.assert_array_equal(restored, q.astype(np.float32) * scale)
    fused = run_model(result.model, [{"x": np.eye(64, dtype=np.float32)}])[0][0]
    np.testing.assert_allclose(fused, restored, rtol=0, atol=1e-6)  # MatMulNBits scales after the sum


def test_weight_only_conv_is_folded_at_load_so_onnxruntime_runs_a_float_conv(tmp_path):
    model = load_model(MODELS_DIR / "cnn.onnx")
    result, report = quantize(model, mode="weights")
    assert report["counts"]["weight_only_fold"] == 5
    ran = ort_runs(result.model, tmp_path)
    assert "DequantizeLinear" not in ran and "Cast" not in ran and ran["Conv"] >= 1
    assert max_abs_error(model, result.model, seeded_feeds(model)) <= 0.05


@pytest.mark.parametrize("weight_type,data_type", [("int4", TensorProto.INT4), ("uint4", TensorProto.UINT4)])
def test_int4_blocked_raises_opset_and_runs_matmulnbits(tmp_path, weight_type, data_type):
    w = weight((128, 64))
    model = matmul_model(w)
    result, report = quantize(model, mode="weights", weight_type=weight_type, symmetric_weights=weight_type == "int4")
    stored = initializers(result.model)
    assert stored["W_quantized"].data_type == data_type
    assert len(stored["W_quantized"].raw_data) == 128 * 64 // 2
    # the block scales are stored as float16 behind a Cast that onnxruntime folds before its fusion
    assert stored["W_scale_float16"].data_type == TensorProto.FLOAT16
    assert numpy_helper.to_array(stored["W_scale_float16"]).shape == (128 // 32, 64)
    assert not [t for t in stored.values() if t.data_type == TensorProto.FLOAT]
    dq = next(n for n in result.model.graph.node if n.op_type == "DequantizeLinear")
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 32}
    assert report["details"]["opset"]["after"] == 21
    assert next(o.version for o in result.model.opset_import if o.domain == "") == 21
    assert result.model.ir_version >= 10
    assert ort_runs(result.model, tmp_path)["MatMulNBits"] == 1
    feeds = [{"x": np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)}]
    reference, candidate = run_model(model, feeds)[0][0], run_model(result.model, feeds)[0][0]
    assert np.linalg.norm(candidate - reference) / np.linalg.norm(reference) < 0.12


def test_int4_scales_float16_cannot_hold_stay_float32_and_still_run_matmulnbits(tmp_path):
    w = weight((128, 64)) * 1e-6  # scales near 1e-7, under float16's smallest normal (6.1e-5)
    model = matmul_model(w)
    result, _ = quantize(model, mode="weights", weight_type="uint4")
    stored = initializers(result.model)
    assert stored["W_scale"].data_type == TensorProto.FLOAT
    assert not [t for t in stored.values() if t.data_type == TensorProto.FLOAT16]
    assert ort_runs(result.model, tmp_path)["MatMulNBits"] == 1
    feeds = [{"x": np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)}]
    reference, candidate = run_model(model, feeds)[0][0], run_model(result.model, feeds)[0][0]
    assert np.linalg.norm(candidate - reference) / np.linalg.norm(reference) < 0.12


def correlated_feeds(count: int, seed: int, k: int = 128) -> list[dict]:
    """Activations like a transformer's: correlated channels, a few of them ten times larger."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).standard_normal((k, k)) * 0.3 + np.eye(k)
    scale = np.ones(k)
    scale[[3, 40, 77]] = 10.0
    return [{"x": ((rng.standard_normal((16, k)) @ mix) * scale).astype(np.float32)} for _ in range(count)]


def test_int4_with_calibration_data_rounds_by_gptq_and_beats_nearest_on_held_out_data(tmp_path):
    model = matmul_model(weight((128, 256)))
    calibration, held_out = correlated_feeds(12, seed=1), correlated_feeds(4, seed=2)
    gptq, report = quantize(model, calibration=calibration, mode="weights", weight_type="int4")
    nearest, plain = quantize(model, calibration=calibration, mode="weights", weight_type="int4",
                              weight_rounding="nearest")
    assert report["counts"]["weights_gptq"] == 1 and "weights_gptq" not in plain["counts"]
    assert report["details"]["gptq"]["samples"] == 12
    assert report["details"]["gptq"]["output_error_vs_nearest_median"] < 0.7
    assert ort_runs(gptq.model, tmp_path)["MatMulNBits"] == 1, "GPTQ output is an ordinary blocked tensor"
    reference = run_model(model, held_out)

    def error(candidate) -> float:
        got = run_model(candidate, held_out)
        return sum(float(np.linalg.norm(a[0] - b[0])) for a, b in zip(got, reference, strict=True))

    assert error(gptq.model) < 0.85 * error(nearest.model)  # norms: 0.79 here, MSE 0.63
    again, _ = quantize(gptq.model, calibration=calibration, mode="weights", weight_type="int4")
    assert again.modified is False


def test_gptq_act_order_option_reaches_the_rounding_and_the_report(monkeypatch):
    model = matmul_model(weight((128, 256)))
    calibration = correlated_feeds(12, seed=1)
    seen: list[bool] = []
    real = gptq_module.InverseFactor

    def spy(hessian, damping, *, act_order):
        seen.append(act_order)
        return real(hessian, damping, act_order=act_order)

    monkeypatch.setattr(gptq_module, "InverseFactor", spy)
    ordered, report = quantize(model, calibration=calibration, mode="weights", weight_type="int4")
    natural, plain = quantize(model, calibration=calibration, mode="weights", weight_type="int4",
                              gptq_act_order=False)
    assert seen == [True, False]
    assert report["details"]["gptq"]["act_order"] is True and plain["details"]["gptq"]["act_order"] is False
    integers = [{name: numpy_helper.to_array(t).tobytes() for name, t in initializers(result.model).items()}
                for result in (ordered, natural)]
    assert integers[0].keys() == integers[1].keys() and integers[0] != integers[1]


def test_gptq_measures_inputs_in_several_passes_when_their_hessians_exceed_the_budget(monkeypatch):
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
                              [numpy_helper.from_array(weight((128, 128)), "W1"),
                               numpy_helper.from_array(weight((128, 64), seed=1), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    calibration = correlated_feeds(6, seed=1)
    one_pass, report = quantize(model, calibration=calibration, mode="weights", weight_type="int4")
    assert report["details"]["gptq"]["calibration_passes"] == 1 and report["counts"]["weights_gptq"] == 2
    monkeypatch.setattr(gptq_module, "HESSIAN_BUDGET_BYTES", 8 * 128 * 128)  # one 128 x 128 X^T X at a time
    two_passes, report = quantize(model, calibration=calibration, mode="weights", weight_type="int4")
    assert report["details"]["gptq"]["calibration_passes"] == 2 and report["counts"]["weights_gptq"] == 2
    assert two_passes.model.SerializeToString() == one_pass.model.SerializeToString()


def test_gptq_asked_for_without_calibration_data_says_what_is_missing():
    with pytest.raises(PassError, match="calibration data"):
        quantize(matmul_model(weight((64, 32))), mode="weights", weight_type="int4", weight_rounding="gptq")


def test_4bit_table_folded_at_load_keeps_its_block_scales_in_float16():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((300, 64)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["y"], name="embed")], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 64])],
                              [numpy_helper.from_array(table, "E")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result, report = quantize(model, mode="weights", weight_type="int4")
    stored = initializers(result.model)
    halves = [t for t in stored.values() if t.data_type == TensorProto.FLOAT16]
    assert len(halves) == 1 and numpy_helper.to_array(halves[0]).size == 300 * 64 // 32
    assert "float32" not in report["details"]["bytes_by_dtype_after"], report["details"]["bytes_by_dtype_after"]
    feeds = [{"ids": np.array([0, 7, 299, 150, 7], np.int64)}]
    got = run_model(result.model, feeds)[0][0]
    step = (table.max(axis=1, keepdims=True) - table.min(axis=1, keepdims=True)) / 15
    assert np.all(np.abs(got - table[feeds[0]["ids"]]) <= 0.51 * step[feeds[0]["ids"]] + 1e-3)


def test_zeros_stay_exactly_zero_symmetric_and_asymmetric():
    w = weight((64, 32)) + 0.05
    w[::3] = 0.0
    for symmetric, weight_type in ((True, "int8"), (False, "uint8")):
        result, _ = quantize(matmul_model(w), mode="weights", weight_type=weight_type, symmetric_weights=symmetric)
        restored = run_unoptimized(result.model, {"x": np.eye(64, dtype=np.float32)})
        assert np.all(restored[w == 0] == 0.0)
        assert np.count_nonzero(restored[np.abs(w) > 0.01]) == np.count_nonzero(np.abs(w) > 0.01)


def test_shared_weight_in_main_graph_and_if_branches_is_quantized_once():
    model = load_model(MODELS_DIR / "if_subgraph.onnx")
    result, _ = quantize(model, mode="weights", weight_only_form="dequantize_linear")
    stored = initializers(result.model)
    assert [name for name in stored if name.startswith("shared.weight")] == [
        "shared.weight_quantized", "shared.weight_scale"]
    assert [t.name for t in result.model.graph.initializer if t.name == "shared.weight_quantized"]
    readers = [n for n in nodes(result.model) if "shared.weight_quantized" in n.input]
    assert [n.op_type for n in readers] == ["DequantizeLinear"]
    users = [n for n in nodes(result.model) if "shared.weight" in n.input]
    assert len(users) == 3 and len({n.op_type for n in users}) == 1
    feeds = seeded_feeds(model, count=4)
    assert max_abs_error(model, result.model, feeds) <= 0.05


def test_constant_node_weights_are_quantized_and_a_shared_one_once():
    model = load_model(MODELS_DIR / "constant_weights.onnx")
    result, report = quantize(model, mode="weights", min_weight_elements=0)
    float_constants = [n for n in result.model.graph.node if n.op_type == "Constant"
                       and numpy_helper.to_array(n.attribute[0].t).dtype == np.float32
                       and numpy_helper.to_array(n.attribute[0].t).size > 16]
    assert float_constants == []
    assert report["counts"]["weights_int8"] == 3  # conv2d_0.w_0, conv2d_1.w_0 (two Convs), fc_0.w_0
    integer = [n for n in initializers(result.model) if n.endswith("_quantized")]
    assert sorted(integer) == sorted(set(integer)) and "conv2d_1.w_0_quantized" in integer
    assert list(result.model.metadata_props) == list(model.metadata_props)
    assert max_abs_error(model, result.model, seeded_feeds(model)) <= 0.05


def test_report_gives_bytes_by_dtype_and_warns_about_float_weights_left():
    model = load_model(MODELS_DIR / "mlp.onnx")
    float_bytes = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    weight_elements = sum(numpy_helper.to_array(t).size for t in model.graph.initializer if len(t.dims) == 2)
    _, report = quantize(model, mode="weights")
    details = report["details"]
    assert details["bytes_by_dtype_before"] == {"float32": float_bytes}
    assert details["bytes_by_dtype_after"]["int8"] == weight_elements
    assert report["saved_bytes"] == details["bytes_before"] - details["bytes_after"] > 0
    assert "warnings" not in details
    _, excluded = quantize(model, mode="weights", exclude_op_types=("Gemm",))
    assert "still stored as float" in excluded["details"]["warnings"][0]


def test_exclusions_by_name_glob_regex_op_type_and_position():
    model = load_model(MODELS_DIR / "mlp.onnx")
    names = [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(names) == 3

    def kept_float(**options):
        _, report = quantize(model, mode="weights", **options)
        return sorted(s["node"] for s in report["skipped"] if "node" in s), report

    skipped, report = kept_float(exclude_nodes=(names[0],))
    assert skipped == [names[0]] and "exclude_nodes" in report["skipped"][0]["reason"]
    assert kept_float(exclude_nodes=("re:" + names[1][-3:] + "$",))[0] == [names[1]]
    skipped, report = kept_float(exclude_op_types=("MatMul",))
    assert len(skipped) == 1 and "exclude_op_types" in report["skipped"][0]["reason"]
    assert kept_float(exclude_first=1, exclude_last=1)[0] == sorted([names[0], names[2]])


@pytest.mark.parametrize("mode,weight_type", [("weights", "int8"), ("dynamic", "int8"), ("weights", "int4")])
def test_second_run_changes_nothing_and_says_already_quantized(mode, weight_type):
    """int4 too: its float16 scales behind a Cast are quantization parameters, not weights to report."""
    model = load_model(MODELS_DIR / "transformer_tied.onnx")
    first, _ = quantize(model, mode=mode, weight_type=weight_type)
    again, report = quantize(first.model, mode=mode, weight_type=weight_type)
    assert again.modified is False
    assert report["skipped"] and all("already" in s["reason"] or "min_weight_elements" in s["reason"]
                                      or "run time" in s["reason"] or "not a weight input" in s["reason"]
                                      for s in report["skipped"])
    assert again.model.SerializeToString(deterministic=True) == first.model.SerializeToString(deterministic=True)


# ---------------------------------------------------------------- dynamic mode

def test_dynamic_matmul_uses_the_pattern_onnxruntime_fuses(tmp_path):
    model = matmul_model(weight((128, 96)))
    result, report = quantize(model, mode="dynamic", dynamic_min_k=0)
    assert sorted(n.op_type for n in result.model.graph.node) == sorted(
        ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul"])
    assert report["counts"]["matmul_dynamic"] == 1
    assert initializers(result.model)["W_quantized"].data_type == TensorProto.INT8
    assert ort_runs(result.model, tmp_path)["DynamicQuantizeMatMul"] == 1
    feeds = [{"x": np.random.default_rng(2).standard_normal((8, 128)).astype(np.float32)}]
    reference = run_model(model, feeds)[0][0]
    assert max_abs_error(model, result.model, feeds) <= 0.02 * np.abs(reference).max()


def test_dynamic_keeps_gelu_fed_matmul_weight_only_without_calibration(tmp_path):
    model = matmul_model(weight((64, 32)), gelu=True)
    _, report = quantize(model, mode="dynamic", dynamic_min_k=0)
    assert report["counts"].get("matmul_dynamic", 0) == 0
    assert "GELU" in report["details"]["weight_only_matmuls"][0]["reason"]
    feeds = [{"x": np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)}]
    _, calibrated = quantize(model, calibration=feeds, mode="dynamic", dynamic_min_k=0)
    assert calibrated["counts"]["matmul_dynamic"] == 1


def test_dynamic_splits_outlier_channels_measured_on_calibration_data():
    model = matmul_model(weight((64, 32)))
    rng = np.random.default_rng(4)

    def sample():
        x = rng.standard_normal((16, 64)).astype(np.float32)
        x[:, 5] *= 60.0
        return {"x": x}
    calibration, evaluation = [sample() for _ in range(4)], [sample() for _ in range(2)]
    split, report = quantize(model, calibration=calibration, mode="dynamic", dynamic_min_k=0)
    assert report["details"]["outlier_channels"] == {"x": [5]}
    plain, _ = quantize(model, calibration=calibration, mode="dynamic", dynamic_min_k=0, outlier_channels=0)
    assert max_abs_error(model, split.model, evaluation) < 0.5 * max_abs_error(model, plain.model, evaluation)


def test_outlier_split_adds_the_bias_first_so_onnxruntime_fuses_it(tmp_path):
    w, bias = weight((64, 32)), weight((32,), seed=3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"), helper.make_node("Add", ["h", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal((16, 64)).astype(np.float32) * np.where(np.arange(64) == 5, 60.0, 1.0)
              .astype(np.float32)} for _ in range(6)]
    result, report = quantize(model, calibration=feeds[:4], mode="dynamic", dynamic_min_k=0)
    assert report["details"]["outlier_channels"] == {"x": [5]}
    ran = ort_runs(result.model, tmp_path)
    assert ran["DynamicQuantizeMatMul"] == 1 and ran["Add"] == 1, ran
    fused = next(n for n in onnx.load(tmp_path / "model.ort-optimized.onnx").graph.node
                 if n.op_type == "DynamicQuantizeMatMul")
    assert len(fused.input) == 5 and fused.input[4] == "b", "the bias is folded into the integer MatMul"
    assert ran["Mul"] >= 2 and "MatMul" not in ran  # inlier mask, and the one-channel outer product
    reference = run_model(model, feeds[4:])
    assert max_abs_error(model, result.model, feeds[4:]) < 0.02 * max(np.abs(r[0]).max() for r in reference)


def test_dynamic_shares_one_integer_weight_across_if_branches():
    model = load_model(MODELS_DIR / "if_subgraph.onnx")
    result, report = quantize(model, mode="dynamic", dynamic_min_k=0)
    assert report["counts"]["matmul_dynamic"] == 3
    readers = [n for n in nodes(result.model) if "shared.weight_quantized" in n.input]
    assert [n.op_type for n in readers] == ["MatMulInteger"] * 3
    assert list(initializers(result.model)).count("shared.weight_quantized") == 1
    assert max_abs_error(model, result.model, seeded_feeds(model, count=4)) <= 0.05


def test_dynamic_leaves_small_matmuls_weight_only_because_they_would_run_slower(tmp_path):
    model = matmul_model(weight((120, 120)))
    result, report = quantize(model, mode="dynamic")
    assert "matmul_dynamic" not in report["counts"]
    assert "dynamic_min_k" in report["details"]["weight_only_matmuls"][0]["reason"]
    assert ort_runs(result.model, tmp_path) == Counter({"MatMul": 1})


# ---------------------------------------------------------------- options

@pytest.mark.parametrize("options,message", [
    ({"block_size": 24}, "block_size"),
    ({"op_types": ("Conv", "Softmax")}, "op_types"),
    ({"mode": "static", "weight_type": "int4"}, "static"),
    ({"exclude_first": -1}, "exclude_first"),
    ({"mode": "fast"}, "mode"),
    ({"exclude_nodes": ("re:(",)}, "regular expression"),
    ({"mode": "dynamic", "weight_rounding": "gptq"}, "weight_rounding"),
    ({"calibration_samples": -1}, "calibration_samples"),
])
def test_bad_options_name_the_option(options, message):
    with pytest.raises(OptionError, match=message):
        create_pass("quantize", **options)


def _power_spectrum_model(path, rng) -> None:
    """|x|^2 -> MatMul (K=256) -> log(1 + .): the MatMul's input spans many orders of magnitude, like
    the power spectrum of a log-mel front end (~[0, 2.6e12]); the log makes the small values count."""
    weight = np.abs(rng.standard_normal((256, 64)) * 0.1).astype(np.float32)  # a filterbank: non-negative
    nodes = [helper.make_node("Mul", ["x", "x"], ["power"]),
             helper.make_node("MatMul", ["power", "W"], ["mel"], name="mel"),
             helper.make_node("Add", ["mel", "one"], ["shifted"]), helper.make_node("Log", ["shifted"], ["logmel"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 256])],
                              [helper.make_tensor_value_info("logmel", TensorProto.FLOAT, [1, 16, 64])],
                              [numpy_helper.from_array(weight, "W"),
                               numpy_helper.from_array(np.ones(1, np.float32), "one")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def test_default_int8_keeps_a_matmul_float_when_calibration_sees_a_hopeless_range(tmp_path, monkeypatch, capsys):
    """The default mode ignored the calibration ranges and broke the mel model (cosine 0.956);
    static mode kept that MatMul float. Both now apply the same rule."""
    rng = np.random.default_rng(0)
    source = tmp_path / "mel.onnx"
    _power_spectrum_model(source, rng)
    for folder in ("cal", "data"):
        (tmp_path / folder).mkdir()
        for index in range(4):
            spectrum = np.exp(rng.normal(0.0, 3.0, (1, 16, 256))).astype(np.float32) * 1e3
            np.savez(tmp_path / folder / f"{index}.npz", x=spectrum)
    args = ["optimize", str(source), "-o", str(tmp_path / "q.onnx"), "--quantize", "int8", "--validate", "--quiet",
            "--quantize-mode", "dynamic", "--calibration-data", str(tmp_path / "cal"), "--data", str(tmp_path / "data"),
            "--report", str(tmp_path / "r.json")]  # dynamic: the former default (now auto, which measures it)
    assert main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    skipped = report["passes"][-1]["report"]["skipped"]
    assert any(s.get("tensor") == "power" and "activation range up to" in s["reason"] for s in skipped)
    monkeypatch.setattr("passes.quantize.common.MAX_ACTIVATION_ABS", math.inf)  # the rules off: as before
    monkeypatch.setattr("passes.quantize.common.MAX_CHANNEL_SPREAD", math.inf)
    assert main(args) == 1


def test_default_int8_keeps_a_matmul_float_when_its_channels_spread_past_8_bits(monkeypatch):
    """The dynamic range, not only the range: channels whose |max| runs from 1e-4 to 100 (peak well
    under the range limit, far more wide channels than the outlier split takes) leave the median
    channel within one 8-bit step. The MatMul keeps a float activation and an int8 weight."""
    rng = np.random.default_rng(0)
    scales = np.geomspace(1e-4, 100.0, 256).astype(np.float32)
    model = matmul_model(weight((256, 64)))
    calibration = [{"x": (rng.standard_normal((16, 256)) * scales).astype(np.float32)} for _ in range(4)]
    held_out = [{"x": (rng.standard_normal((16, 256)) * scales).astype(np.float32)} for _ in range(4)]
    kept, report = quantize(model, calibration=calibration, mode="dynamic")
    assert any("channel ranges spread" in s["reason"] for s in report["skipped"])
    assert Counter(n.op_type for n in kept.model.graph.node)["DynamicQuantizeLinear"] == 0
    assert initializers(kept.model)["W_quantized"].data_type == TensorProto.INT8
    monkeypatch.setattr("passes.quantize.common.MAX_CHANNEL_SPREAD", math.inf)  # the rule off
    dynamic, _ = quantize(model, calibration=calibration, mode="dynamic")
    assert Counter(n.op_type for n in dynamic.model.graph.node)["DynamicQuantizeLinear"] == 1
    reference = np.concatenate([r[0] for r in run_model(model, held_out)])
    errors = [max_abs_error(model, m.model, held_out) / np.abs(reference).max() for m in (kept, dynamic)]
    assert errors[0] < errors[1], errors  # 0.009 vs 0.017 of the output range


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "weights", "weight_type": "int4"},
        {"mode": "dynamic", "dynamic_min_k": 0},
        {"mode": "static"},
    ],
)
def test_int8_weight_only_nodes_is_the_next_best_format_in_every_mode(options):
    """The accuracy budget's first back-off step: named nodes keep an int8 weight-only weight and a
    float activation (no 4-bit blocks, no run-time or static activation quantization)."""
    model = matmul_model(weight((128, 96)))
    calibration = [{"x": np.random.default_rng(i).standard_normal((4, 128)).astype(np.float32)} for i in range(4)]
    plain, _ = quantize(model, calibration=calibration, **options)
    named, report = quantize(model, calibration=calibration, int8_weight_only_nodes=("fc",), **options)
    ops = Counter(n.op_type for n in named.model.graph.node)
    assert ops["DynamicQuantizeLinear"] == ops["QuantizeLinear"] == ops["MatMulInteger"] == 0
    assert initializers(named.model)["W_quantized"].data_type == TensorProto.INT8
    assert report["counts"]["weights_int8"] == 1 and named.model.SerializeToString() != plain.model.SerializeToString()
    reference = np.concatenate([r[0] for r in run_model(model, calibration)])
    assert max_abs_error(model, named.model, calibration) <= 0.02 * np.abs(reference).max()
    other, _ = quantize(model, calibration=calibration, int8_weight_only_nodes=("fc2",), **options)
    assert other.model.SerializeToString() == plain.model.SerializeToString()


def test_fine_block_nodes_take_blocks_of_32_whatever_block_size(tmp_path):
    """The bits budget's first step up: a named node's 4-bit weight gets finer blocks (more scales,
    less error), the others keep block_size; a tied weight read by a named head gets them everywhere."""
    model = matmul_model(weight((256, 64)))
    wide, _ = quantize(model, mode="weights", weight_type="int4", block_size=128)
    fine, _ = quantize(model, mode="weights", weight_type="int4", block_size=128, fine_block_nodes=("fc",))
    blocks = [{a.name: a.i for a in n.attribute}["block_size"] for n in fine.model.graph.node
              if n.op_type == "DequantizeLinear"]
    assert blocks == [32] and ort_runs(fine.model, tmp_path)["MatMulNBits"] == 1
    feeds = [{"x": np.random.default_rng(2).standard_normal((8, 256)).astype(np.float32)}]
    assert max_abs_error(model, fine.model, feeds) < max_abs_error(model, wide.model, feeds)
    other, _ = quantize(model, mode="weights", weight_type="int4", block_size=128, fine_block_nodes=("fc2",))
    assert other.model.SerializeToString() == wide.model.SerializeToString()
    small, _ = quantize(model, mode="weights", weight_type="int4", block_size=16, fine_block_nodes=("fc",))
    assert [{a.name: a.i for a in n.attribute}["block_size"] for n in small.model.graph.node
            if n.op_type == "DequantizeLinear"] == [16]  # never coarser than asked


def normed_model(opset: int = 17, tied: bool = False, also_read: bool = False) -> onnx.ModelProto:
    """x -> LayerNormalization(gamma, beta) -> two MatMuls (q, k) -> outputs; gamma makes a few input
    channels of the MatMuls 20x larger than the rest (the activations AWQ protects)."""
    rng = np.random.default_rng(4)
    gamma = np.ones(128, np.float32)
    gamma[[5, 40, 99]] = 20.0
    beta = (rng.standard_normal(128) * 0.1).astype(np.float32)
    wq, wk = weight((128, 64), seed=1), weight((128, 64), seed=2)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="norm", axis=-1),
        helper.make_node("MatMul", ["n", "Wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["n", "Wk"], ["k"], name="k_proj"),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 64]) for name in ("q", "k")]
    if also_read:
        nodes.append(helper.make_node("ReduceSum", ["n"], ["total"], name="n_sum", keepdims=0))
        outputs.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, []))
    if tied:
        nodes.append(helper.make_node("ReduceSum", ["Wk"], ["wsum"], name="wk_sum", keepdims=0))
        outputs.append(helper.make_tensor_value_info("wsum", TensorProto.FLOAT, []))
    graph = helper.make_graph(
        nodes, "normed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 128])], outputs,
        [numpy_helper.from_array(v, n) for v, n in ((gamma, "gamma"), (beta, "beta"), (wq, "Wq"), (wk, "Wk"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_awq_scales_fold_into_the_norm_and_beat_nearest_on_held_out_data(tmp_path):
    model = normed_model()
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((32, 128)).astype(np.float32)} for _ in range(6)]
    held_out = [{"x": rng.standard_normal((32, 128)).astype(np.float32)} for _ in range(4)]
    nearest, _ = quantize(model, mode="weights", weight_type="int4", weight_rounding="nearest")
    awq, report = quantize(model, calibration=calibration, mode="weights", weight_type="int4", weight_rounding="awq")
    group = report["details"]["awq"]["groups"]["n"]
    assert report["counts"]["awq_groups_scaled"] == 1 and group["alpha"] > 0
    assert group["output_error_vs_nearest"] < 0.9
    assert ort_runs(awq.model, tmp_path)["MatMulNBits"] == 2  # still two 4-bit MatMuls, nothing added
    errors = [max_abs_error(model, m.model, held_out) for m in (awq, nearest)]
    assert errors[0] < errors[1]
    stored = initializers(awq.model)
    gamma = numpy_helper.to_array(stored["gamma"])
    assert gamma[5] < 20.0 and gamma[0] != 1.0  # the scales went into the norm
    again, second = quantize(awq.model, calibration=calibration, mode="weights", weight_type="int4",
                             weight_rounding="awq")
    assert again.model.SerializeToString() == awq.model.SerializeToString() and "awq" not in second["details"]
    rerun, _ = quantize(model, calibration=calibration, mode="weights", weight_type="int4", weight_rounding="awq")
    assert rerun.model.SerializeToString() == awq.model.SerializeToString()


@pytest.mark.parametrize(("kind", "reason"), [("also_read", "also read by nodes"), ("tied", "also read elsewhere")])
def test_awq_leaves_a_group_whose_scales_would_change_another_reader(kind, reason):
    model = normed_model(**{kind: True})
    calibration = [{"x": np.random.default_rng(i).standard_normal((32, 128)).astype(np.float32)} for i in range(4)]
    result, report = quantize(model, calibration=calibration, mode="weights", weight_type="int4", weight_rounding="awq")
    assert reason in report["details"]["awq"]["skipped"]["n"]
    assert "awq_groups_scaled" not in report["counts"]
    stored = initializers(result.model)
    assert numpy_helper.to_array(stored["gamma"])[5] == 20.0
    if kind == "also_read":  # the norm's other reader sees exactly what it saw
        want = run_model(model, calibration)
        got = run_model(result.model, calibration)
        assert all(np.array_equal(w[2], g[2]) for w, g in zip(want, got, strict=True))


def test_awq_without_calibration_data_says_what_is_missing():
    with pytest.raises(PassError, match="weight_rounding='awq' needs calibration data"):
        quantize(normed_model(), mode="weights", weight_type="int4", weight_rounding="awq")
