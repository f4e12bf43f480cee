"""--quantize-mode auto: every candidate built, checked like --validate and timed against the input;
the fastest that passes is kept (the most accurate among those within the noise floor)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from optimizer.api import optimize
from optimizer.auto_choice import choose as _choose
from optimizer.auto_choice import why as _why
from optimizer.auto_trials import Candidate
from optimizer.cli import main
from optimizer.executor import ExecutorOptions
from optimizer.fileio.model import load_model
from optimizer.optimize_options import OptimizeOptions, ValidationOptions
from optimizer.verify.tolerances import Tolerance
from tests.helpers.quantize_checks import heavy_tail_model
from tests.helpers.ray_check import ray_or_skip
from tests.helpers.samples import MODELS_DIR, seeded_feeds
from tests.passes.quantize.test_integer_forms import mobile_block

PREFERENCE = ["weights", "dynamic", "static"]


def _candidate(value: str, ratio: float | None, passed: bool = True, error: str | None = None) -> Candidate:
    return Candidate(value, passed=passed if error is None else None, latency_ratio=ratio, error=error)


def test_the_fastest_passing_candidate_wins():
    candidates = [_candidate("weights", 1.0), _candidate("dynamic", 0.98), _candidate("static", 0.5)]
    chosen = _choose(candidates, 0.02, PREFERENCE)
    assert chosen.value == "static" and "0.50x" in _why(chosen, candidates, 0.02)


def test_a_failing_candidate_is_never_chosen_however_fast():
    candidates = [_candidate("weights", 1.0), _candidate("dynamic", 0.6), _candidate("static", 0.3, passed=False)]
    assert _choose(candidates, 0.02, PREFERENCE).value == "dynamic"


def test_within_the_noise_floor_the_more_accurate_form_wins():
    candidates = [_candidate("weights", 1.0), _candidate("dynamic", 0.99), _candidate("static", 0.97)]
    assert _choose(candidates, 0.04, PREFERENCE).value == "weights"
    assert _choose(candidates, 0.01, PREFERENCE).value == "static"


@pytest.mark.parametrize(("again", "halfwidth", "noise"), [(1.004, 0.03, 0.03), (1.05, 0.01, 0.05)])
def test_the_noise_floor_is_the_second_sessions_distance_or_its_confidence_halfwidth(
    monkeypatch, tmp_path, again, halfwidth, noise
):
    """One median of two identical sessions can land near 1.0 by chance; its 95% interval says how
    far apart two equal models may measure."""
    import optimizer.auto_choice as auto_choice
    from optimizer.auto_trials import AutoSettings
    from optimizer.verify.benchmark import BenchResult, ModelTiming

    def timing(name: str, ratio: float, width: float) -> ModelTiming:
        return ModelTiming(name, 1, 0.0, 1.0, 1.0, 1.0, 1.0, 20, ratio, "cpu", ratio, width)

    def fake_benchmark(models, feeds, names, **kwargs):
        timings = [timing("input", 1.0, 0.0), timing("input again", again, halfwidth), timing(names[2], 0.9, 0.02)]
        return BenchResult(models=timings, provider_requested="cpu", provider_note=None, warmup=0, rounds=20, threads=2)

    monkeypatch.setattr(auto_choice, "benchmark", fake_benchmark)
    candidate = Candidate("static", passed=True)
    settings = AutoSettings([{}], "calibration samples", Tolerance(), {}, "cpu", None)
    paths = {candidate.name: tmp_path / "c.onnx"}
    found, rounds = auto_choice.time_candidates([candidate], b"model", paths, settings, PREFERENCE)
    assert found == pytest.approx(noise) and rounds == 20 and candidate.latency_ratio == pytest.approx(0.9)


def _rounds(*ratios: float, spread: float = 0.0) -> list[list[float]]:
    """Latencies (ms) of "input", "input again" and candidates over 12 rounds: each model at its
    ratio to the input, give or take ``spread`` (alternating signs)."""
    wobble = [spread if index % 2 else -spread for index in range(12)]
    return [[100.0] * 12] + [[100.0 * (ratio + w) for w in wobble] for ratio in ratios]


WEIGHTS, STATIC, STATIC_BACKED_OFF = (0, 0), (2, 0), (2, 3)


@pytest.mark.parametrize(
    ("ratios", "keys", "spread", "settled"),
    [
        ((1.0, 0.9, 0.5), {2: WEIGHTS}, 0.1, True),  # one passing candidate: nothing to choose between
        ((1.0, 0.9, 0.5), {2: WEIGHTS, 3: STATIC}, 0.01, True),  # far apart: 0.4 against a floor of 0.01
        ((1.05, 0.9, 0.89), {2: WEIGHTS, 3: STATIC}, 0.001, True),  # within the floor at any end: weights
        ((1.0, 0.9, 0.88), {2: WEIGHTS, 3: STATIC}, 0.01, False),  # gap 0.02: inside the intervals around the floor
        ((1.0, 0.64, 0.68), {2: STATIC_BACKED_OFF, 3: (2, 4)}, 0.01, True),  # the pick is also the preferred one
        ((1.0, 0.64, 0.645), {2: STATIC_BACKED_OFF, 3: (2, 4)}, 0.01, False),  # near tie; the floor may shrink
        ((1.05, 0.655, 0.63), {2: STATIC_BACKED_OFF, 3: (2, 4)}, 0.01, False),  # floor 0.05 may drop to 0.04: gap 0.045
        ((1.0, 0.655, 0.64), {2: STATIC_BACKED_OFF, 3: (2, 4)}, 0.01, False),  # preferred, 0.015 slower: unsure
    ],
)
def test_timing_stops_only_when_more_rounds_cannot_change_the_choice(ratios, keys, spread, settled):
    from optimizer.auto_choice import choice_settled

    assert choice_settled(keys)(_rounds(*ratios, spread=spread)) is settled


def test_nothing_passing_keeps_the_most_accurate_built_form():
    candidates = [
        _candidate("weights", None, error="option refused"),
        _candidate("dynamic", 0.9, passed=False),
        _candidate("static", 0.5, passed=False),
    ]
    chosen = _choose(candidates, 0.01, PREFERENCE)
    assert chosen.value == "dynamic" and "no candidate passed" in _why(chosen, candidates, 0.01)


def test_slower_than_the_input_is_said():
    candidates = [_candidate("weights", 1.2), _candidate("dynamic", 1.3)]
    assert "slower than the input" in _why(_choose(candidates, 0.02, PREFERENCE), candidates, 0.02)


def test_among_passing_static_builds_within_the_noise_the_fewest_backed_off_groups_win():
    fewer = Candidate("static", passed=True, latency_ratio=0.61, softened=["a"])
    more = Candidate("static", passed=True, latency_ratio=0.60, softened=["a", "b"])
    chosen = _choose([_candidate("weights", 1.0), more, fewer], 0.02, PREFERENCE)
    assert chosen is fewer and chosen.name == "static, 1 group weight-only"
    assert "backed off to weight-only int8: a" in _why(chosen, [more, fewer], 0.02)


def _cnn_and_calibration() -> tuple[onnx.ModelProto, list]:
    model = load_model(MODELS_DIR / "cnn.onnx")
    return model, seeded_feeds(model, count=40, seed=3)


def test_auto_measures_every_mode_and_keeps_the_chosen_build(tmp_path):
    model, calibration = _cnn_and_calibration()
    options = OptimizeOptions(pass_options={"quantize": {}}, calibration=calibration, passes=["quantize"])
    result = optimize(model, tmp_path / "out.onnx", options)
    auto = result.report.auto
    assert auto is not None and [c["value"] for c in auto["candidates"]] == PREFERENCE
    assert "calibration samples the pass did not calibrate on" in auto["evaluated_on"]  # 40 > 32 calibrated on
    built = [c for c in auto["candidates"] if c["error"] is None]
    assert all(c["latency_ratio"] > 0 and c["size_bytes"] > 0 and c["passed"] is not None for c in built)
    chosen = next(c for c in auto["candidates"] if c["value"] == auto["chosen"])
    assert chosen["passed"]
    fastest = min(c["latency_ratio"] for c in built if c["passed"])
    assert chosen["latency_ratio"] <= fastest + auto["noise_floor"] + 1e-9
    quantize_report = result.report.passes[-1]["report"]
    assert quantize_report["details"]["mode"] == auto["chosen"]
    ops = {n.op_type for n in result.model.graph.node}
    assert ("QuantizeLinear" in ops) == (auto["chosen"] == "static")
    assert any("quantize mode auto:" in note for note in result.report.notes)


def test_auto_refuses_every_lossy_form_under_an_exact_tolerance(tmp_path):
    model, calibration = _cnn_and_calibration()
    exact = ValidationOptions(tolerance=Tolerance(max_abs=0.0), keep_failed=True)
    options = OptimizeOptions(passes=["quantize"], calibration=calibration, validation=exact)
    result = optimize(model, tmp_path / "out.onnx", options)
    auto = result.report.auto
    assert auto is not None and not any(c["passed"] for c in auto["candidates"])
    assert auto["chosen"] == "weights" and "no candidate passed" in auto["why"]


def test_auto_without_calibration_data_measures_nothing(tmp_path):
    model = load_model(MODELS_DIR / "cnn.onnx")
    result = optimize(model, tmp_path / "out.onnx", OptimizeOptions(passes=["quantize"]))
    assert result.report.auto is not None
    assert result.report.auto["chosen"] == "dynamic" and result.report.auto["candidates"] == []
    assert result.report.passes[-1]["report"]["details"]["mode"] == "dynamic"


@pytest.mark.parametrize("suffix", ["md", "html"])
def test_cli_auto_report_lists_the_candidates(tmp_path, suffix):
    model, calibration = _cnn_and_calibration()
    folder = tmp_path / "cal"
    folder.mkdir()
    for index, feed in enumerate(calibration[:36]):
        np.savez(folder / f"{index:03d}.npz", **feed)
    source = tmp_path / "cnn.onnx"
    onnx.save(model, source)
    report = tmp_path / f"r.{suffix}"
    args = ["optimize", str(source), "-o", str(tmp_path / "q.onnx"), "--quantize", "int8", "--quantize-mode", "auto"]
    args += ["--calibration-data", str(folder), "--report", str(report), "--report", str(tmp_path / "r.json")]
    assert main([*args, "--quiet"]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    text = report.read_text()
    assert f"quantize mode auto: {data['auto']['chosen']}" in text
    for candidate in data["auto"]["candidates"]:
        assert candidate["value"] in text


def test_a_candidate_identical_to_another_is_measured_once(tmp_path):
    """A model with no MatMul: dynamic mode writes weight-only's file byte for byte."""
    model = mobile_block()
    calibration = seeded_feeds(model, count=40, seed=3)
    result = optimize(model, tmp_path / "out.onnx", OptimizeOptions(passes=["quantize"], calibration=calibration))
    auto = result.report.auto
    assert auto is not None
    by_value = {c["value"]: c for c in auto["candidates"]}
    assert by_value["dynamic"]["same_as"] == "weights" and by_value["weights"]["same_as"] is None
    assert by_value["dynamic"]["latency_ratio"] == by_value["weights"]["latency_ratio"]
    assert by_value["dynamic"]["passed"] == by_value["weights"]["passed"]


def test_a_failing_static_build_is_retried_with_its_worst_rounded_groups_backed_off(tmp_path):
    """conv1's c^4 rounds its small values away: static fails, with percentile-100 ranges too; backing
    off the first group (conv1 weight-only, its Muls and Sigmoid float) passes."""
    model = heavy_tail_model()
    options = OptimizeOptions(passes=["quantize"], calibration=seeded_feeds(model, count=40, seed=3))
    result = optimize(model, tmp_path / "out.onnx", options)
    auto = result.report.auto
    assert auto is not None
    by_name = {c["name"]: c for c in auto["candidates"]}
    assert by_name["static"]["passed"] is False and by_name["static"]["violation"] > 1
    wider = by_name["static, percentile 100"]
    assert wider["passed"] is False and wider["violation"] > 1
    passing = by_name["static, 1 group weight-only"]  # from plain static, which missed by less
    assert passing["passed"] is True and passing["softened"] == ["conv1"] and passing["violation"] <= 1
    assert passing["latency_ratio"] is not None and passing["tool_seconds"] is not None
    assert len(auto["candidates"]) == 5  # the search stops at the first build that passes
    assert auto["ranking"] == [{"node": "conv1", "position": 0}]
    if auto["chosen"] == "static":  # chosen when fastest: the written file is the passing build
        assert "re:^conv1$" in result.report.passes[-1]["options"]["int8_weight_only_nodes"]


@pytest.mark.parametrize(
    ("workers", "threshold", "expected_builds", "fewest"),
    [
        (1, 21, [1, 2, 4, 8, 16, 32, 24, 20], 24),
        (2, 21, [1, 2, 4, 8, 16, 32, 24, 20], 24),  # 16 and 32 built together: 16 is the failing bound
        (2, 3, [1, 2, 4, 8, 3], 3),  # 4 and 8 both pass: the search runs between 2 and 4
    ],
)
def test_backing_off_bisects_between_the_last_failing_and_the_first_passing_count(
    monkeypatch, workers, threshold, expected_builds, fewest
):
    """Static passes from ``threshold`` groups weight-only: the doubling search finds a passing
    count, then two more builds bisect between it and the last failing one."""
    import optimizer.auto_mode as auto_mode

    built: list[int] = []

    def soften(trials, chosen, failed, names, counts):
        built.extend(counts)
        return [Candidate("static", softened=names[:count], passed=count >= threshold) for count in counts]

    names = [f"conv{index}" for index in range(40)]
    monkeypatch.setattr(auto_mode, "_soften", soften)
    monkeypatch.setattr(auto_mode, "static_groups", lambda model: names)

    class Trials:
        pass

    Trials.workers = workers

    failed = Candidate("static", passed=False, violation=3.0)
    chosen = [type("NoWider", (), {"unclipped_options": lambda self: {}})()]
    ranking = auto_mode.retry_failed(Trials(), chosen, 0, failed, None)
    assert built == expected_builds
    assert [item["node"] for item in ranking] == names[:fewest]


def test_the_chosen_backed_off_build_is_the_file_written(tmp_path, monkeypatch):
    _fixed_timing(monkeypatch)
    model = heavy_tail_model()
    options = OptimizeOptions(passes=["quantize"], calibration=seeded_feeds(model, count=40, seed=3))
    result = optimize(model, tmp_path / "out.onnx", options)
    assert result.report.auto is not None and result.report.auto["chosen"] == "static"
    assert result.report.auto["chosen_name"] == "static, 1 group weight-only"
    assert "backed off to weight-only int8: conv1" in result.report.auto["why"]
    assert "auto: static, 1 group weight-only" in result.report.to_markdown()
    assert "re:^conv1$" in result.report.passes[-1]["options"]["int8_weight_only_nodes"]
    written = onnx.load(tmp_path / "out.onnx")
    quantized_inputs = {n.input[0] for n in written.graph.node if n.op_type == "QuantizeLinear"}
    assert "s1" in quantized_inputs and not {"c1", "p1", "q1"} & quantized_inputs


def _fixed_timing(monkeypatch) -> None:
    """Timing on a tiny model is noise: the backed-off builds are the fastest, the rest at 1.0x."""
    import optimizer.auto_mode as auto_mode

    def timed(candidates, reference, paths, settings, preference):
        for candidate in candidates:
            candidate.latency_ratio = 0.5 if candidate.softened else 1.0
        return 0.01, 20

    monkeypatch.setattr(auto_mode, "time_candidates", timed)


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_builds_and_checks_in_workers_choose_what_this_process_chooses(tmp_path, monkeypatch, kind):
    """Auto mode's builds and checks through the executor (2 local processes, or 2 Ray actors on a
    local instance): the same verdicts, the same choice, the same bytes written."""
    if kind == "ray":
        ray_or_skip()
    _fixed_timing(monkeypatch)
    model = heavy_tail_model()
    calibration = seeded_feeds(model, count=40, seed=3)
    here = optimize(model, tmp_path / "here.onnx", OptimizeOptions(passes=["quantize"], calibration=calibration))
    executor = ExecutorOptions(kind=kind, workers=2)
    options = OptimizeOptions(passes=["quantize"], calibration=calibration, executor=executor)
    there = optimize(model, tmp_path / "there.onnx", options)
    assert here.report.auto is not None and there.report.auto is not None
    verdicts = {c["name"]: c["passed"] for c in here.report.auto["candidates"]}
    in_workers = {c["name"]: c["passed"] for c in there.report.auto["candidates"]}
    assert {name: in_workers[name] for name in verdicts} == verdicts  # workers try 1 and 2 groups at once
    assert there.report.auto["why"] == here.report.auto["why"]
    assert here.report.auto["trials_on"] == "this process"
    assert there.report.auto["trials_on"] == executor.describe() and "2 " in executor.describe()
    assert f"built and checked in {executor.describe()}, then timed here alone" in there.report.to_markdown()
    assert (tmp_path / "here.onnx").read_bytes() == (tmp_path / "there.onnx").read_bytes()


def test_passes_before_the_auto_pass_run_once_and_the_result_is_the_whole_pipelines(tmp_path, monkeypatch):
    """Pruning then auto int8: the prune pass runs once (not once per candidate); the file written is
    byte for byte what the chosen passes give when run from the input, and its report comes first."""
    from optimizer.pass_base import PassContext
    from optimizer.pipeline import Pipeline
    from optimizer.registry import create_pass
    from passes.prune.prune_pass import PrunePass

    model, calibration = _cnn_and_calibration()
    runs = []
    original = PrunePass.run

    def counted(self, graph, context):
        runs.append(self.name)
        return original(self, graph, context)

    monkeypatch.setattr(PrunePass, "run", counted)
    options = OptimizeOptions(
        passes=["prune", "quantize"], pass_options={"prune": {"sparsity": 0.3}}, calibration=calibration
    )
    result = optimize(model, tmp_path / "out.onnx", options)
    auto = result.report.auto
    assert auto is not None and len([c for c in auto["candidates"] if c["error"] is None]) >= 2
    assert runs == ["prune"]
    assert [item["name"] for item in result.report.passes] == ["prune", "quantize"]
    assert result.report.passes[0]["report"]["counts"]["tensors_pruned"] > 0
    chosen = [
        create_pass(item["name"], **{k: tuple(v) if isinstance(v, list) else v for k, v in item["options"].items()})
        for item in result.report.passes
    ]
    again = Pipeline(chosen, context=PassContext(calibration=lambda: iter(calibration))).run(model)
    assert again.model.SerializeToString() == result.model.SerializeToString()
