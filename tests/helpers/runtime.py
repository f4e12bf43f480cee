"""The tests' own onnxruntime runs: an independent reference, opened here and nowhere else in tests."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def run_model(model: onnx.ModelProto | Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Every output of ``model`` on every feed, on CPU (a path is opened by onnxruntime directly)."""
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def assert_same_outputs(reference: onnx.ModelProto | Path, candidate: onnx.ModelProto | Path,
                        feeds: list[dict[str, np.ndarray]], *, atol: float = 0.0) -> None:
    """Outputs equal within ``atol`` (0: bit-identical) on every feed."""
    for expected_list, actual_list in zip(run_model(reference, feeds), run_model(candidate, feeds), strict=True):
        for expected, actual in zip(expected_list, actual_list, strict=True):
            assert expected.shape == actual.shape and expected.dtype == actual.dtype
            if atol == 0.0:
                np.testing.assert_array_equal(actual, expected)
            else:
                np.testing.assert_allclose(actual, expected, atol=atol, rtol=0)


def open_session(model: onnx.ModelProto | Path, *,
                 graph_optimization_level: ort.GraphOptimizationLevel | None = None) -> ort.InferenceSession:
    """A CPU session for ``model``; opening it proves onnxruntime accepts the graph.

    A path is opened by onnxruntime directly (external data resolves next to it). ``graph_optimization_level``
    replaces onnxruntime's default (all optimizations), e.g. ORT_DISABLE_ALL to run each op's own arithmetic.
    """
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    options = None
    if graph_optimization_level is not None:
        options = ort.SessionOptions()
        options.graph_optimization_level = graph_optimization_level
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def ort_runs(model: onnx.ModelProto, tmp_path: Path) -> Counter:
    """Op types of the graph onnxruntime really runs (SessionOptions.optimized_model_filepath)."""
    source, target = tmp_path / "model.onnx", tmp_path / "model.ort-optimized.onnx"
    onnx.save(model, source)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(target).graph.node)


def max_abs_error(reference: onnx.ModelProto | Path, candidate: onnx.ModelProto | Path,
                  feeds: list[dict[str, np.ndarray]]) -> float:
    """Largest absolute difference over the float outputs of two models on the same feeds."""
    pairs = zip(run_model(reference, feeds), run_model(candidate, feeds), strict=True)
    return max(float(np.abs(a - b).max())
               for ra, rb in pairs for a, b in zip(ra, rb, strict=True) if a.dtype.kind == "f")
