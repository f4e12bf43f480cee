from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.fileio.model import load_model
from optimizer.graph.convert import export_model, import_graph, unused_initializers
from optimizer.graph.walk import iter_graphs, tensor_uses
from optimizer.graph.weights import is_constant_derived, weight_values
from tests.helpers.runtime import assert_same_outputs
from tests.helpers.samples import MODELS_DIR, SAMPLE_MODELS, all_initializer_names, seeded_feeds


def test_round_trip_keeps_model_fields_of_every_sample():
    for path in SAMPLE_MODELS:
        model = load_model(path)
        exported = export_model(import_graph(model), model)
        for field in ("ir_version", "producer_name", "producer_version", "doc_string", "domain", "model_version"):
            assert getattr(exported, field) == getattr(model, field), (path.name, field)
        assert list(exported.metadata_props) == list(model.metadata_props)
        assert list(exported.opset_import) == list(model.opset_import)
        onnx.checker.check_model(exported, full_check=True)
        assert_same_outputs(model, exported, seeded_feeds(model))


def test_outer_scope_weight_is_stored_once():
    for stem in ("if_subgraph", "loop_subgraph"):
        model = load_model(MODELS_DIR / f"{stem}.onnx")
        exported = export_model(import_graph(model), model)
        names = all_initializer_names(exported.graph)
        assert names.count("shared.weight") == 1, (stem, names)
        assert sorted(names) == sorted(all_initializer_names(model.graph))


def test_plain_onnx_graphsurgeon_would_duplicate_it():
    """The defect export_model repairs; if onnx-graphsurgeon fixes it, this test says so."""
    model = load_model(MODELS_DIR / "if_subgraph.onnx")
    plain = gs.export_onnx(gs.import_onnx(model))
    assert all_initializer_names(plain.graph).count("shared.weight") > 1
    assert not plain.metadata_props


def test_opset_raise_lifts_ir_version_and_keeps_custom_domains():
    model = onnx.parser.parse_model("""
    <ir_version: 7, opset_import: ["" : 13, "my.domain" : 2]>
    g (float[2] x) => (float[2] y) { y = Relu(x) }""")
    graph = import_graph(model)
    graph.opset = 21
    exported = export_model(graph, model)
    assert {o.domain: o.version for o in exported.opset_import} == {"": 21, "my.domain": 2}
    assert exported.ir_version == 10


def test_iter_graphs_and_uses_reach_subgraphs():
    model = load_model(MODELS_DIR / "if_subgraph.onnx")
    graph = import_graph(model)
    assert len(list(iter_graphs(graph))) == 3
    uses = tensor_uses(graph)
    owners = {id(use.graph) for use in uses["shared.weight"]}
    assert len(uses["shared.weight"]) == 3 and len(owners) == 3


def test_weight_values_from_initializer_and_constant_node():
    model = load_model(MODELS_DIR / "constant_weights.onnx")
    graph = import_graph(model)
    conv = next(node for node in graph.nodes if node.op == "Conv")
    values = weight_values(conv.inputs[1])
    expected = next(n for n in model.graph.node if n.output[0] == conv.inputs[1].name)
    np.testing.assert_array_equal(values, onnx.numpy_helper.to_array(expected.attribute[0].t))
    assert weight_values(graph.inputs[0]) is None
    mlp = import_graph(load_model(MODELS_DIR / "mlp.onnx"))
    gemm = next(node for node in mlp.nodes if node.op == "Gemm")
    assert weight_values(gemm.inputs[1]).shape == (128, 64)


def test_unused_initializers_found_in_subgraphs_too():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c) => (float[2] y)
    <float[2] used = {1, 2}, float[3] spare = {0, 0, 0}>
    {
      y = If(c) <
        then_branch = t () => (float[2] o1) <float[4] inner_spare = {0, 0, 0, 0}> { o1 = Add(x, used) },
        else_branch = e () => (float[2] o2) { o2 = Neg(x) }>
    }""")
    found = unused_initializers(model.graph)
    assert [(e["tensor"], e["bytes"]) for e in found] == [("spare", 12), ("inner_spare", 16)]
    assert found[1]["graph"].startswith("main/")


BRANCHES_READING_W = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, bool c) => (float[N, 4] y)
<float[4, 4] W = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,2}>
{
  y = If(c) <
    then_branch = t () => (float[N, 4] o1) { o1 = MatMul(x, W) },
    else_branch = e () => (float[N, 4] o2) { ELSE }>
}"""
"""W read by the then-branch; ELSE is the else-branch's body."""


def test_constant_read_only_by_both_branches_is_stored_once_in_the_enclosing_graph():
    model = onnx.parser.parse_model(BRANCHES_READING_W.replace("ELSE", "o2 = Add(x, x)"))
    both = onnx.parser.parse_model(BRANCHES_READING_W.replace("ELSE", "m = MatMul(x, W)\n o2 = Neg(m)"))
    plain = gs.export_onnx(gs.import_onnx(both))
    assert all_initializer_names(plain.graph).count("W") == 2, "onnx-graphsurgeon stores it in each branch"
    exported = export_model(import_graph(both), both)
    assert all_initializer_names(exported.graph) == ["W"]
    assert [t.name for t in exported.graph.initializer] == ["W"]
    onnx.checker.check_model(exported, full_check=True)
    for switch in (True, False):
        assert_same_outputs(both, exported, [{"x": np.ones((2, 4), np.float32), "c": np.array(switch)}])
    single = export_model(import_graph(model), model)
    assert all_initializer_names(single.graph) == ["W"]


def test_is_constant_derived_follows_chains_and_diamonds_but_not_inputs_or_subgraphs():
    weight = gs.Constant("w", np.ones((2, 2), np.float32))
    x = gs.Variable("x", dtype=np.float32, shape=[2, 2])
    cast, scaled, summed, mixed = (
        gs.Variable(name, dtype=np.float32) for name in ("cast", "scaled", "summed", "mixed")
    )
    graph = gs.Graph(nodes=[
        gs.Node("Cast", inputs=[weight], outputs=[cast], attrs={"to": 1}),
        gs.Node("Mul", inputs=[cast, weight], outputs=[scaled]),
        gs.Node("Add", inputs=[scaled, cast], outputs=[summed]),  # diamond: cast read twice
        gs.Node("Add", inputs=[summed, x], outputs=[mixed]),
    ], inputs=[x], outputs=[mixed])
    memo: dict = {}
    assert is_constant_derived(summed, memo) and memo[id(cast)] is True
    assert not is_constant_derived(mixed, memo) and not is_constant_derived(x, memo)
    branch = gs.Variable("branch", dtype=np.float32)
    body = gs.Graph(nodes=[], inputs=[], outputs=[gs.Constant("b", np.ones(1, np.float32))])
    graph.nodes.append(gs.Node("If", inputs=[gs.Constant("c", np.array(True))], outputs=[branch],
                               attrs={"then_branch": body, "else_branch": body}))
    assert not is_constant_derived(branch, {})
