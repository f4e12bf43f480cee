import json
import math

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.calibration.feeds import generate_feeds, model_input_specs
from optimizer.errors import FeedError, OptionError, RuntimeSessionError
from optimizer.verify.runtime import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    create_session,
    resolve_provider,
    run_session,
)
from optimizer.verify.validate import Tolerance, compare

RNG = np.random.Generator(np.random.PCG64(0))
WEIGHT = RNG.standard_normal((4, 5)).astype(np.float32)
SCALE = RNG.standard_normal((4,)).astype(np.float32)


def make_model(nodes, outputs, initializers, inputs=None) -> onnx.ModelProto:
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])]
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        outputs,
        [numpy_helper.from_array(array, name) for name, array in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def two_output_model(weight=WEIGHT, scale=SCALE) -> onnx.ModelProto:
    """``logits`` = x @ W (class-like), ``scaled`` = sum(x * s) over the last axis (rank 1)."""
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["logits"]),
            helper.make_node("Mul", ["x", "s"], ["xs"]),
            helper.make_node("ReduceSum", ["xs", "axes"], ["scaled"], keepdims=0),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5]),
            helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["batch"]),
        ],
        {"w": weight, "s": scale, "axes": np.array([-1], dtype=np.int64)},
    )


def argmax_model(weight=WEIGHT) -> onnx.ModelProto:
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("ArgMax", ["y"], ["label"], axis=-1, keepdims=0),
        ],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])],
        {"w": weight},
    )


def unary_model(op: str, factor: float = 1.0) -> onnx.ModelProto:
    """``y = op(x * factor)``."""
    return make_model(
        [helper.make_node("Mul", ["x", "f"], ["xf"]), helper.make_node(op, ["xf"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        {"f": np.array(factor, dtype=np.float32)},
    )


def feeds_for(model, count=3, batch=6, seed=0):
    return generate_feeds(
        model_input_specs(model), count=count, seed=seed, shapes={"x": (batch, 4)}
    )


def test_identical_models_pass_exactly():
    model = two_output_model()
    result = compare(model, model.SerializeToString(), feeds_for(model))
    assert result.passed and result.samples == 3
    for metrics in result.outputs:
        assert metrics.exact and metrics.passed and metrics.failures == []
        assert metrics.max_abs == 0.0 and metrics.cosine == 1.0 and metrics.sqnr_db == math.inf
    assert [metrics.name for metrics in result.outputs] == ["logits", "scaled"]
    assert result.outputs[0].top1_agreement == 1.0
    assert result.outputs[0].shape == (6, 5) and result.outputs[0].dtype == "float32"
    assert result.worst_output == "logits"
    assert result.summary().splitlines()[-1] == "PASS"
    assert result.provider_used == CPU_PROVIDER and result.provider_note is None


def test_perturbed_weight_fails_and_names_the_worst_output():
    reference = two_output_model()
    candidate = two_output_model(weight=WEIGHT + np.float32(0.01))
    result = compare(reference, candidate, feeds_for(reference))
    logits, scaled = result.outputs
    assert not result.passed and result.worst_output == "logits"
    assert not logits.passed and scaled.passed and scaled.exact
    assert logits.failures == [f"max_abs {logits.max_abs:.3g} > 1e-06"]
    assert logits.violation_ratio == pytest.approx(logits.max_abs / 1e-6)
    assert 0.0 < logits.sqnr_db < 60.0 and 0.99 < logits.cosine < 1.0
    last_line = result.summary().splitlines()[-1]
    assert last_line == f"FAIL: worst output 'logits' (max_abs {logits.max_abs:.3g} > 1e-06)"
    assert "FAIL" in result.summary().splitlines()[2]


def test_worst_output_is_the_largest_violation():
    reference = two_output_model()
    candidate = two_output_model(weight=WEIGHT + np.float32(1e-4), scale=SCALE + np.float32(0.5))
    result = compare(reference, candidate, feeds_for(reference))
    assert [metrics.passed for metrics in result.outputs] == [False, False]
    assert result.worst_output == "scaled"


def test_per_output_tolerance_and_default_key():
    reference = two_output_model()
    candidate = two_output_model(scale=SCALE * np.float32(1.001))
    feeds = feeds_for(reference)
    assert not compare(reference, candidate, feeds).passed
    loose = {"scaled": Tolerance(max_abs=0.1, min_sqnr_db=30.0), "*": Tolerance(max_abs=0.0)}
    result = compare(reference, candidate, feeds, tolerance=loose)
    assert result.passed
    assert result.tolerance["scaled"]["min_sqnr_db"] == 30.0
    assert result.tolerance["logits"]["max_abs"] == 0.0
    strict_sqnr = compare(
        reference, candidate, feeds, tolerance={"scaled": Tolerance(min_sqnr_db=80.0)}
    )
    (failure,) = strict_sqnr.outputs[1].failures
    assert failure.startswith("SQNR dB ") and failure.endswith(" < 80")


def test_unknown_tolerance_output_is_an_option_error():
    model = two_output_model()
    with pytest.raises(OptionError, match="unknown output\\(s\\) logit; outputs: logits, scaled"):
        compare(model, model, feeds_for(model), tolerance={"logit": Tolerance(max_abs=1.0)})


def test_bad_tolerance_values():
    with pytest.raises(OptionError, match="max_abs must be >= 0"):
        Tolerance(max_abs=-1.0)
    with pytest.raises(OptionError, match="min_top1 must be in \\[0, 1\\]"):
        Tolerance(min_top1=2.0)
    with pytest.raises(OptionError, match="min_cosine must be a number"):
        Tolerance(min_cosine=float("nan"))


def test_top1_agreement_matches_numpy():
    permuted = WEIGHT[:, [1, 0, 2, 3, 4]]
    reference, candidate = two_output_model(), two_output_model(weight=permuted)
    feeds = feeds_for(reference, count=4, batch=50)
    result = compare(reference, candidate, feeds, tolerance={"*": Tolerance(min_top1=1.0)})
    x = np.concatenate([feed["x"] for feed in feeds])
    expected = np.mean(np.argmax(x @ WEIGHT, axis=-1) == np.argmax(x @ permuted, axis=-1))
    logits, scaled = result.outputs
    assert 0.0 < expected < 1.0
    assert logits.top1_agreement == pytest.approx(expected, abs=1e-12)
    assert scaled.top1_agreement is None and scaled.passed
    assert logits.failures == [f"top-1 agreement {expected:.3g} < 1"]


def test_min_top1_on_a_non_class_output_is_refused():
    model = two_output_model()
    with pytest.raises(
        OptionError, match="min_top1 set for output 'scaled', which is not class-like"
    ):
        compare(model, model, feeds_for(model), tolerance={"scaled": Tolerance(min_top1=0.9)})


def test_int_outputs_are_compared_exactly():
    reference = argmax_model()
    candidate = argmax_model(weight=WEIGHT[:, [1, 0, 2, 3, 4]])
    feeds = feeds_for(reference, batch=40)
    same = compare(reference, argmax_model(), feeds, tolerance=Tolerance())
    assert same.passed and same.outputs[0].exact and same.outputs[0].top1_agreement is None
    result = compare(reference, candidate, feeds, tolerance=Tolerance(max_abs=100.0))
    (label,) = result.outputs
    x = np.concatenate([feed["x"] for feed in feeds])
    differ = np.count_nonzero(
        np.argmax(x @ WEIGHT, -1) != np.argmax(x @ WEIGHT[:, [1, 0, 2, 3, 4]], -1)
    )
    assert differ > 0
    assert label.failures == [f"{differ} of 120 elements differ (int64 compared exactly)"]
    assert label.dtype == "int64" and not result.passed


def nan_feed():
    return [{"x": np.array([[-1.0, 4.0, -9.0, 16.0]], dtype=np.float32)}]


def test_nan_at_the_same_position_counts_as_equal():
    result = compare(
        unary_model("Sqrt"),
        unary_model("Sqrt", factor=1.0001),
        nan_feed(),
        tolerance=Tolerance(max_abs=1e-3),
    )
    (y,) = result.outputs
    assert y.passed and y.nonfinite_mismatches == 0 and 0 < y.max_abs < 1e-3
    same = compare(unary_model("Sqrt"), unary_model("Sqrt"), nan_feed())
    assert same.passed and same.outputs[0].exact and same.outputs[0].sqnr_db == math.inf


def test_nan_in_candidate_only_fails():
    reference = make_model(
        [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Sqrt", ["a"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        {},
    )
    result = compare(reference, unary_model("Sqrt"), nan_feed(), tolerance=Tolerance(max_abs=1.0))
    (y,) = result.outputs
    assert not y.passed and y.nonfinite_mismatches == 2
    assert y.failures == ["2 NaN/Inf value(s) in one model but not the other"]
    assert y.max_abs == 0.0
    assert result.summary().splitlines()[-1].startswith("FAIL: worst output 'y' (2 NaN/Inf")


def test_streaming_metrics_equal_metrics_on_the_concatenation():
    reference = two_output_model()
    candidate = two_output_model(
        weight=WEIGHT + RNG.standard_normal(WEIGHT.shape).astype(np.float32) * 0.05
    )
    specs = model_input_specs(reference)
    feeds = [
        generate_feeds(specs, count=1, seed=seed, shapes={"x": (batch, 4)})[0]
        for seed, batch in enumerate([3, 7, 1, 12, 5])
    ]
    result = compare(reference, candidate, feeds, tolerance=Tolerance())
    sessions = [
        create_session(model, resolve_provider("cpu"))[0] for model in (reference, candidate)
    ]
    ref, cand = (
        np.concatenate([run_session(session, feed, label="m")["logits"] for feed in feeds])
        .astype(np.float64)
        .ravel()
        for session in sessions
    )
    diff = np.abs(ref - cand)
    logits = result.outputs[0]
    assert logits.max_abs == diff.max()
    assert logits.mean_abs == pytest.approx(diff.mean(), rel=1e-12)
    assert logits.max_rel == diff.max() / np.abs(ref).max()
    cosine = ref @ cand / (np.linalg.norm(ref) * np.linalg.norm(cand))
    assert logits.cosine == pytest.approx(cosine, rel=1e-12)
    assert logits.sqnr_db == pytest.approx(
        10 * np.log10(np.sum(ref**2) / np.sum(diff**2)), rel=1e-12
    )
    assert logits.shape == (None, 5) and result.samples == 5


def test_all_zero_outputs_have_cosine_one():
    zero = unary_model("Abs", factor=0.0)
    result = compare(
        zero, zero, feeds_for(zero), tolerance=Tolerance(min_cosine=1.0, min_sqnr_db=100.0)
    )
    assert result.passed and result.outputs[0].cosine == 1.0


def test_to_dict_is_strict_json():
    model = two_output_model()
    result = compare(
        model,
        two_output_model(weight=WEIGHT * 2),
        feeds_for(model),
        tolerance={"scaled": Tolerance()},
    )
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["outputs"][1]["sqnr_db"] == "inf"
    assert data["outputs"][1]["shape"] == [6]
    assert data["worst_output"] == "logits" and data["passed"] is False
    assert data["tolerance"]["logits"] == {
        "max_abs": 1e-6,
        "max_rel": None,
        "min_cosine": None,
        "min_sqnr_db": None,
        "min_top1": None,
        "by_kind": False,
    }


def test_different_output_names_are_refused():
    with pytest.raises(
        RuntimeSessionError, match="outputs only in reference: logits, scaled; only in candidate: y"
    ):
        compare(two_output_model(), unary_model("Abs"), feeds_for(two_output_model()))


def test_different_output_shapes_are_refused():
    wide = make_model(
        [helper.make_node("Concat", ["x", "x"], ["y"], axis=-1)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        {},
    )
    with pytest.raises(
        RuntimeSessionError,
        match="sample 0: output 'y' has shape \\(6, 4\\) in the reference but \\(6, 8\\)",
    ):
        compare(unary_model("Abs"), wide, feeds_for(wide))


def test_candidate_without_an_unused_input_runs_on_reference_feeds():
    extra = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
        helper.make_tensor_value_info("unused", TensorProto.INT64, [1]),
    ]
    reference = make_model(
        [helper.make_node("Abs", ["x"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        {},
        extra,
    )
    feeds = generate_feeds(model_input_specs(reference), count=2)
    assert compare(reference, unary_model("Abs"), feeds).passed


def test_feed_errors_and_empty_feeds():
    model = unary_model("Abs")
    with pytest.raises(FeedError, match="sample 0, input 'x': dtype float64"):
        compare(model, model, [{"x": np.zeros((1, 4))}])
    with pytest.raises(FeedError, match="no feeds given"):
        compare(model, model, iter([]))


@pytest.mark.skipif(
    CUDA_PROVIDER in onnxruntime.get_available_providers(), reason="has CUDA"
)
def test_cuda_request_reports_the_fallback():
    model = unary_model("Abs")
    result = compare(model, model, feeds_for(model, count=1), provider="cuda")
    assert result.provider_requested == "cuda" and result.provider_used == CPU_PROVIDER
    assert "falling back to CPU" in result.provider_note
    assert result.summary().splitlines()[1].startswith("note: CUDA requested")


def test_float16_candidate_is_compared_in_float64():
    reference = unary_model("Abs")
    half = make_model(
        [
            helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
            helper.make_node("Abs", ["h"], ["y"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 4])],
        {},
    )
    result = compare(
        reference, half, feeds_for(reference), tolerance=Tolerance(max_rel=1e-3, min_sqnr_db=50.0)
    )
    (y,) = result.outputs
    assert result.passed and not y.exact and 0 < y.max_abs < 1e-2
    assert y.dtype == "float32 vs float16"


def test_max_rel_is_the_error_relative_to_the_output_scale_as_rtol_says():
    """--rtol's help says max|a-b| / max|a|: an output crossing zero must not report 9e+05."""
    reference = unary_model("Identity")
    shifted = make_model(
        [helper.make_node("Add", ["x", "eps"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        {"eps": np.full((1,), 1e-3, np.float32)},
    )
    feeds = [{"x": np.array([[100.0, -50.0, 1e-9, 0.0]], np.float32)}]
    result = compare(reference, shifted, feeds, tolerance=Tolerance(max_rel=1e-4))
    (y,) = result.outputs
    assert y.max_rel == pytest.approx(1e-3 / 100.0, rel=1e-3)
    assert result.passed
    assert not compare(reference, shifted, feeds, tolerance=Tolerance(max_rel=1e-6)).passed
