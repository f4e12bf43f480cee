"""The bundled sample models, seeded feeds, graph walks and file digests, shared by the tests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from optimizer.calibration.feeds import generate_feeds, model_input_specs
from optimizer.graph.walk import walk_proto

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = ROOT / "models"
SAMPLE_MODELS = sorted(MODELS_DIR.glob("*.onnx"))


def sample_ids() -> list[str]:
    """Test ids for SAMPLE_MODELS, so a failure names the model."""
    return [path.stem for path in SAMPLE_MODELS]


def seeded_feeds(model: onnx.ModelProto, count: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random feeds for a model, plus both branches for a bool switch input."""
    feeds = generate_feeds(model_input_specs(model), count=count, seed=seed)
    for index, feed in enumerate(feeds):
        for name, value in feed.items():
            if value.dtype == np.bool_ and value.shape == ():
                feed[name] = np.array(index % 2 == 0)
    return feeds


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A graph and every subgraph below it, depth first (the library's one walker)."""
    return (site.graph for site in walk_proto(graph))


def all_initializer_names(graph: onnx.GraphProto) -> list[str]:
    """Initializer names of a graph and all its subgraphs (a name twice = stored twice)."""
    return [tensor.name for owner in all_graphs(graph) for tensor in owner.initializer]


def digest(path: Path) -> str:
    """SHA-256 of a file, to prove a file did or did not change."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_state(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with its digest: equal before and after means nothing changed."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}
