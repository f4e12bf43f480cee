"""Tests for optimizer.graph.inspection: exact counts and bytes on small hand-built models."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.graph.inspection import (
    DuplicateGroup,
    TensorInfo,
    human_bytes,
    inspect_model,
    weight_bytes_by_dtype,
    weight_tensors,
)
from optimizer.report.inspect_text import inspection_text

F = TensorProto.FLOAT
IF_PATH = "main/If_9"


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def _initializers() -> list[TensorProto]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    s = np.array([1, 2, 3, 4], dtype=np.int8)
    return [
        _init("W", w),                                   # 48 B
        _init("W_copy", w.copy()),                       # 48 B, exact copy
        _init("W_t", np.ascontiguousarray(w.T)),         # 48 B, transposed copy
        _init("B1", b),                                  # 32 B
        _init("B2", b.copy()),                           # 32 B, exact copy
        _init("S1", s),                                  # 4 B
        _init("S2", s.copy()),                           # 4 B
        _init("Q", np.arange(16, dtype=np.int8)),        # 16 B, unused
        helper.make_tensor("N4", TensorProto.INT4, [5], [1, -2, 3, 4, 5]),  # 3 B, unused
    ]


def _if_node() -> onnx.NodeProto:
    """then_branch owns T_in and reads outer C; else_branch reads outer C only."""
    out = helper.make_tensor_value_info
    then_graph = helper.make_graph(
        [helper.make_node("Add", ["h7", "T_in"], ["t1"]),
         helper.make_node("Mul", ["t1", "C"], ["then_out"])],
        "then", [], [out("then_out", F, ["batch", 4])],
        initializer=[_init("T_in", np.full(4, 7.0, dtype=np.float32))],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Sub", ["h7", "C"], ["else_out"])],
        "else", [], [out("else_out", F, ["batch", 4])],
    )
    return helper.make_node(
        "If", ["cond"], ["if_out"], then_branch=then_graph, else_branch=else_graph
    )


def _function() -> onnx.FunctionProto:
    return helper.make_function(
        "local", "Scale", ["x"], ["y"],
        [helper.make_node("Constant", [], ["k"], value_float=3.0),
         helper.make_node("Mul", ["x", "k"], ["y"])],
        [helper.make_opsetid("", 17)],
    )


def build_model() -> onnx.ModelProto:
    c_value = _init("C", np.array([1, 2, 3, 4], dtype=np.float32))
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["h1"]),
        helper.make_node("MatMul", ["X", "W_copy"], ["h2"]),
        helper.make_node("Add", ["h1", "h2"], ["h3"]),
        helper.make_node("MatMul", ["h3", "W_t"], ["h4"]),
        helper.make_node("Constant", [], ["C"], value=c_value),     # 16 B
        helper.make_node("Add", ["h4", "C"], ["h5"]),
        helper.make_node("Constant", [], ["K"], value_float=2.0),   # 4 B
        helper.make_node("Mul", ["h5", "K"], ["h6"]),
        helper.make_node("MyOp", ["h6"], ["h7"], domain="custom.ops"),
        _if_node(),                                                 # index 9
        helper.make_node("Scale", ["if_out"], ["Y"], domain="local"),
        helper.make_node("Add", ["B1", "B2"], ["bsum"]),
        helper.make_node("Add", ["S1", "S2"], ["ssum"]),
    ]
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("SP", F, [2], [1.0, 2.0]),
        helper.make_tensor("SP_idx", TensorProto.INT64, [2], [1, 5]),
        [10],
    )  # 8 B values + 16 B indices
    graph = helper.make_graph(
        nodes, "main",
        [helper.make_tensor_value_info("X", F, ["batch", 4]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("Y", F, ["batch", 4]),
         helper.make_tensor_value_info("bsum", F, [8]),
         helper.make_tensor_value_info("ssum", TensorProto.INT8, [4])],
        initializer=_initializers(),
        sparse_initializer=[sparse],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.ops", 1),
                       helper.make_opsetid("local", 1)],
        functions=[_function()],
        producer_name="unit-test", producer_version="1.0",
    )
    helper.set_model_props(model, {"vocab": "abc", "author": "me"})
    return model


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    built = build_model()
    onnx.checker.check_model(built)
    return built


def test_nodes_by_op_counts_every_graph_and_function(model):
    report = inspect_model(model)
    assert report.nodes_by_op == {
        "Add": 5, "Constant": 3, "If": 1, "MatMul": 3, "Mul": 3, "Sub": 1,
        "custom.ops::MyOp": 1, "local::Scale": 1,
    }
    assert list(report.nodes_by_op) == sorted(report.nodes_by_op)


def test_weight_bytes_by_dtype_and_total(model):
    floats = 3 * 48 + 2 * 32 + 16 + 4 + 4 + 16 + (8 + 16)  # W*, B*, C, K, fn k, T_in, sparse
    expected = {"FLOAT": floats, "INT4": 3, "INT8": 4 + 4 + 16}
    assert weight_bytes_by_dtype(model) == expected
    report = inspect_model(model)
    assert report.weight_bytes_by_dtype == expected
    assert report.weight_bytes_total == floats + 3 + 24 == 299


def test_weight_bytes_by_first_consumer_op(model):
    assert inspect_model(model).weight_bytes_by_op == {
        "(unused)": 16 + 24 + 3,          # Q, sparse SP, N4
        "Add": 64 + 8 + 16 + 16,          # B1+B2, S1+S2, C (Add before Mul), T_in
        "MatMul": 3 * 48,
        "Mul": 4 + 4,                     # K, function's k
    }


def test_constant_nodes_subgraphs_and_io(model):
    report = inspect_model(model)
    assert (report.constant_node_weights, report.constant_node_weight_bytes) == (3, 24)
    assert report.subgraphs == [
        f"{IF_PATH}.else_branch (1 node)",     # attribute order (make_node sorts by name)
        f"{IF_PATH}.then_branch (2 nodes)",
        "function:local.Scale (2 nodes)",
    ]
    assert report.inputs == ["X: FLOAT[batch,4]", "cond: BOOL[]"]
    assert report.outputs == ["Y: FLOAT[batch,4]", "bsum: FLOAT[8]", "ssum: INT8[4]"]
    assert report.metadata_keys == ["author", "vocab"]
    assert report.opsets == {"ai.onnx": 17, "custom.ops": 1, "local": 1}
    assert (report.ir_version, report.producer) == (model.ir_version, "unit-test 1.0")


def test_consumers_follow_scope_into_subgraphs(model):
    by_name = {(t.graph, t.name): t for t in weight_tensors(model)}
    assert by_name[("main", "C")].consumers == 3          # main Add, then Mul, else Sub
    assert by_name[("main", "C")].source == "constant-node"
    assert by_name[(f"{IF_PATH}.then_branch", "T_in")].consumers == 1
    assert by_name[("main", "W")].consumers == 1
    assert by_name[("main", "Q")].consumers == 0
    assert by_name[("function:local.Scale", "k")].consumers == 1
    sparse = by_name[("main", "SP")]
    assert (sparse.source, sparse.shape, sparse.size_bytes) == ("sparse-initializer", (10,), 24)


def test_inner_tensor_shadows_outer_name():
    inner = helper.make_graph(
        [helper.make_node("Identity", ["A"], ["o"])], "inner", [],
        [helper.make_tensor_value_info("o", F, [2])],
        initializer=[_init("A", np.zeros(2, dtype=np.float32))],
    )
    node = helper.make_node("If", ["c"], ["r"], name="gate", then_branch=inner, else_branch=inner)
    graph = helper.make_graph(
        [node, helper.make_node("Add", ["A", "A"], ["s"])], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("r", F, [2]), helper.make_tensor_value_info("s", F, [2])],
        initializer=[_init("A", np.ones(2, dtype=np.float32))],
    )
    infos = weight_tensors(helper.make_model(graph))
    assert [(t.graph, t.name, t.consumers) for t in infos] == [
        ("main", "A", 2),
        ("main/gate.else_branch", "A", 1),
        ("main/gate.then_branch", "A", 1),
    ]


def test_duplicates_exact_and_transposed(model):
    report = inspect_model(model)
    assert report.duplicates == [
        DuplicateGroup("transposed", ("W", "W_copy", "W_t"), 96),
        DuplicateGroup("exact", ("B1", "B2"), 32),
        DuplicateGroup("exact", ("S1", "S2"), 4),
    ]


def test_small_duplicates_count_unless_a_minimum_is_set(model):
    """Every duplicate counts by default, as every one is a byte share saves; a minimum hides small ones."""
    assert all("S1" not in g.tensors for g in inspect_model(model, min_duplicate_bytes=16).duplicates)


def test_duplicates_across_graphs_use_path_prefix():
    value = np.arange(8, dtype=np.float32)
    inner = helper.make_graph(
        [helper.make_node("Identity", ["D"], ["o"])], "inner", [],
        [helper.make_tensor_value_info("o", F, [8])], initializer=[_init("D", value)],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["", "c"], [], body=inner, name="loop")], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [],
        initializer=[_init("E", value.copy())],
    )
    groups = inspect_model(helper.make_model(graph)).duplicates
    assert groups == [DuplicateGroup("exact", ("E", "main/loop.body/D"), 32)]


def test_largest_tensors_order(model):
    report = inspect_model(model, top=10)
    assert [(t.graph, t.name) for t in report.largest_tensors] == [
        ("main", "W"), ("main", "W_copy"), ("main", "W_t"), ("main", "B1"), ("main", "B2"),
        ("main", "SP"), ("main", "C"), ("main", "Q"), (f"{IF_PATH}.then_branch", "T_in"),
        ("function:local.Scale", "k"),
    ]
    assert report.largest_tensors[0] == TensorInfo(
        "W", "FLOAT", (4, 3), 48, "initializer", "main", 1
    )
    assert len(inspect_model(model, top=2).largest_tensors) == 2


def test_constant_attribute_forms_count_as_weights():
    nodes = [
        helper.make_node("Constant", [], ["ints"], value_ints=[1, 2, 3]),
        helper.make_node("Constant", [], ["int"], value_int=5),
        helper.make_node("Constant", [], ["floats"], value_floats=[1.0, 2.0]),
        helper.make_node("Constant", [], ["strs"], value_strings=[b"ab", b"cde"]),
    ]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("int", 7, [])])
    infos = weight_tensors(helper.make_model(graph))
    assert [(t.name, t.dtype, t.shape, t.size_bytes) for t in infos] == [
        ("ints", "INT64", (3,), 24), ("int", "INT64", (), 8),
        ("floats", "FLOAT", (2,), 8), ("strs", "STRING", (2,), 5),
    ]


def test_to_dict_is_json_and_deterministic(model):
    first = inspect_model(model).to_dict()
    second = inspect_model(build_model()).to_dict()
    assert first == second
    assert json.loads(json.dumps(first)) == first
    assert first["largest_tensors"][0]["shape"] == [4, 3]
    assert first["duplicates"][0] == {
        "kind": "transposed", "tensors": ["W", "W_copy", "W_t"], "wasted_bytes": 96
    }


def test_to_text_has_every_section(model):
    text = inspection_text(inspect_model(model))
    for section in ("Model: (in memory)", "Inputs", "Outputs", "Nodes by op (18 total",
                    "Weights by dtype", "Weights by consuming op", "Subgraphs",
                    "Largest tensors", "Duplicates (132 B could be saved)", "Metadata keys",
                    "custom.ops::MyOp", "X: FLOAT[batch,4]", "W, W_copy, W_t"):
        assert section in text, section
    assert text == inspection_text(inspect_model(model))


def test_file_size_counts_external_data_and_ignores_missing(tmp_path):
    weight = np.arange(4096, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["big"], ["out"])], "g", [],
        [helper.make_tensor_value_info("out", F, [4096])], initializer=[_init("big", weight)],
    )
    path = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True,
                    location="w.bin", size_threshold=0)
    loaded = onnx.load(str(path))
    expected = os.path.getsize(path) + os.path.getsize(tmp_path / "w.bin")
    report = inspect_model(loaded, path=path)
    assert (report.path, report.file_size_bytes) == (str(path), expected)
    os.remove(tmp_path / "w.bin")
    assert inspect_model(loaded, path=path).file_size_bytes == os.path.getsize(path)
    assert inspect_model(loaded).file_size_bytes is None


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (1_234_567, "1.2 MB"),
    (999_990, "1.0 MB"), (3 * 10**9, "3.0 GB"),
])
def test_human_bytes(size, text):
    assert human_bytes(size) == text


def test_duplicates_reshaped_and_cast_kinds():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    wide = rng.standard_normal((8, 2)).astype(np.float32)
    initializers = [
        _init("R", w), _init("R_flat", w.reshape(-1).copy()), _init("R_3d", w.reshape(2, 3, 4).copy()),
        _init("C32", wide), _init("C16", wide.astype(np.float16)), _init("C32_copy", wide.copy()),
        _init("N16", (wide + 1).astype(np.float16)),                # same shape, not a cast copy
    ]
    nodes = [helper.make_node("Identity", [t.name], [f"o_{t.name}"]) for t in initializers]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(f"o_{t.name}", t.data_type, None)
                                               for t in initializers], initializer=initializers)
    groups = inspect_model(helper.make_model(graph)).duplicates
    assert groups == [
        DuplicateGroup("reshaped", ("R", "R_3d", "R_flat"), 2 * 96),
        DuplicateGroup("cast", ("C16", "C32", "C32_copy"), 32 + 64),
    ]
    text = inspection_text(inspect_model(helper.make_model(graph)))
    assert "reshaped" in text and "cast" in text


def test_transposed_and_cast_copies_of_one_tensor_form_one_group():
    """A_t = A transposed and A16 = A cast: share keeps A and replaces both (48 + 24 B), so does inspect."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    initializers = [_init("A", w), _init("A_t", np.ascontiguousarray(w.T)), _init("A16", w.astype(np.float16))]
    nodes = [helper.make_node("Identity", [t.name], [f"o_{t.name}"]) for t in initializers]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(f"o_{t.name}", t.data_type, None)
                                               for t in initializers], initializer=initializers)
    groups = inspect_model(helper.make_model(graph)).duplicates
    assert groups == [DuplicateGroup("transposed", ("A", "A16", "A_t"), 48 + 24)]
