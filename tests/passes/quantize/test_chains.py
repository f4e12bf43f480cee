"""Weights that reach their reader through Slice/Squeeze/Transpose/Concat/... are quantized too."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.fileio.model import load_model
from tests.helpers.quantize_checks import initializers, quantize
from tests.helpers.runtime import run_model
from tests.helpers.samples import MODELS_DIR

RNG = np.random.default_rng(15)


def _voice_feeds(is_16k: bool) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3 if is_16k else 4)
    return [
        {"audio": rng.standard_normal((2, 1, 64)).astype(np.float32), "is_16k": np.asarray(is_16k)} for _ in range(3)
    ]


def _max_error(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> float:
    pairs = zip(run_model(reference, feeds), run_model(candidate, feeds), strict=True)
    return max(float(np.abs(a[0] - b[0]).max()) for a, b in pairs)


@pytest.mark.parametrize("mode", ["dynamic", "weights", "static"])
def test_voice_activity_stacks_sliced_into_both_branches_are_stored_int8(mode):
    model = load_model(MODELS_DIR / "voice_activity.onnx")
    calibration = _voice_feeds(True) + _voice_feeds(False) if mode == "static" else None
    result, report = quantize(model, calibration=calibration, mode=mode)
    stored = initializers(result.model)
    for stack in ("encoder.weight_stack", "lstm.W_stack", "lstm.R_stack"):
        assert stored[f"{stack}_quantized"].data_type == TensorProto.INT8
        assert stack not in stored
    assert len(result.model.SerializeToString()) <= 0.30 * len(model.SerializeToString())
    for is_16k in (True, False):  # both If branches agree with the original (probabilities)
        assert _max_error(model, result.model, _voice_feeds(is_16k)) < 5e-3
    notes = " ".join(report["details"]["notes"])
    assert "lstm.W_stack: reaches LSTM 'sr8.lstm', LSTM 'sr16.lstm' through data-movement ops" in notes
    bias = [s for s in report["skipped"] if s.get("tensor") == "lstm.B_stack"]
    assert bias and "LSTM 'sr8.lstm' input 3" in bias[0]["reason"]
    again, _ = quantize(result.model, calibration=calibration, mode=mode)
    assert again.modified is False
    rerun, _ = quantize(model, calibration=calibration, mode=mode)
    assert rerun.model.SerializeToString(deterministic=True) == result.model.SerializeToString(deterministic=True)


def _scale_shape(model: onnx.ModelProto, weight: str) -> tuple[int, ...]:
    return tuple(numpy_helper.to_array(initializers(model)[f"{weight}_scale_broadcast"]).shape)


def _model(nodes, inits, x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_per_channel_scales_follow_a_transpose_from_a_constant_node():
    """W stored [N=96, K=40] in a Constant node, transposed to [K, N] for MatMul: one scale per
    output channel means one per stored row."""
    w = RNG.standard_normal((96, 40)).astype(np.float32) * np.linspace(0.01, 1, 96, dtype=np.float32)[:, None]
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
        helper.make_node("Transpose", ["w"], ["wt"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm"),
    ]
    model = _model(nodes, [], [3, 40], [3, 96])
    result, report = quantize(model, mode="weights")
    assert _scale_shape(result.model, "w") == (96, 1)
    feeds = [{"x": RNG.standard_normal((3, 40)).astype(np.float32)}]
    reference = run_model(model, feeds)[0][0]
    assert _max_error(model, result.model, feeds) <= 0.01 * np.abs(reference).max()
    assert report["counts"]["weights_int8"] == 1


def test_concatenated_weights_each_get_scales_along_the_rows_they_give():
    a = RNG.standard_normal((20, 64)).astype(np.float32)
    b = RNG.standard_normal((12, 64)).astype(np.float32) * 10
    nodes = [
        helper.make_node("Concat", ["a", "b"], ["w"], name="cat", axis=0),
        helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm", transB=1),
    ]
    model = _model(nodes, [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b")], [2, 64], [2, 32])
    result, _ = quantize(model, mode="weights")
    assert _scale_shape(result.model, "a") == (20, 1) and _scale_shape(result.model, "b") == (12, 1)
    feeds = [{"x": RNG.standard_normal((2, 64)).astype(np.float32)}]
    assert _max_error(model, result.model, feeds) <= 0.01 * np.abs(run_model(model, feeds)[0][0]).max()


def test_chains_that_compute_or_depend_on_run_time_values_stay_float_with_their_reason():
    w = RNG.standard_normal((64, 64)).astype(np.float32)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Reshape", ["w", "shape"], ["w2"], name="reshape"),
        helper.make_node("MatMul", ["x", "w2"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "pos"], ["y"], name="add_pos"),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones((64, 64), np.float32), "pos")]
    model = _model(nodes, inits, [64, 64], [64, 64])
    result, report = quantize(model, mode="weights")
    assert result.modified is False
    reasons = {s["tensor"]: s["reason"] for s in report["skipped"] if "tensor" in s}
    assert "Reshape input 1 (shape) is computed at run time" in reasons["w"]
    assert "read by Add 'add_pos' input 1" in reasons["pos"]


def test_a_chain_into_an_excluded_node_stays_float_and_says_so():
    w = RNG.standard_normal((64, 32)).astype(np.float32)
    nodes = [
        helper.make_node("Identity", ["w"], ["w2"], name="same"),
        helper.make_node("MatMul", ["x", "w2"], ["y"], name="head"),
    ]
    model = _model(nodes, [numpy_helper.from_array(w, "w")], [2, 64], [2, 32])
    result, report = quantize(model, mode="weights", exclude_nodes=("head",))
    assert result.modified is False
    reasons = {s["tensor"]: s["reason"] for s in report["skipped"] if "tensor" in s}
    assert "reaches MatMul 'head', which node name matches exclude_nodes" in reasons["w"]


def test_an_outer_initializer_that_is_also_a_graph_input_stays_float_when_only_branches_read_it():
    """Fuzz mutant 237 (seed 0): lstm.R_stack listed in graph.input; the branches' readers hold their
    own Constant object of that name, so the guard matches names too (the output once failed to
    load: 'Duplicate definition of name (lstm.R_stack)')."""
    model = load_model(MODELS_DIR / "voice_activity.onnx")
    stack = next(t for t in model.graph.initializer if t.name == "lstm.R_stack")
    model.graph.input.append(helper.make_tensor_value_info(stack.name, stack.data_type, list(stack.dims)))
    result, report = quantize(model, mode="weights", weight_type="int4")
    assert "lstm.R_stack_quantized" not in initializers(result.model)
    reasons = {s.get("tensor"): s["reason"] for s in report["skipped"]}
    assert reasons["lstm.R_stack"] == "graph input (overridable initializer)"


def test_a_cast_to_integers_ends_a_chain_and_split_pieces_put_back_together_are_followed():
    """Review of session 18: Cast(to=INT64) changes values (an integer table read through it stays
    float); an LSTM-style Split -> Concat gate reordering of one weight is one chain; Flatten with a
    negative axis traces like its positive form."""
    table = np.round(RNG.standard_normal((300, 4)) * 10).astype(np.float32)
    nodes = [helper.make_node("Cast", ["table"], ["ti"], name="to_int", to=TensorProto.INT64),
             helper.make_node("Cast", ["ti"], ["tf"], name="to_float", to=TensorProto.FLOAT),
             helper.make_node("Gather", ["tf", "ids"], ["y"], name="lookup")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
                              [numpy_helper.from_array(table, "table")])
    result, _ = quantize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), mode="weights")
    assert result.modified is False
    w = RNG.standard_normal((4 * 16, 32)).astype(np.float32)
    nodes = [helper.make_node("Split", ["w"], ["i", "o", "f", "c"], name="gates", axis=0),
             helper.make_node("Concat", ["i", "f", "o", "c"], ["w2"], name="reorder", axis=0),
             helper.make_node("Gemm", ["x", "w2"], ["y"], name="fc", transB=1)]
    model = _model(nodes, [numpy_helper.from_array(w, "w")], [2, 32], [2, 64])
    result, _ = quantize(model, mode="weights")
    assert _scale_shape(result.model, "w") == (64, 1)
    w3 = RNG.standard_normal((64, 4, 16)).astype(np.float32)
    for axis in (2, -1):  # [64, 4, 16] -> [256, 16]: MatMul's output channels are the stored last axis
        nodes = [helper.make_node("Flatten", ["w3"], ["flat"], name="flat", axis=axis),
                 helper.make_node("MatMul", ["x", "flat"], ["y"], name="fc")]
        model = _model(nodes, [numpy_helper.from_array(w3, "w3")], [2, 256], [2, 16])
        result, _ = quantize(model, mode="weights")
        assert _scale_shape(result.model, "w3") == (1, 1, 16)


def test_weights_stored_as_float16_are_reported_not_silently_left():
    from optimizer.pipeline import Pipeline
    from optimizer.registry import create_pass

    model = load_model(MODELS_DIR / "mlp.onnx")
    halved = Pipeline([create_pass("float16")]).run(model).model
    _, report = quantize(halved, mode="weights")
    reasons = [s["reason"] for s in report["skipped"] if "tensor" in s]
    assert any("stored as float16" in reason for reason in reasons)
