"""Tests for optimizer.graph.names: fresh names avoid every graph's tensors (node names on request), the
counter goes before the suffix, and ``others`` finds a name carried by another tensor object."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.graph.names import NameAllocator


def _graph() -> tuple[gs.Graph, gs.Constant]:
    """Main graph: x -> Add(w) -> y, node named "w_q"; an If branch holds a second tensor named "w"."""
    x, y = gs.Variable("x", np.float32, [2]), gs.Variable("y", np.float32, [2])
    weight = gs.Constant("w", np.ones(2, np.float32))
    inner_w = gs.Constant("w", np.zeros(2, np.float32))
    inner_out = gs.Variable("z", np.float32, [2])
    branch = gs.Graph(nodes=[gs.Node("Identity", "inner", inputs=[inner_w], outputs=[inner_out])], outputs=[inner_out])
    cond = gs.Variable("cond", np.bool_, [])
    out = gs.Variable("if_out", np.float32, [2])
    nodes = [
        gs.Node("Add", "w_q", inputs=[x, weight], outputs=[y]),
        gs.Node("If", "gate", {"then_branch": branch, "else_branch": branch}, inputs=[cond], outputs=[out]),
    ]
    return gs.Graph(nodes=nodes, inputs=[x, cond], outputs=[y, out]), weight


def test_fresh_avoids_tensor_names_in_subgraphs_and_counts_before_the_suffix() -> None:
    graph, _ = _graph()
    names = NameAllocator(graph, reserve_node_names=False)
    assert names.fresh("z") == "z_1"                   # "z" lives only in the If branch
    assert names.fresh("z") == "z_2"                   # a fresh name is reserved
    assert names.fresh("x", "_scale") == "x_scale"
    assert names.fresh("x", "_scale") == "x_1_scale"
    assert names.fresh("new") == "new"


def test_node_names_are_reserved_only_when_asked() -> None:
    graph, _ = _graph()
    assert NameAllocator(graph, reserve_node_names=False).fresh("w", "_q") == "w_q"
    assert NameAllocator(graph, reserve_node_names=True).fresh("w", "_q") == "w_1_q"


def test_others_are_other_objects_with_the_same_name() -> None:
    graph, weight = _graph()
    names = NameAllocator(graph, reserve_node_names=True)
    assert len(names.others(weight)) == 1              # the If branch's own "w"
    assert names.others(graph.inputs[0]) == set()      # "x" is carried by one object
    fresh = gs.Constant(names.fresh("w_q"), np.ones(1, np.float32))
    assert fresh.name == "w_q_1" and names.others(fresh) == set()
