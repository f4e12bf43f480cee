"""The quantization mode is planned once per graph: targets are collected and the mode's plan made a
second time only when the planned forms need a higher opset (the conversion re-imports the graph)."""

from __future__ import annotations

from collections import Counter

import pytest

import passes  # noqa: F401  (registers every pass)
import passes.quantize.quantize_pass as quantize_pass
from optimizer.fileio.model import load_model
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass
from tests.helpers.samples import MODELS_DIR

PLANNERS = ("collect_targets", "plan_dynamic", "plan_static")


@pytest.fixture
def calls(monkeypatch) -> Counter:
    counted: Counter = Counter()
    for name in PLANNERS:
        original = getattr(quantize_pass, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            counted[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(quantize_pass, name, wrapper)
    return counted


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_planned_once_when_the_opset_suffices(calls, mode):
    """int8 per-channel forms need opset 13; the samples have 17."""
    from optimizer.pass_base import PassContext
    from tests.helpers.samples import seeded_feeds
    model = load_model(MODELS_DIR / "transformer_tied.onnx")
    feeds = seeded_feeds(model, count=2)
    result = Pipeline([create_pass("quantize", mode=mode)],
                      context=PassContext(calibration=lambda: iter(feeds))).run(model)
    assert result.modified
    assert "opset" not in result.runs[0].report.get("details", {})
    assert calls["collect_targets"] == 1 and calls[f"plan_{mode}"] == 1


def test_planned_again_after_an_opset_conversion(calls):
    """4-bit weights need opset 21: the converted graph is a new one, so the plan is made on it."""
    result = Pipeline([create_pass("quantize", mode="dynamic", weight_type="int4")]).run(
        load_model(MODELS_DIR / "transformer_tied.onnx"))
    assert result.runs[0].report["details"]["opset"]["after"] == 21
    assert calls["collect_targets"] == 2 and calls["plan_dynamic"] == 2
