"""Every registered pass, on every bundled sample: checker, numerics, idempotence, metadata,
determinism. A new pass is covered here as soon as it is registered."""

from __future__ import annotations

import pytest

from optimizer.checker import check_model_full
from optimizer.model import load_model
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass, get_pass_class, pass_names
import passes  # noqa: F401
from tests.conftest import SAMPLE_MODELS, assert_same_outputs, sample_ids, seeded_feeds

LOSSY_TOLERANCE = 1e-2


def apply(name: str, model):
    return Pipeline([create_pass(name)], check_each_pass=True).run(model)


@pytest.mark.parametrize("name", pass_names())
@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=sample_ids())
def test_pass_contract(name, path):
    original = load_model(path)
    before = original.SerializeToString()
    result = apply(name, original)
    assert original.SerializeToString() == before, "the pipeline changed the caller's model"
    check_model_full(result.model)
    assert list(result.model.metadata_props) == list(original.metadata_props)
    assert result.model.doc_string == original.doc_string
    assert result.model.opset_import == original.opset_import
    feeds = seeded_feeds(original)
    tolerance = 0.0 if get_pass_class(name).lossless else LOSSY_TOLERANCE
    assert_same_outputs(original, result.model, feeds, atol=tolerance)
    again = apply(name, result.model)
    assert again.modified is False, f"second '{name}' run still changed: {again.runs[0].report}"
    assert again.model.SerializeToString(deterministic=True) == result.model.SerializeToString(deterministic=True)
    repeat = apply(name, load_model(path))
    assert repeat.model.SerializeToString(deterministic=True) == result.model.SerializeToString(deterministic=True)


def test_registry_has_the_foundation_passes():
    assert {"cleanup", "constants-to-initializers"} <= set(pass_names())
