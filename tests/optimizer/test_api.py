from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from optimizer.api import FeedOptions, OptimizeOptions, ValidationOptions, build_passes, optimize
from optimizer.errors import OptionError
from optimizer.fileio.model import load_model
from optimizer.graph.walk import iter_graphs
from optimizer.pass_base import Pass, PassContext, PassReport, PassResult
from optimizer.report.report import write_report
from optimizer.verify.validate import Tolerance
from tests.helpers.samples import MODELS_DIR, digest, seeded_feeds

CHECK = ValidationOptions()


@dataclass(frozen=True, kw_only=True)
class ShiftWeightsPass(Pass):
    """A deliberately lossy pass: adds ``shift`` to every 2-D float initializer."""

    name = "shift-weights-test"
    summary = "test only"
    shift: float = 0.05

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        report = PassReport()
        for owner in iter_graphs(graph):
            for tensor in owner.tensors().values():
                if isinstance(tensor, gs.Constant) and tensor.values.dtype == np.float32 and tensor.values.ndim == 2:
                    tensor.values = (tensor.values + self.shift).astype(np.float32)
                    report.count("shifted")
        return PassResult(graph, True, report.to_dict())


def test_optimize_a_proto_in_memory_leaves_it_alone():
    model = load_model(MODELS_DIR / "constant_weights.onnx")
    before = model.SerializeToString()
    result = optimize(model)
    assert model.SerializeToString() == before
    assert result.output_path is None and result.modified
    assert result.report.output.path is None
    assert result.report.input.weight_bytes == result.report.output.weight_bytes > 0
    assert result.report.output.size_bytes < result.report.input.size_bytes


def test_validation_failure_writes_nothing_and_keeps_the_previous_output(tmp_path):
    output = tmp_path / "out.onnx"
    assert optimize(MODELS_DIR / "mlp.onnx", output).output_path == output
    previous = digest(output)
    result = optimize(MODELS_DIR / "mlp.onnx", output,
                      OptimizeOptions(passes=["cleanup", ShiftWeightsPass()], validation=CHECK))
    assert not result.passed and result.comparison.worst_output == "logits"
    assert digest(output) == previous
    assert any("not written" in note for note in result.report.notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"], "staging files left behind"
    kept = optimize(MODELS_DIR / "mlp.onnx", output, OptimizeOptions(
        passes=[ShiftWeightsPass()], validation=ValidationOptions(keep_failed=True)))
    assert not kept.passed and kept.output_path == output and digest(output) != previous


def test_lossy_pipeline_uses_a_loose_default_and_explicit_tolerance_wins(tmp_path):
    result = optimize(MODELS_DIR / "mlp.onnx", None,
                      OptimizeOptions(passes=[ShiftWeightsPass(shift=1e-5)], validation=CHECK))
    assert result.passed
    assert result.comparison.tolerance["logits"] == {"max_abs": None, "max_rel": None, "min_cosine": 0.99,
                                                     "min_sqnr_db": 20.0, "min_top1": None, "by_kind": True}
    strict = optimize(MODELS_DIR / "mlp.onnx", None, OptimizeOptions(
        passes=[ShiftWeightsPass(shift=1e-5)], validation=ValidationOptions(tolerance=Tolerance(max_abs=1e-9))))
    assert not strict.passed


def test_feeds_from_iterable_and_npz_folder(tmp_path):
    model = load_model(MODELS_DIR / "if_subgraph.onnx")
    feeds = seeded_feeds(model, count=2)
    from_list = optimize(model, None, OptimizeOptions(validation=CHECK, feeds=FeedOptions(source=iter(feeds))))
    assert from_list.passed and from_list.comparison.samples == 2
    for index, feed in enumerate(feeds):
        np.savez(tmp_path / f"{index:03d}.npz", **feed)
    from_folder = optimize(MODELS_DIR / "if_subgraph.onnx", None, OptimizeOptions(validation=CHECK,
                                                                       feeds=FeedOptions(source=tmp_path)))
    assert from_folder.passed and from_folder.comparison.samples == 2


def test_bench_times_input_and_output():
    result = optimize(MODELS_DIR / "mlp.onnx", None, OptimizeOptions(bench_rounds=2))
    assert [row.name for row in result.bench.models] == ["input", "output"]
    assert result.report.benchmark["models"][0]["ratio_p50"] == 1.0


def test_options_for_a_pass_outside_the_pipeline_are_an_error():
    with pytest.raises(OptionError, match="not in the pipeline"):
        build_passes(["cleanup"], {"constants-to-initializers": {"min_size_bytes": 4}})
    with pytest.raises(OptionError, match="unknown pass 'nope'"):
        build_passes(["cleanup"], {"nope": {}})


def test_report_formats(tmp_path):
    result = optimize(MODELS_DIR / "mlp.onnx", None, OptimizeOptions(passes=[ShiftWeightsPass()], validation=CHECK))
    text = result.report.to_markdown()
    assert "| logits |" in text and "FAIL" in text
    write_report(result.report, tmp_path / "r.md")
    assert (tmp_path / "r.md").read_text() == text
    with pytest.raises(OptionError, match="unknown format"):
        write_report(result.report, tmp_path / "r.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.md"]


@dataclass(frozen=True, kw_only=True)
class CountCalibrationPass(Pass):
    """Reads the calibration data twice and reports how many samples it saw."""

    name = "count-calibration-test"
    summary = "test only"

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        report = PassReport()
        for _ in range(2):
            report.count("samples", sum(1 for _ in context.calibration_feeds(self.name)))
        report.details["provider"] = context.provider
        return PassResult(graph, False, report.to_dict())


def test_calibration_reaches_passes_and_can_be_read_twice(tmp_path):
    model = load_model(MODELS_DIR / "mlp.onnx")
    feeds = seeded_feeds(model, count=3)
    for index, feed in enumerate(feeds):
        np.savez(tmp_path / f"{index}.npz", **feed)
    for source in (tmp_path, feeds):
        result = optimize(model, None, OptimizeOptions(passes=[CountCalibrationPass()], calibration=source,
                                                     provider="cuda"))
        report = result.report.passes[0]["report"]
        assert report["counts"]["samples"] == 6 and report["details"]["provider"] == "cuda"


def test_missing_calibration_is_a_clear_error():
    from optimizer.errors import PassError
    with pytest.raises(PassError, match="needs calibration data"):
        optimize(MODELS_DIR / "mlp.onnx", None, OptimizeOptions(passes=[CountCalibrationPass()]))


def test_calibration_feeds_are_checked_against_the_model(tmp_path):
    from optimizer.errors import FeedError
    with pytest.raises(FeedError, match="x"):
        optimize(MODELS_DIR / "mlp.onnx", None, OptimizeOptions(calibration=[{"x": np.zeros((1, 3), np.float32)}]))


def test_fusion_check_runs_by_itself_on_quantized_outputs(tmp_path):
    from tests.helpers.builders import matmul_model
    quantized = optimize(matmul_model("weight-only"), tmp_path / "q.onnx", OptimizeOptions(passes=["cleanup"]))
    assert quantized.report.fusion["integer_kernels"] == {"MatMulNBits": 1}
    assert "## What onnxruntime runs" in quantized.report.to_markdown()
    plain = optimize(MODELS_DIR / "mlp.onnx", None, OptimizeOptions(passes=["cleanup"]))
    assert plain.report.fusion is None
    forced = optimize(MODELS_DIR / "mlp.onnx", None, OptimizeOptions(passes=["cleanup"], fusion_check=True))
    assert forced.report.fusion["quantized_groups_written"] == 0


def test_plan_passes_orders_compressions_and_maps_options():
    from optimizer.api import plan_passes
    names, options = plan_passes(prune=0.5, prune_mode="global", quantize="int8", quantize_mode="dynamic",
                                 options={"cleanup": {"remove_identity": False}})
    assert names == ["constants-to-initializers", "share", "cleanup", "prune", "quantize"]
    assert options == {"cleanup": {"remove_identity": False}, "prune": {"sparsity": 0.5, "mode": "global"},
                       "quantize": {"weight_type": "int8", "mode": "dynamic"}}
    names, options = plan_passes(["cleanup"], prune=0.25, prune_mode="channels", cluster_bits=4)
    assert names == ["cleanup", "prune-channels", "cluster"]
    assert options == {"prune-channels": {"ratio": 0.25}, "cluster": {"bits": 4}}
    with pytest.raises(OptionError, match="choose one"):
        plan_passes(quantize="int8", cluster_bits=4)


def test_cli_cluster_shortcut_shrinks_the_transformer(tmp_path, capsys):
    from optimizer.cli import main
    output = tmp_path / "c.onnx"
    assert main(["optimize", str(MODELS_DIR / "transformer_tied.onnx"), "-o", str(output), "--cluster", "4",
                 "--set", "cluster.min_elements=1024", "--validate", "--min-cosine", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "pass share:" in out and "pass cluster:" in out
    assert output.stat().st_size < 0.3 * (MODELS_DIR / "transformer_tied.onnx").stat().st_size


def test_bisect_names_the_pass_that_broke_validation(tmp_path):
    result = optimize(MODELS_DIR / "mlp.onnx", tmp_path / "o.onnx", OptimizeOptions(
        validation=CHECK, bisect=True,
        passes=["constants-to-initializers", "cleanup", ShiftWeightsPass(shift=0.5), "share"]))
    assert not result.passed
    found = result.report.bisect
    assert found["first_bad_pass"] == "shift-weights-test" and found["index"] == 2
    assert "outside tolerance" in found["reason"]
    assert "## Bisect" in result.report.to_markdown()


def test_validation_without_isolation_gives_the_same_verdict(tmp_path):
    isolated = optimize(MODELS_DIR / "cnn.onnx", None, OptimizeOptions(validation=CHECK))
    inline = optimize(MODELS_DIR / "cnn.onnx", None, OptimizeOptions(validation=ValidationOptions(isolate=False)))
    assert isolated.comparison.to_dict() == inline.comparison.to_dict()


def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path):
    import os

    from optimizer.fileio.output_files import process_start_ticks
    parent, me = os.getppid(), os.getpid()
    dead = tmp_path / ".onnx-compress-999999999-5-abc12345"
    reused = tmp_path / f".onnx-compress-{me}-{process_start_ticks(me) + 1}-abc12345"
    alive = tmp_path / f".onnx-compress-{parent}-{process_start_ticks(parent)}-def45678"
    legacy = tmp_path / ".onnx-compress-999999999-abc123"
    for folder in (dead, reused, alive, legacy):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"partial")
    optimize(MODELS_DIR / "mlp.onnx", tmp_path / "o.onnx", OptimizeOptions(validation=CHECK))
    assert not dead.exists() and not reused.exists(), "owners provably dead (gone, or id reused)"
    assert alive.exists() and legacy.exists(), "a live owner, or one that cannot be proven dead"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["o.onnx"]


def test_a_large_output_is_fusion_checked_in_a_child_process_with_the_same_answer(tmp_path, monkeypatch):
    """Outputs above ISOLATED_FUSION_ABOVE_BYTES get their onnxruntime session in a child (its memory
    is not added to the tool's); the report is the one the in-process check gives."""
    import optimizer.report_notes as notes

    options = OptimizeOptions(passes=["quantize"], pass_options={"quantize": {"weight_type": "int4"}})
    here = optimize(MODELS_DIR / "transformer_tied.onnx", tmp_path / "here.onnx", options).report.fusion
    calls = []
    original = notes.run_isolated
    monkeypatch.setattr(notes, "ISOLATED_FUSION_ABOVE_BYTES", 0)
    monkeypatch.setattr(notes, "run_isolated", lambda *a, **k: calls.append(a) or original(*a, **k))
    there = optimize(MODELS_DIR / "transformer_tied.onnx", tmp_path / "there.onnx", options).report.fusion
    assert calls and here is not None and here["integer_kernels"]
    assert {k: v for k, v in there.items() if k != "model"} == {k: v for k, v in here.items() if k != "model"}
