from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes  # noqa: F401
from optimizer.errors import OptionError
from optimizer.fileio.checker import check_model_full
from optimizer.fileio.model import load_model
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass
from tests.helpers.runtime import assert_same_outputs
from tests.helpers.samples import MODELS_DIR, seeded_feeds


def convert(model: onnx.ModelProto, **options):
    result = Pipeline([create_pass("constants-to-initializers", **options)]).run(model)
    check_model_full(result.model)
    return result, result.runs[0].report


def constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def test_paddle_style_model_has_every_weight_as_initializer_bit_for_bit():
    model = load_model(MODELS_DIR / "constant_weights.onnx")
    expected = constant_values(model)
    assert len(model.graph.initializer) == 0 and expected
    result, report = convert(model)
    assert not any(n.op_type == "Constant" for n in result.model.graph.node)
    stored = {t.name: t for t in result.model.graph.initializer}
    assert sorted(stored) == sorted(expected)
    for name, values in expected.items():
        actual = numpy_helper.to_array(stored[name])
        assert actual.dtype == values.dtype
        np.testing.assert_array_equal(actual, values)
    assert report["counts"]["constants_converted"] == len(expected)
    assert_same_outputs(model, result.model, seeded_feeds(model))


def test_shared_constant_becomes_one_initializer_with_both_consumers():
    model = load_model(MODELS_DIR / "constant_weights.onnx")
    result, _ = convert(model)
    readers = {}
    for node in result.model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    shared = [name for name, nodes in readers.items() if len(nodes) >= 2 and name in
              {t.name for t in result.model.graph.initializer}]
    assert shared, "the sample's shared Constant weight must stay one tensor read by two nodes"


def test_constant_inside_branch_becomes_branch_initializer():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, bool c) => (float[N, 4] y)
    {
      y = If(c) <
        then_branch = t () => (float[N, 4] o1) { k = Constant <value = float[4] {1, 2, 3, 4}> ()
                                                   o1 = Add(x, k) },
        else_branch = e () => (float[N, 4] o2) { o2 = Neg(x) }>
    }""")
    result, _report = convert(model)
    branch = next(a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch")
    assert [t.name for t in branch.initializer] == ["k"]
    assert [n.op_type for n in branch.node] == ["Add"]
    assert len(result.model.graph.initializer) == 0
    for switch in (True, False):
        assert_same_outputs(model, result.model, [{"x": np.ones((2, 4), np.float32), "c": np.array(switch)}])


def test_graph_output_constant_and_small_constants_skipped_with_reason():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y, float[2] k)
    {
      k = Constant <value = float[2] {5, 6}> ()
      s = Constant <value_float = 2.0> ()
      w = Constant <value = float[4] {1, 2, 3, 4}> ()
      r = Mul(x, s)
      y = Add(r, w)
    }""")
    result, report = convert(model, min_size_bytes=16)
    reasons = {next(v for k, v in s.items() if k != "reason"): s["reason"] for s in report["skipped"]}
    assert "graph output" in reasons["k"]
    assert reasons["s"] == "4 bytes < min_size_bytes=16"
    assert {t.name for t in result.model.graph.initializer} == {"w"}
    assert report["counts"]["constants_converted"] == 1


def test_scalar_forms_and_half_precision_are_kept_exactly():
    half = np.array([1.5, -2.25, 65504.0], dtype=np.float16)
    nodes = [
        helper.make_node("Constant", [], ["h"], value=numpy_helper.from_array(half, "h")),
        helper.make_node("Constant", [], ["f"], value_float=0.5),
        helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
        helper.make_node("Add", ["xh", "h"], ["y"]),
        helper.make_node("Mul", ["x", "f"], ["z"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [3]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result, _ = convert(model)
    stored = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert stored["h"].dtype == np.float16
    np.testing.assert_array_equal(stored["h"], half)
    assert stored["f"].dtype == np.float32 and stored["f"].shape == () and stored["f"] == 0.5
    assert_same_outputs(model, result.model, [{"x": np.array([1, 2, 3], np.float32)}])


def test_negative_min_size_is_an_option_error():
    with pytest.raises(OptionError, match="min_size_bytes"):
        create_pass("constants-to-initializers", min_size_bytes=-1)
