"""Every registered pass, with default options, on every bundled sample: checker, numerics,
idempotence, metadata, determinism, caller's model untouched. A new pass is covered here as
soon as it is registered. Tight accuracy bounds for lossy passes live in each pass's own tests;
here a lossy pass must keep every output finite, of the same shape, and close in direction."""

from __future__ import annotations

import numpy as np
import pytest

import passes  # noqa: F401
from optimizer.errors import OptionError
from optimizer.fileio.checker import check_model_full
from optimizer.fileio.model import load_model
from optimizer.pass_base import PassContext
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass, get_pass_class, pass_names
from tests.helpers.providers import runnable_here
from tests.helpers.runtime import assert_same_outputs, run_model
from tests.helpers.samples import SAMPLE_MODELS, sample_ids, seeded_feeds

LOSSY_MIN_COSINE = 0.9


def apply(name: str, model, feeds):
    context = PassContext(calibration=lambda: iter(feeds))
    return Pipeline([create_pass(name)], check_each_pass=True, context=context).run(model)


def assert_close_in_direction(reference, candidate, feeds) -> None:
    for expected_list, actual_list in zip(run_model(reference, feeds), run_model(candidate, feeds), strict=True):
        for expected, actual in zip(expected_list, actual_list, strict=True):
            assert expected.shape == actual.shape and expected.dtype == actual.dtype
            if expected.dtype.kind != "f":
                continue
            assert np.isfinite(actual).all()
            a, b = expected.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
            denominator = np.linalg.norm(a) * np.linalg.norm(b)
            cosine = 1.0 if denominator == 0 else float(a @ b / denominator)
            assert cosine >= LOSSY_MIN_COSINE, f"cosine {cosine:.4f}"


@pytest.mark.parametrize("name", pass_names())
@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=sample_ids())
def test_pass_contract(name, path):
    original = load_model(path)
    before = original.SerializeToString()
    feeds = seeded_feeds(original)
    if not runnable_here(name):  # e.g. bfloat16 compute, without CUDA here
        with pytest.raises(OptionError, match=str(get_pass_class(name).required_provider).upper()):
            apply(name, original, feeds)
        assert original.SerializeToString() == before
        return
    result = apply(name, original, feeds)
    assert original.SerializeToString() == before, "the pipeline changed the caller's model"
    check_model_full(result.model)
    assert list(result.model.metadata_props) == list(original.metadata_props)
    assert result.model.doc_string == original.doc_string
    if get_pass_class(name).lossless:
        assert result.model.opset_import == original.opset_import
        assert_same_outputs(original, result.model, feeds)
    else:
        assert_close_in_direction(original, result.model, feeds)
    again = apply(name, result.model, feeds)
    assert again.modified is False, f"second '{name}' run still changed: {again.runs[0].report}"
    assert again.model.SerializeToString(deterministic=True) == result.model.SerializeToString(deterministic=True)
    repeat = apply(name, load_model(path), feeds)
    assert repeat.model.SerializeToString(deterministic=True) == result.model.SerializeToString(deterministic=True)


def test_registry_has_the_foundation_passes():
    assert {"cleanup", "constants-to-initializers"} <= set(pass_names())
