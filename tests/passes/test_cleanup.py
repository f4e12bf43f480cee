from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import passes  # noqa: F401
from optimizer.errors import OptionError
from optimizer.fileio.checker import check_model_full
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass
from tests.helpers.runtime import assert_same_outputs


def run_cleanup(model: onnx.ModelProto, **options):
    result = Pipeline([create_pass("cleanup", **options)]).run(model)
    check_model_full(result.model)
    return result, result.runs[0].report


HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def parse(text: str) -> onnx.ModelProto:
    """A checked model from its text; opset 17 unless the text names its own opsets."""
    model = onnx.parser.parse_model(text if "opset_import" in text else HEADER + text)
    onnx.checker.check_model(model, full_check=True)
    return model


def feed(shape=(2, 4), seed=0):
    return [{"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}]


def test_removes_unused_nodes_and_initializers_and_counts_bytes():
    model = parse("""
    g (float[N, 4] x) => (float[N, 4] y)
    <float[4] B = {1, 2, 3, 4}, float[8] unused = {0, 0, 0, 0, 0, 0, 0, 0}>
    {
      y = Add(x, B)
      dead = Mul(x, B)
      dead2 = Relu(dead)
    }""")
    result, report = run_cleanup(model)
    assert [n.op_type for n in result.model.graph.node] == ["Add"]
    assert [t.name for t in result.model.graph.initializer] == ["B"]
    assert report["counts"] == {"unused_initializers_removed": 1, "unused_nodes_removed": 2}
    assert report["saved_bytes"] == 32
    assert result.modified
    assert_same_outputs(model, result.model, feed())


def test_bypasses_inner_identity_and_renames_producer_of_output_identity():
    model = parse("""
    g (float[N, 4] x) => (float[N, 4] y, float[N, 4] z)
    {
      a = Relu(x)
      b = Identity(a)
      c = Neg(b)
      y = Identity(c)
      z = Abs(b)
    }""")
    result, report = run_cleanup(model)
    ops = [n.op_type for n in result.model.graph.node]
    assert "Identity" not in ops
    assert report["counts"] == {"identities_removed": 2, "unused_nodes_removed": 0}
    neg = next(n for n in result.model.graph.node if n.op_type == "Neg")
    assert list(neg.input) == ["a"] and list(neg.output) == ["y"]
    assert [o.name for o in result.model.graph.output] == ["y", "z"]
    assert_same_outputs(model, result.model, feed())


def test_keeps_identity_that_copies_a_graph_input_to_an_output_and_says_why():
    model = parse("""
    g (float[N, 4] x) => (float[N, 4] y, float[N, 4] z)
    {
      y = Identity(x)
      z = Relu(x)
    }""")
    result, report = run_cleanup(model)
    assert [n.op_type for n in result.model.graph.node].count("Identity") == 1
    assert len(report["skipped"]) == 1
    assert "graph input" in report["skipped"][0]["reason"]
    assert result.modified is False


def test_remove_identity_false_keeps_them():
    model = parse("""
    g (float[N, 4] x) => (float[N, 4] y)
    { a = Identity(x)
      y = Relu(a) }""")
    result, _report = run_cleanup(model, remove_identity=False)
    assert [n.op_type for n in result.model.graph.node] == ["Identity", "Relu"]
    assert result.modified is False


def test_sorts_unsorted_graph():
    nodes = [helper.make_node("Relu", ["a"], ["y"], name="second"), helper.make_node("Neg", ["x"], ["a"], name="first")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    result, _ = run_cleanup(model)
    assert [n.name for n in result.model.graph.node] == ["first", "second"]
    assert result.modified


def test_subgraph_dead_node_removed_outer_weight_kept_once():
    model = parse("""
    g (float[N, 4] x, bool c) => (float[N, 4] y)
    <float[4, 4] W = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}>
    {
      a = MatMul(x, W)
      y = If(c) <
        then_branch = t () => (float[N, 4] o1) { o1 = MatMul(a, W)
                                                   junk = Neg(a) },
        else_branch = e () => (float[N, 4] o2) { o2 = Identity(a) }>
    }""")
    result, report = run_cleanup(model)
    main = result.model.graph
    branches = {attr.name: attr.g for attr in main.node[1].attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["MatMul"]
    assert len(branches["then_branch"].initializer) == 0, "outer-scope W must not be copied into the branch"
    assert [t.name for t in main.initializer] == ["W"]
    assert any("outer-scope" in s["reason"] for s in report["skipped"])
    for switch in (True, False):
        feeds = [{"x": np.ones((2, 4), np.float32) * 3, "c": np.array(switch)}]
        assert_same_outputs(model, result.model, feeds)


def test_constant_node_weights_and_shared_weight_untouched():
    model = parse("""
    g (float[N, 4] x) => (float[N, 4] y)
    {
      w = Constant <value = float[4] {1, 2, 3, 4}> ()
      a = Mul(x, w)
      y = Add(a, w)
    }""")
    result, _ = run_cleanup(model)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Constant", "Mul", "Add"]
    assert_same_outputs(model, result.model, feed())


def test_unknown_option_lists_valid_ones():
    with pytest.raises(OptionError, match="valid options: remove_identity"):
        create_pass("cleanup", remove_identities=True)
    with pytest.raises(OptionError, match="must be bool"):
        create_pass("cleanup", remove_identity="yes")


def test_function_and_custom_domain_kept():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17, "local" : 1, "custom.ops" : 1]>
    g (float[N, 4] x) => (float[N, 4] y, float[N, 4] z)
    { a = local.Twice(x)
      y = Identity(a)
      z = custom.ops.Mystery(x) }
    <domain: "local", opset_import: ["" : 17]>
    Twice (t) => (u) { u = Add(t, t) }
    """ .replace("custom.ops.Mystery", "custom.ops.Mystery"))
    result = Pipeline([create_pass("cleanup")]).run(model)
    assert [f.name for f in result.model.functions] == ["Twice"]
    domains = {o.domain: o.version for o in result.model.opset_import}
    assert domains == {"": 17, "local": 1, "custom.ops": 1}
    assert any(n.domain == "custom.ops" and n.op_type == "Mystery" for n in result.model.graph.node)
