"""Bits budget (--bits-per-weight): every layer 4-bit, blocks widened when the budget needs it,
then the layers whose step up (blocks of 32, then 8-bit) buys the most KL per byte, measured."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes  # noqa: F401  (registers every pass)
from optimizer.api import BitsOptions, BudgetOptions, OptimizeOptions, optimize
from optimizer.bits_budget import LayerChoice, Level, _allocate, _choices, metric_output, plan_bits
from optimizer.budget_trials import MetricSpec, Runtime
from optimizer.cli import main
from optimizer.errors import OptionError
from optimizer.executor import ExecutorOptions
from optimizer.fileio.checker import check_model_full
from optimizer.graph.bit_count import BitsMeasure, measure_bits
from optimizer.registry import create_pass
from optimizer.verify.metrics import builtin_metric
from tests.helpers.runtime import run_model

HIDDEN, VOCAB, TOKENS = 256, 512, 16
SENSITIVE = "mlp_down"


def decoder_like(seed: int = 0) -> onnx.ModelProto:
    """ids -> Transpose(E) -> Gather -> MatMul(W1) -> Relu -> MatMul(W2) -> Relu -> MatMul(E) -> logits;
    E is tied (lookup and head), W2 has a few huge weights that wreck its 4-bit blocks (the sensitive layer),
    and a second output stands for a KV cache (the metric must not be taken on it)."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32) * 0.5
    w1 = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) / 16
    w2 = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) / 16
    w2[rng.integers(0, HIDDEN, 24), rng.integers(0, HIDDEN, 24)] = 3.0
    nodes = [
        helper.make_node("Transpose", ["E"], ["table"], name="embed_transpose", perm=[1, 0]),
        helper.make_node("Gather", ["table", "ids"], ["h0"], name="embed", axis=0),
        helper.make_node("MatMul", ["h0", "W1"], ["h1"], name="mlp_up"),
        helper.make_node("Relu", ["h1"], ["a1"], name="act"),
        helper.make_node("MatMul", ["a1", "W2"], ["h2"], name=SENSITIVE),
        helper.make_node("Relu", ["h2"], ["present.0.key"], name="act2"),
        helper.make_node("MatMul", ["present.0.key", "E"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder_like",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, TOKENS])],
        [
            helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, [1, TOKENS, HIDDEN]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, TOKENS, VOCAB]),
        ],
        [numpy_helper.from_array(v, n) for v, n in ((table, "E"), (w1, "W1"), (w2, "W2"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def calibration(count: int = 6) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    return [{"ids": rng.integers(0, VOCAB, (1, TOKENS)).astype(np.int64)} for _ in range(count)]


def int4_options(bits: float, **extra) -> OptimizeOptions:
    return OptimizeOptions(
        passes=["quantize"],
        pass_options={"quantize": {"weight_type": "int4", **extra}},
        calibration=calibration(),
        bits=BitsOptions(bits_per_weight=bits),
    )


def test_the_budget_holds_and_the_sensitive_layer_steps_up():
    model = decoder_like()
    result = optimize(model, None, int4_options(4.5))
    bits = result.report.bits
    assert bits is not None and bits["met"]
    measured_bits = measure_bits(model, result.model).bits_per_weight
    assert measured_bits == pytest.approx(bits["final"]["bits_per_weight"], abs=1e-3)
    assert bits["final"]["bits_per_weight"] <= 4.5 < 4.625  # block_size 32 alone: 4 + (16 + 4) / 32
    assert bits["block_size"] == 128 and bits["requested_block_size"] == 32  # 64 fits; one doubling past it
    stepped = bits["finer"] + bits["next_best"]
    assert SENSITIVE in stepped
    assert bits["final"]["value"] < bits["base"]["value"]  # the steps bought KL back
    assert bits["metric"] == "kl[logits]"
    assert any("block_size 32 needs more than 4.5" in note and "started at block_size 128" in note
               for note in result.report.notes)
    check_model_full(result.model)
    # the reported KL is what onnxruntime gives for the written model on the calibration data
    kl = builtin_metric("kl")
    out, ref = run_model(result.model, calibration()), run_model(model, calibration())
    measured = kl([{"y": r[1]} for r in ref], [{"y": o[1]} for o in out])
    assert measured == pytest.approx(bits["final"]["value"], rel=1e-6)
    rows = {row["node"]: row for row in result.report.layers}
    assert rows[SENSITIVE]["status"] != "requested format"


def test_reruns_are_byte_identical_and_the_input_is_untouched():
    model = decoder_like()
    before = model.SerializeToString()
    first = optimize(model, None, int4_options(5.0)).model.SerializeToString()
    assert optimize(model, None, int4_options(5.0)).model.SerializeToString() == first
    assert model.SerializeToString() == before


def test_a_budget_below_what_the_widest_blocks_take_is_refused():
    least = r"below the least this model takes: 4\.08\d with every layer compressed as requested at block_size 256"
    with pytest.raises(OptionError, match=least):
        optimize(decoder_like(), None, int4_options(4.05))


def test_a_generous_budget_buys_8_bit_for_the_sensitive_layer():
    model = decoder_like()
    result = plan_bits(
        model,
        [create_pass("quantize", weight_type="int4", mode="weights")],
        calibration(),
        budget=8.5,
        metric=MetricSpec("kl"),
        runtime=Runtime("cpu", None),
    )
    assert result.met and result.block_size == 32
    assert SENSITIVE in result.chosen("next-best")
    assert result.final.bits_per_weight <= 8.5 and result.value < result.base_value


def test_workers_choose_what_this_process_chooses():
    model, quantize = decoder_like(), [create_pass("quantize", weight_type="int4", mode="weights")]
    settings = {"budget": 5.0, "metric": MetricSpec("kl"), "runtime": Runtime("cpu", None)}
    here = plan_bits(model, quantize, calibration(), **settings)
    there = plan_bits(model, quantize, calibration(), executor=ExecutorOptions(workers=2),
                      worker_imports=("passes",), **settings)
    assert here.chosen("finer") == there.chosen("finer") and here.chosen("next-best") == there.chosen("next-best")
    assert here.final == there.final


def test_the_metric_defaults_to_the_logits_output():
    model = decoder_like()
    assert metric_output(model, MetricSpec("kl")).output == "logits"
    assert metric_output(model, MetricSpec("kl", output="present.0.key")).output == "present.0.key"


def _measure(weight_bytes: int, signature: str = "") -> BitsMeasure:
    return BitsMeasure(1000, weight_bytes, 1000, weight_bytes, signature)


def test_layers_whose_trials_built_the_same_model_are_one_choice():
    results = {
        "head": [(0.5, _measure(600, "head-fine")), (0.1, _measure(900, "head-8"))],
        "lookup": [(0.5, _measure(600, "head-fine")), (0.1, _measure(900, "head-8"))],  # same weight, other reader
        "fc": [(0.9, _measure(520, "fc-fine")), (0.8, _measure(560, "fc-8"))],
        "fc2": [(0.9, _measure(520, "fc2-fine")), (0.8, _measure(560, "fc2-8"))],  # same shape and values
    }
    choices = _choices(results, ["finer", "next-best"], 1.0, _measure(500), lambda value: value)
    assert [c.layers for c in choices] == [["head", "lookup"], ["fc"], ["fc2"]]
    assert choices[0].level("next-best") == Level("next-best", 0.1, 0.9, 400)


def test_trials_of_two_same_shape_layers_have_different_signatures():
    model, quantize = decoder_like(), create_pass("quantize", weight_type="int4", mode="weights")
    from optimizer.budget_trials import Backoff, compress

    runtime = Runtime("cpu", None)
    up, down = (measure_bits(model, compress(model, [quantize], Backoff(weight_only=frozenset([name])), [], runtime))
                for name in ("mlp_up", SENSITIVE))
    assert up.weight_bytes == down.weight_bytes and up.signature != down.signature


def test_over_the_budget_a_choice_steps_down_one_level():
    from optimizer.bits_budget import _one_down

    both = LayerChoice(["a"], [Level("finer", 0, 0.5, 10), Level("next-best", 0, 0.6, 100)], chosen="next-best")
    assert _one_down(both) == "finer"
    both.chosen = "finer"
    assert _one_down(both) is None
    useless_finer = LayerChoice(["b"], [Level("finer", 0, 0.0, 10), Level("next-best", 0, 0.6, 100)], "next-best")
    assert _one_down(useless_finer) is None


def test_allocation_takes_the_best_gain_per_byte_and_steps_a_layer_up_twice():
    base = _measure(500)  # 4 bits per weight over 1000 weights
    a = LayerChoice(["a"], [Level("finer", 0, 0.5, 10), Level("next-best", 0, 0.6, 100)])
    b = LayerChoice(["b"], [Level("finer", 0, 0.01, 10), Level("next-best", 0, 0.02, 100)])
    _allocate([a, b], base, budget=8 * (500 + 10 + 90 + 10) / 1000)  # room for a: finer, then next-best; b: finer
    assert (a.chosen, b.chosen) == ("next-best", "finer")
    a.chosen = b.chosen = None
    _allocate([a, b], base, budget=8 * 505 / 1000)  # room for nothing
    assert (a.chosen, b.chosen) == (None, None)
    useless = LayerChoice(["c"], [Level("next-best", 0, -0.1, 5)])
    _allocate([useless], base, budget=10.0)
    assert useless.chosen is None  # a step that makes things worse is never taken


def test_int4_with_calibration_data_needs_no_mode():
    result = optimize(decoder_like(), None, OptimizeOptions(
        passes=["quantize"], pass_options={"quantize": {"weight_type": "int4"}}, calibration=calibration()))
    assert result.report.auto["chosen"] == "weights"
    assert "weights_gptq" in result.report.passes[0]["report"]["counts"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"calibration": None}, "calibration data"),
        ({"budget": BudgetOptions(max_drop=0.1)}, "give one of them"),
        ({"passes": ["cleanup"], "pass_options": None}, "--quantize int4"),
    ],
)
def test_requests_the_budget_cannot_serve_are_refused_before_any_work(extra, message):
    options = int4_options(4.5)
    settings = {**{k: getattr(options, k) for k in ("passes", "pass_options", "calibration", "bits")}, **extra}
    with pytest.raises(OptionError, match=message):
        optimize(decoder_like(), None, OptimizeOptions(**settings))


def test_cli_writes_the_model_and_reports_the_budget(tmp_path, capsys):
    source, cal = tmp_path / "model.onnx", tmp_path / "cal"
    onnx.save(decoder_like(), source)
    cal.mkdir()
    for i, feed in enumerate(calibration()):
        np.savez(cal / f"{i}.npz", **feed)
    out, report = tmp_path / "out.onnx", tmp_path / "report.md"
    code = main(["optimize", str(source), "-o", str(out), "--quantize", "int4", "--calibration-data", str(cal),
                 "--bits-per-weight", "5", "--report", str(report)])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "bits budget: " in printed and "within 5" in printed
    assert "## Bits budget" in report.read_text()
    missing = main(["optimize", str(source), "-o", str(tmp_path / "nowhere" / "out.onnx"), "--quantize", "int4",
                    "--calibration-data", str(cal), "--bits-per-weight", "5"])
    assert missing == 2 and "nowhere" in capsys.readouterr().err
    refused = main(["optimize", str(source), "-o", str(out), "--quantize", "int4", "--bits-per-weight", "5"])
    assert refused == 2 and "calibration" in capsys.readouterr().err


def test_a_model_too_large_to_run_from_memory_is_run_from_files(tmp_path, monkeypatch):
    """Above 256 MB of external data optimize() loads lazily; onnxruntime cannot resolve such a model
    in memory, so the budget's reference and trials run saved copies, here and in workers."""
    import optimizer.app_inputs as app_inputs

    source = tmp_path / "model.onnx"
    onnx.save_model(decoder_like(), source, save_as_external_data=True, location="model.data", size_threshold=0)
    monkeypatch.setattr(app_inputs, "LAZY_LOAD_ABOVE_BYTES", 0)  # stands for a model over 256 MB
    finals = []
    for workers in (1, 2):
        options = int4_options(4.5)
        options = OptimizeOptions(**{**options.__dict__, "executor": ExecutorOptions(workers=workers)})
        result = optimize(source, tmp_path / f"out{workers}.onnx", options)
        assert result.report.bits["met"] and SENSITIVE in result.report.bits["finer"] + result.report.bits["next_best"]
        finals.append(result.report.bits["final"])
    assert finals[0] == finals[1]
    (one,), (two,) = (list(tmp_path.glob(f"out{n}.onnx.*.data")) for n in (1, 2))
    assert one.read_bytes() == two.read_bytes()


def test_an_8bit_request_is_not_widened_and_its_floor_is_named_without_blocks():
    int8 = {"quantize": {"weight_type": "int8", "mode": "weights"}}
    options = OptimizeOptions(passes=["quantize"], pass_options=int8, calibration=calibration(),
                              bits=BitsOptions(bits_per_weight=7.0))
    with pytest.raises(OptionError, match=r"least this model takes: 8\.\d+ with every layer compressed as requested$"):
        optimize(decoder_like(), None, options)


def test_a_tied_table_steps_up_by_its_most_used_rows():
    """Between the table's finer blocks and 8-bit: its rows the calibration text looks up most at 8
    bits (Zipf-distributed ids, as text has them), measured like every other step."""
    rng = np.random.default_rng(5)
    text_like = [{"ids": (np.minimum(rng.zipf(1.2, (1, TOKENS)), VOCAB) - 1).astype(np.int64)} for _ in range(6)]
    model = decoder_like()
    result = plan_bits(
        model,
        [create_pass("quantize", weight_type="int4", mode="weights")],
        text_like,
        budget=5.0,
        metric=MetricSpec("kl"),
        runtime=Runtime("cpu", None),
    )
    [table] = [choice for choice in result.layers if "lm_head" in choice.layers]
    names = [level.name for level in table.levels]
    assert names[0] == "rows 0.0625" and names[-1] == "next-best"  # blocks of 32 already: no finer step
    assert result.met and result.to_dict()["rows"] > 0 and table.chosen.startswith("rows ")
    assert "lm_head" in result.to_dict()["finer"]  # a rows step is built with the table's finer blocks
    assert result.value < 0.2 * result.base_value
    compressed = optimize(model, None, OptimizeOptions(
        passes=["quantize"], pass_options={"quantize": {"weight_type": "int4", "mode": "weights"}},
        calibration=text_like, bits=BitsOptions(bits_per_weight=5.0))).model
    check_model_full(compressed)
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in compressed.graph.node
            if n.op_type == "GatherBlockQuantized"]
    assert sorted(bits) == [4, 8]
    assert measure_bits(model, compressed).bits_per_weight == pytest.approx(result.final.bits_per_weight)


def test_a_rows_step_steps_down_to_fewer_rows_then_finer_blocks():
    from optimizer.bits_budget import _one_down

    levels = [Level("finer", 0, 0.1, 10), Level("rows 0.0625", 0, 0.3, 20, 0.0625)]
    levels.append(Level("rows 0.125", 0, 0.4, 30, 0.125))
    table = LayerChoice(["head"], [*levels, Level("next-best", 0, 0.6, 100)], chosen="rows 0.125")
    assert _one_down(table) == "rows 0.0625"
    table.chosen = "rows 0.0625"
    assert _one_down(table) == "finer"
