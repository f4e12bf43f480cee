"""The one weight abstraction: initializers and Constant nodes, in any graph, read and written in place."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.graph.convert import export_model, import_graph
from optimizer.graph.walk import ScopeTree, tensor_uses
from optimizer.graph.weights import Weight, collect_weights, constant_weight

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 2] x, bool c) => (float[2, 2] y, float[2, 2] z)
<float[2, 2] W = {1, 2, 3, 4}>
{
  K = Constant <value = float[2, 2] {5, 6, 7, 8}> ()
  s = Constant <value_float = 2.0> ()
  a = MatMul(x, W)
  b = Add(a, W)
  y = If(c) <
    then_branch = t () => (float[2, 2] o1) {
      L = Constant <value = float[2, 2] {9, 9, 9, 9}> ()
      o1 = MatMul(b, K)
    },
    else_branch = e () => (float[2, 2] o2) { o2 = Mul(b, s) }>
  z = Add(y, K)
}
"""


def graph_and_tree():
    root = import_graph(onnx.parser.parse_model(MODEL))
    return root, ScopeTree.build(root)


def test_initializer_read_by_two_nodes_is_one_weight_with_both_uses():
    root, _ = graph_and_tree()
    uses = tensor_uses(root)
    weight = constant_weight(root.tensors()["W"], uses["W"])
    assert weight is not None and weight.node is None
    assert [(use.node.op, use.index) for use in weight.uses] == [("MatMul", 1), ("Add", 1)]
    assert [node.op for node in weight.consumers] == ["MatMul", "Add"] and weight.op_types() == ["Add", "MatMul"]
    np.testing.assert_array_equal(weight.values, [[1, 2], [3, 4]])
    assert weight.nbytes == 16


def test_constant_node_weight_read_inside_a_branch_and_outside_is_stored_in_its_home_graph():
    root, tree = graph_and_tree()
    weights = {w.name: w for w in collect_weights(root)}
    k = weights["K"]
    assert k.node is not None and k.node.op == "Constant" and k.home is root
    assert {tree.path(g) for g in k.reader_graphs(tree)} == {"main", "main/If_4.then_branch"}
    assert k.storage_graphs(tree) == [root] and k.label(tree) == "K"
    assert weights["s"].values.shape == () and float(weights["s"].values) == 2.0


def test_initializer_read_only_in_branches_is_labelled_by_the_branch_that_stores_it():
    root, tree = graph_and_tree()
    branch = root.nodes[4].attrs["then_branch"]
    constant = gs.Constant("inner", np.ones((2, 2), np.float32))
    branch.nodes[1].inputs[1] = constant
    weight = Weight(constant)
    assert weight.storage_graphs(tree) == [branch]
    assert weight.label(tree) == "main/If_4.then_branch/inner"


def test_write_changes_the_weight_once_for_every_reader_and_exports():
    root, _ = graph_and_tree()
    uses = tensor_uses(root)
    for name in ("W", "K"):
        weight = constant_weight(root.nodes[2].inputs[1] if name == "W" else root.nodes[0].outputs[0], uses[name])
        assert weight is not None
        before = weight.values.copy()
        weight.write(before * 10)
        np.testing.assert_array_equal(weight.values, before * 10)
    model = export_model(root, onnx.parser.parse_model(MODEL))
    onnx.checker.check_model(model, full_check=True)
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(stored["W"], [[10, 20], [30, 40]])
    k_node = next(n for n in model.graph.node if n.output[0] == "K")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(k_node.attribute[0].t), [[50, 60], [70, 80]])


def test_scalar_constant_forms_and_activations_are_not_writable_weights():
    root, _ = graph_and_tree()
    assert constant_weight(root.nodes[1].outputs[0]) is None  # value_float: no tensor to write back
    assert constant_weight(root.nodes[2].outputs[0]) is None  # an activation


def test_digest_and_same_bytes_compare_values_not_names():
    one = Weight(gs.Constant("a", np.arange(4, dtype=np.float32)))
    two = Weight(gs.Constant("b", np.arange(4, dtype=np.float32)))
    other = Weight(gs.Constant("c", np.arange(4, dtype=np.int32)))
    assert one.digest() == two.digest() and one.same_bytes(two)
    assert not one.same_bytes(other) and one.digest() != Weight(gs.Constant("d", np.ones(4, np.float32))).digest()
