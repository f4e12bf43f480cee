"""optimizer.verify.isolation: onnxruntime crashes, hangs and runaway allocations in a child process
become RuntimeSessionError quoting the signal or onnxruntime, and say 'not validated'."""

from __future__ import annotations

import multiprocessing

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.errors import FeedError, RuntimeSessionError
from optimizer.verify.isolation import NOT_VALIDATED, compare_isolated, run_isolated
from optimizer.verify.validate import Tolerance, compare
from tests.reliability import crashers


def _linear_model(path, *, scale: float = 1.0, reshape_to=None):
    weight = numpy_helper.from_array((np.arange(32, dtype=np.float32).reshape(4, 8) / 10) * scale, "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y" if reshape_to is None else "m"])]
    extra = []
    if reshape_to is not None:
        extra.append(numpy_helper.from_array(np.array(reshape_to, np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["m", "shape"], ["y"], name="bad_reshape"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, *extra])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, path)
    return str(path)


FEEDS = [{"x": np.random.default_rng(seed).standard_normal((2, 4)).astype(np.float32)} for seed in range(3)]


def test_compare_isolated_gives_the_same_comparison_as_compare(tmp_path):
    reference = _linear_model(tmp_path / "a.onnx")
    candidate = _linear_model(tmp_path / "b.onnx", scale=1.001)
    tolerance = Tolerance(max_abs=1e-3)
    isolated = compare_isolated(reference, candidate, FEEDS, tolerance=tolerance, timeout_s=120)
    direct = compare(reference, candidate, FEEDS, tolerance=tolerance)
    assert isolated.to_dict() == direct.to_dict()
    assert isolated.passed is False and isolated.outputs[0].max_abs > 1e-3


def test_onnxruntime_failing_on_the_candidate_is_quoted(tmp_path):
    reference = _linear_model(tmp_path / "a.onnx")
    candidate = _linear_model(tmp_path / "b.onnx", reshape_to=[3, 5])
    with pytest.raises(RuntimeSessionError,
                       match=rf"onnxruntime failed to run .*b\.onnx.*bad_reshape.*; {NOT_VALIDATED}$"):
        compare_isolated(reference, candidate, FEEDS, timeout_s=120)


def test_errors_of_compare_come_back_unchanged(tmp_path):
    reference = _linear_model(tmp_path / "a.onnx")
    with pytest.raises(FeedError, match="'x'"):
        run_isolated(crashers.raise_feed_error, timeout_s=60, label="test")
    with pytest.raises(FeedError):
        compare_isolated(reference, reference, [{"z": np.zeros(1, np.float32)}], timeout_s=120)


def test_a_crash_is_a_runtime_session_error_naming_the_signal_and_last_output():
    with pytest.raises(RuntimeSessionError) as caught:
        run_isolated(crashers.abort_after_message, "Fatal error: kernel exploded", timeout_s=60,
                     label="validating m.onnx")
    message = str(caught.value)
    assert "crashed (SIGABRT) while validating m.onnx" in message
    assert "kernel exploded" in message and message.endswith(NOT_VALIDATED)
    assert multiprocessing.active_children() == []


def test_a_silent_exit_is_reported_with_its_code():
    with pytest.raises(RuntimeSessionError, match=f"exited with code 7 without a result.*{NOT_VALIDATED}"):
        run_isolated(crashers.exit_quietly, 7, timeout_s=60, label="test")


def test_a_hang_is_stopped_at_the_timeout():
    with pytest.raises(RuntimeSessionError, match=f"did not finish test within 1 s and was stopped; {NOT_VALIDATED}"):
        run_isolated(crashers.sleep_then_return, 60, timeout_s=1, label="test")
    assert multiprocessing.active_children() == []
    assert run_isolated(crashers.sleep_then_return, 0, timeout_s=60, label="test") == "woke up"


def test_memory_limit_turns_a_runaway_allocation_into_an_error():
    with pytest.raises(RuntimeSessionError, match=f"out of memory while test; {NOT_VALIDATED}"):
        run_isolated(crashers.allocate, 4 * 2**30, timeout_s=60, label="test", max_memory_bytes=2**30)


def test_a_bug_in_the_child_stays_an_internal_error():
    with pytest.raises(RuntimeError, match="KeyError: 'a bug'"):
        run_isolated(crashers.raise_key_error, timeout_s=60, label="test")


def test_bad_timeout_is_refused():
    with pytest.raises(RuntimeSessionError, match="timeout must be > 0"):
        run_isolated(crashers.sleep_then_return, 0, timeout_s=0, label="test")
