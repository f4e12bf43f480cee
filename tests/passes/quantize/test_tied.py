"""4-bit tied embeddings: the head's MatMul runs as MatMulNBits, the lookups as GatherBlockQuantized
on a transposed copy of the same integers, and nothing is dequantized at run time."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.calibration.quant_math import dequantize
from tests.helpers.quantize_checks import initializers, quantize
from tests.helpers.runtime import ort_runs, run_model

HIDDEN, VOCAB, TOKENS = 256, 512, 6
RNG = np.random.default_rng(3)


def tied_model(extra_reader: str | None = None, constant_node: bool = False) -> onnx.ModelProto:
    """ids -> Transpose(W) -> Gather -> (embedded, an output) -> MatMul(., W) -> logits, W [HIDDEN, VOCAB]:
    the layout onnxruntime-genai's builder writes for tied input and output embeddings."""
    values = RNG.standard_normal((HIDDEN, VOCAB)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["W"], ["table"], name="embed_transpose", perm=[1, 0]),
        helper.make_node("Gather", ["table", "ids"], ["embedded"], name="embed_lookup", axis=0),
        helper.make_node("MatMul", ["embedded", "W"], ["logits"], name="lm_head"),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, TOKENS, VOCAB]),
        helper.make_tensor_value_info("embedded", TensorProto.FLOAT, [1, TOKENS, HIDDEN]),
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


def _lookup_table(model: onnx.ModelProto) -> np.ndarray:
    """The float table the GatherBlockQuantized node stands for, dequantized in numpy."""
    [node] = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    stored = initializers(model)
    data, scale = (numpy_helper.to_array(stored[name]) for name in node.input[0::2][:2])
    zero = numpy_helper.to_array(stored[node.input[3]]) if len(node.input) > 3 else np.zeros_like(scale, np.int8)
    block = next(a.i for a in node.attribute if a.name == "block_size")
    return dequantize(data.astype(np.int32), scale, zero.astype(np.int32), 1, block)


@pytest.mark.parametrize("symmetric", [None, True])
@pytest.mark.parametrize("constant_node", [False, True])
def test_tied_weight_runs_as_matmulnbits_and_block_quantized_lookups(tmp_path, symmetric, constant_node):
    model = tied_model(constant_node=constant_node)
    result, report = quantize(model, mode="weights", weight_type="int4", symmetric_weights=symmetric)
    produced = result.model
    assert report["counts"]["lookups_gather_block_quantized"] == 1
    runs = ort_runs(produced, tmp_path)
    assert runs["MatMulNBits"] == 1 and runs["GatherBlockQuantized"] == 1
    assert runs["DequantizeLinear"] == 0 and runs["Transpose"] == 0 and runs["MatMul"] == 0
    ops = [n.op_type for n in produced.graph.node]
    stored = initializers(produced)
    readers = [name for n in produced.graph.node for name in n.input if name in stored]
    assert len(set(readers)) == len(readers), "no integers, scales or zero points are shared"
    assert "Transpose" not in ops
    # the lookups are exact: the rows of the stored table, dequantized
    table = _lookup_table(produced)
    for feed in feeds():
        embedded = run_model(produced, [feed])[0][1]
        np.testing.assert_array_equal(embedded, table[feed["ids"]])
    # and the head's integers are the same integers, transposed
    head = next(n for n in produced.graph.node if n.op_type == "DequantizeLinear")
    lookup = next(n for n in produced.graph.node if n.op_type == "GatherBlockQuantized")
    np.testing.assert_array_equal(
        numpy_helper.to_array(stored[head.input[0]]).T, numpy_helper.to_array(stored[lookup.input[0]])
    )


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
