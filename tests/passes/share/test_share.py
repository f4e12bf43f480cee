from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes
import passes.share.share_pass  # noqa: F401  (registers "share" until passes/__init__ imports it)
from optimizer.errors import OptionError
from optimizer.fileio.checker import check_model_full
from optimizer.fileio.model import load_model
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass
from tests.helpers.runtime import assert_same_outputs, run_model
from tests.helpers.samples import MODELS_DIR, all_initializer_names, seeded_feeds

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def run_share(model: onnx.ModelProto, **options):
    result = Pipeline([create_pass("share", **options)], check_each_pass=True).run(model)
    check_model_full(result.model)
    again = Pipeline([create_pass("share", **options)]).run(result.model)
    assert again.modified is False, again.runs[0].report
    return result.model, result.runs[0].report


def make_model(nodes, inputs, outputs, initializers, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def init(name, array):
    return numpy_helper.from_array(array, name)


def x_feeds(shape, count=2):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def test_tied_embedding_stored_once_bit_identical():
    original = load_model(MODELS_DIR / "transformer_tied.onnx")
    shared, report = run_share(original)
    copy_bytes = 512 * 64 * 4
    saved = original.ByteSize() - shared.ByteSize()
    assert abs(saved - copy_bytes) <= 0.01 * copy_bytes
    assert report["saved_bytes"] == copy_bytes
    assert "lm_head.weight" not in all_initializer_names(shared.graph)
    transpose = [n for n in shared.graph.node if n.op_type == "Transpose" and n.input[0] == "embed.weight"]
    assert len(transpose) == 1 and list(transpose[0].attribute[0].ints) == [1, 0]
    assert report["details"]["groups"][0]["kept"] == "embed.weight"
    assert_same_outputs(original, shared, seeded_feeds(original))


def test_exact_copies_in_main_constant_node_and_if_branch_become_one():
    w = RNG.standard_normal((4, 4)).astype(np.float32)
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["h", "W_then"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", F, [2, 4])], initializer=[init("W_then", w.copy())])
    else_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["W_else"], value=init("v", w.copy())),
         helper.make_node("MatMul", ["h", "W_else"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", F, [2, 4])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h0"]),
             helper.make_node("MatMul", ["h0", "W_copy"], ["h"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F, [2, 4]),
                               helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                       [helper.make_tensor_value_info("y", F, [2, 4])], [init("W", w), init("W_copy", w.copy())])
    shared, report = run_share(model)
    assert all_initializer_names(shared.graph) == ["W"]
    assert [n.op_type for n in shared.graph.node[2].attribute[1].g.node] == ["MatMul"]  # else: Constant gone
    assert report["counts"] == {"exact_copies_removed": 3}
    assert report["saved_bytes"] == 3 * 64
    for switch in (True, False):
        feeds = [{"x": f["x"], "c": np.array(switch)} for f in x_feeds((2, 4))]
        assert_same_outputs(model, shared, feeds)


def test_copies_only_in_sibling_branches_are_left_with_reason():
    w = RNG.standard_normal((4, 4)).astype(np.float32)
    branches = {}
    for key, name in (("then_branch", "A"), ("else_branch", "B")):
        branches[key] = helper.make_graph(
            [helper.make_node("MatMul", ["x", name], [f"o{name}"])], key, [],
            [helper.make_tensor_value_info(f"o{name}", F, [2, 4])], initializer=[init(name, w.copy())])
    model = make_model([helper.make_node("If", ["c"], ["y"], **branches)],
                       [helper.make_tensor_value_info("x", F, [2, 4]),
                        helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                       [helper.make_tensor_value_info("y", F, [2, 4])], [])
    shared, report = run_share(model)
    assert sorted(all_initializer_names(shared.graph)) == ["A", "B"]
    assert len(report["skipped"]) == 1 and "sibling subgraphs" in report["skipped"][0]["reason"]
    assert report["saved_bytes"] == 0


def test_gemm_transpose_copy_flips_trans_b_without_a_node():
    w = RNG.standard_normal((6, 4)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["a"]),
             helper.make_node("Gemm", ["x", "W_t"], ["b"], transB=1),
             helper.make_node("Add", ["a", "b"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F, [3, 6])],
                       [helper.make_tensor_value_info("y", F, [3, 4])],
                       [init("W", w), init("W_t", np.ascontiguousarray(w.T))])
    shared, report = run_share(model)
    assert [t.name for t in shared.graph.initializer] == ["W"]
    assert [n.op_type for n in shared.graph.node] == ["Gemm", "Gemm", "Add"]
    trans_b = [helper.get_attribute_value(a) for n in shared.graph.node for a in n.attribute if a.name == "transB"]
    assert trans_b == [0]
    assert report["counts"] == {"gemm_transpose_flags_flipped": 1, "transposed_copies_removed": 1}
    assert_same_outputs(model, shared, x_feeds((3, 6)))


def test_four_d_permutation_reshape_and_cast_copies():
    w = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    m = RNG.standard_normal((6, 20)).astype(np.float32)
    nodes = [helper.make_node("Add", ["x4", "W"], ["a"]),
             helper.make_node("Add", ["x4p", "W_perm"], ["b"]),
             helper.make_node("MatMul", ["x", "M"], ["c"]),
             helper.make_node("Add", ["x120", "M_flat"], ["d"]),
             helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["x16", "M16"], ["e"])]
    inputs = [helper.make_tensor_value_info(n, F, s) for n, s in
              (("x4", [2, 3, 4, 5]), ("x4p", [2, 4, 5, 3]), ("x", [2, 6]), ("x120", [120]))]
    outputs = [helper.make_tensor_value_info("a", F, [2, 3, 4, 5]), helper.make_tensor_value_info("b", F, [2, 4, 5, 3]),
               helper.make_tensor_value_info("c", F, [2, 20]), helper.make_tensor_value_info("d", F, [120]),
               helper.make_tensor_value_info("e", TensorProto.FLOAT16, [2, 20])]
    m[0, :4] = [1e-8, 7e4, -3.3e-5, 65519.0]  # fp16 underflow, overflow, subnormal and rounding cases
    with np.errstate(over="ignore"):
        m16 = m.astype(np.float16)
    model = make_model(nodes, inputs, outputs, [
        init("W", w), init("W_perm", np.ascontiguousarray(w.transpose(0, 2, 3, 1))),
        init("M", m), init("M_flat", m.reshape(-1).copy()), init("M16", m16)])
    shared, report = run_share(model)
    assert sorted(t.name for t in shared.graph.initializer) == ["M", "M_flat.shape", "W"]
    assert report["counts"] == {"cast_copies_removed": 1, "nodes_added": 3, "reshaped_copies_removed": 1,
                                "transposed_copies_removed": 1}
    assert report["saved_bytes"] == w.nbytes + m.nbytes + m.size * 2
    ops = sorted(n.op_type for n in shared.graph.node)
    assert ops.count("Transpose") == 1 and ops.count("Reshape") == 1 and ops.count("Cast") == 2
    feeds = [{n.name: np.random.default_rng(i).standard_normal(
        [d.dim_value for d in n.type.tensor_type.shape.dim]).astype(np.float32) for n in inputs} for i in range(2)]
    assert_same_outputs(model, shared, feeds)


def test_near_duplicates_only_when_enabled_and_error_reported():
    w = RNG.standard_normal((8, 8)).astype(np.float32)
    near = w + np.float32(1e-4) * np.abs(w).max() * np.sign(w)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("MatMul", ["a", "V"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F, [2, 8])],
                       [helper.make_tensor_value_info("y", F, [2, 8])], [init("W", w), init("V", near)])
    exact, report = run_share(model)
    assert report["counts"] == {} and len(exact.graph.initializer) == 2
    _, strict = run_share(model, near_duplicate_rtol=1e-5)
    assert strict["counts"] == {}
    merged, loose = run_share(model, near_duplicate_rtol=1e-3)
    assert [t.name for t in merged.graph.initializer] == ["W"]
    group = loose["details"]["groups"][0]
    assert group["kind"] == "near" and group["replaced"] == ["V"]
    assert 0.9e-4 <= group["max_rel_error"] <= 1.1e-4
    expected = x_feeds((2, 8))[0]["x"] @ w @ w
    np.testing.assert_allclose(run_model(merged, x_feeds((2, 8)))[0][0], expected, rtol=1e-5, atol=1e-5)


def test_custom_op_reader_and_graph_output_weight_are_left_alone():
    w = RNG.standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]),
             helper.make_node("Mystery", ["x", "W_custom"], ["b"], domain="custom.ops"),
             helper.make_node("Identity", ["W_out"], ["w_copy_out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 4])],
                              [helper.make_tensor_value_info("a", F, [2, 4]),
                               helper.make_tensor_value_info("b", F, None),
                               helper.make_tensor_value_info("W_out", F, [4, 4])],
                              initializer=[init("W", w), init("W_custom", w.copy()), init("W_out", w.copy())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.ops", 1)])
    result = Pipeline([create_pass("share")]).run(model)
    report = result.runs[0].report
    names = [t.name for t in result.model.graph.initializer]
    assert sorted(names) == ["W_custom", "W_out"]  # the custom op's copy was kept, W redirected to it
    custom = next(n for n in result.model.graph.node if n.domain == "custom.ops")
    assert list(custom.input) == ["x", "W_custom"]
    assert report["counts"] == {"exact_copies_removed": 1}
    assert any("graph input or output" in s["reason"] for s in report["skipped"])


def test_shared_weight_with_several_readers_in_constant_nodes():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y)
    {
      w1 = Constant <value = float[4] {1, 2, 3, 4}> ()
      w2 = Constant <value = float[4] {1, 2, 3, 4}> ()
      a = Mul(x, w1)
      b = Add(a, w1)
      c = Sub(b, w2)
      y = Div(c, w2)
    }"""
    model = onnx.parser.parse_model(text)
    shared, report = run_share(model)
    assert [n.op_type for n in shared.graph.node] == ["Constant", "Mul", "Add", "Sub", "Div"]
    assert {i for n in shared.graph.node[1:] for i in n.input} == {"x", "w1", "a", "b", "c"}
    assert report["saved_bytes"] == 16
    assert_same_outputs(model, shared, x_feeds((3, 4)))


def test_bad_option_values():
    with pytest.raises(OptionError, match="near_duplicate_rtol"):
        create_pass("share", near_duplicate_rtol=1.5)
    with pytest.raises(OptionError, match="must be bool"):
        create_pass("share", transformed="yes")


def test_same_shape_tensors_differing_only_between_sampled_values_are_not_merged():
    base = RNG.standard_normal((100, 100)).astype(np.float32)
    near = base.copy()
    near.reshape(-1)[1] += 1.0  # the sample takes every 9th value: index 1 is not in it
    copy = base.copy()
    nodes = [helper.make_node("MatMul", ["x", name], [f"y{i}"]) for i, name in enumerate(("A", "B", "C"))]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F, [2, 100])],
                       [helper.make_tensor_value_info(f"y{i}", F, [2, 100]) for i in range(3)],
                       [init("A", base), init("B", near), init("C", copy)])
    shared, report = run_share(model)
    assert report["counts"]["exact_copies_removed"] == 1
    assert sorted(all_initializer_names(shared.graph)) == ["A", "B"]
    assert_same_outputs(model, shared, x_feeds((2, 100)), atol=0.0)
