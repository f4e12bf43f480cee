"""inspect's "duplicates: N bytes could be saved" is the number of bytes the share pass then saves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes  # noqa: F401  (registers every pass)
from optimizer.fileio.model import load_model
from optimizer.graph.convert import import_graph
from optimizer.graph.inspection import inspect_model
from optimizer.registry import create_pass
from tests.helpers.samples import SAMPLE_MODELS, sample_ids


def _inspect_bytes(model: onnx.ModelProto) -> int:
    return sum(group.wasted_bytes for group in inspect_model(model).duplicates)


def _share_saved_bytes(model: onnx.ModelProto) -> int:
    result = create_pass("share")(import_graph(model))
    return int(result.report["saved_bytes"])


def scalar_constants_model() -> onnx.ModelProto:
    """The real layout detector's case: 4 groups of repeated 4-byte scalar Constant nodes (inspect once
    reported 208 B there, share saved 1,696 B)."""
    nodes, value = [], "x"
    for index in range(40):
        scalar = np.array([0.5, 2.0, 1e-5, 3.0][index % 4], dtype=np.float32)
        tensor = numpy_helper.from_array(scalar, f"c{index}")
        nodes.append(helper.make_node("Constant", [], [f"c{index}"], value=tensor, name=f"const{index}"))
        nodes.append(helper.make_node("Mul", [value, f"c{index}"], [f"y{index}"], name=f"mul{index}"))
        value = f"y{index}"
    graph = helper.make_graph(
        nodes, "scalars",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, [2, 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=sample_ids())
def test_sample_models(path: Path) -> None:
    assert _inspect_bytes(load_model(path)) == _share_saved_bytes(load_model(path))


def test_small_scalar_constants() -> None:
    model = scalar_constants_model()
    saved = _share_saved_bytes(scalar_constants_model())
    assert saved == 36 * 4
    assert _inspect_bytes(model) == saved
