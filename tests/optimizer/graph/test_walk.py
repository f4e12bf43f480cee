"""The one walker: every graph of a model, in a stated order, with one path label format."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from optimizer.graph.convert import import_graph
from optimizer.graph.walk import (
    Enter,
    Leave,
    NodeStep,
    ScopeTree,
    gs_subgraphs,
    model_events,
    names_read,
    proto_subgraphs,
    walk,
    walk_model,
    walk_proto,
)

NESTED = """
<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
g (float[2] x, bool c) => (float[2] y, float[2] z)
<float[2] w = {1, 2}>
{
  y = If(c) <
    then_branch = t () => (float[2] o1) {
      o1 = If(c) <
        then_branch = tt () => (float[2] a) { a = Add(x, w) },
        else_branch = te () => (float[2] b) { b = Neg(x) }>
    },
    else_branch = e () => (float[2] o2) { o2 = Sub(x, w) }>
  z = local.Twice(x)
}
<domain: "local", opset_import: ["" : 17]>
Twice (v) => (out) {
  out = Add(v, v)
}
"""


def nested_model() -> onnx.ModelProto:
    return onnx.parser.parse_model(NESTED)


def test_pre_order_visits_every_graph_with_paths_and_depths():
    sites = list(walk_model(nested_model()))
    assert [(s.path, s.kind, s.depth) for s in sites] == [
        ("main", "main", 0),
        ("main/If_0.then_branch", "subgraph", 1),
        ("main/If_0.then_branch/If_0.then_branch", "subgraph", 2),
        ("main/If_0.then_branch/If_0.else_branch", "subgraph", 2),
        ("main/If_0.else_branch", "subgraph", 1),
        ("function:local.Twice", "function", 0),
    ]
    assert sites[2].parent is sites[1] and sites[1].owner.op_type == "If"
    assert sites[2].attribute == "then_branch"


def test_post_order_puts_every_graph_after_its_subgraphs():
    paths = [s.path for s in walk_model(nested_model(), order="post", functions=False)]
    assert paths == ["main/If_0.then_branch/If_0.then_branch", "main/If_0.then_branch/If_0.else_branch",
                     "main/If_0.then_branch", "main/If_0.else_branch", "main"]


def test_lexical_events_put_a_nodes_subgraphs_right_after_it():
    kinds = []
    for event in model_events(nested_model(), functions=False):
        if isinstance(event, NodeStep):
            kinds.append(f"node {event.node.op_type} in {event.site.path}")
        else:
            kinds.append(f"{type(event).__name__.lower()} {event.site.path}")
    assert kinds[:4] == ["enter main", "node If in main", "enter main/If_0.then_branch",
                         "node If in main/If_0.then_branch"]
    assert kinds.index("leave main/If_0.then_branch") < kinds.index("enter main/If_0.else_branch")
    assert kinds[-3:] == ["leave main/If_0.else_branch", "node Twice in main", "leave main"]


def test_graphs_attribute_labels_each_graph_and_duplicate_names_get_the_node_index():
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])])
    custom = helper.make_node("Multi", ["x"], ["y1"], name="same", domain="custom")
    custom.attribute.append(helper.make_attribute("branches", [branch, branch]))
    twin = helper.make_node("Multi", ["x"], ["y2"], name="same", domain="custom")
    twin.attribute.append(helper.make_attribute("branches", [branch]))
    graph = helper.make_graph([custom, twin], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1])])
    assert [label for label, _ in proto_subgraphs(custom)] == ["branches[0]", "branches[1]"]
    assert [s.path for s in walk_proto(graph)] == [
        "main", "main/same.branches[0]", "main/same.branches[1]", "main/same#1.branches[0]"]


def test_training_graphs_are_walked_only_when_asked():
    model = nested_model()
    info = model.training_info.add()
    info.algorithm.CopyFrom(helper.make_graph([], "algo", [], []))
    info.initialization.CopyFrom(helper.make_graph([], "init", [], []))
    assert "training[0].algorithm" not in [s.path for s in walk_model(model)]
    kinds = [(s.path, s.kind) for s in walk_model(model, training=True)][-2:]
    assert kinds == [("training[0].initialization", "training-init"), ("training[0].algorithm", "training-algo")]


def _deep_model(levels: int) -> onnx.ModelProto:
    body = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "leaf", [],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])])
    for level in range(levels):
        node = helper.make_node("If", ["c"], ["o"], name=f"if{level}", then_branch=body, else_branch=body)
        body = helper.make_graph([node], f"g{level}", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])])
    return helper.make_model(body)


def test_depth_limit_names_the_outermost_node_over_the_limit():
    seen: list[str] = []

    def too_deep(node):
        seen.append(node.name)
        raise ValueError(node.name)

    assert len(list(walk_model(_deep_model(3), max_depth=3, too_deep=too_deep))) == 2 ** 4 - 1
    with pytest.raises(ValueError, match="if0"):
        list(walk_model(_deep_model(3), max_depth=2, too_deep=too_deep))
    assert seen == ["if0"]


def test_names_read_three_ways():
    model = nested_model()
    graph = model.graph
    then_branch = graph.node[0].attribute[0].g
    assert names_read(then_branch) == {"c", "x", "w"}
    assert names_read(then_branch, implicit_only=True) == {"c", "x", "w"}
    assert names_read(graph, implicit_only=True) == set()
    assert {"y", "z", "x", "c"} <= names_read(graph, include_interface=True)
    assert "z" not in names_read(graph)


def test_gs_walk_gives_the_same_paths_as_the_proto_walk_and_skips_functions_by_default():
    model = nested_model()
    root = import_graph(model)
    assert [s.path for s in walk(root)] == [s.path for s in walk_model(model, functions=False)]
    assert [s.path for s in walk(root, functions=True)][-1] == "function:local.Twice"
    assert [label for label, _ in gs_subgraphs(root.nodes[0])] == ["then_branch", "else_branch"]


LOOP = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x, int64 n, bool c) => (float[2] y)
<float[2] w = {1, 2}>
{
  y = Loop(n, c, x) <body = b (int64 i, bool cin, float[2] acc) => (bool cout, float[2] next) {
      cout = Identity(cin)
      next = If(cin) <
        then_branch = t () => (float[2] a) { a = Add(acc, w) },
        else_branch = e () => (float[2] s) { s = Sub(acc, w) }>
  }>
}
"""


def test_scope_tree_common_ancestor_stays_in_a_loop_body_unless_hoisting():
    root = import_graph(onnx.parser.parse_model(LOOP))
    tree = ScopeTree.build(root)
    body = root.nodes[0].attrs["body"]
    then_branch, else_branch = (body.nodes[1].attrs[key] for key in ("then_branch", "else_branch"))
    assert tree.common_ancestor([then_branch, else_branch]) is body
    assert tree.common_ancestor([then_branch, else_branch], hoist_out_of_loops=True) is root
    assert tree.common_ancestor([then_branch]) is then_branch
    assert tree.ancestors(then_branch) == [then_branch, body, root]
    assert tree.path(else_branch) == "main/Loop_0.body/If_1.else_branch" and tree.depth(else_branch) == 2
    assert tree.outermost([else_branch, body, then_branch]) == [body]
    assert tree.graph_of(body.nodes[1]) is body and tree.is_within(then_branch, body)
    assert not tree.is_within(body, then_branch)


def test_every_event_has_a_matching_leave():
    events = list(model_events(nested_model(), training=True))
    entered = [e.site.path for e in events if isinstance(e, Enter)]
    left = [e.site.path for e in events if isinstance(e, Leave)]
    assert sorted(entered) == sorted(left) and len(entered) == 6
