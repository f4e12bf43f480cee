"""Regression tests for what the fuzzing harness found (tests/reliability/test_fuzz.py), each reduced
to the smallest model that shows it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from optimizer.cli import main
from optimizer.errors import ModelLoadError
from optimizer.fileio.model import load_model
from optimizer.progress import progress_bar
from tests.helpers.runtime import open_session
from tests.helpers.samples import MODELS_DIR


def _loop_model(trip_dims: list[int] | None, cond_dims: list[int] | None) -> onnx.ModelProto:
    """Loop(M, cond, x) whose M or cond is a Constant of the given shape (None: a scalar)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cin"], ["cout"]), helper.make_node("Identity", ["x"], ["xo"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cin", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cout", TensorProto.BOOL, []),
         helper.make_tensor_value_info("xo", TensorProto.FLOAT, [1])])

    def constant(name: str, dtype: int, dims: list[int] | None, value) -> onnx.NodeProto:
        tensor = helper.make_tensor(f"{name}.value", dtype, dims or [], [] if dims else [value])
        return helper.make_node("Constant", [], [name], value=tensor)

    nodes = [constant("m", TensorProto.INT64, trip_dims, 3), constant("c", TensorProto.BOOL, cond_dims, True),
             helper.make_node("Loop", ["m", "c", "x"], ["y"], name="loop", body=body)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("trip_dims", "cond_dims"), [([0], None), (None, [0]), (None, [2**62, 0])])
def test_empty_loop_scalars_are_refused_at_load(trip_dims, cond_dims):
    """onnxruntime dereferences Loop's M without a size check: an empty constant was a SIGSEGV in
    bench and in-process validation (fuzz seed 0, mutant 297)."""
    with pytest.raises(ModelLoadError, match=r"node 'loop' \(Loop\): Loop input '(M|cond)' must hold one value"):
        load_model(_loop_model(trip_dims, cond_dims))


def test_empty_loop_trip_count_crashes_onnxruntime_so_the_check_is_needed(tmp_path):
    """The check above guards a real crash: prove it in a child so this suite survives."""
    path = tmp_path / "m.onnx"
    onnx.save(_loop_model([0], None), path)
    code = ("import sys, numpy as np, onnxruntime as ort; "
            "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']); "
            "s.run(None, {'x': np.ones(1, np.float32)})")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=60)
    assert result.returncode < 0 or result.returncode > 128, result.returncode


def test_scalar_loop_inputs_still_load():
    load_model(_loop_model(None, None))


def test_cluster_output_loads_at_opset_13(tmp_path):
    """uint8 Sub exists only from opset 14: the cluster pass unpacks in uint32 below it and decodes
    the same weights as at opset 17 (fuzz seed 0, mutant 178)."""
    model = onnx.load(MODELS_DIR / "mlp.onnx")
    model.opset_import[0].version = 13
    source = tmp_path / "mlp13.onnx"
    onnx.save(model, source)
    outputs = {}
    for name, path in (("13", source), ("17", MODELS_DIR / "mlp.onnx")):
        outputs[name] = tmp_path / f"out{name}.onnx"
        assert main(["optimize", str(path), "-o", str(outputs[name]), "--cluster", "4", "--quiet"]) == 0
    clustered = onnx.load(outputs["13"])
    assert clustered.opset_import[0].version == 13
    assert "Sub" in {node.op_type for node in clustered.graph.node}
    results = []
    for path in (outputs["13"], outputs["17"]):
        session = open_session(path)
        feed = {"x": np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)}
        results.append(session.run(None, feed)[0])
    np.testing.assert_array_equal(results[0], results[1])


def test_progress_bars_stay_off_a_pipe(capsys):
    """A bar on a stderr that is not a terminal turned a one-line error into three (fuzz seed 0, mutant 181):
    off a terminal a stage writes one line when it ends, and nothing when it fails."""
    result = subprocess.run([sys.executable, "-m", "optimizer.cli", "bench", str(MODELS_DIR / "mlp.onnx"),
                             "--rounds", "2", "--warmup", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and [line[:11] for line in result.stderr.splitlines()] == ["benchmark: "]
    with pytest.raises(ZeroDivisionError), progress_bar(total=None, desc="stage", unit="run", enabled=True) as bar:
        bar.update()
        raise ZeroDivisionError
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("opset", [7, 9])
def test_cluster_skips_models_older_than_its_decoding_ops(tmp_path, opset):
    """BitShift and GatherElements arrive in opset 11: before it the pass skips and says why
    (fuzz opset sweep, finding F5), so the output still loads."""
    model = onnx.load(MODELS_DIR / "cnn.onnx")
    model.opset_import[0].version = opset
    source, output, report = tmp_path / "cnn.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, source)
    assert main(["optimize", str(source), "-o", str(output), "--cluster", "4", "--quiet", "--report", str(report)]) == 0
    open_session(output)
    assert f"opset {opset} < 11" in report.read_text()
