"""Nothing hangs, nothing is orphaned (issue 11, items 9 and 10).

A Loop of 2**62 iterations before a MatMul runs forever in onnxruntime. Every stage that runs the
model must stop at ``--timeout`` with exit code 2 and a message naming the stage. Every CLI run
here is a subprocess with a hard outer timeout, so a regression fails instead of hanging the
suite. Killing the CLI during validation (SIGKILL or SIGTERM), or the process running a budget
search with worker processes, must leave no child process running.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.errors import OptionError
from optimizer.pass_base import PassContext
from optimizer.verify import run_limit
from optimizer.verify.isolation import EXIT_PARENT_GONE, die_with_parent
from optimizer.verify.runtime import RunTimeoutError, checked_timeout, create_session, resolve_provider, run_outputs

ROOT = Path(__file__).resolve().parents[2]
FOREVER = 2**62
CHANNELS = 256
"""MatMul K: dynamic int8 quantizes activations from K=256 (dynamic_min_k), so outliers are calibrated."""
OUTER_TIMEOUT_S = 90
STAGE_BOUND_S = 30
GONE_WITHIN_S = 10
LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="scans /proc for child processes")


def loop_model(trip_count: int | None) -> onnx.ModelProto:
    """x -> Loop(trip_count) adding 1e-9 per iteration -> MatMul(W) -> y; ``None``: trip count is an input."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["a", "step"], ["a_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, CHANNELS])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("a_out", TensorProto.FLOAT, [1, CHANNELS])],
        [numpy_helper.from_array(np.array(1e-9, np.float32), "step")],
    )  # fmt: skip
    weight = np.random.default_rng(0).standard_normal((CHANNELS, CHANNELS)).astype(np.float32)
    initializers = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.array(True), "cond")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS])]
    if trip_count is None:
        inputs.append(helper.make_tensor_value_info("trip", TensorProto.INT64, []))
    else:
        initializers.append(numpy_helper.from_array(np.array(trip_count, np.int64), "trip"))
    nodes = [helper.make_node("Loop", ["trip", "cond", "x"], ["spun"], body=body, name="spin"),
             helper.make_node("MatMul", ["spun", "W"], ["y"], name="project")]
    graph = helper.make_graph(nodes, "loop_then_matmul", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CHANNELS])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def hanging(tmp_path_factory) -> Path:
    """A folder with loop.onnx (2**62 iterations), cand.onnx (its weight changed) and cal/ (one sample)."""
    folder = tmp_path_factory.mktemp("hang")
    model = loop_model(FOREVER)
    onnx.save(model, folder / "loop.onnx")
    weight = model.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, "W"))
    onnx.save(model, folder / "cand.onnx")
    (folder / "cal").mkdir()
    np.savez(folder / "cal" / "0.npz", x=np.ones((1, CHANNELS), np.float32))
    return folder


def run_cli(folder: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "optimizer.cli", *args], cwd=folder, capture_output=True,
                            text=True, timeout=OUTER_TIMEOUT_S, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return result, time.monotonic() - started


OPTIMIZE = ("optimize", "loop.onnx", "-o", "out.onnx")
CASES = {
    "static": ([*OPTIMIZE, "--quantize", "int8", "--quantize-mode", "static", "--calibration-data", "cal"],
               "loop.onnx: static calibration"),
    "gptq": ([*OPTIMIZE, "--quantize", "int4", "--quantize-mode", "weights", "--calibration-data", "cal"],
             "loop.onnx: GPTQ calibration"),
    "dynamic-outliers": ([*OPTIMIZE, "--quantize", "int8", "--quantize-mode", "dynamic", "--calibration-data", "cal"],
                         "loop.onnx: outlier calibration"),
    "auto": ([*OPTIMIZE, "--quantize", "int8", "--calibration-data", "cal"],
             "auto mode, checking the weights candidate,"),
    "prune-sensitivity": ([*OPTIMIZE, "--prune", "0.5", "--prune-mode", "sensitivity", "--calibration-data", "cal"],
                          "loop.onnx: sensitivity scan"),
    "budget": ([*OPTIMIZE, "--quantize", "int8", "--max-drop", "0.01"], "accuracy budget"),
    "optimize-bench": ([*OPTIMIZE, "--bench"], "benchmark"),
    "optimize-validate": ([*OPTIMIZE, "--validate", "--no-isolate"], "validation"),
    "bench": (["bench", "loop.onnx"], "benchmark"),
    "sensitivity": (["sensitivity", "loop.onnx"], "sensitivity scan"),
    "debug": (["debug", "loop.onnx", "cand.onnx"], "layer debug"),
    "validate": (["validate", "loop.onnx", "cand.onnx", "--no-isolate"], "validation"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_endless_loop_is_stopped_at_the_timeout_naming_the_stage(hanging, case):
    argv, stage = CASES[case]
    before = sorted(path.name for path in hanging.iterdir())
    result, seconds = run_cli(hanging, *argv, "--timeout", "2")
    assert result.returncode == 2, result.stderr
    assert seconds < STAGE_BOUND_S
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"onnx-compress: error: {stage} did not finish within 2 s ("), last_line
    assert last_line.endswith("timed out; raise --timeout)")
    assert sorted(path.name for path in hanging.iterdir()) == before


def test_a_stopped_run_leaves_the_session_usable():
    session, _ = create_session(loop_model(None), resolve_provider("cpu"))
    x = np.zeros((1, CHANNELS), np.float32)
    started = time.monotonic()
    with pytest.raises(RunTimeoutError, match=r"^probe did not finish within 0\.5 s \(onnxruntime run of m "):
        run_outputs(session, None, {"x": x, "trip": np.array(FOREVER, np.int64)}, label="m", stage="probe",
                    timeout_s=0.5)
    assert time.monotonic() - started < STAGE_BOUND_S
    (y,) = run_outputs(session, None, {"x": x, "trip": np.array(3, np.int64)}, label="m", timeout_s=0.5)
    assert y.shape == (1, CHANNELS)


def test_finished_runs_leave_no_deadline_behind():
    session, _ = create_session(loop_model(None), resolve_provider("cpu"))
    feed = {"x": np.zeros((1, CHANNELS), np.float32), "trip": np.array(1, np.int64)}
    first = run_outputs(session, None, feed, label="m", timeout_s=60)
    for _ in range(50):
        assert np.array_equal(run_outputs(session, None, feed, label="m", timeout_s=60)[0], first[0])
    assert run_limit._WATCHDOG._deadlines == {}
    assert run_limit.arm(object(), None) is None


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, "10", True])
def test_timeouts_must_be_positive_numbers(bad):
    with pytest.raises(OptionError, match="timeout must be a number of seconds > 0 or None"):
        checked_timeout(bad)
    with pytest.raises(OptionError):
        PassContext(timeout_s=bad)


def test_an_infinite_timeout_means_no_limit():
    assert checked_timeout(math.inf) is None and checked_timeout(None) is None and checked_timeout(5) == 5.0


def test_the_timeout_error_names_the_model_once():
    error = RunTimeoutError("static calibration did not finish within 2 s (...)")
    named = error.naming("m.onnx")
    assert str(named) == "m.onnx: static calibration did not finish within 2 s (...)"
    assert named.naming("m.onnx") is named and error.naming(None) is error


# --- item 10: children die with their parent -------------------------------------------------


def _state(pid: int) -> str | None:
    """The process state letter, or None when the process is gone (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if state in ("Z", "X") else state


def _spawned_children(parent: int) -> list[int]:
    """Processes started by multiprocessing's spawn (not its resource tracker) whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in command:
            found.append(int(entry.name))
    return sorted(found)


def _wait_for_children(process: subprocess.Popen, count: int) -> list[int]:
    deadline = time.monotonic() + OUTER_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        children = _spawned_children(process.pid)
        if len(children) >= count:
            return children
        time.sleep(0.1)
    raise AssertionError(f"no {count} child process(es) appeared (exit code {process.poll()})")


def _assert_all_gone(children: list[int]) -> None:
    deadline = time.monotonic() + GONE_WITHIN_S
    try:
        while time.monotonic() < deadline and any(_state(pid) for pid in children):
            time.sleep(0.1)
        assert [pid for pid in children if _state(pid)] == []
    finally:
        for pid in children:  # a failing test must not leave a process spinning
            if _state(pid):
                os.kill(pid, signal.SIGKILL)


def _kill_after_children_start(command: list[str], cwd: Path, children: int, how: signal.Signals) -> list[int]:
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        started = _wait_for_children(process, children)
        time.sleep(1.0)  # into the run
        assert all(_state(pid) for pid in started)
        process.send_signal(how)
        assert process.wait(timeout=OUTER_TIMEOUT_S) == -how
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return started


@LINUX_PROC
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_the_cli_during_validation_leaves_no_child(hanging, how, tmp_path):
    command = [sys.executable, "-m", "optimizer.cli", "optimize", str(hanging / "loop.onnx"), "-o",
               str(tmp_path / "out.onnx"), "--validate", "--quiet", "--timeout", "300"]
    _assert_all_gone(_kill_after_children_start(command, tmp_path, 1, how))


BUDGET_SCRIPT = """
from optimizer.budget import MetricSpec, search_budget
from optimizer.executor import ExecutorOptions
from optimizer.fileio.model import load_model
from tests.helpers.samples import MODELS_DIR, seeded_feeds
from tests.helpers.budget_damage import DamagePass, register
register()
model = load_model(MODELS_DIR / "mlp.onnx")
search_budget(model, [DamagePass()], MetricSpec("cosine"),
              seeded_feeds(model, count=4), max_drop=0.002, executor=ExecutorOptions(workers=2),
              worker_imports=("tests.helpers.budget_damage:register", "signal:pause"))
"""
"""A budget search whose workers never finish starting (``signal.pause()`` in their initializer), so
they are busy when the parent is killed."""


@LINUX_PROC
def test_budget_workers_die_with_their_parent():
    command = [sys.executable, "-c", BUDGET_SCRIPT]
    _assert_all_gone(_kill_after_children_start(command, ROOT, 2, signal.SIGKILL))


def _child_waiting_on_lifeline(lifeline, parent_pid: int) -> None:
    die_with_parent(lifeline, parent_pid)
    time.sleep(120)


def test_the_child_exits_when_the_lifeline_closes():
    """The portable fallback alone: the parent lives on, only its end of the pipe is closed."""
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=_child_waiting_on_lifeline, args=(reader, os.getpid()), daemon=True)
    child.start()
    reader.close()
    try:
        time.sleep(0.5)
        assert child.is_alive()
        writer.close()
        child.join(GONE_WITHIN_S)
        assert child.exitcode == EXIT_PARENT_GONE
    finally:
        if child.is_alive():
            child.kill()
            child.join()


def test_a_child_whose_parent_already_died_exits_at_once():
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    not_the_parent = os.getpid() + 1
    child = context.Process(target=_child_waiting_on_lifeline, args=(reader, not_the_parent), daemon=True)
    child.start()
    try:
        child.join(GONE_WITHIN_S + 20)
        assert child.exitcode == EXIT_PARENT_GONE
    finally:
        writer.close()
        if child.is_alive():
            child.kill()
            child.join()
