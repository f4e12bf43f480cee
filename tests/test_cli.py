"""The command line end to end: exit codes, one-line errors, inputs untouched, nothing partial."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.calibration.feeds import generate_feeds, model_input_specs
from optimizer.cli import main
from optimizer.verify.benchmark import BenchResult, ModelTiming
from tests.helpers.runtime import assert_same_outputs
from tests.helpers.samples import ROOT, SAMPLE_MODELS, folder_state, sample_ids, seeded_feeds


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a child process (exit code and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "optimizer.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def assert_one_line_error(capsys_or_text, *needles: str) -> str:
    text = capsys_or_text if isinstance(capsys_or_text, str) else capsys_or_text.readouterr().err
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {text!r}"
    assert lines[0].startswith("onnx-compress: error: ")
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=sample_ids())
def test_optimize_every_sample_validates_and_matches(path, tmp_path, capsys):
    output = tmp_path / "out.onnx"
    code = main(["optimize", str(path), "-o", str(output), "--validate", "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS" in out and f"wrote {output}" in out
    original = onnx.load(path)
    assert_same_outputs(original, onnx.load(output), seeded_feeds(original), atol=1e-6)
    saved = onnx.load(output)
    onnx.checker.check_model(saved, full_check=True)
    assert list(saved.metadata_props) == list(original.metadata_props) and saved.metadata_props
    assert saved.doc_string == original.doc_string != ""
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["validation"]["passed"] is True
    assert report["validation"]["provider_used"] == "CPUExecutionProvider"
    assert report["output"]["path"] == str(output)
    assert [run["name"] for run in report["passes"]] == ["constants-to-initializers", "share", "cleanup"]


def test_optimize_twice_gives_byte_identical_files(sample_copy, tmp_path):
    source = sample_copy("transformer_tied")
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert main(["optimize", str(source), "-o", str(first), "--quiet"]) == 0
    assert main(["optimize", str(source), "-o", str(second), "--quiet"]) == 0
    assert first.read_bytes() == second.read_bytes()
    assert main(["optimize", str(source), "-o", str(first), "--quiet"]) == 0
    assert first.read_bytes() == second.read_bytes()


def test_markdown_and_json_reports_show_the_same_numbers(sample_copy, tmp_path, capsys):
    source = sample_copy("constant_weights")
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    assert main(["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--validate",
                 "--report", str(md), "--report", str(js), "--quiet"]) == 0
    data = json.loads(js.read_text())
    text = md.read_text()
    assert f"| file (bytes) | {data['input']['size_bytes']:,} | {data['output']['size_bytes']:,} |" in text
    converted = data["passes"][0]["report"]["counts"]["constants_converted"]
    assert converted > 0 and f"constants_converted={converted}" in text
    assert "PASS on 4 random samples (not evidence of accuracy" in text
    assert capsys.readouterr().out == ""


def garbage_inputs(tmp_path: Path) -> dict[str, Path]:
    model_bytes = (ROOT / "models" / "mlp.onnx").read_bytes()
    files = {
        "empty": b"",
        "random": np.random.default_rng(0).bytes(4096),
        "truncated": model_bytes[: len(model_bytes) // 2],
        "png": b"\x89PNG\r\n\x1a\n" + bytes(200),
    }
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / "in" / f"{name}.onnx"
        paths[name].parent.mkdir(exist_ok=True)
        paths[name].write_bytes(content)
    (tmp_path / "in" / "folder.onnx").mkdir()
    paths["directory"] = tmp_path / "in" / "folder.onnx"
    paths["missing"] = tmp_path / "in" / "missing.onnx"
    return paths


@pytest.mark.parametrize("case", ["empty", "random", "truncated", "png", "directory", "missing"])
def test_bad_input_files_exit_2_with_one_line_and_leave_nothing(case, tmp_path, capsys):
    paths = garbage_inputs(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = folder_state(tmp_path / "in")
    code = main(["optimize", str(paths[case]), "-o", str(out_dir / "x.onnx")])
    assert code == 2
    assert_one_line_error(capsys, str(paths[case]))
    assert folder_state(tmp_path / "in") == before
    assert list(out_dir.iterdir()) == []


def test_output_equal_to_input_is_refused(sample_copy, tmp_path, capsys):
    source = sample_copy("mlp")
    before = source.read_bytes()
    aliases = [str(source), str(tmp_path / "." / "mlp.onnx"), str(tmp_path / "sub" / ".." / "mlp.onnx")]
    (tmp_path / "sub").mkdir()
    for alias in aliases:
        assert main(["optimize", str(source), "-o", alias]) == 2
        assert_one_line_error(capsys, "mlp.onnx")
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "sub"]


def test_output_through_symlink_to_input_is_refused(sample_copy, tmp_path, capsys):
    source = sample_copy("mlp")
    before = source.read_bytes()
    link = tmp_path / "link.onnx"
    link.symlink_to(source)
    assert main(["optimize", str(source), "-o", str(link)]) == 2
    assert_one_line_error(capsys, "link.onnx")
    assert source.read_bytes() == before and link.is_symlink()


@pytest.mark.parametrize("case", ["missing-folder", "folder-is-a-file", "read-only-filesystem"])
def test_unwritable_output_folder_exit_2_and_nothing_written(case, sample_copy, tmp_path, capsys):
    source = sample_copy("mlp")
    before = folder_state(tmp_path)
    if case == "missing-folder":
        output = tmp_path / "nope" / "out.onnx"
    elif case == "folder-is-a-file":
        output = source / "out.onnx"
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc on this system")
        output = Path("/proc/onnx-compress-test.onnx")
    for extra in ([], ["--validate"]):
        assert main(["optimize", str(source), "-o", str(output), *extra]) == 2
        assert_one_line_error(capsys)
    assert folder_state(tmp_path) == before
    assert not output.exists()


def model_with_external_data(folder: Path, location: str) -> Path:
    weight = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "W")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "hardlink"])
def test_external_data_escapes_are_refused(case, tmp_path, capsys):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(16, dtype=np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    location = {"dotdot": "../secret.bin", "absolute": str(secret)}.get(case, "weights.bin")
    if case == "symlink":
        (folder / "weights.bin").symlink_to(secret)
    elif case == "hardlink":
        os.link(secret, folder / "weights.bin")
    path = model_with_external_data(folder, location)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = folder_state(tmp_path)
    assert main(["optimize", str(path), "-o", str(out_dir / "o.onnx")]) == 2
    assert_one_line_error(capsys, "'W'")
    assert folder_state(tmp_path) == before


def test_external_data_inside_folder_loads(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    path = model_with_external_data(tmp_path, "weights.bin")
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--validate"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_errors_from_a_real_child_process_are_one_line_with_exit_2(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    result = run_cli("optimize", str(bad), "-o", str(tmp_path / "o.onnx"))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, str(bad))
    assert result.stdout == ""


def test_unknown_pass_and_bad_option_are_usage_errors(sample_copy, tmp_path, capsys):
    source = sample_copy("mlp")
    assert main(["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--passes", "cleanup,shrink"]) == 2
    assert_one_line_error(capsys, "unknown pass 'shrink'", "cleanup")
    output = str(tmp_path / "o.onnx")
    assert main(["optimize", str(source), "-o", output, "--set", "cleanup.remove_identity=maybe"]) == 2
    assert_one_line_error(capsys, "remove_identity", "bool")
    assert main(["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--set", "cleanup.speed=1"]) == 2
    assert_one_line_error(capsys, "valid options: remove_identity")
    assert not (tmp_path / "o.onnx").exists()


def test_set_option_reaches_the_pass(sample_copy, tmp_path, capsys):
    source = sample_copy("constant_weights")
    report = tmp_path / "r.json"
    assert main(["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--quiet", "--report", str(report),
                 "--set", "constants-to-initializers.min_size_bytes=1000000"]) == 0
    first = json.loads(report.read_text())["passes"][0]
    assert first["options"] == {"min_size_bytes": 1000000}
    assert first["modified"] is False and first["report"]["skipped"]


def test_cuda_request_falls_back_with_a_message_and_records_cpu(sample_copy, tmp_path, capsys):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here; the fallback path is not taken")
    source = sample_copy("mlp")
    report = tmp_path / "r.json"
    assert main(["optimize", str(source), "-o", str(tmp_path / "o.onnx"), "--validate", "--provider", "cuda",
                 "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "CUDA" in out and "CPU" in out
    validation = json.loads(report.read_text())["validation"]
    assert validation["provider_requested"] == "cuda"
    assert validation["provider_used"] == "CPUExecutionProvider"
    assert "CUDA" in validation["provider_note"]


def test_validate_command_passes_identical_and_fails_perturbed(sample_copy, tmp_path, capsys):
    source = sample_copy("mlp")
    assert main(["validate", str(source), str(source)]) == 0
    assert "PASS" in capsys.readouterr().out
    model = onnx.load(source)
    weight = next(t for t in model.graph.initializer if t.name == "fc2.weight" or len(t.dims) == 2)
    array = numpy_helper.to_array(weight).copy()
    array.flat[0] += 1.0
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    perturbed = tmp_path / "perturbed.onnx"
    onnx.save(model, perturbed)
    assert main(["validate", str(source), str(perturbed), "--json", "--exact"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is False and data["worst_output"] == "logits"
    assert main(["validate", str(source), str(perturbed), "--atol", "10"]) == 0
    capsys.readouterr()
    assert main(["validate", str(source), str(perturbed), "--output-tolerance", "logits:atol=10,min-cosine=0.5"]) == 0
    assert main(["validate", str(source), str(perturbed), "--atol", "10",
                 "--output-tolerance", "logits:min-sqnr=200"]) == 1
    assert "SQNR" in capsys.readouterr().out
    assert main(["validate", str(source), str(perturbed), "--output-tolerance", "logits:speed=1"]) == 2
    assert_one_line_error(capsys, "speed=1", "atol")
    assert main(["validate", str(source), str(perturbed), "--output-tolerance", "nope:atol=1"]) == 2
    assert_one_line_error(capsys, "nope")


def test_validate_uses_the_lossy_default_unless_exact(sample_copy, tmp_path, capsys):
    """A candidate at cosine 1.000000 must not FAIL on the lossless 1e-6 limit unless --exact asks for it."""
    source = sample_copy("mlp")
    model = onnx.load(source)
    for weight in model.graph.initializer:
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.0001), weight.name))
    candidate = tmp_path / "close.onnx"
    onnx.save(model, candidate)
    assert main(["validate", str(source), str(candidate), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] and data["tolerance"]["logits"]["min_cosine"] == 0.99
    assert main(["validate", str(source), str(candidate), "--exact"]) == 1
    assert "max_abs" in capsys.readouterr().out
    assert main(["validate", str(source), str(candidate), "--output-tolerance", "logits:min-cosine=0.5"]) == 0
    loose_logits = ["--output-tolerance", "logits:min-cosine=0.5"]
    assert main(["validate", str(source), str(candidate), "--exact", *loose_logits]) == 0


def test_bench_and_inspect_and_passes_commands(sample_copy, capsys):
    source = sample_copy("transformer_tied")
    assert main(["bench", str(source), str(source), "--rounds", "3", "--warmup", "1", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert len(bench["models"]) == 2 and bench["models"][0]["ratio_p50"] == 1.0
    assert bench["models"][0]["size_bytes"] == source.stat().st_size
    assert main(["inspect", str(source), "--json"]) == 0
    inspection = json.loads(capsys.readouterr().out)
    kinds = {group["kind"] for group in inspection["duplicates"]}
    assert "transposed" in kinds
    assert main(["inspect", str(source)]) == 0
    assert "lm_head.weight" in capsys.readouterr().out
    assert main(["passes"]) == 0
    listing = capsys.readouterr().out
    assert "cleanup (lossless)" in listing and "constants-to-initializers.min_size_bytes" in listing


def test_debug_command_ranks_compressed_layers(tmp_path, capsys):
    from tests.helpers.builders import compressed_mlp
    reference, candidate, expected = compressed_mlp()
    onnx.save(reference, tmp_path / "ref.onnx")
    onnx.save(candidate, tmp_path / "cand.onnx")
    assert main(["debug", str(tmp_path / "ref.onnx"), str(tmp_path / "cand.onnx"), "--report",
                 str(tmp_path / "layers.md"), "--report", str(tmp_path / "layers.json")]) == 0
    out = capsys.readouterr().out
    assert "2 compressed layer(s)" in out and expected["quantized"].name in out
    layers = json.loads((tmp_path / "layers.json").read_text())["layers"]
    assert {layer["kind"] for layer in layers} == {"pruned", "quantized"}
    assert "## Per layer" in (tmp_path / "layers.md").read_text()


def test_sensitivity_command_scans_and_allocates(tmp_path, capsys):
    report = tmp_path / "s.json"
    assert main(["sensitivity", str(ROOT / "models" / "mlp.onnx"), "--sparsities", "0.5,0.9", "--target", "0.5",
                 "--samples", "2", "--report", str(report), "--report", str(tmp_path / "s.md")]) == 0
    out = capsys.readouterr().out
    assert "cos@0.5" in out and "allocated" in out
    data = json.loads(report.read_text())
    assert data["sparsities"] == [0.5, 0.9] and len(data["layers"]) >= 2 and data["allocation"]
    assert main(["sensitivity", str(ROOT / "models" / "mlp.onnx"), "--sparsities", "half"]) == 2


def test_prune_and_sparse_storage_flags(tmp_path, capsys):
    output = tmp_path / "p.onnx"
    args = ["--prune", "0.9", "--sparse-storage", "auto", "--set", "prune.min_elements=256"]
    report = str(tmp_path / "r.json")
    assert main(["optimize", str(ROOT / "models" / "mlp.onnx"), "-o", str(output), *args, "--report", report]) == 0
    saved = onnx.load(output)
    assert len(saved.graph.sparse_initializer) >= 1
    data = json.loads((tmp_path / "r.json").read_text())
    assert any("sparse_initializer" in note for note in data["notes"])
    assert output.stat().st_size < 0.5 * (ROOT / "models" / "mlp.onnx").stat().st_size


@pytest.mark.parametrize("command", ["optimize", "validate", "bench", "inspect", "passes", "debug", "sensitivity"])
def test_help_shows_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["optimize"])
    assert exit_info.value.code == 2


def test_a_verdict_on_generated_feeds_says_it_is_not_evidence(sample_copy, tmp_path, capsys, caplog):
    """Without --data the samples are random: the verdict line, the reports and a warning say so."""
    source = sample_copy("mlp")
    report = tmp_path / "r.json"
    args = ["optimize", str(source), "-o", str(tmp_path / "q.onnx"), "--quantize", "int8", "--validate"]
    assert main([*args, "--report", str(report), "--report", str(tmp_path / "r.md")]) == 0
    verdict = capsys.readouterr().out.splitlines()
    caveat = "PASS on 4 random samples: not evidence of accuracy; give --data DIR"
    assert any(line.startswith(caveat) for line in verdict)
    assert "random samples only" in caplog.text
    assert json.loads(report.read_text())["validation"]["random_feeds"] is True
    assert "random samples (not evidence of accuracy" in (tmp_path / "r.md").read_text()
    data = tmp_path / "feeds"
    data.mkdir()
    np.savez(data / "0.npz", **generate_feeds(model_input_specs(onnx.load(source)), count=1, seed=3)[0])
    caplog.clear()
    assert main([*args, "--data", str(data), "--report", str(report)]) == 0
    assert "PASS" in capsys.readouterr().out.splitlines() and "random" not in caplog.text
    assert json.loads(report.read_text())["validation"]["random_feeds"] is False
    assert main(["validate", str(source), str(source)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("PASS on 4 random samples")


def test_reports_of_a_failed_validation_say_the_output_was_not_written(sample_copy, tmp_path):
    source = sample_copy("mlp")
    reports = [tmp_path / "r.md", tmp_path / "r.html"]
    args = ["optimize", str(source), "-o", str(tmp_path / "q.onnx"), "--quantize", "int4", "--quantize-mode", "weights"]
    assert main([*args, "--validate", "--atol", "1e-9", "--quiet", *(f"--report={r}" for r in reports)]) == 1
    for report in reports:
        text = report.read_text()
        assert "output: not written (see the notes)" in text and "None" not in text, report.name
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_and_reports_get_the_mode_the_umask_gives(sample_copy, tmp_path, umask):
    """Reports were written 0600 while .onnx files were 0644: every file written follows the umask."""
    source = sample_copy("mlp")
    written = [tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.html"]
    previous = os.umask(umask)
    try:
        assert main(["optimize", str(source), "-o", str(written[0]), "--quiet",
                     *(f"--report={path}" for path in written[1:])]) == 0
    finally:
        os.umask(previous)
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in written} == dict.fromkeys(
        [path.name for path in written], 0o666 & ~umask)


def test_progress_in_a_log_is_one_line_per_stage_not_a_bar(tmp_path):
    """stderr redirected to a file: no carriage returns, one line when each stage ends."""
    source = tmp_path / "mlp.onnx"
    shutil.copy(ROOT / "models" / "mlp.onnx", source)
    log = tmp_path / "log.txt"
    command = [sys.executable, "-m", "optimizer.cli", "bench", str(source), "--rounds", "3", "--warmup", "0"]
    with log.open("w") as stderr:
        finished = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=stderr, check=False, timeout=120)
    assert finished.returncode == 0
    text = log.read_text()
    assert "\r" not in text and re.search(r"^benchmark: [0-9]+ run\(s\) in [0-9.]+ s$", text, re.M), text


def _unnamed_two_node_model(path: Path) -> bytes:
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path.read_bytes()


def test_a_lossless_run_never_grows_a_file(tmp_path, monkeypatch):
    """Unset model fields stay unset (they cost 10 bytes); and should an export still come out larger,
    the output keeps the input's bytes."""
    source, output, report = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    original = _unnamed_two_node_model(source)
    assert main(["optimize", str(source), "-o", str(output), "--quiet"]) == 0
    assert output.read_bytes() == original
    import optimizer.graph.convert as convert

    def padded(template, model):
        model.doc_string = "x" * 64

    monkeypatch.setattr(convert, "_copy_model_fields", padded)
    for checks in ([], ["--validate"]):
        output.unlink()
        assert main(["optimize", str(source), "-o", str(output), "--quiet", *checks, "--report", str(report)]) == 0
        assert output.read_bytes() == original
        assert any("keeps the input's bytes" in note for note in json.loads(report.read_text())["notes"])
    assert main(["optimize", str(source), "-o", str(output), "--quiet", "--prune", "0.5"]) == 0
    assert len(output.read_bytes()) > len(original)  # a lossy pipeline is not replaced by its input


def test_pruning_that_leaves_the_file_as_large_says_so(sample_copy, tmp_path, capsys):
    source = sample_copy("mlp")
    assert main(["optimize", str(source), "-o", str(tmp_path / "p.onnx"), "--prune", "0.3"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: pruning zeroed")]
    assert len(notes) == 1 and "--sparse-storage auto" in notes[0]
    channels = ["--prune", "0.3", "--prune-mode", "channels"]
    assert main(["optimize", str(source), "-o", str(tmp_path / "c.onnx"), *channels]) == 0
    assert "note: pruning zeroed" not in capsys.readouterr().out


def _timing(name: str, ratio: float) -> ModelTiming:
    return ModelTiming(name=name, size_bytes=1, session_create_ms=1.0, p50_ms=ratio, p90_ms=ratio, mean_ms=ratio,
                       min_ms=ratio, rounds=20, ratio_p50=ratio, provider_used="CPUExecutionProvider",
                       ratio_paired=ratio)


@pytest.mark.parametrize(("ratio", "slower"), [(1.85, True), (1.02, False), (0.6, False)])
def test_an_output_slower_than_its_input_is_said_in_the_summary_and_report(
        sample_copy, tmp_path, capsys, monkeypatch, ratio, slower):
    """Static int8 ran 1.85x fp32 on a real classifier and the report said only "integer kernels"."""
    def timed(models, feeds, names, **kwargs):
        return BenchResult([_timing("input", 1.0), _timing("output", ratio)], "cpu", None, 0, 20, None)

    monkeypatch.setattr("optimizer.api.benchmark", timed)
    source, report = sample_copy("mlp"), tmp_path / "r.json"
    assert main(["optimize", str(source), "-o", str(tmp_path / "q.onnx"), "--quantize", "int8", "--bench",
                 "--report", str(report)]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "SLOWER: 'output' takes 1.85x" in line]
    notes = [note for note in json.loads(report.read_text())["notes"] if note.startswith("SLOWER")]
    assert (len(said), len(notes)) == ((1, 1) if slower else (0, 0))
