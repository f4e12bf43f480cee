"""Shared helpers: the bundled sample models, onnxruntime runs, file digests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from optimizer.calibration.feeds import generate_feeds, model_input_specs

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"
SAMPLE_MODELS = sorted(MODELS_DIR.glob("*.onnx"))


def sample_ids() -> list[str]:
    return [path.stem for path in SAMPLE_MODELS]


def seeded_feeds(model: onnx.ModelProto, count: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random feeds for a model, plus both branches for a bool switch input."""
    feeds = generate_feeds(model_input_specs(model), count=count, seed=seed)
    for index, feed in enumerate(feeds):
        for name, value in feed.items():
            if value.dtype == np.bool_ and value.shape == ():
                feed[name] = np.array(index % 2 == 0)
    return feeds


def run_model(model: onnx.ModelProto | Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def assert_same_outputs(reference, candidate, feeds, *, atol: float = 0.0) -> None:
    """Outputs equal within ``atol`` (0: bit-identical) on every feed."""
    for expected_list, actual_list in zip(run_model(reference, feeds), run_model(candidate, feeds), strict=True):
        for expected, actual in zip(expected_list, actual_list, strict=True):
            assert expected.shape == actual.shape and expected.dtype == actual.dtype
            if atol == 0.0:
                np.testing.assert_array_equal(actual, expected)
            else:
                np.testing.assert_allclose(actual, expected, atol=atol, rtol=0)


def all_graphs(graph: onnx.GraphProto):
    """A graph and every subgraph below it, depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for subgraph in subgraphs:
                yield from all_graphs(subgraph)


def all_initializer_names(graph: onnx.GraphProto) -> list[str]:
    """Initializer names of a graph and all its subgraphs (a name twice = stored twice)."""
    return [tensor.name for owner in all_graphs(graph) for tensor in owner.initializer]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_state(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with its digest: equal before and after means nothing changed."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def sample_copy(tmp_path):
    """Copy a bundled sample into tmp_path so tests never touch models/."""
    def copy(stem: str) -> Path:
        target = tmp_path / f"{stem}.onnx"
        target.write_bytes((MODELS_DIR / f"{stem}.onnx").read_bytes())
        return target
    return copy
