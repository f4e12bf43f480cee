from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes
import passes.share.cluster
import passes.share.share_pass  # noqa: F401
from optimizer.errors import OptionError
from optimizer.fileio.checker import check_model_full
from optimizer.fileio.model import load_model
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass
from passes.share.kmeans import (
    assign,
    batched_searchsorted,
    error_metrics,
    kmeans_rows,
    pack,
    slots_per_byte,
    uniform_fake_quantize,
    unpack,
)
from tests.helpers.runtime import run_model
from tests.helpers.samples import MODELS_DIR

F = TensorProto.FLOAT


def run_cluster(model: onnx.ModelProto, passes_=("cluster",), **options):
    steps = [create_pass(name, **(options if name == "cluster" else {})) for name in passes_]
    result = Pipeline(steps, check_each_pass=True).run(model)
    check_model_full(result.model)
    again = Pipeline([create_pass("cluster", **options)]).run(result.model)
    assert again.modified is False, again.runs[0].report
    return result.model, result.runs[-1].report


def matmul_model(weight: np.ndarray, reader: str = "MatMul", **attrs) -> onnx.ModelProto:
    rows, cols = weight.shape[::-1] if reader == "Gemm" and attrs.get("transB") else weight.shape
    node = helper.make_node(reader, ["x", "W"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F, [rows, rows])],
                              [helper.make_tensor_value_info("y", F, [rows, cols])],
                              initializer=[numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def decoded_weight(model: onnx.ModelProto, rows: int) -> np.ndarray:
    """Run the clustered model on an identity input: the output is the decoded weight."""
    return run_model(model, [{"x": np.eye(rows, dtype=np.float32)}])[0][0]


def test_kmeans_recovers_few_distinct_values_and_beats_uniform():
    rng = np.random.default_rng(0)
    levels = np.sort(rng.standard_normal(16))
    rows = levels[rng.integers(0, 16, (3, 500))]
    centroids = kmeans_rows(rows, 16)
    codes = assign(rows, centroids)
    np.testing.assert_array_equal(np.take_along_axis(centroids, codes.astype(np.int64), 1), rows)
    gaussian = rng.standard_normal((4, 2000))
    book = kmeans_rows(gaussian, 16)
    decoded = np.take_along_axis(book, assign(gaussian, book).astype(np.int64), 1)
    kmeans_mse, _ = error_metrics(gaussian, decoded)
    uniform_mse, _ = error_metrics(gaussian, uniform_fake_quantize(gaussian, 4))
    assert kmeans_mse < 0.6 * uniform_mse
    np.testing.assert_array_equal(kmeans_rows(gaussian, 16), book)  # deterministic


def test_assignment_is_nearest_and_search_matches_numpy():
    rng = np.random.default_rng(1)
    rows = np.sort(rng.standard_normal((5, 100)), axis=1)
    queries = rng.standard_normal((5, 7))
    expected = np.stack([np.searchsorted(r, q) for r, q in zip(rows, queries, strict=True)])
    np.testing.assert_array_equal(batched_searchsorted(rows, queries), expected)
    book = np.sort(rng.standard_normal((5, 8)), axis=1)
    values = rng.standard_normal((5, 300))
    brute = np.abs(values[:, :, None] - book[:, None, :]).argmin(2)
    np.testing.assert_array_equal(np.take_along_axis(book, assign(values, book).astype(np.int64), 1),
                                  np.take_along_axis(book, brute, 1))


@pytest.mark.parametrize(("bits", "slots"), [(2, 4), (3, 2), (4, 2), (5, 1), (8, 1)])
def test_packing_round_trip(bits, slots):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, 1000).astype(np.uint8)
    assert slots_per_byte(bits, codes.size) == slots
    np.testing.assert_array_equal(unpack(pack(codes, slots), slots), codes)
    assert slots_per_byte(4, 1001) == 1


def test_matmul_per_channel_4bit_packed_decodes_in_onnxruntime():
    weight = np.random.default_rng(2).standard_normal((64, 128)).astype(np.float32)
    model = matmul_model(weight)
    clustered, report = run_cluster(model)
    codes = next(t for t in clustered.graph.initializer if t.name == "W.codes")
    assert (codes.data_type, list(codes.dims)) == (TensorProto.UINT8, [64 * 128 // 2])
    book = next(t for t in clustered.graph.initializer if t.name == "W.codebook")
    assert list(book.dims) == [16, 128]
    decoded = decoded_weight(clustered, 64)
    assert max(len(np.unique(decoded[:, j])) for j in range(128)) <= 16
    detail = report["details"]["tensors"][0]
    assert detail["granularity"] == "per-channel (axis 1)" and detail["indices_per_byte"] == 2
    mse = float(((decoded.astype(np.float64) - weight) ** 2).mean())
    assert mse == pytest.approx(detail["kmeans_mse"], rel=1e-4)
    assert detail["kmeans_mse"] < detail["uniform_mse"]
    assert report["saved_bytes"] == weight.nbytes - (64 * 128 // 2 + 16 * 128 * 4)


@pytest.mark.parametrize(("reader", "attrs", "axis"), [("Gemm", {"transB": 1}, 0), ("Gemm", {}, 1)])
def test_gemm_channel_axis_follows_trans_b(reader, attrs, axis):
    weight = np.random.default_rng(3).standard_normal((96, 96)).astype(np.float32)
    clustered, report = run_cluster(matmul_model(weight, reader, **attrs), bits=3)
    assert report["details"]["tensors"][0]["granularity"] == f"per-channel (axis {axis})"
    decoded = decoded_weight(clustered, 96)
    effective = decoded.T if attrs else decoded  # Gemm(I, W, transB=1) = W^T
    distinct = [len(np.unique(np.take(effective, j, axis=axis))) for j in range(96)]
    assert max(distinct) <= 8


def test_conv_weight_and_constant_node_weight_in_if_branch():
    rng = np.random.default_rng(4)
    conv = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    inner = rng.standard_normal((32, 32)).astype(np.float32)
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["K"], value=numpy_helper.from_array(inner, "k")),
         helper.make_node("MatMul", ["f", "K"], ["t"])], "then", [], [helper.make_tensor_value_info("t", F, [16, 32])])
    other = helper.make_graph([helper.make_node("Identity", ["f"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", F, [16, 32])])
    nodes = [helper.make_node("Conv", ["x", "C"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "s"], ["f"]),
             helper.make_node("If", ["b"], ["y"], then_branch=branch, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 8, 8, 4]),
                                           helper.make_tensor_value_info("b", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", F, [16, 32])],
                              initializer=[numpy_helper.from_array(conv, "C"),
                                           numpy_helper.from_array(np.array([-1, 32], np.int64), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    clustered, report = run_cluster(model, min_elements=1000)
    assert [d["tensor"] for d in report["details"]["tensors"]] == ["C", "main/If_2.then_branch/K"]
    then_ops = [n.op_type for n in clustered.graph.node[-1].attribute[1].g.node]
    assert "Constant" not in then_ops and then_ops[-1] == "MatMul" and "GatherElements" in then_ops
    feeds = [{"x": rng.standard_normal((1, 8, 8, 4)).astype(np.float32), "b": np.array(True)}]
    expected, actual = run_model(model, feeds)[0][0], run_model(clustered, feeds)[0][0]
    cosine = float(expected.ravel() @ actual.ravel() / np.linalg.norm(expected) / np.linalg.norm(actual))
    assert cosine > 0.98


def test_tied_embedding_after_share_is_decoded_once():
    model = load_model(MODELS_DIR / "transformer_tied.onnx")
    clustered, report = run_cluster(model, passes_=("share", "cluster"))
    names = [d["tensor"] for d in report["details"]["tensors"]]
    assert "embed.weight" in names and "lm_head.weight" not in names
    embed = next(d for d in report["details"]["tensors"] if d["tensor"] == "embed.weight")
    assert embed["granularity"] == "per-channel (axis 1)"
    gathers = [n for n in clustered.graph.node if n.op_type == "GatherElements" and n.output[0] == "embed.weight"]
    assert len(gathers) == 1


def test_skip_reasons_small_bias_custom_and_codebook_lookup():
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Gemm", ["x", "small", "bias"], ["a"]),
             helper.make_node("Mystery", ["x", "custom_w"], ["b"], domain="custom.ops"),
             helper.make_node("MatMul", ["x", "custom_w"], ["c"]),
             helper.make_node("Gather", ["table", "idx"], ["d"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [4, 64])],
                              [helper.make_tensor_value_info(n, F, [4, 4]) for n in "ad"]
                              + [helper.make_tensor_value_info("b", F, None),
                                 helper.make_tensor_value_info("c", F, [4, 128])], initializer=[
        numpy_helper.from_array(rng.standard_normal((64, 4)).astype(np.float32), "small"),
        numpy_helper.from_array(np.zeros(4, np.float32), "bias"),
        numpy_helper.from_array(rng.standard_normal((64, 128)).astype(np.float32), "custom_w"),
        numpy_helper.from_array(rng.standard_normal(8192).astype(np.float32), "table"),
        numpy_helper.from_array(np.arange(4, dtype=np.int64), "idx")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.ops", 1)])
    result = Pipeline([create_pass("cluster")]).run(model)
    reasons = {next(iter(s.values())): s["reason"] for s in result.runs[0].report["skipped"]}
    assert reasons == {
        "small": "256 elements < min_elements=4096",
        "bias": "bias: small and sensitive, kept in float",
        "custom_w": "read by a custom-domain op",
        "table": "a lookup table read with constant indices (e.g. a codebook already)",
    }
    assert result.modified is False


def test_bad_options():
    with pytest.raises(OptionError, match="bits"):
        create_pass("cluster", bits=9)
    with pytest.raises(OptionError, match="ops"):
        create_pass("cluster", ops=("MatMul", "LSTM"))
    with pytest.raises(OptionError, match="granularity"):
        create_pass("cluster", granularity="per-row")
