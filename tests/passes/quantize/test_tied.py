"""4-bit tied embeddings: the head's MatMul runs as MatMulNBits, the lookups as GatherBlockQuantized
on a transposed copy of the same integers, and nothing is dequantized at run time."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.calibration.gptq import DAMPING, InverseFactor, gptq_quantize
from optimizer.calibration.quant_math import dequantize, qtype
from tests.helpers.quantize_checks import initializers, quantize
from tests.helpers.runtime import ort_runs, run_model

HIDDEN, VOCAB, TOKENS = 256, 512, 6
RNG = np.random.default_rng(3)


def tied_model(extra_reader: str | None = None, constant_node: bool = False, hidden: int = HIDDEN) -> onnx.ModelProto:
    """ids -> Transpose(W) -> Gather -> (embedded, an output) -> MatMul(., W) -> logits, W [HIDDEN, VOCAB]:
    the layout onnxruntime-genai's builder writes for tied input and output embeddings."""
    values = RNG.standard_normal((hidden, VOCAB)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["W"], ["table"], name="embed_transpose", perm=[1, 0]),
        helper.make_node("Gather", ["table", "ids"], ["embedded"], name="embed_lookup", axis=0),
        helper.make_node("MatMul", ["embedded", "W"], ["logits"], name="lm_head"),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, TOKENS, VOCAB]),
        helper.make_tensor_value_info("embedded", TensorProto.FLOAT, [1, TOKENS, hidden]),
    ]
    if extra_reader == "reduce":  # a reader that is not a lookup: the weight must not keep a run-time DQ
        nodes.append(helper.make_node("ReduceSum", ["W"], ["total"], name="weight_sum", keepdims=0))
        outputs.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, []))
    initializers_ = [numpy_helper.from_array(values, "W")]
    if constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["W"], name="W_const", value=initializers_.pop()))
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, TOKENS])], outputs, initializers_
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def feeds(count: int = 3) -> list[dict[str, np.ndarray]]:
    return [{"ids": RNG.integers(0, VOCAB, (1, TOKENS)).astype(np.int64)} for _ in range(count)]


def _unpacked_rows(packed: np.ndarray, count: int) -> np.ndarray:
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    return nibbles[:, :count].astype(np.int32)


def _stored_scale(model: onnx.ModelProto, name: str) -> np.ndarray:
    """A 4-bit scale input: stored as float16 behind a Cast to float32 (a float32 scale would be a
    fifth of the 4-bit bytes), equal to the float32 values it stands for."""
    [cast] = [n for n in model.graph.node if name in n.output]
    assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT
    half = initializers(model)[cast.input[0]]
    assert half.data_type == TensorProto.FLOAT16
    return numpy_helper.to_array(half).astype(np.float32)


def _lookup_table(model: onnx.ModelProto, hidden: int) -> np.ndarray:
    """The float table GatherBlockQuantized stands for, dequantized in numpy from what is stored."""
    node = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    stored = initializers(model)
    producers = {out: n for n in model.graph.node for out in n.output}
    source = producers[node.input[0]].input[0] if node.input[0] in producers else node.input[0]
    data, scale = numpy_helper.to_array(stored[source]), _stored_scale(model, node.input[2])
    block = next(a.i for a in node.attribute if a.name == "block_size")
    blocks = scale.shape[1]
    if data.dtype == np.uint8:  # MatMulNBits' packed layout, shared
        values = _unpacked_rows(data.reshape(data.shape[0], -1), hidden)
        zero = _unpacked_rows(numpy_helper.to_array(stored[node.input[3]]), blocks) if len(node.input) > 3 else 8
    else:  # a transposed 4-bit copy
        values = data.astype(np.int32)
        zero = numpy_helper.to_array(stored[node.input[3]]).astype(np.int32) if len(node.input) > 3 else 0
    return dequantize(values, scale, np.broadcast_to(zero, scale.shape), 1, block)


@pytest.mark.parametrize("symmetric", [None, True])
@pytest.mark.parametrize("constant_node", [False, True])
@pytest.mark.parametrize("hidden", [HIDDEN, 96, 80])
def test_tied_weight_runs_as_matmulnbits_and_block_quantized_lookups(tmp_path, symmetric, constant_node, hidden):
    model = tied_model(constant_node=constant_node, hidden=hidden)
    result, report = quantize(model, mode="weights", weight_type="int4", symmetric_weights=symmetric)
    produced = result.model
    assert report["counts"]["lookups_gather_block_quantized"] == 1
    runs = ort_runs(produced, tmp_path)
    assert runs["MatMulNBits"] == 1 and runs["GatherBlockQuantized"] == 1
    assert runs["DequantizeLinear"] == 0 and runs["Transpose"] == 0 and runs["MatMul"] == 0
    assert "Transpose" not in [n.op_type for n in produced.graph.node]
    # one copy (integers and zero points) read by both when K is whole blocks of 32; else a transposed copy
    stored = initializers(produced)
    integer_tensors = sum(
        t.data_type in (TensorProto.UINT8, TensorProto.UINT4, TensorProto.INT4) for t in stored.values()
    )
    assert integer_tensors <= (2 if hidden % 32 == 0 else 4)
    assert ("tied_matmul_nbits" in report["counts"]) == (hidden % 32 == 0)
    # the lookups are exact: the rows of the stored table, dequantized
    table = _lookup_table(produced, hidden)
    for feed in feeds():
        embedded = run_model(produced, [feed])[0][1]
        np.testing.assert_array_equal(embedded, table[feed["ids"]])


def test_the_head_computes_what_its_dequantized_weight_gives(tmp_path):
    """MatMulNBits on the shared bytes against MatMul on the same table, dequantized in numpy."""
    result, _ = quantize(tied_model(), mode="weights", weight_type="int4")
    table = _lookup_table(result.model, HIDDEN)
    x = RNG.standard_normal((1, TOKENS, HIDDEN)).astype(np.float32)
    head = next(n for n in result.model.graph.node if n.op_type == "MatMulNBits")
    casts = [n for n in result.model.graph.node if n.op_type == "Cast" and n.output[0] in head.input]
    graph = helper.make_graph(
        [
            *casts,
            helper.make_node(
                "MatMulNBits",
                ["x", *head.input[1:]],
                ["y"],
                domain="com.microsoft",
                **{a.name: a.i for a in head.attribute} | {"accuracy_level": 0},
            )
        ],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, TOKENS, VOCAB])],
        [t for t in result.model.graph.initializer if t.name in {*head.input, *(c.input[0] for c in casts)}],
    )
    alone = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    [y] = run_model(alone, [{"x": x}])[0]
    np.testing.assert_allclose(y, x @ table.T, rtol=1e-4, atol=1e-4)


def test_tied_int4_stays_close_to_fp32_is_idempotent_and_reruns_byte_identical():
    model = tied_model()
    first, _ = quantize(model, mode="weights", weight_type="int4")
    again, _ = quantize(model, mode="weights", weight_type="int4")
    assert first.model.SerializeToString(deterministic=True) == again.model.SerializeToString(deterministic=True)
    rerun, rerun_report = quantize(first.model, mode="weights", weight_type="int4")
    assert not rerun.runs[0].modified and "lookups_gather_block_quantized" not in rerun_report["counts"]
    data = feeds()
    for want, got in zip(run_model(model, data), run_model(first.model, data), strict=True):
        for a, b in zip(want, got, strict=True):
            cosine = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
            assert cosine > 0.99  # 4-bit blocks of 32 on normal weights: about 0.995


def test_a_weight_also_read_by_something_else_is_folded_not_dequantized_at_run_time(tmp_path):
    result, report = quantize(tied_model("reduce"), mode="weights", weight_type="int4")
    runs = ort_runs(result.model, tmp_path)
    assert runs["DequantizeLinear"] == 0 and runs["GatherBlockQuantized"] == 0
    assert "lookups_gather_block_quantized" not in report["counts"]
    assert any("also read by" in note and "weight_sum" in note for note in report["details"]["notes"])


def test_default_int8_keeps_no_float_copy_of_a_tied_weight(tmp_path):
    model = tied_model()
    result, report = quantize(model, mode="dynamic")
    stored = initializers(result.model)
    assert not any(
        t.data_type == TensorProto.FLOAT and numpy_helper.to_array(t).size == HIDDEN * VOCAB for t in stored.values()
    )
    runs = ort_runs(result.model, tmp_path)
    assert runs["DequantizeLinear"] == 0 and runs["MatMul"] == 0
    assert runs["DynamicQuantizeMatMul"] + runs["MatMulIntegerToFloat"] == 1
    assert any("also read by Transpose 'embed_transpose'" in note for note in report["details"]["notes"])
    [integers] = [t for t in stored.values() if t.data_type == TensorProto.INT8]
    [scale] = [t for t in stored.values() if t.name.endswith("_scale") and t.data_type == TensorProto.FLOAT]
    table = (numpy_helper.to_array(integers).astype(np.float32) * numpy_helper.to_array(scale)).T
    for feed in feeds():
        np.testing.assert_allclose(run_model(result.model, [feed])[0][1], table[feed["ids"]], rtol=1e-6)


def reverse_tied_model(hidden: int = HIDDEN) -> onnx.ModelProto:
    """ids -> Gather(W) -> embedded -> MatMul(., Transpose(W)) -> logits, W [VOCAB, hidden]: a Hugging
    Face export once the share pass has re-tied its transposed head copy."""
    values = RNG.standard_normal((VOCAB, hidden)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["W", "ids"], ["embedded"], name="embed_lookup", axis=0),
        helper.make_node("Transpose", ["W"], ["W_t"], name="head_transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["embedded", "W_t"], ["logits"], name="lm_head"),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, TOKENS, VOCAB]),
        helper.make_tensor_value_info("embedded", TensorProto.FLOAT, [1, TOKENS, hidden]),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, TOKENS])],
        outputs,
        [numpy_helper.from_array(values, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("symmetric", [None, True])
@pytest.mark.parametrize("hidden", [HIDDEN, 96])
def test_reverse_tied_weight_shares_one_copy_too(tmp_path, symmetric, hidden):
    model = reverse_tied_model(hidden)
    result, report = quantize(model, mode="weights", weight_type="int4", symmetric_weights=symmetric)
    produced = result.model
    assert report["counts"]["tied_matmul_nbits"] == 1 and report["counts"]["lookups_gather_block_quantized"] == 1
    runs = ort_runs(produced, tmp_path)
    assert runs["MatMulNBits"] == 1 and runs["GatherBlockQuantized"] == 1
    assert runs["DequantizeLinear"] == 0 and runs["Transpose"] == 0 and runs["MatMul"] == 0
    table = _lookup_table(produced, hidden)
    for feed in feeds():
        logits, embedded = run_model(produced, [feed])[0]
        np.testing.assert_array_equal(embedded, table[feed["ids"]])
        np.testing.assert_allclose(logits, embedded @ table.T, rtol=1e-2, atol=0.05 * hidden**0.5)
    data = feeds()
    for want, got in zip(run_model(model, data), run_model(produced, data), strict=True):
        cosine = float((want[0] * got[0]).sum() / np.linalg.norm(want[0]) / np.linalg.norm(got[0]))
        assert cosine > 0.99


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def test_a_tied_head_inside_an_if_branch_is_folded_not_moved_out():
    """MatMulNBits stands in only for MatMuls in the weight's own graph (review: the head in an If
    branch was appended to the main graph, leaving the branch output undefined)."""
    weight = RNG.standard_normal((HIDDEN, VOCAB)).astype(np.float32)
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["embedded", "W"], ["y_then"], name="head_in_if")],
        "then",
        [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [1, TOKENS, VOCAB])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["zeros"], ["y_else"], name="no_head")],
        "else",
        [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [1, TOKENS, VOCAB])],
    )
    nodes = [
        helper.make_node("Transpose", ["W"], ["table"], name="embed_transpose", perm=[1, 0]),
        helper.make_node("Gather", ["table", "ids"], ["embedded"], name="embed_lookup", axis=0),
        helper.make_node("If", ["cond"], ["logits"], name="branch", then_branch=branch, else_branch=other),
    ]
    zeros = numpy_helper.from_array(np.zeros((1, TOKENS, VOCAB), np.float32), "zeros")
    graph = helper.make_graph(
        nodes,
        "tied_if",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, TOKENS]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, TOKENS, VOCAB])],
        [numpy_helper.from_array(weight, "W"), zeros],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    result, report = quantize(model, mode="weights", weight_type="int4")  # checked in full, opened
    assert "tied_matmul_nbits" not in report["counts"]
    data = [{**feed, "cond": np.array(True)} for feed in feeds()]
    for want, got in zip(run_model(model, data), run_model(result.model, data), strict=True):
        assert _cosine(want[0], got[0]) > 0.99


def test_a_gemm_reading_a_tied_weight_keeps_its_bias_and_alpha():
    """With weight_only_form=dequantize_linear a Gemm use keeps its DequantizeLinear (review: it
    became MatMulNBits and lost bias and alpha)."""
    model = tied_model()
    graph = model.graph
    graph.node.append(helper.make_node("Gemm", ["x2", "W", "bias"], ["g"], name="gemm", alpha=2.0))
    graph.input.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [3, HIDDEN]))
    graph.output.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, [3, VOCAB]))
    graph.initializer.append(numpy_helper.from_array(np.full(VOCAB, 100.0, np.float32), "bias"))
    result, report = quantize(model, mode="weights", weight_type="int4", weight_only_form="dequantize_linear")
    assert "tied_matmul_nbits" not in report["counts"]
    data = [{**feed, "x2": RNG.standard_normal((3, HIDDEN)).astype(np.float32)} for feed in feeds()]
    for want, got in zip(run_model(model, data), run_model(result.model, data), strict=True):
        np.testing.assert_allclose(got[2].mean(), want[2].mean(), rtol=0.01)
        assert _cosine(want[2] - 100.0, got[2] - 100.0) > 0.99


def test_a_tied_weight_named_for_fine_blocks_takes_them_in_the_head_and_the_lookups(tmp_path):
    """fine_block_nodes names the head; the one shared copy (head and lookups) gets blocks of 32."""
    model = tied_model()
    wide, _ = quantize(model, mode="weights", weight_type="int4", block_size=128)
    fine, _ = quantize(model, mode="weights", weight_type="int4", block_size=128, fine_block_nodes=("lm_head",))
    blocks = {n.op_type: {a.name: a.i for a in n.attribute}["block_size"] for n in fine.model.graph.node
              if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert blocks == {"MatMulNBits": 32, "GatherBlockQuantized": 32}
    runs = ort_runs(fine.model, tmp_path)
    assert runs["MatMulNBits"] == 1 and runs["GatherBlockQuantized"] == 1 and runs["DequantizeLinear"] == 0
    samples = feeds()
    reference = run_model(model, samples)
    errors = [
        max(float(np.abs(got[0] - want[0]).max()) for got, want in zip(run_model(m, samples), reference, strict=True))
        for m in (fine.model, wide.model)
    ]
    assert errors[0] < errors[1]


def test_gptq_on_a_tied_weight_damps_toward_the_lookups_own_error():
    """GPTQ weighs the head's X^T X; a lookup reads the weight itself, so a tied weight takes GPTQ
    with more damping (``TIED_DAMPING``): the head still gains on round-to-nearest, and the table
    moves less than under the usual damping."""
    model = tied_model()
    weight = numpy_helper.to_array(model.graph.initializer[0]).copy()
    weight[:8] *= 4.0  # a few large hidden channels: the head's X^T X is far from isotropic
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "W"))
    calibration = feeds(80)
    gptq, report = quantize(model, calibration=calibration, mode="weights", weight_type="int4")
    nearest, _ = quantize(model, calibration=calibration, mode="weights", weight_type="int4", weight_rounding="nearest")
    assert report["counts"]["weights_gptq"] == 1
    assert report["details"]["gptq"]["output_error_vs_nearest_median"] < 0.5
    rows = np.concatenate([weight.T[feed["ids"][0]] for feed in calibration]).astype(np.float64)
    usual = gptq_quantize(weight, InverseFactor(rows.T @ rows / len(rows), DAMPING), qtype("uint4"),
                          symmetric=False, block_size=32).dequantized()

    def table_error(table: np.ndarray) -> float:
        return float(np.square(table - weight.T).sum())

    assert table_error(_lookup_table(gptq.model, HIDDEN)) < 0.7 * table_error(usual.T)
    assert table_error(_lookup_table(gptq.model, HIDDEN)) > table_error(_lookup_table(nearest.model, HIDDEN))
