"""float16 compute: the graph computes in float16 with float32 islands; inputs and outputs stay float32."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes  # noqa: F401
from optimizer.errors import OptionError
from optimizer.fileio.checker import check_model_full
from optimizer.fileio.model import load_model
from optimizer.graph.convert import export_model, import_graph
from optimizer.graph.edit import toposort
from optimizer.graph.tensor_types import tensor_types
from optimizer.pass_base import PassContext, PassReport
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass
from passes.precision.compute import ComputeConfig, bfloat16_target, convert_compute
from tests.helpers.runtime import open_session, run_model
from tests.helpers.samples import MODELS_DIR, SAMPLE_MODELS, all_graphs, sample_ids, seeded_feeds


def _compute(model, feeds=None, **options):
    context = PassContext(calibration=(lambda: iter(feeds)) if feeds else None)
    result = Pipeline([create_pass("float16", mode="compute", **options)], check_each_pass=True,
                      context=context).run(model)
    open_session(result.model)
    return result, result.runs[0].report


def _min_cosine(reference, candidate, feeds) -> float:
    lowest = 1.0
    for expected_list, actual_list in zip(run_model(reference, feeds), run_model(candidate, feeds), strict=True):
        for expected, actual in zip(expected_list, actual_list, strict=True):
            assert actual.dtype == expected.dtype and np.isfinite(actual).all()
            a, b = expected.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
            lowest = min(lowest, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return lowest


@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=sample_ids())
def test_every_sample_computes_in_float16_within_its_precision(path):
    model = load_model(path)
    feeds = seeded_feeds(model, count=3)
    result, report = _compute(model, feeds)
    assert report["counts"]["nodes_float16"] >= 1
    assert [i.type.tensor_type.elem_type for i in result.model.graph.input] == \
        [i.type.tensor_type.elem_type for i in model.graph.input]
    assert _min_cosine(model, result.model, feeds) >= 0.999
    halves = [n for g in all_graphs(result.model.graph) for n in g.node
              if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16]
    assert halves or any(t.data_type == TensorProto.FLOAT16 for g in all_graphs(result.model.graph)
                         for t in g.initializer)
    for graph in all_graphs(result.model.graph):  # no Cast pairs: one Cast per tensor and direction
        cast_outputs = {n.output[0] for n in graph.node if n.op_type == "Cast"}
        assert not [n.name for n in graph.node if n.op_type == "Cast" and n.input[0] in cast_outputs]
    again, again_report = _compute(result.model, feeds)
    assert again.modified is False and "already computes in float16" in again_report["skipped"][0]["reason"]
    rerun, _ = _compute(model, feeds)
    assert rerun.model.SerializeToString(deterministic=True) == result.model.SerializeToString(deterministic=True)


def test_one_cast_per_tensor_and_direction_in_each_graph():
    model = load_model(MODELS_DIR / "transformer_tied.onnx")
    result, _ = _compute(model, seeded_feeds(model, count=2))
    for graph in all_graphs(result.model.graph):
        casts = Counter((n.input[0], n.attribute[0].i) for n in graph.node if n.op_type == "Cast")
        assert casts and max(casts.values()) == 1


def test_statistics_and_exponentials_stay_float32_with_their_reason():
    model = load_model(MODELS_DIR / "transformer_tied.onnx")
    _, report = _compute(model, seeded_feeds(model, count=2))
    reasons = {s["node"]: s["reason"] for s in report["skipped"] if "node" in s}
    kept = {name.split("/")[-1]: reason for name, reason in reasons.items()}
    assert any("precision: Softmax" in r for r in kept.values())
    assert not any("sizes" in r for r in kept.values())  # the sliced position table is data, not sizes


def _size_arithmetic_model() -> onnx.ModelProto:
    """y = Reshape(x * 3, shape computed in float from Shape(x)); the float size arithmetic must stay exact."""
    nodes = [
        helper.make_node("Mul", ["x", "three"], ["scaled"], name="scale"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Cast", ["shape"], ["shape_f"], name="to_float", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["shape_f", "one"], ["shape_f2"], name="size_math"),
        helper.make_node("Cast", ["shape_f2"], ["shape_i"], name="to_int", to=TensorProto.INT64),
        helper.make_node("Reshape", ["scaled", "shape_i"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4099])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4099])],
        [numpy_helper.from_array(np.full((4099,), 3.0, np.float32), "three"),
         numpy_helper.from_array(np.ones((2,), np.float32), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_size_arithmetic_and_wide_ranges_stay_float32():
    model = _size_arithmetic_model()
    feeds = [{"x": np.random.default_rng(0).standard_normal((3, 4099)).astype(np.float32)}]
    result, report = _compute(model, feeds)
    reasons = {s["node"]: s["reason"] for s in report["skipped"] if "node" in s}
    assert "tensor sizes" in reasons["size_math"] and "Cast between float32" in reasons["to_float"]
    assert _min_cosine(model, result.model, feeds) >= 0.999
    wide = [{"x": feed["x"] * 10000} for feed in feeds]  # x * 3 reaches 1e5: beyond float16
    result, report = _compute(model, wide)
    reasons = {s["node"]: s["reason"] for s in report["skipped"] if "node" in s}
    assert reasons["scale"].startswith("range: |")
    assert _min_cosine(model, result.model, wide) >= 0.999


def test_named_ops_stay_float32():
    model = load_model(MODELS_DIR / "mlp.onnx")
    _, report = _compute(model, seeded_feeds(model, count=2), keep_float32=("Gemm",))
    kept = [s for s in report["skipped"] if "keep_float32" in s["reason"]]
    assert len(kept) == sum(n.op_type == "Gemm" for n in model.graph.node)


def test_bfloat16_refuses_cpu_and_converts_for_a_cuda_provider():
    model = load_model(MODELS_DIR / "mlp.onnx")
    with pytest.raises(OptionError, match="bfloat16 compute needs a provider with bfloat16 kernels"):
        Pipeline([create_pass("bfloat16")]).run(model)
    graph = import_graph(model)  # the conversion itself, as the CUDA path runs it (no GPU here)
    template = onnx.ModelProto(ir_version=8, opset_import=[helper.make_opsetid("", 17)])
    types = tensor_types(graph, template)
    assert convert_compute(graph, types, ComputeConfig(bfloat16_target()), {}, PassReport())
    toposort(graph)
    converted = export_model(graph, template)
    check_model_full(converted)
    assert any(t.data_type == TensorProto.BFLOAT16 for t in converted.graph.initializer)


def test_after_int8_the_integer_kernels_still_fuse(tmp_path):
    """--quantize int8 --float16 compute: nodes that read dequantized values or feed a quantizer stay
    float32, so onnxruntime still runs DynamicQuantizeMatMul (and the rest computes in float16)."""
    from tests.helpers.runtime import ort_runs

    w = np.random.default_rng(0).standard_normal((128, 96)).astype(np.float32) * 0.05
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"), helper.make_node("Tanh", ["h"], ["y"], name="act")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 96])], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    passes_ = [create_pass("quantize", mode="dynamic", dynamic_min_k=0), create_pass("float16", mode="compute")]
    result = Pipeline(passes_, check_each_pass=True).run(model)
    report = result.runs[-1].report
    assert ort_runs(result.model, tmp_path)["DynamicQuantizeMatMul"] == 1
    assert any("integer kernel" in s["reason"] for s in report["skipped"])
    assert report["counts"]["nodes_float16"] >= 1
    outputs = [n for n in result.model.graph.node if n.output[0] == "y"]
    assert outputs[0].op_type == "Cast" and outputs[0].input[0] not in {n.output[0] for n in result.model.graph.node
                                                                         if n.op_type == "Cast"}
    feeds = [{"x": np.random.default_rng(2).standard_normal((8, 128)).astype(np.float32)}]
    assert _min_cosine(model, result.model, feeds) >= 0.99


def _graph_model(nodes, inits, inputs=(("x", [2, 8]),), outputs=(("y", [2, 8]),), extra_inputs=()):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs] + list(extra_inputs),
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_values_that_cannot_be_retyped_or_would_not_survive_keep_their_readers_float32():
    """Review of session 18: a Constant in scalar form, a ConstantOfShape without a value, a
    sequence, and an epsilon of 1e-12 (0 in float16) each once made a model onnxruntime refused
    or that divided by zero."""
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["c"], name="two", value_float=2.0),
        helper.make_node("Mul", ["x", "c"], ["m"], name="mul"),
        helper.make_node("ConstantOfShape", ["shape"], ["z"], name="zeros"),
        helper.make_node("Add", ["m", "z"], ["a"], name="add_zeros"),
        helper.make_node("Mul", ["a", "a"], ["sq"], name="square"),
        helper.make_node("Add", ["sq", "eps"], ["v"], name="add_eps"),
        helper.make_node("Sqrt", ["v"], ["r"], name="root"),
        helper.make_node("SequenceConstruct", ["r", "a"], ["seq"], name="seq"),
        helper.make_node("ConcatFromSequence", ["seq"], ["cat"], name="cat", axis=0),
        helper.make_node("Relu", ["cat"], ["y"], name="relu"),
    ]
    inits = [numpy_helper.from_array(np.asarray([2, 8], np.int64), "shape"),
             numpy_helper.from_array(np.full((2, 8), 1e-12, np.float32), "eps")]
    model = _graph_model(nodes, inits, outputs=(("y", [4, 8]),))
    result, report = _compute(model, [{"x": x}])
    reasons = {s["node"]: s["reason"] for s in report["skipped"] if "node" in s}
    assert "scalar form" in reasons["two"] and "without a tensor value" in reasons["zeros"]
    assert "is 0 in float16" in reasons["add_eps"] and "sequence" in reasons["seq"]
    zero = {"x": np.zeros((2, 8), np.float32)}  # sqrt(0 + 1e-12): 1e-6 in float32, 0 if eps were rounded
    assert np.isclose(run_model(result.model, [zero])[0][0], run_model(model, [zero])[0][0], atol=1e-9).all()
    assert _min_cosine(model, result.model, [{"x": x}]) >= 0.999


def test_an_overridable_initializer_stays_overridable():
    w = np.random.default_rng(4).standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    model = _graph_model(nodes, [numpy_helper.from_array(w, "W")],
                         extra_inputs=[helper.make_tensor_value_info("W", TensorProto.FLOAT, [8, 8])])
    result, _ = _compute(model, [{"x": np.ones((2, 8), np.float32)}])
    override = {"x": np.ones((2, 8), np.float32), "W": np.full((8, 8), 5.0, np.float32)}
    assert np.allclose(run_model(result.model, [override])[0][0], 40.0)


@pytest.mark.parametrize("mode", ["compute", "storage"])
def test_the_accuracy_budget_backs_a_layer_off_to_float32(mode):
    """--max-drop with --float16: a backed-off layer (keep_float32 by exact node name) computes in
    float32 (compute) or reads float32 weights (storage)."""
    from optimizer.budget_trials import backed_off_passes

    model = load_model(MODELS_DIR / "mlp.onnx")
    first = next(n.name for n in model.graph.node if n.op_type == "Gemm")
    (backed,) = backed_off_passes([create_pass("float16", mode=mode)], [first])
    result = Pipeline([backed], check_each_pass=True).run(model)
    reasons = {s.get("node") or s.get("tensor"): s["reason"] for s in result.runs[0].report["skipped"]}
    assert any("keep_float32" in reason for reason in reasons.values())
    node = next(n for n in result.model.graph.node if n.name == first)
    stored = {t.name: t.data_type for t in result.model.graph.initializer}
    assert stored[node.input[1]] == TensorProto.FLOAT
