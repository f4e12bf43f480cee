"""Budget search on the sample MLP with a test pass that damages each layer by a known amount."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import passes  # noqa: F401  (registers cleanup)
from optimizer import registry
from optimizer.budget import MetricSpec, backed_off_passes, budget_layers, search_budget
from optimizer.budget_trials import Backoff, Runtime, compress
from optimizer.cli import main
from optimizer.errors import OptionError
from optimizer.executor import ExecutorOptions
from optimizer.fileio.model import load_model
from tests.helpers.budget_damage import DamagePass, SoftDamagePass, matches
from tests.helpers.ray_check import ray_or_skip
from tests.helpers.samples import MODELS_DIR, seeded_feeds

DAMAGE_MODULE = "tests.helpers.budget_damage"

PASSES = [DamagePass()]


@pytest.fixture(scope="module")
def data():
    """The damage pass is registered only while these tests run (and in their worker processes)."""
    module = importlib.import_module(DAMAGE_MODULE)
    module.register()
    model = load_model(MODELS_DIR / "mlp.onnx")
    yield model, seeded_feeds(model, count=4)
    for name in (module.DamagePass.name, module.SoftDamagePass.name):
        registry._PASSES.pop(name, None)


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
    parallel = search_budget(model, PASSES, MetricSpec("cosine"), feeds, max_drop=0.002,
                             executor=ExecutorOptions(workers=2),
                             worker_imports=("passes", DAMAGE_MODULE + ":register"))
    assert parallel.backed_off == serial.backed_off and parallel.value == pytest.approx(serial.value)
    assert [step.backed_off for step in parallel.steps[:1]] == [step.backed_off for step in serial.steps[:1]]


def test_a_local_ray_instance_gives_the_same_answer_as_local_processes(data):
    """The same search through Ray actors (a local instance started and stopped by the search)."""
    ray_or_skip()
    import ray

    model, feeds = data
    imports = ("passes", DAMAGE_MODULE + ":register")
    local = search_budget(model, PASSES, MetricSpec("cosine"), feeds, max_drop=0.002,
                          executor=ExecutorOptions(workers=2), worker_imports=imports)
    on_ray = search_budget(model, PASSES, MetricSpec("cosine"), feeds, max_drop=0.002,
                           executor=ExecutorOptions(kind="ray", workers=2), worker_imports=imports)
    assert on_ray.backed_off == local.backed_off and on_ray.weight_only == local.weight_only
    assert on_ray.value == pytest.approx(local.value) and on_ray.trials == local.trials
    assert not ray.is_initialized()  # the instance it started is stopped


def test_ray_without_the_extra_is_a_clear_error(data, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    model, feeds = data
    with pytest.raises(OptionError, match=r"pip install 'onnx-compress\[ray\]'"):
        search_budget(model, PASSES, MetricSpec("cosine"), feeds, max_drop=0.002, executor=ExecutorOptions(kind="ray"))


def test_executor_options_are_checked():
    with pytest.raises(OptionError, match="executor must be one of local, ray"):
        ExecutorOptions(kind="dask")
    with pytest.raises(OptionError, match="workers"):
        ExecutorOptions(workers=0)
    with pytest.raises(OptionError, match="needs --executor ray"):
        ExecutorOptions(ray_address="10.0.0.1:6379")
    assert ExecutorOptions(kind="ray", workers=3).describe() == "3 Ray actor(s) on a local Ray instance"


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


def test_backs_off_to_the_next_best_format_before_float(data):
    """Issue 13: backing a layer off goes to the pass's next-best format (quantize: weight-only int8)
    first; float only when that format cannot meet the budget even for every layer."""
    model, feeds = data
    loose = search_budget(model, [SoftDamagePass()], MetricSpec("cosine"), feeds, max_drop=0.002)
    assert loose.met and loose.backed_off == [] and loose.weight_only == ["fc2.matmul"]
    assert all(step.backed_off == [] for step in loose.steps[4:])  # no trial went to float
    tight = search_budget(model, [SoftDamagePass()], MetricSpec("cosine"), feeds, max_drop=0.0001)
    assert tight.met and tight.backed_off == ["fc2.matmul"] and tight.weight_only == ["fc1.gemm", "fc3.gemm"]
    all_soft = [s for s in tight.steps if s.weight_only == sorted(tight.ranking) and not s.backed_off]
    assert len(all_soft) == 1 and not all_soft[0].met
    layers = {row["node"]: row["status"] for row in budget_layers(tight)}
    assert layers["fc2.matmul"].startswith("backed off (kept") and "weight-only int8" in layers["fc1.gemm"]
    chosen = backed_off_passes([SoftDamagePass()], tight.backed_off, ["fc2.matmul", "fc1.gemm"])[0]
    assert isinstance(chosen, SoftDamagePass) and matches("fc2.matmul", chosen.exclude_nodes)
    assert matches("fc1.gemm", chosen.soft_nodes) and not matches("fc2.matmul", chosen.soft_nodes)


def _chain(layers: int = 12) -> onnx.ModelProto:
    """x @ W0 @ W1 ... : ``layers`` MatMuls named mm0.. with seeded 8x8 weights."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32) * 0.4, f"w{i}") for i in range(layers)
    ]
    nodes = [
        helper.make_node(
            "MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}" if i < layers - 1 else "y"], name=f"mm{i}"
        )
        for i in range(layers)
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_stops_early_when_only_undoing_nearly_everything_could_meet_it(data):
    """Issue 13: when even 90% of the layers uncompressed miss the budget, say so and stop there."""
    model = _chain(12)
    feeds = seeded_feeds(model, count=2)
    result = search_budget(model, [DamagePass()], MetricSpec("max_abs"), feeds, max_drop=1e-9)
    assert result.stopped_early and not result.met and result.mostly_undone()
    assert len(result.backed_off) == 11 and result.trials == 1 + 12 + 1  # first, leave-one-out, the 90% trial
    assert "stopped there" in result.mostly_undone_text() and result.to_dict()["stopped_early"]
    enough = search_budget(model, [DamagePass()], MetricSpec("max_abs"), feeds, max_drop=1e6)
    assert enough.met and not enough.stopped_early and not enough.mostly_undone()


def test_a_budget_not_met_writes_nothing_even_without_validate(data, tmp_path):
    """A budget implies validation: the verdict is the budget's metric on the staged file."""
    from optimizer.api import BudgetOptions, FeedOptions, OptimizeOptions, optimize

    model = _chain(12)
    result = optimize(
        model,
        tmp_path / "out.onnx",
        OptimizeOptions(
            passes=["damage-test"],
            budget=BudgetOptions(max_drop=1e-9, metric="max_abs"),
            feeds=FeedOptions(source=seeded_feeds(model, count=2)),
        ),
    )
    assert result.comparison is not None and not result.passed and not (tmp_path / "out.onnx").exists()
    assert any("stopped there" in note for note in result.report.notes)


def test_quantize_budget_keeps_int8_weights_where_static_activations_hurt(tmp_path):
    """The real quantize pass: between the static drop and the weight-only drop, the budget keeps
    every weight int8 (some weight-only) and leaves nothing float."""
    from passes.quantize.quantize_pass import QuantizePass

    model = load_model(MODELS_DIR / "mlp.onnx")
    feeds, calibration = seeded_feeds(model, count=4), seeded_feeds(model, count=8, seed=1)
    static, soft = QuantizePass(mode="static"), QuantizePass(mode="static", int8_weight_only_nodes=("*",))
    runtime = Runtime("cpu", None)
    reference = runtime.outputs(model, feeds)
    metric = MetricSpec("cosine").build()
    drops = [
        1.0 - metric(reference, runtime.outputs(compress(model, [p], Backoff(), calibration, runtime), feeds))
        for p in (static, soft)
    ]
    assert drops[1] < drops[0], drops
    result = search_budget(
        model, [static], MetricSpec("cosine"), feeds, calibration=calibration, max_drop=(drops[0] + drops[1]) / 2
    )
    assert result.met and result.backed_off == [] and result.weight_only
    float_weights = [
        t.name
        for t in result.model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 256
    ]
    assert float_weights == [] and set(result.weight_only) <= set(result.ranking)
    assert "fc1.gemm" in result.ranking  # static int8 folded its Relu: still ranked (by node name)


def test_perplexity_budget_on_a_language_model(tmp_path, capsys):
    """--metric perplexity reads the tokens of --data's input_ids and the logits output; the verdict is
    the perplexity onnxruntime gives the written file on the same samples."""
    from optimizer.verify.metrics import builtin_metric
    from tests.helpers.runtime import run_model

    rng = np.random.default_rng(5)
    feeds = [{"input_ids": rng.integers(0, 512, (1, 12)).astype(np.int64)} for _ in range(4)]
    data, cal = tmp_path / "data", tmp_path / "cal"
    for folder, offset in ((data, 0), (cal, 2)):
        folder.mkdir()
        for index, feed in enumerate(feeds[offset:] + feeds[:offset]):
            np.savez(folder / f"{index}.npz", **feed)
    output, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = main(["optimize", str(MODELS_DIR / "transformer_tied.onnx"), "-o", str(output), "--quantize", "int4",
                 "--calibration-data", str(cal), "--max-drop", "5", "--metric", "perplexity", "--data", str(data),
                 "--report", str(report)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    source = load_model(str(MODELS_DIR / "transformer_tied.onnx"))
    written = load_model(str(output))
    ordered = [dict(np.load(path)) for path in sorted(data.glob("*.npz"))]
    perplexity = builtin_metric("perplexity", feeds=ordered)
    names = [o.name for o in source.graph.output]
    baseline = perplexity([], [dict(zip(names, r, strict=True)) for r in run_model(source, ordered)])
    value = perplexity([], [dict(zip(names, r, strict=True)) for r in run_model(written, ordered)])
    assert baseline > 1.0 and value != baseline
    assert f"accuracy budget: perplexity {value:.6g}, drop {value - baseline:.3g} <= 5" in printed
    assert main(["optimize", str(MODELS_DIR / "cnn.onnx"), "-o", str(tmp_path / "c.onnx"), "--quantize", "int8",
                 "--max-drop", "1", "--metric", "perplexity", "--data", str(data)]) == 2
    assert "input_ids" in capsys.readouterr().err
    # without --data the samples would be random token ids: refused before any work
    assert main(["optimize", str(MODELS_DIR / "transformer_tied.onnx"), "-o", str(tmp_path / "t.onnx"),
                 "--quantize", "int8", "--max-drop", "1", "--metric", "perplexity"]) == 2
    assert "without --data DIR" in capsys.readouterr().err
    assert not (tmp_path / "c.onnx").exists() and not (tmp_path / "t.onnx").exists()
