"""Tests for optimizer.graph.bytes, the one stored-bytes counter (inspect, cleanup, quantize's report and
constants-to-initializers' min_size_bytes decision all count through it)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

import passes  # noqa: F401  (registers every pass)
from optimizer.graph.bytes import stored_bytes
from optimizer.graph.convert import import_graph
from optimizer.registry import create_pass


@pytest.mark.parametrize(("data_type", "values", "expected"), [
    (TensorProto.FLOAT, [1.0, 2.0, 3.0, 4.0, 5.0], 20),
    (TensorProto.INT4, [1, 2, 3, 4, 5], 3),           # two per byte
    (TensorProto.INT2, [1, 0, 1, -1, 1], 2),          # four per byte
    (TensorProto.FLOAT6E2M3, [1.0, 2.0, 0.5, 1.0, 0.0], 4),  # 30 bits
    (TensorProto.STRING, [b"ab", b"cde"], 5),
])
def test_packed_widths_and_strings(data_type: int, values: list, expected: int) -> None:
    assert stored_bytes(helper.make_tensor("t", data_type, [len(values)], values)) == expected


def test_typed_fields_and_raw_data_count_the_same() -> None:
    array = np.arange(6, dtype=np.float16).reshape(2, 3)
    typed = helper.make_tensor("t", TensorProto.FLOAT16, [2, 3], array.astype(np.float32).reshape(-1).tolist())
    assert len(typed.raw_data) == 0
    assert stored_bytes(typed) == stored_bytes(numpy_helper.from_array(array)) == 12


def test_sparse_counts_values_and_indices_and_scalars_one_element() -> None:
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.ones(3, np.float32), "v"), numpy_helper.from_array(np.arange(3), "i"), [10])
    assert stored_bytes(sparse) == 12 + 24
    assert stored_bytes(numpy_helper.from_array(np.array(1.5, np.float64), "s")) == 8


def test_graphsurgeon_constants_lazy_or_loaded() -> None:
    proto = helper.make_tensor("q", TensorProto.INT4, [7], [1] * 7)
    assert stored_bytes(gs.Constant("q", LazyValues(proto))) == 4
    assert stored_bytes(gs.Constant("w", np.zeros((2, 3), np.float32))) == 24


def _int2_constant_model(count: int) -> onnx.ModelProto:
    value = helper.make_tensor("c", TensorProto.INT2, [count], [1] * count)
    nodes = [helper.make_node("Constant", [], ["c"], value=value, name="const"),
             helper.make_node("Identity", ["c"], ["y"], name="id")]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.INT2, [count])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])


def test_min_size_bytes_sees_int2_packed() -> None:
    """16 INT2 values are 4 stored bytes (once counted as 16): under min_size_bytes=5 they stay a node."""
    result = create_pass("constants-to-initializers", min_size_bytes=5)(import_graph(_int2_constant_model(16)))
    assert [n.op for n in result.graph.nodes] == ["Constant", "Identity"]
    result = create_pass("constants-to-initializers", min_size_bytes=4)(import_graph(_int2_constant_model(16)))
    assert [n.op for n in result.graph.nodes] == ["Identity"]
