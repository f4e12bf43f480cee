"""Run the quantize pass the way the quantize tests do: checked after the pass, then opened by onnxruntime."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
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


def heavy_tail_model() -> onnx.ModelProto:
    """x -> conv1 -> c^4 (two Muls) -> Sigmoid -> conv2 -> y. c^4 is heavy-tailed: one uint8 scale
    set by its largest values rounds the small ones, where the Sigmoid is steep, to 0 or one step,
    so static int8 fails a cosine check. Backing off conv1's group (its Muls and Sigmoid stay float)
    leaves only the Sigmoid's output, [0.5, 1], rounded before conv2, which passes."""
    rng = np.random.default_rng(7)
    w1 = rng.normal(0, 0.25, (8, 4, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32)
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Mul", ["c1", "c1"], ["p1"], name="square1"),
        onnx.helper.make_node("Mul", ["p1", "p1"], ["q1"], name="fourth1"),
        onnx.helper.make_node("Sigmoid", ["q1"], ["s1"], name="sigmoid1"),
        onnx.helper.make_node("Conv", ["s1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "heavy_tail",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 8, 8])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
