"""float16 storage: half the bytes, fp32's graph in onnxruntime, outputs within float16 rounding."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes  # noqa: F401
from optimizer.fileio.model import load_model
from optimizer.pass_base import PassContext
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass
from optimizer.verify.fusion import check_fusion
from tests.helpers.quantize_checks import initializers
from tests.helpers.runtime import run_model
from tests.helpers.samples import MODELS_DIR, SAMPLE_MODELS, sample_ids, seeded_feeds

MIN_COSINE = 0.99999


def _run(model: onnx.ModelProto, *names: str, feeds=None, **options):
    passes_ = [create_pass(name, **(options if name == "float16" else {})) for name in names]
    context = PassContext(calibration=(lambda: iter(feeds)) if feeds else None)
    result = Pipeline(passes_, check_each_pass=True, context=context).run(model)
    return result, result.runs[-1].report


def _cosines(reference, candidate, feeds) -> list[float]:
    found = []
    for expected_list, actual_list in zip(run_model(reference, feeds), run_model(candidate, feeds), strict=True):
        for expected, actual in zip(expected_list, actual_list, strict=True):
            a, b = expected.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
            assert np.isfinite(b).all()
            found.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return found


@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=sample_ids())
def test_every_sample_keeps_its_outputs_and_onnxruntime_runs_the_same_ops(path, tmp_path):
    model = load_model(path)
    result, report = _run(model, "float16")
    assert result.modified and report["counts"]["weights_float16"] >= 1
    feeds = seeded_feeds(model, count=3)
    assert min(_cosines(model, result.model, feeds)) >= MIN_COSINE
    assert check_fusion(result.model).run_ops == check_fusion(model).run_ops
    halves = [t for t in initializers(result.model).values() if t.data_type == TensorProto.FLOAT16]
    assert halves and report["details"]["max_relative_error"] <= 2.0**-11
    again, _ = _run(result.model, "float16")
    assert again.modified is False


@pytest.mark.parametrize("name, limit", [("mlp", 0.51), ("voice_activity", 0.515), ("cnn", 0.535)])
def test_weight_heavy_samples_halve(name, limit):
    """cnn keeps 3% of its file in graph structure and 2% in 16- and 32-value BatchNorm and bias
    tensors, whose Cast nodes would cost more than float16 saves: 0.531 is its floor here."""
    model = load_model(MODELS_DIR / f"{name}.onnx")
    result, _ = _run(model, "float16")
    assert len(result.model.SerializeToString()) <= limit * len(model.SerializeToString())


def test_a_weight_read_in_both_branches_is_stored_once_and_voice_activity_branches_agree():
    model = load_model(MODELS_DIR / "if_subgraph.onnx")
    result, _ = _run(model, "float16")
    stored = [t.name for g in [result.model.graph] for t in g.initializer]
    assert "shared.weight_float16" in stored
    assert sum(name == "shared.weight_float16" for name in initializers(result.model)) == 1
    voice = load_model(MODELS_DIR / "voice_activity.onnx")
    converted, _ = _run(voice, "float16")
    for is_16k in (True, False):
        feeds = [{"audio": np.random.default_rng(1).standard_normal((2, 1, 64)).astype(np.float32),
                  "is_16k": np.asarray(is_16k)}]
        assert min(_cosines(voice, converted.model, feeds)) >= MIN_COSINE


def _matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_values_beyond_float16_range_and_excluded_names_stay_float32():
    weight = np.ones((16, 16), np.float32)
    weight[3, 4] = 1e5
    result, report = _run(_matmul_model(weight), "float16")
    assert result.modified is False
    assert "exceed float16's range" in report["skipped"][0]["reason"]
    result, report = _run(_matmul_model(np.ones((16, 16), np.float32)), "float16", exclude_tensors=("re:^w$",))
    assert result.modified is False and report["skipped"][0]["reason"] == "name matches exclude_tensors"


def test_after_int8_the_scales_stay_float32_and_what_int8_left_becomes_float16():
    model = load_model(MODELS_DIR / "transformer_tied.onnx")
    feeds = seeded_feeds(model, count=4)
    result, report = _run(model, "quantize", "float16", feeds=feeds)
    reasons = {s["tensor"]: s["reason"] for s in report["skipped"]}
    scales = [name for name in reasons if name.endswith("_scale")]
    assert scales and all("quantization parameter" in reasons[name] or "min_elements" in reasons[name]
                          for name in scales)
    assert any("quantization parameter" in reasons[name] for name in scales)
    stored = initializers(result.model)
    assert all(stored[name].data_type == TensorProto.FLOAT for name in scales)
    assert any(t.data_type == TensorProto.FLOAT16 for t in stored.values())
    assert min(_cosines(model, result.model, feeds)) >= 0.99


def test_the_cli_flag_maps_to_the_pass_and_refuses_what_it_does_not_have(tmp_path, capsys):
    from optimizer.cli import main

    out = tmp_path / "mlp.fp16.onnx"
    code = main(["optimize", str(MODELS_DIR / "mlp.onnx"), "-o", str(out), "--float16", "storage", "--validate",
                 "--report", str(tmp_path / "r.json")])
    assert code == 0 and "PASS" in capsys.readouterr().out
    assert any(t.data_type == TensorProto.FLOAT16 for t in onnx.load(str(out)).graph.initializer)
    refused = main(["optimize", str(MODELS_DIR / "mlp.onnx"), "-o", str(tmp_path / "x.onnx"), "--float16", "half"])
    assert refused == 2 and "invalid choice: 'half'" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    both = main(["optimize", str(MODELS_DIR / "mlp.onnx"), "-o", str(tmp_path / "x.onnx"), "--float16", "compute",
                 "--bfloat16", "compute"])
    assert both == 2 and "choose one" in capsys.readouterr().err
    bf16 = main(["optimize", str(MODELS_DIR / "mlp.onnx"), "-o", str(tmp_path / "x.onnx"), "--bfloat16", "compute"])
    assert bf16 == 2 and "needs a provider with bfloat16 kernels" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
