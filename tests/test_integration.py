"""Passes composed as the default pipelines compose them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

import passes  # noqa: F401
from optimizer.calibration.expose import expose_outputs
from optimizer.fileio.checker import check_model_full
from optimizer.fileio.model import load_model
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass
from tests.helpers.runtime import open_session, run_model
from tests.helpers.samples import MODELS_DIR, all_graphs, seeded_feeds


def all_initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    return [tensor for owner in all_graphs(graph) for tensor in owner.initializer]


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [node for owner in all_graphs(graph) for node in owner.node]


def test_weight_shared_by_main_graph_and_if_branches_is_quantized_once():
    model = load_model(MODELS_DIR / "if_subgraph.onnx")
    shared = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "shared.weight"))
    result = Pipeline([create_pass("share"), create_pass("quantize", mode="weights", weight_type="int8"),
                       create_pass("cleanup")]).run(model)
    check_model_full(result.model)
    tensors = all_initializers(result.model.graph)
    same_shape = [t for t in tensors if tuple(t.dims) == shared.shape]
    assert len(same_shape) == 1, [t.name for t in same_shape]
    assert same_shape[0].data_type == onnx.TensorProto.INT8
    assert not any(t.data_type == onnx.TensorProto.FLOAT and tuple(t.dims) == shared.shape for t in tensors)
    matmuls = [n for n in all_nodes(result.model.graph) if n.op_type == "MatMul"]
    readers = sorted(n.name for n in matmuls if n.input[1] == "shared.weight")
    assert readers == ["branch_a.matmul", "branch_b.matmul", "pre.matmul"]
    producers = [n for n in all_nodes(result.model.graph) if "shared.weight" in n.output]
    assert len(producers) == 1 and producers[0] in result.model.graph.node, "one dequantize, in the main graph"
    feeds = seeded_feeds(model, count=4)
    for expected, actual in zip(run_model(model, feeds), run_model(result.model, feeds), strict=True):
        a, b = expected[0].ravel().astype(np.float64), actual[0].ravel().astype(np.float64)
        assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.999


def effective_weights(model: onnx.ModelProto, feed: dict) -> dict[str, np.ndarray]:
    """The float weight each MatMul/Gemm really multiplies by, as onnxruntime computes it."""
    names = [node.input[1] for node in model.graph.node if node.op_type in ("MatMul", "Gemm")]
    session = open_session(expose_outputs(model, names))
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    return {node.name: values[node.input[1]] for node in model.graph.node if node.op_type in ("MatMul", "Gemm")}


def test_pruned_zeros_stay_exactly_zero_after_int8_quantization():
    model = load_model(MODELS_DIR / "mlp.onnx")
    feed = seeded_feeds(model, count=1)[0]
    pruned = Pipeline([create_pass("prune", sparsity=0.5, min_elements=256)]).run(model).model
    quantized = Pipeline([create_pass("quantize", mode="weights", weight_type="int8")]).run(pruned).model
    before, after = effective_weights(pruned, feed), effective_weights(quantized, feed)
    assert sorted(before) == sorted(after) and len(before) == 3
    checked = 0
    for name, weight in before.items():
        zeros = weight == 0
        if zeros.mean() < 0.4:
            continue
        assert np.all(after[name][zeros] == 0.0), name
        assert np.count_nonzero(after[name]) <= np.count_nonzero(weight)
        checked += 1
    assert checked == 3
    quantized_types = {t.data_type for t in quantized.graph.initializer}
    assert onnx.TensorProto.INT8 in quantized_types
