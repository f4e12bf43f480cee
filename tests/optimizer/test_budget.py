"""Budget search on the sample MLP with a test pass that damages each layer by a known amount."""

from __future__ import annotations

import importlib

import pytest

import passes  # noqa: F401  (registers cleanup)
from optimizer import registry
from optimizer.budget import MetricSpec, backed_off_passes, search_budget
from optimizer.cli import main
from optimizer.errors import OptionError
from optimizer.fileio.model import load_model
from tests.helpers.budget_damage import DamagePass, matches
from tests.helpers.samples import MODELS_DIR, seeded_feeds

DAMAGE_MODULE = "tests.helpers.budget_damage"

PASSES = [DamagePass()]


@pytest.fixture(scope="module")
def data():
    """The damage pass is registered only while these tests run (and in their worker processes)."""
    module = importlib.import_module(DAMAGE_MODULE)
    registry.register(module.DamagePass)
    model = load_model(MODELS_DIR / "mlp.onnx")
    yield model, seeded_feeds(model, count=4)
    registry._PASSES.pop(module.DamagePass.name, None)


def test_exclusion_patterns_are_exact_names():
    backed_off = backed_off_passes([DamagePass(exclude_nodes=("keep*",))], ["fc2.gemm", "a[1]*"])
    patterns = backed_off[0].exclude_nodes
    assert isinstance(backed_off[0], DamagePass) and patterns[0] == "keep*"
    assert matches("fc2.gemm", patterns) and matches("a[1]*", patterns)
    assert not matches("fc2.gemmX", patterns) and not matches("a1", patterns)


def test_backs_off_the_harmful_layer_first_and_meets_the_budget(data):
    model, feeds = data
    result = search_budget(model, PASSES, MetricSpec("cosine"), feeds, max_drop=0.002)
    assert result.met and result.drop <= 0.002
    assert result.backed_off == ["fc2.matmul"]
    assert result.ranking[0] == "fc2.matmul" and result.ranking_method == "leave-one-out gain"
    assert result.steps[0].action == "requested compression" and not result.steps[0].met
    assert result.trials <= 24 and result.to_dict()["steps"][-1]["met"] in (True, False)


def test_nothing_to_do_when_the_budget_holds(data):
    model, feeds = data
    result = search_budget(model, PASSES, MetricSpec("cosine"), feeds, max_drop=0.5)
    assert result.met and result.backed_off == [] and result.trials == 1


def test_unreachable_budget_backs_off_everything_and_says_not_met(data):
    model, feeds = data
    result = search_budget(model, PASSES, MetricSpec("max_abs"), feeds, max_drop=-0.0 + 1e-12)
    assert result.backed_off == sorted(result.ranking)
    assert result.met == (result.drop <= 1e-12)


def test_small_trial_budget_ranks_by_sqnr(data):
    model, feeds = data
    result = search_budget(model, PASSES, MetricSpec("cosine"), feeds, max_drop=0.002, max_trials=4)
    assert result.ranking_method.startswith("per-layer output SQNR") and result.trials <= 4


def test_workers_give_the_same_answer(data):
    model, feeds = data
    serial = search_budget(model, PASSES, MetricSpec("cosine"), feeds, max_drop=0.002)
    parallel = search_budget(model, PASSES, MetricSpec("cosine"), feeds, max_drop=0.002, workers=2,
                             worker_imports=("passes", DAMAGE_MODULE + ":register"))
    assert parallel.backed_off == serial.backed_off and parallel.value == pytest.approx(serial.value)


def test_bad_arguments(data):
    model, feeds = data
    with pytest.raises(OptionError, match="back off"):
        search_budget(model, [registry.create_pass("cleanup")], MetricSpec("cosine"), feeds, max_drop=0.01)
    with pytest.raises(OptionError):
        search_budget(model, PASSES, MetricSpec("cosine"), feeds, max_drop=-1)


def test_optimize_with_a_budget_reports_steps_and_fallbacks(data, tmp_path):
    from optimizer.api import BudgetOptions, FeedOptions, OptimizeOptions, ValidationOptions, optimize
    model, feeds = data
    result = optimize(model, tmp_path / "out.onnx", OptimizeOptions(
        passes=["damage-test", "cleanup"], budget=BudgetOptions(max_drop=0.002), feeds=FeedOptions(source=feeds),
        validation=ValidationOptions(tolerance=None)))
    budget = result.report.budget
    assert budget["met"] and budget["backed_off"] == ["fc2.matmul"]
    fell_back = [row for row in result.report.layers if row["status"].startswith("backed off")]
    assert [row["node"] for row in fell_back] == ["fc2.matmul"] and "leave-one-out" in fell_back[0]["reason"]
    options = result.report.passes[0]["options"]["exclude_nodes"]
    assert options == ["re:^fc2\\.matmul$"]
    text = result.report.to_markdown()
    assert "## Accuracy budget" in text and "backed off" in text


def test_cli_budget_flags(data, tmp_path, capsys):
    import numpy as np

    from optimizer.cli import main
    model, feeds = data
    for index, feed in enumerate(feeds):
        np.savez(tmp_path / f"{index}.npz", **feed)
    source = tmp_path / "in.onnx"
    source.write_bytes(model.SerializeToString())
    code = main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--passes", "damage-test,cleanup",
                 "--max-drop", "0.002", "--metric", "cosine", "--data", str(tmp_path), "--workers", "1",
                 "--report", str(tmp_path / "r.json")])
    assert code == 0
    assert "accuracy budget met" in capsys.readouterr().out
    assert main(["optimize", str(source), "-o", str(tmp_path / "o2.onnx"), "--passes", "damage-test",
                 "--max-drop", "0.01", "--metric", "nope.module:fn", "--data", str(tmp_path)]) == 2
    assert "higher or lower" in capsys.readouterr().err


def test_a_met_budget_is_the_verdict_of_the_final_check(tmp_path, capsys):
    """The search said "budget met" and the final check FAILed on SQNR: now the final check uses the
    budget's metric on the same data, unless the user gave explicit limits."""
    source, output = MODELS_DIR / "mlp.onnx", tmp_path / "p.onnx"
    args = ["optimize", str(source), "-o", str(output), "--prune", "0.9", "--validate", "--max-drop", "1.0",
            "--metric", "top1", "--max-trials", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "PASS (accuracy budget: top1" in out and "<= 1" in out and output.exists()
    output.unlink()
    assert main([*args, "--min-sqnr", "20"]) == 1
    assert "FAIL: worst output 'logits' (SQNR dB" in capsys.readouterr().out and not output.exists()
