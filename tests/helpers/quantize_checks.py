"""Run the quantize pass the way the quantize tests do: checked after the pass, then opened by onnxruntime."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import onnx

import passes
import passes.quantize.quantize_pass  # noqa: F401  (registers the pass until passes/__init__ lists it)
from optimizer.fileio.checker import check_model_full
from optimizer.pass_base import PassContext
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass
from tests.helpers.runtime import open_session
from tests.helpers.samples import all_graphs


def quantize(model: onnx.ModelProto, calibration: Iterable[Any] | None = None, **options: Any) -> tuple[Any, Any]:
    """(pipeline result, quantize report) after a full check and a session open of the output."""
    context = PassContext(calibration=(lambda: iter(calibration)) if calibration is not None else None)
    result = Pipeline([create_pass("quantize", **options)], check_each_pass=True, context=context).run(model)
    check_model_full(result.model)
    open_session(result.model)
    return result, result.runs[0].report


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every initializer of the model and its subgraphs, by name."""
    return {t.name: t for g in all_graphs(model.graph) for t in g.initializer}
