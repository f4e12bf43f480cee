"""Loader limits a hostile file could abuse, unit by unit: subgraph nesting depth, a
ConstantOfShape that would fill memory, cycles and dangling inputs, opset imports, and sizes
checked against memory before anything is read. (tests/reliability/test_bad_inputs.py runs the
same cases end to end through the CLI.)"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import optimizer.fileio.external_data as external_module
import optimizer.fileio.model as model_module
from optimizer.errors import ModelLoadError
from optimizer.fileio.model import load_model
from optimizer.fileio.tensor_checks import custom_domain_ops
from tests.helpers.model_files import (
    EXTERNAL_NAME,
    WEIGHTS,
    _add_model,
    _valid_model_bytes,
    _write,
    _write_external_model,
)  # fmt: skip

# --------------------------------------------------------------------------- graph limits


def _nested_if_model(depth: int) -> bytes:
    """``depth`` If nodes, each in the then-branch of the one above (built in place)."""
    model = _add_model(numpy_helper.from_array(WEIGHTS, "w"))
    del model.graph.node[:], model.graph.initializer[:]
    model.graph.input.add().CopyFrom(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    graph, out = model.graph, "y"
    for level in range(depth):
        node = graph.node.add(op_type="If", input=["c"], output=[out], name=f"if{level}")
        other = node.attribute.add(name="else_branch", type=onnx.AttributeProto.GRAPH).g
        other.node.add(op_type="Identity", input=["x"], output=[f"e{level}"])
        other.output.add(name=f"e{level}")
        other.name = f"else{level}"
        graph = node.attribute.add(name="then_branch", type=onnx.AttributeProto.GRAPH).g
        graph.name, out = f"then{level}", f"t{level}"
        graph.output.add(name=out)
    graph.node.add(op_type="Identity", input=["x"], output=[out])
    return model.SerializeToString()


def test_subgraph_nesting_limit_is_exact_and_names_the_node():
    limit = model_module.MAX_SUBGRAPH_DEPTH
    assert len(load_model(_nested_if_model(limit)).graph.node) == 1
    with pytest.raises(ModelLoadError, match=f"node 'if{limit}' \\(If\\): subgraphs nested over the limit of {limit}"):
        load_model(_nested_if_model(limit + 1))
    with pytest.raises(ModelLoadError, match="nested deeper than protobuf parses"):
        load_model(_nested_if_model(40))


def test_nesting_limit_covers_training_initialization_graphs():
    limit = model_module.MAX_SUBGRAPH_DEPTH
    model = _add_model(numpy_helper.from_array(WEIGHTS, "w"))
    model.training_info.add().initialization.CopyFrom(onnx.load_from_string(_nested_if_model(limit + 1)).graph)
    with pytest.raises(ModelLoadError, match=f"node 'if{limit}' \\(If\\): subgraphs nested over the limit"):
        load_model(model.SerializeToString())


def _constant_of_shape_model(shape_source: str, shape: list[int], value_type=None) -> onnx.ModelProto:
    shape_tensor = numpy_helper.from_array(np.array(shape, np.int64), "shape")
    attributes = {}
    if value_type is not None:
        attributes["value"] = helper.make_tensor("v", value_type, [1], [0])
    fill = helper.make_node("ConstantOfShape", ["shape"], ["filled"], name="fill", **attributes)
    nodes = [fill, helper.make_node("Identity", ["x"], ["y"])]
    initializers = []
    if shape_source == "initializer":
        initializers.append(shape_tensor)
    elif shape_source == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["shape"], value=shape_tensor))
    else:
        nodes.insert(0, helper.make_node("Constant", [], ["shape"], value_ints=shape))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("shape_source", ["initializer", "constant", "value_ints"])
def test_constant_of_shape_over_the_limit_is_refused_before_anything_is_allocated(shape_source):
    limit = model_module.MAX_CONSTANT_OF_SHAPE_BYTES
    load_model(_constant_of_shape_model(shape_source, [limit // 4]))
    load_model(_constant_of_shape_model(shape_source, [2, limit // 2], TensorProto.INT8))
    with pytest.raises(ModelLoadError, match=f"node 'fill' \\(ConstantOfShape\\): constant shape \\[2, {limit // 4}\\] "
                                             f"would materialize {2 * limit} bytes, over the limit of {limit}"):
        load_model(_constant_of_shape_model(shape_source, [2, limit // 4]))
    with pytest.raises(ModelLoadError, match="fill"):
        load_model(_constant_of_shape_model(shape_source, [2, limit // 2 + 1], TensorProto.INT8))


def test_constant_of_shape_in_a_branch_with_an_outer_scope_shape_is_checked():
    model = _constant_of_shape_model("initializer", [2**33])
    fill = model.graph.node[0]
    branch = helper.make_graph([fill], "then", [], [helper.make_tensor_value_info("filled", TensorProto.FLOAT, None)])
    del model.graph.node[0]
    model.graph.input.add().CopyFrom(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    model.graph.node.append(helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch))
    with pytest.raises(ModelLoadError, match="'fill' \\(ConstantOfShape\\)"):
        load_model(model)


@pytest.mark.parametrize(
    ("nodes", "reason"),
    [
        ([("Add", ["x", "b"], ["a"], "first"), ("Relu", ["a"], ["b"], "second"), ("Identity", ["a"], ["y"], "out")],
         "node 'second' \\(Relu\\): nodes form a cycle: node 'second' \\(Relu\\) -> node 'first' \\(Add\\) -> "
         "node 'second' \\(Relu\\)"),
        ([("Relu", ["y"], ["y"], "self")], "node 'self' \\(Relu\\): nodes form a cycle"),
        ([("Add", ["x", "nowhere"], ["y"], "adder")],
         "node 'adder' \\(Add\\): input 'nowhere' is produced by no node, initializer or graph input"),
    ],
)
def test_cycles_and_dangling_inputs_name_the_node(nodes, reason):
    graph = helper.make_graph([helper.make_node(op, i, o, name=n) for op, i, o, n in nodes], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    with pytest.raises(ModelLoadError, match=reason):
        load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_dangling_input_inside_a_branch_is_found_and_outer_names_are_not_dangling():
    branch = helper.make_graph([helper.make_node("Add", ["x", "w"], ["b_out"], name="inner")], "then", [],
                               [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, [4])])
    model = _add_model(numpy_helper.from_array(WEIGHTS, "w"))
    model.graph.input.add().CopyFrom(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    model.graph.node.append(helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch))
    load_model(model)
    branch.node[0].input[1] = "ghost"
    model.graph.node[1].CopyFrom(helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch))
    with pytest.raises(ModelLoadError, match="node 'inner' \\(Add\\): input 'ghost'"):
        load_model(model)


@pytest.mark.parametrize(
    ("opsets", "reason"),
    [
        ([("", 99)], "opset_import 'ai.onnx': version 99 is newer than this onnx knows"),
        ([("", 18), ("ai.onnx.ml", 99)], "opset_import 'ai.onnx.ml': version 99"),
        ([("", 18), ("ai.onnx", 17)], "opset_import 'ai.onnx': domain imported twice"),
        ([("", 0)], "version 0 is not >= 1"),
        ([("", 18), ("custom.domain", 999)], None),
    ],
)
def test_opset_imports_are_checked_for_onnx_domains_only(opsets, reason):
    model = _add_model(numpy_helper.from_array(WEIGHTS, "w"))
    del model.opset_import[:]
    for domain, version in opsets:
        model.opset_import.add(domain=domain, version=version)
    if reason is None:
        load_model(model)
        return
    with pytest.raises(ModelLoadError, match=reason):
        load_model(model)


# --------------------------------------------------------------------------- memory


def test_external_tensor_larger_than_memory_is_refused_before_reading(tmp_path, monkeypatch):
    model_path = _write_external_model(tmp_path)
    headrooms = iter([10**12, 31])
    monkeypatch.setattr(external_module, "memory_headroom_bytes", lambda: next(headrooms))
    with pytest.raises(ModelLoadError, match=f"{EXTERNAL_NAME}.*needs about 32 bytes of memory, more than the 31"):
        load_model(model_path)
    monkeypatch.setattr(external_module, "memory_headroom_bytes", lambda: 10**12)
    assert load_model(model_path).graph.initializer[0].raw_data == WEIGHTS.tobytes()


def test_model_file_larger_than_memory_is_refused_before_reading(tmp_path, monkeypatch):
    path = _write(tmp_path / "m.onnx", _valid_model_bytes())
    monkeypatch.setattr(external_module, "memory_headroom_bytes", lambda: path.stat().st_size)
    with pytest.raises(ModelLoadError, match=f"{path}: needs about .* bytes of memory"):
        load_model(path)




def test_custom_domain_ops_are_listed_from_every_graph_but_not_local_functions():
    branch = helper.make_graph([helper.make_node("Deep", ["x"], ["b"], domain="vendor.inner")], "then", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])])
    nodes = [helper.make_node("MyOp", ["x"], ["a"], domain="custom.domain"),
             helper.make_node("FusedMatMul", ["x", "x"], ["m"], domain="com.microsoft"),
             helper.make_node("Local", ["x"], ["l"], domain="local.fn"),
             helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph)
    model.functions.append(helper.make_function("local.fn", "Local", ["a"], ["b"],
                                                [helper.make_node("Relu", ["a"], ["b"])],
                                                [helper.make_opsetid("", 18)]))
    assert custom_domain_ops(model) == ["custom.domain:MyOp", "vendor.inner:Deep"]
