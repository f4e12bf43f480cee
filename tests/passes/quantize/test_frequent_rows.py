"""``frequent_rows``: a tied table's most-looked-up rows at 8 bits in both its uses (the lookups and
the head), the rest at 4, each use still reading one copy of the integers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.errors import OptionError, PassError
from tests.helpers.quantize_checks import initializers, quantize
from tests.helpers.runtime import ort_runs, run_model
from tests.passes.quantize.test_tied import (
    HIDDEN,
    TOKENS,
    VOCAB,
    _lookup_table,
    reverse_tied_model,
    tied_model,
)

RNG = np.random.default_rng(11)


def skewed_feeds(count: int, distinct: int = VOCAB) -> list[dict[str, np.ndarray]]:
    """Token ids as text has them: a few rows looked up often, most rarely (Zipf), within ``distinct``.
    At most 32 for calibration: the pass counts ``calibration_samples`` (32) of them."""
    ids = np.minimum(RNG.zipf(1.3, (count, 1, TOKENS)), distinct) - 1
    return [{"ids": row.astype(np.int64)} for row in ids]


def _counts(feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.bincount(np.concatenate([feed["ids"].ravel() for feed in feeds]), minlength=VOCAB)


def _table(model: onnx.ModelProto, hidden: int) -> np.ndarray:
    """The float table both uses stand for, rebuilt in numpy from what is stored: the 8-bit rows,
    the 4-bit rows (``_lookup_table``) and the int32 position of each row among them."""
    stored = initializers(model)
    lookups = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    eight = next(n for n in lookups if any(a.name == "bits" and a.i == 8 for a in n.attribute))
    producers = {out: n for n in model.graph.node for out in n.output}
    data = numpy_helper.to_array(stored[producers[eight.input[0]].input[0]]).astype(np.int32) - np.int32(128)
    scale = numpy_helper.to_array(stored[eight.input[2]])
    frequent = (data.astype(np.float32) * scale[:, :, None]).reshape(data.shape[0], hidden)
    alone = onnx.ModelProto()
    alone.CopyFrom(model)
    alone.graph.node.remove(eight)  # _lookup_table reads the first GatherBlockQuantized
    rest = _lookup_table(alone, hidden)
    position = next(t for t in stored.values() if t.data_type == TensorProto.INT32 and t.dims == [VOCAB])
    return np.concatenate([frequent, rest.astype(np.float32)])[numpy_helper.to_array(position)]


@pytest.mark.parametrize("make", [tied_model, reverse_tied_model])
@pytest.mark.parametrize("symmetric", [None, True])
@pytest.mark.parametrize("hidden", [HIDDEN, 96])
def test_frequent_rows_at_8_bits_in_both_uses(tmp_path, make, symmetric, hidden):
    model, calibration = make(hidden=hidden), skewed_feeds(32)
    result, report = quantize(
        model, calibration, mode="weights", weight_type="int4", symmetric_weights=symmetric, frequent_rows=0.25
    )
    produced = result.model
    chosen = report["counts"]["tied_frequent_rows"]
    assert chosen == min(VOCAB // 4, np.count_nonzero(_counts(calibration)))
    runs = ort_runs(produced, tmp_path)
    assert runs["MatMulNBits"] == 2 and runs["GatherBlockQuantized"] == 2
    assert runs["DequantizeLinear"] == 0 and runs["MatMul"] == 0 and runs["Transpose"] == 0
    table = _table(produced, hidden)
    original = numpy_helper.to_array(model.graph.initializer[0])
    original = original.T if make is tied_model else original
    error = np.abs(table - original).max(axis=1)
    counts = _counts(calibration)
    top = np.argsort(-counts, kind="stable")[:chosen]
    rare = np.setdiff1d(np.arange(VOCAB), top)
    assert error[top].max() < error[rare].min()  # the most-used rows, and only they, are 8-bit
    checks = skewed_feeds(3) + [{"ids": np.array([[-1, 0, 1, VOCAB - 2, -VOCAB, 5]], np.int64)}]
    for feed in checks:
        logits, embedded = run_model(produced, [feed])[0]
        np.testing.assert_array_equal(embedded, table[feed["ids"]])  # negative ids read from the end
        np.testing.assert_allclose(logits, embedded @ table.T, rtol=1e-2, atol=0.05 * hidden**0.5)


def test_frequent_rows_bring_the_outputs_closer_than_4_bits_alone():
    """Agreement with the original through onnxruntime: on text-like ids, the logits' error shrinks."""
    model, calibration, checks = tied_model(), skewed_feeds(32), skewed_feeds(8)
    errors = {}
    for fraction in (0.0, 0.25):
        result, _ = quantize(model, calibration, mode="weights", weight_type="int4", frequent_rows=fraction)
        errors[fraction] = [
            float(np.abs(got[1] - want[1]).mean())
            for want, got in zip(run_model(model, checks), run_model(result.model, checks), strict=True)
        ]
    assert np.mean(errors[0.25]) < 0.5 * np.mean(errors[0.0])  # most looked-up rows now 8-bit


def test_frequent_rows_rerun_byte_identical_idempotent_and_constant_node_weights():
    model, calibration = tied_model(constant_node=True), skewed_feeds(20)
    first, _ = quantize(model, calibration, mode="weights", weight_type="int4", frequent_rows=0.25)
    again, _ = quantize(model, calibration, mode="weights", weight_type="int4", frequent_rows=0.25)
    assert first.model.SerializeToString(deterministic=True) == again.model.SerializeToString(deterministic=True)
    rerun, report = quantize(first.model, calibration, mode="weights", weight_type="int4", frequent_rows=0.25)
    assert not rerun.runs[0].modified and "tied_frequent_rows" not in report["counts"]


def test_rows_never_looked_up_stay_4_bit():
    _, report = quantize(
        tied_model(), skewed_feeds(10, distinct=12), mode="weights", weight_type="int4", frequent_rows=0.5
    )
    assert 0 < report["counts"]["tied_frequent_rows"] <= 12


def test_lookups_of_a_computed_index_are_counted_by_running_the_model(tmp_path):
    """The lookup reads Abs(ids), not a graph input: counted from the model's own values."""
    model = tied_model()
    lookup = next(n for n in model.graph.node if n.op_type == "Gather")
    lookup.input[1] = "row"
    model.graph.node.insert(0, helper.make_node("Abs", ["ids"], ["row"], name="row_abs"))
    feeds = skewed_feeds(30)
    calibration = [{"ids": -feed["ids"]} for feed in feeds]
    result, report = quantize(model, calibration, mode="weights", weight_type="int4", frequent_rows=0.25)
    assert report["counts"]["tied_frequent_rows"] == min(VOCAB // 4, np.count_nonzero(_counts(feeds)))
    assert ort_runs(result.model, tmp_path)["GatherBlockQuantized"] == 2


def test_a_fraction_of_under_one_row_still_takes_the_most_used_row():
    _, report = quantize(tied_model(), skewed_feeds(8), mode="weights", weight_type="int4", frequent_rows=0.001)
    assert report["counts"]["tied_frequent_rows"] == 1


def test_frequent_rows_outside_weights_mode_are_refused_or_said_to_do_nothing():
    with pytest.raises(OptionError, match="frequent_rows applies to mode 'weights'"):
        quantize(tied_model(), skewed_feeds(2), mode="dynamic", frequent_rows=0.25)
    _, report = quantize(tied_model(), skewed_feeds(2), weight_type="int4", frequent_rows=0.25)  # auto, alone
    assert any(note.startswith("frequent_rows: applies to weights mode") for note in report["details"]["notes"])


def test_frequent_rows_need_calibration_data_and_a_fraction_below_one():
    with pytest.raises(PassError, match=r"frequent_rows.*calibration data"):
        quantize(tied_model(), mode="weights", weight_type="int4", frequent_rows=0.25)
    for bad in (1.0, -0.1):
        with pytest.raises(OptionError, match="frequent_rows"):
            quantize(tied_model(), skewed_feeds(2), mode="weights", weight_type="int4", frequent_rows=bad)


def test_a_model_without_a_tied_table_says_so():
    model = tied_model("reduce")  # the weight has a reader that is not a lookup: folded, no split
    _, report = quantize(model, skewed_feeds(4), mode="weights", weight_type="int4", frequent_rows=0.25)
    assert "tied_frequent_rows" not in report["counts"]
    assert any(note.startswith("frequent_rows: no 4-bit weight") for note in report["details"]["notes"])


def test_a_tied_table_inside_an_if_branch_keeps_4_bits_and_says_why():
    """Lookup counts come from main-graph tensors: a table whose lookups live in a branch is not split."""
    inner = tied_model().graph
    branch = helper.make_graph(list(inner.node), "then", [], list(inner.output), list(inner.initializer))
    other = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["logits_shape"], ["logits_else"], name="no_logits"),
            helper.make_node("ConstantOfShape", ["embedded_shape"], ["embedded_else"], name="no_embedding"),
        ],
        "else",
        [],
        [
            helper.make_tensor_value_info("logits_else", TensorProto.FLOAT, [1, TOKENS, VOCAB]),
            helper.make_tensor_value_info("embedded_else", TensorProto.FLOAT, [1, TOKENS, HIDDEN]),
        ],
    )
    shapes = [
        numpy_helper.from_array(np.array([1, TOKENS, VOCAB], np.int64), "logits_shape"),
        numpy_helper.from_array(np.array([1, TOKENS, HIDDEN], np.int64), "embedded_shape"),
    ]
    node = helper.make_node(
        "If", ["cond"], ["logits", "embedded"], name="branch", then_branch=branch, else_branch=other
    )
    graph = helper.make_graph(
        [node],
        "tied_if",
        [*inner.input, helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        list(inner.output),
        shapes,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    data = [{**feed, "cond": np.array(True)} for feed in skewed_feeds(6)]
    result, report = quantize(model, data, mode="weights", weight_type="int4", frequent_rows=0.25)
    assert "tied_frequent_rows" not in report["counts"]
    assert any(note.startswith("frequent_rows: no 4-bit weight") for note in report["details"]["notes"])
    for want, got in zip(run_model(model, data), run_model(result.model, data), strict=True):
        cosine = float((want[0] * got[0]).sum() / np.linalg.norm(want[0]) / np.linalg.norm(got[0]))
        assert cosine > 0.99


@pytest.mark.parametrize("option", [{"frequent_rows": 0.25}, {"weight_rounding": "gptq"}])
def test_auto_mode_with_a_weights_mode_option_builds_weights_mode_only(option):
    """optimize()'s auto mode measures dynamic and static too; an option only weights mode has must
    not make those candidates fail (they were refused as options of mode 'dynamic')."""
    from optimizer.api import OptimizeOptions, optimize

    options = OptimizeOptions(passes=["quantize"], pass_options={"quantize": option}, calibration=skewed_feeds(8))
    result = optimize(tied_model(), None, options)
    assert result.report.auto["chosen"] == "weights"
