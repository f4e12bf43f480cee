"""Models with ops that only onnxruntime defines in the ONNX domain (onnxruntime-genai's builder
writes RMSNorm as default-domain SimplifiedLayerNormalization): loaded, compressed, checked."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.cli import main
from optimizer.errors import ModelLoadError
from optimizer.fileio.checker import check_model_full
from optimizer.fileio.model import load_model
from optimizer.fileio.onnxruntime_ops import checker_view, onnxruntime_only_nodes
from optimizer.fileio.save import save_model
from tests.helpers.runtime import max_abs_error

RNG = np.random.default_rng(0)


def rms_norm_model(op: str = "SimplifiedLayerNormalization", opset: int = 17) -> onnx.ModelProto:
    scale = numpy_helper.from_array(RNG.uniform(0.5, 1.5, 256).astype(np.float32), "scale")
    weight = numpy_helper.from_array(RNG.standard_normal((256, 512)).astype(np.float32) * 0.1, "weight")
    inputs = ["x", "scale"] + (["bias"] if op == "LayerNormalization" else [])
    extra = [numpy_helper.from_array(np.zeros(256, np.float32), "bias")] if op == "LayerNormalization" else []
    graph = helper.make_graph(
        [
            helper.make_node(op, inputs, ["normed"], name="norm", axis=-1, epsilon=1e-5),
            helper.make_node("MatMul", ["normed", "weight"], ["y"], name="proj"),
        ],
        "decoder_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 512])],
        [scale, weight, *extra],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_a_default_domain_rms_norm_loads_and_the_model_is_left_as_it_was():
    model = rms_norm_model()
    before = model.SerializeToString(deterministic=True)
    loaded = load_model(model)
    assert [node.domain for node in loaded.graph.node] == ["", ""]
    assert {entry.domain for entry in loaded.opset_import} == {""}
    with checker_view(model):  # in place: the same proto, changed only for the checker's eyes
        onnx.checker.check_model(model)
    assert model.SerializeToString(deterministic=True) == before


def test_an_op_nobody_defines_is_still_refused_by_name():
    model = rms_norm_model()
    model.graph.node[0].op_type = "NoSuchNormalization"
    with pytest.raises(ModelLoadError, match=r"not a valid ONNX model.*NoSuchNormalization"):
        load_model(model)


def test_only_layer_normalization_below_opset_17_is_onnxruntimes():
    assert [n.name for n in onnxruntime_only_nodes(rms_norm_model("LayerNormalization", 13))] == ["norm"]
    assert onnxruntime_only_nodes(rms_norm_model("LayerNormalization", 17)) == []
    assert load_model(rms_norm_model("LayerNormalization", 13)).graph.node[0].domain == ""


def test_the_checker_view_is_undone_when_the_check_fails():
    model = rms_norm_model()
    with pytest.raises(RuntimeError), checker_view(model) as seen:
        assert seen.graph.node[0].domain == "com.microsoft"
        assert {entry.domain for entry in seen.opset_import} == {"", "com.microsoft"}
        raise RuntimeError("checker failed")
    assert model.graph.node[0].domain == ""
    assert [entry.domain for entry in model.opset_import] == [""]


def test_int8_of_a_model_with_rms_norm_runs_in_onnxruntime_and_passes_the_full_check(tmp_path):
    source = save_model(rms_norm_model(), tmp_path / "model.onnx")
    target = tmp_path / "out.onnx"
    assert main(["optimize", str(source), "-o", str(target), "--quantize", "int8", "--quiet"]) == 0
    produced = onnx.load(str(target))
    assert {t.data_type for t in produced.graph.initializer if t.name.startswith("weight")} == {
        TensorProto.INT8,
        TensorProto.FLOAT,
    }
    assert sum(t.data_type == TensorProto.INT8 for t in produced.graph.initializer) == 1
    assert [n.domain for n in produced.graph.node if n.op_type == "SimplifiedLayerNormalization"] == [""]
    check_model_full(produced)
    feeds = [{"x": RNG.standard_normal((1, 8, 256)).astype(np.float32)} for _ in range(3)]
    # dynamic int8 (weights and activations rounded to 8 bits) on outputs of about 5 in absolute value
    assert max_abs_error(source, target, feeds) < 0.15


def test_the_input_size_counts_external_data_of_any_name(tmp_path):
    model = rms_norm_model()
    source = tmp_path / "model.onnx"
    onnx.save_model(model, str(source), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    report = tmp_path / "report.json"
    target = tmp_path / "out.onnx"
    assert main(["optimize", str(source), "-o", str(target), "--report", str(report), "--quiet"]) == 0
    expected = source.stat().st_size + (tmp_path / "model.onnx.data").stat().st_size
    assert json.loads(report.read_text())["input"]["size_bytes"] == expected


@pytest.mark.parametrize(("op", "opset"), [("SimplifiedLayerNormalization", 17), ("LayerNormalization", 13)])
def test_int4_converts_such_a_model_to_opset_21(tmp_path, op, opset):
    """4-bit needs opset 21: onnx's version converter has no schema for these ops (review), so they
    wait in a private domain while it runs and come back to the default domain."""
    source = save_model(rms_norm_model(op, opset), tmp_path / "model.onnx")
    target = tmp_path / "out.onnx"
    assert main(["optimize", str(source), "-o", str(target), "--quantize", "int4", "--quiet"]) == 0
    produced = onnx.load(str(target))
    assert {entry.domain: entry.version for entry in produced.opset_import} == {"": 21}
    assert [n.domain for n in produced.graph.node if n.op_type == op] == [""]
    check_model_full(produced)
    feeds = [{"x": RNG.standard_normal((1, 8, 256)).astype(np.float32)} for _ in range(3)]
    # 4-bit blocks of 32 on outputs of about 5 in absolute value
    assert max_abs_error(source, target, feeds) < 0.6
