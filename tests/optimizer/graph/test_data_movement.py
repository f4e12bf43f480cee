"""Data-movement ops applied with numpy give what onnxruntime computes, element for element."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.graph.convert import import_graph
from optimizer.graph.data_movement import ChainReaders, NotApplied, apply_data_movement, follow_chain
from tests.helpers.runtime import run_model

DATA = np.arange(2 * 6 * 5, dtype=np.float32).reshape(2, 6, 5)


def _one_op(op: str, params: dict[str, np.ndarray], outputs: int = 1, **attrs: object) -> onnx.ModelProto:
    names = ["data", *params]
    outs = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op, names, outs, name="op", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in params.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CASES = [
    ("Slice", {"s": [5, -1], "e": [-100, 1], "a": [1, -1], "st": [-2, 1]}, 1, {}),
    ("Slice", {"s": [1], "e": [1000], "a": [2]}, 1, {}),
    ("Split", {"split": [1, 3, 2]}, 3, {"axis": 1}),
    ("Squeeze", {"axes": [0]}, 1, {}),
    ("Unsqueeze", {"axes": [-1, 0]}, 1, {}),
    ("Reshape", {"shape": [0, -1]}, 1, {}),
    ("Transpose", {}, 1, {"perm": [2, 0, 1]}),
    ("Transpose", {}, 1, {}),
    ("Flatten", {}, 1, {"axis": 2}),
    ("Flatten", {}, 1, {"axis": 0}),
    ("Gather", {"idx": [[-1, 0], [2, 2]]}, 1, {"axis": 1}),
    ("Identity", {}, 1, {}),
]


@pytest.mark.parametrize("op, params, outputs, attrs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_numpy_application_matches_onnxruntime(op, params, outputs, attrs):
    arrays = {k: np.asarray(v, np.int64) for k, v in params.items()}
    model = _one_op(op, arrays, outputs, **attrs)
    expected = run_model(model, [{"data": DATA[:1] if op == "Squeeze" else DATA}])[0]
    node = import_graph(model).nodes[0]
    got = apply_data_movement(node, [DATA[:1] if op == "Squeeze" else DATA])
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_concat_and_a_run_time_parameter():
    graph = import_graph(_one_op("Concat", {}, 1, axis=0))
    node = graph.nodes[0]
    node.inputs.append(gs.Constant("other", np.zeros((1, 6, 5), np.float32)))
    (joined,) = apply_data_movement(node, [DATA, np.full((1, 6, 5), -1.0, np.float32)])
    assert joined.shape == (3, 6, 5) and (joined[2] == -1).all()
    reshape = import_graph(_one_op("Reshape", {"shape": np.asarray([-1], np.int64)}, 1)).nodes[0]
    reshape.inputs[1] = gs.Variable("computed_shape", dtype=np.int64)
    with pytest.raises(NotApplied, match="computed_shape"):
        apply_data_movement(reshape, [DATA])


def test_follow_chain_stops_at_a_reader_that_computes():
    model = _one_op("Transpose", {}, 1)
    graph = import_graph(model)
    transposed = graph.nodes[0].outputs[0]
    graph.nodes.append(gs.Node("Relu", "relu", inputs=[transposed], outputs=[gs.Variable("r", dtype=np.float32)]))
    graph.outputs = [graph.nodes[1].outputs[0]]
    readers = ChainReaders.of(graph)
    with pytest.raises(NotApplied, match="read by Relu 'relu' input 0"):
        follow_chain(graph.inputs[0], DATA, readers, lambda use: False)
    leaves = follow_chain(graph.inputs[0], DATA, readers, lambda use: use.node.op == "Relu")
    assert [use.node.name for use, _ in leaves] == ["relu"]
    np.testing.assert_array_equal(leaves[0][1], DATA.T)


def test_parameters_that_do_not_fit_the_data_are_not_applied():
    """Fuzz seed 5 mutant 1637: a Squeeze turned into Reshape(shape=[0]) raised numpy's ValueError
    out of the quantize pass (exit 3) instead of leaving the weight float."""
    node = import_graph(_one_op("Reshape", {"shape": np.asarray([0], np.int64)}, 1)).nodes[0]
    with pytest.raises(NotApplied, match=r"Reshape 'op' cannot apply to a \[2, 6, 5\] input"):
        apply_data_movement(node, [DATA])
