"""One error path: the same bad input gets the same exit code in every mode, a failing pass is named
with the node it failed on, missing calibration data is refused before any work, and the automatic
fusion check never fails a run whose output was written and validated.

Exit codes: 0 success, 1 validation failed, 2 bad input or usage, 3 internal error.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer import registry
from optimizer.api import OptimizeOptions, optimize
from optimizer.cli import main
from optimizer.errors import OptionError, PassError
from optimizer.internal_errors import working_on
from optimizer.pass_base import Pass, PassContext, PassResult
from tests.helpers.samples import MODELS_DIR

MLP = MODELS_DIR / "mlp.onnx"


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture
def custom_op_model(tmp_path) -> tuple[Path, Path]:
    """A custom-domain op feeding a MatMul wide enough (K=256) for dynamic mode to calibrate it."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32), "W")
    nodes = [helper.make_node("CustomRelu", ["x"], ["h"], name="custom", domain="com.example"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    source = tmp_path / "custom.onnx"
    onnx.save(model, source)
    calibration = tmp_path / "cal"
    calibration.mkdir()
    for index in range(2):
        feed = np.random.default_rng(index).standard_normal((1, 256)).astype(np.float32)
        np.savez(calibration / f"{index}.npz", x=feed)
    return source, calibration


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_custom_domain_op_that_must_run_is_bad_input_in_every_mode(custom_op_model, tmp_path, mode, capsys):
    source, calibration = custom_op_model
    output = tmp_path / "out" / "o.onnx"
    output.parent.mkdir()
    code = main(["optimize", str(source), "-o", str(output), "--quantize", "int8", "--quantize-mode", mode,
                 "--calibration-data", str(calibration), "--quiet"])
    lines = _error_lines(capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("onnx-compress: error: ") and "CustomRelu" in lines[0]
    assert list(output.parent.iterdir()) == []


def test_a_custom_domain_op_that_need_not_run_passes_through(custom_op_model, tmp_path, capsys):
    source, _ = custom_op_model
    code = main(["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--quantize", "int8",
                 "--quantize-mode", "weights"])
    assert code == 0 and (tmp_path / "o.onnx").exists()
    assert "custom-domain ops passed through untouched" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "request_text"), [
    (["--quantize", "int8", "--quantize-mode", "static"], "--quantize-mode static"),
    (["--prune", "0.5", "--prune-mode", "sensitivity"], "--prune-mode sensitivity"),
    (["--prune", "0.5", "--prune-mode", "wanda"], "--prune-mode wanda"),
    (["--prune", "0.5", "--prune-mode", "nm", "--set", "prune.criterion=wanda"], "--set prune.criterion=wanda"),
    (["--prune", "0.5", "--prune-mode", "sparsegpt"], "--prune-mode sparsegpt"),
    (["--prune", "0.5", "--prune-structure", "heads"], "--prune-structure heads"),
    (["--prune-flops", "0.1"], "--prune-flops"),
    (["--quantize", "int4", "--quantize-mode", "weights", "--set", "quantize.weight_rounding=gptq"],
     "--set quantize.weight_rounding=gptq"),
])
def test_missing_calibration_data_is_refused_before_any_work(tmp_path, capsys, flags, request_text):
    code = main(["optimize", str(MLP), "-o", str(tmp_path / "o.onnx"), *flags])
    lines = _error_lines(capsys)
    assert code == 2 and len(lines) == 1, lines
    assert request_text in lines[0] and "--calibration-data" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_missing_calibration_data_is_refused_before_the_model_is_read(tmp_path):
    """The plan stage comes first: a model path that does not exist is never opened."""
    options = OptimizeOptions(passes=["quantize"], pass_options={"quantize": {"mode": "static"}})
    with pytest.raises(OptionError, match="--quantize-mode static needs calibration data"):
        optimize(tmp_path / "missing.onnx", tmp_path / "o.onnx", options)


@dataclass(frozen=True, kw_only=True)
class _FailingPass(Pass):
    """Fails on the second node it visits: with a bug (ZeroDivisionError) or with a PassError."""

    name = "test-failing-pass"
    summary = "test only"
    refuse: bool = False

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        for index, node in enumerate(graph.nodes):
            with working_on("node", node.name):
                if index == 1 and self.refuse:
                    raise PassError("this graph shape is not supported")
                if index == 1:
                    return PassResult(graph, False, {"ratio": 1 / 0})
        return PassResult(graph, False, {})


@pytest.fixture
def failing_pass(monkeypatch) -> str:
    monkeypatch.setitem(registry._PASSES, _FailingPass.name, _FailingPass)
    return _FailingPass.name


def _second_node_name() -> str:
    return onnx.load(MLP).graph.node[1].name


def test_a_bug_in_a_pass_names_the_pass_and_node_exit_3(failing_pass, tmp_path, capsys):
    code = main(["optimize", str(MLP), "-o", str(tmp_path / "o.onnx"), "--passes", failing_pass])
    lines = _error_lines(capsys)
    assert code == 3 and len(lines) == 1, lines
    assert lines[0] == (f"onnx-compress: pass '{failing_pass}' failed on node {_second_node_name()}: "
                        "ZeroDivisionError: division by zero (internal error, stage: run passes; "
                        "run with --debug for the traceback)")
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback_of_a_failing_pass(failing_pass, tmp_path, capsys):
    code = main(["optimize", str(MLP), "-o", str(tmp_path / "o.onnx"), "--passes", failing_pass, "--debug"])
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" in err and "1 / 0" in err


def test_a_pass_refusing_a_graph_names_the_pass_and_node_exit_2(failing_pass, tmp_path, capsys):
    code = main(["optimize", str(MLP), "-o", str(tmp_path / "o.onnx"), "--passes", failing_pass,
                 "--set", f"{failing_pass}.refuse=true"])
    lines = _error_lines(capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (f"onnx-compress: error: pass '{failing_pass}' failed on node {_second_node_name()}: "
                        "this graph shape is not supported")


def test_a_bug_in_the_automatic_fusion_check_is_only_a_warning(monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("in the fusion check")
    monkeypatch.setattr("optimizer.report_notes.check_fusion", broken)
    output = tmp_path / "o.onnx"
    code = main(["optimize", str(MLP), "-o", str(output), "--quantize", "int8", "--quantize-mode", "weights",
                 "--validate", "--fusion-check"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert output.exists() and "PASS" in captured.out
    assert "note: fusion check failed (the output is written and valid): ZeroDivisionError" in captured.out


@pytest.mark.parametrize(("target", "flags", "stage"), [
    ("optimizer.api.run_comparison", ["--validate"], "validate"),
    ("optimizer.api.benchmark", ["--bench", "--rounds", "1"], "benchmark"),
    ("optimizer.api.write_report", ["--report", "r.json"], "report"),
])
def test_a_bug_in_a_stage_of_optimize_names_that_stage(monkeypatch, tmp_path, capsys, target, flags, stage):
    """Stages are named by api's stage() blocks, not guessed from the traceback."""
    def broken(*args, **kwargs):
        raise ZeroDivisionError("in a stage")
    monkeypatch.setattr(target, broken)
    monkeypatch.chdir(tmp_path)
    code = main(["optimize", str(MLP), "-o", str(tmp_path / "o.onnx"), *flags])
    lines = _error_lines(capsys)
    assert code == 3 and len(lines) == 1, lines
    assert lines[0].startswith(f"onnx-compress: internal error (stage: {stage}): ZeroDivisionError: in a stage")


def _broken(*args, **kwargs):
    raise ZeroDivisionError("injected")


# (model, arguments, where the injected bug goes, what the message names)
REAL_PASS_FAILURES = [
    ("cnn", ["--quantize", "int8", "--quantize-mode", "weights"], "passes.quantize.weights.quantize_weight", "tensor"),
    ("mlp", ["--quantize", "int8", "--quantize-mode", "dynamic", "--set", "quantize.dynamic_min_k=1"],
     "passes.quantize.dynamic.quantize_weight", "tensor"),
    ("cnn", ["--prune", "0.5"], "passes.prune.prune_pass.zero_flat", "tensor"),
    ("cnn", ["--prune", "0.5", "--prune-mode", "channels"], "passes.prune.channels._apply", "node"),
    ("cnn", ["--cluster", "4"], "passes.share.cluster.ClusterWeightsPass._cluster", "tensor"),
    ("transformer_tied", ["--passes", "share"], "passes.share.share_pass.drop_constant_node", "tensor"),
    ("constant_weights", ["--passes", "constants-to-initializers"],
     "passes.constants_to_initializers.ConstantsToInitializersPass._convert", "node"),
]


@pytest.mark.parametrize(("model", "args", "where", "kind"), REAL_PASS_FAILURES,
                         ids=[f"{case[0]}:{' '.join(case[1])}" for case in REAL_PASS_FAILURES])
def test_a_bug_inside_a_real_pass_names_the_weight_or_node(model, args, where, kind, monkeypatch, tmp_path, capsys):
    module, _, attribute = where.rpartition(".")
    if module.rpartition(".")[2][:1].isupper():  # a method: patch it on its class
        module, _, cls = module.rpartition(".")
        monkeypatch.setattr(getattr(importlib.import_module(module), cls), attribute, _broken)
    else:
        monkeypatch.setattr(where, _broken)
    source = MODELS_DIR / f"{model}.onnx"
    code = main(["optimize", str(source), "-o", str(tmp_path / "o.onnx"), *args, "--quiet"])
    lines = _error_lines(capsys)
    assert code == 3 and len(lines) == 1, lines
    graph = onnx.load(source).graph
    names = {t.name for t in graph.initializer} if kind == "tensor" else {n.name for n in graph.node}
    names |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    prefix, _, rest = lines[0].partition(f" failed on {kind} ")
    assert prefix.startswith("onnx-compress: pass '") and rest.split(":")[0] in names, lines[0]
    assert rest.endswith("ZeroDivisionError: injected (internal error, stage: run passes; "
                         "run with --debug for the traceback)")
    assert list(tmp_path.iterdir()) == []


def test_a_model_onnxruntime_cannot_initialise_gets_one_error_line_not_onnxruntimes_log_too(tmp_path, capfd):
    """Fuzz seed 5 mutant 419 (an LSTM without hidden_size): onnxruntime logged its own error line
    (with terminal colours) to stderr before ours."""
    model = onnx.load(str(MODELS_DIR / "voice_activity.onnx"))
    for attribute in model.graph.node[0].attribute:
        if attribute.name == "then_branch":
            lstm = next(n for n in attribute.g.node if n.op_type == "LSTM")
            del lstm.attribute[:]
    path = tmp_path / "no_hidden_size.onnx"
    onnx.save(model, str(path))
    code = main(["validate", str(path), str(path), "--samples", "1", "--no-isolate"])
    err = capfd.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if line.strip()] == [err.strip()]
    assert err.startswith("onnx-compress: error: onnxruntime cannot load") and "hidden_size" in err
