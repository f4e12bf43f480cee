"""The write side never loses anything: concurrent writers to one output, files the run reads
that a report or data file would alias, data files the tool did not write, failures after
publishing, and long output names. Every data-loss test compares the bytes of every
pre-existing file before and after."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import optimizer.report_notes as report_notes
from optimizer.api import FeedOptions, OptimizeOptions, ValidationOptions, optimize
from optimizer.errors import ModelSaveError, OptionError, RuntimeSessionError
from optimizer.fileio.model import load_model
from optimizer.fileio.output_files import process_start_ticks
from optimizer.fileio.save import save_model
from tests.reliability.child import ROOT, run_cli_child, weight_model

ROUNDS = 20
_WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
from optimizer.fileio.save import save_model
from tests.reliability.child import weight_model
model = weight_model(200_000, seed=int(sys.argv[3]))
for _ in range(int(sys.argv[4])):
    save_model(model, sys.argv[2], external_data=sys.argv[5] == "external")
"""


def _hashes(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.iterdir()) if path.is_file() and not path.is_symlink()}  # fmt: skip


def _leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if ".tmp-" in name or name.startswith(".onnx-compress-"))


def _weights(path: Path) -> bytes:
    return load_model(path).graph.initializer[0].raw_data


def _external_model(folder: Path, data_name: str, seed: int = 0) -> Path:
    """in.onnx whose weight is stored in ``data_name`` next to it."""
    model = weight_model(4096, seed=seed)
    onnx.save_model(model, folder / "in.onnx", save_as_external_data=True, location=data_name,
                    size_threshold=0)  # fmt: skip
    return folder / "in.onnx"


# --------------------------------------------------------------------------- 1. concurrent writers


@pytest.mark.parametrize("layout", ["external", "inline"])
def test_two_concurrent_writers_always_leave_one_complete_file(tmp_path, layout):
    output = tmp_path / "out.onnx"
    expected = {seed: weight_model(200_000, seed=seed).graph.initializer[0].raw_data for seed in (1, 2)}
    for round_index in range(ROUNDS):
        writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(ROOT), str(output), str(seed), "3", layout],
                                    stderr=subprocess.PIPE, text=True) for seed in (1, 2)]  # fmt: skip
        errors = [writer.communicate(timeout=120)[1] for writer in writers]
        assert [writer.returncode for writer in writers] == [0, 0], f"round {round_index}: {errors}"
        assert _weights(output) in expected.values(), f"round {round_index}: output does not match a writer"
        assert _leftovers(tmp_path) == [], f"round {round_index}"
        data_files = [path.name for path in tmp_path.iterdir() if path.name.endswith(".data")]
        assert len(data_files) == (1 if layout == "external" else 0), data_files


@pytest.mark.slow
def test_two_concurrent_cli_runs_to_one_output(tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save_model(weight_model(50_000, seed=3), source)
    output = tmp_path / "out" / "o.onnx"
    output.parent.mkdir()
    before = _hashes(tmp_path)
    variants = [["--external-data", "always"], ["--validate", "--external-data", "always"]]
    for round_index in range(ROUNDS):
        runs = [subprocess.Popen([sys.executable, "-m", "optimizer.cli", "optimize", str(source), "-o", str(output),
                                  "--quiet", *extra], cwd=ROOT, stderr=subprocess.PIPE, text=True)
                for extra in variants]  # fmt: skip
        errors = [run.communicate(timeout=300)[1] for run in runs]
        assert [run.returncode for run in runs] == [0, 0], f"round {round_index}: {errors}"
        assert _weights(output) == weight_model(50_000, seed=3).graph.initializer[0].raw_data
        assert _leftovers(output.parent) == [], f"round {round_index}"
    assert _hashes(tmp_path) == before


def test_an_old_data_file_we_wrote_goes_once_the_new_model_is_in(tmp_path):
    output = tmp_path / "out.onnx"
    save_model(weight_model(4096, seed=1), output, external_data=True)
    (first,) = [path.name for path in tmp_path.glob("*.data")]
    save_model(weight_model(4096, seed=2), output, external_data=True)
    (second,) = [path.name for path in tmp_path.glob("*.data")]
    assert first != second and re.fullmatch(r"out\.onnx\.[0-9a-f]{16}\.data", second)
    save_model(weight_model(4096, seed=2), output)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"], "switching to inline drops our old data file"


# --------------------------------------------------------------------------- 2. writes vs reads


@pytest.mark.parametrize("alias", ["same", "hardlink", "symlink", "spelling"])
def test_report_aimed_at_the_inputs_external_data_is_refused_before_any_work(tmp_path, alias):
    source = _external_model(tmp_path, "w.md")
    report = {"same": tmp_path / "w.md", "hardlink": tmp_path / "alias.md", "symlink": tmp_path / "link.md",
              "spelling": tmp_path / "sub" / ".." / "w.md"}[alias]  # fmt: skip
    (tmp_path / "sub").mkdir()
    if alias == "hardlink":
        os.link(source, report)  # the loader refuses hard-linked external data, not model files
    elif alias == "symlink":
        report.symlink_to(tmp_path / "w.md")
    before = _hashes(tmp_path)
    run = run_cli_child(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--report", str(report)],
                        workspace=tmp_path)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "refusing to overwrite" in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert _hashes(tmp_path) == before and not (tmp_path / "out.onnx").exists()


def test_library_refuses_reports_that_alias_inputs_outputs_or_data_folders(tmp_path):
    source = _external_model(tmp_path, "w.json")
    data = tmp_path / "feeds"
    data.mkdir()
    np.savez(data / "0.npz", x=np.zeros(4096, np.float32))
    os.link(data / "0.npz", tmp_path / "feed.json")
    before = _hashes(tmp_path)
    for reports, output in [([tmp_path / "w.json"], None), ([tmp_path / "feed.json"], None),
                            ([tmp_path / "r.json", tmp_path / "r.json"], None)]:  # fmt: skip
        with pytest.raises(ModelSaveError, match="refusing to overwrite"):
            optimize(source, output, OptimizeOptions(reports=reports, validation=ValidationOptions(),
                                                     feeds=FeedOptions(source=data)))
    with pytest.raises(OptionError, match="unknown format"):
        optimize(source, tmp_path / "out.onnx", OptimizeOptions(reports=[tmp_path / "r.txt"]))
    assert _hashes(tmp_path) == before and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("command", ["debug", "sensitivity"])
def test_debug_and_sensitivity_reports_never_overwrite_their_inputs(tmp_path, command):
    source = _external_model(tmp_path, "w.json")
    argv = ([command, str(source), str(source)] if command == "debug" else [command, str(source)])
    before = _hashes(tmp_path)
    run = run_cli_child([*argv, "--report", str(tmp_path / "w.json")], workspace=tmp_path)
    assert run.returncode == 2 and "refusing to overwrite" in run.stderr, run.stderr
    assert _hashes(tmp_path) == before


# --------------------------------------------------------------------------- 3. data files not ours


@pytest.mark.parametrize("extra", [["--external-data", "always"], ["--validate"], ["--bench", "--rounds", "1"],
                                   ["--validate", "--external-data", "always"]])  # fmt: skip
@pytest.mark.parametrize("existing", ["file", "folder"])
def test_an_existing_out_data_the_tool_did_not_write_is_never_touched(tmp_path, extra, existing):
    (tmp_path / "in").mkdir()
    source = _external_model(tmp_path / "in", "in.onnx.data")
    out = tmp_path / "out"
    out.mkdir()
    if existing == "file":
        (out / "o.onnx.data").write_bytes(b"the user's file")
    else:
        (out / "o.onnx.data").mkdir()
        (out / "o.onnx.data" / "keep").write_bytes(b"inside")
    onnx.save_model(weight_model(16, seed=9), out / "o.onnx")
    before = {**_hashes(out), **_hashes(out / "o.onnx.data")} if existing == "folder" else _hashes(out)
    run = run_cli_child(["optimize", str(source), "-o", str(out / "o.onnx"), "--quiet", *extra], workspace=tmp_path)
    assert run.returncode == 0, run.stderr
    after = _hashes(out) if existing == "file" else {**_hashes(out), **_hashes(out / "o.onnx.data")}
    assert {name: after.get(name) for name in before if name != "o.onnx"} == {
        name: digest for name, digest in before.items() if name != "o.onnx"}
    assert _weights(out / "o.onnx") == weight_model(4096).graph.initializer[0].raw_data
    assert _leftovers(out) == []


# --------------------------------------------------------------------------- 5. nothing fails after publishing


def test_a_failing_fusion_check_only_warns_after_the_output_is_written(tmp_path, monkeypatch, caplog):
    def broken_fusion_check(model, provider):
        raise RuntimeSessionError("onnxruntime could not load the model")

    monkeypatch.setattr(report_notes, "check_fusion", broken_fusion_check)
    result = optimize(_external_model(tmp_path, "w.bin"), tmp_path / "out.onnx",
                      OptimizeOptions(fusion_check=True, reports=[tmp_path / "r.json"]))
    assert result.output_path == tmp_path / "out.onnx" and (tmp_path / "r.json").exists()
    assert any("fusion check failed" in note for note in result.report.notes)
    assert "fusion check failed" in caplog.text


def test_a_bad_report_path_fails_before_the_output_is_written(tmp_path):
    source = _external_model(tmp_path, "w.bin")
    run = run_cli_child(["optimize", str(source), "-o", str(tmp_path / "out.onnx"),
                         "--report", str(tmp_path / "missing" / "r.json")], workspace=tmp_path)  # fmt: skip
    assert run.returncode == 2 and "does not exist" in run.stderr, run.stderr
    assert not (tmp_path / "out.onnx").exists()


# --------------------------------------------------------------------------- 18. long names


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("length", [241, 255])
def test_output_names_up_to_255_bytes_are_written(tmp_path, external, length):
    output = tmp_path / ("m" * (length - 5) + ".onnx")
    save_model(weight_model(4096, seed=1), output, external_data=external)
    assert _weights(output) == weight_model(4096, seed=1).graph.initializer[0].raw_data
    assert all(len(os.fsencode(name)) <= 255 for name in os.listdir(tmp_path))
    assert len(os.listdir(tmp_path)) == (2 if external else 1)
    result = optimize(output, tmp_path / ("r" * (length - 5) + ".onnx"), OptimizeOptions(
        validation=ValidationOptions(), reports=[tmp_path / ("p" * (length - 5) + ".json")]))
    assert result.passed and _leftovers(tmp_path) == []


def test_a_validated_run_cleans_only_temporaries_of_dead_writers(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)  # fmt: skip
    me = os.getpid()
    start = process_start_ticks(me)
    dead = tmp_path / f".out.onnx.tmp-{int(finished.stdout)}-7-abcd1234"
    live = tmp_path / f".out.onnx.tmp-{me}-{start}-abcd1234"
    for path in (dead, live):
        path.write_bytes(b"partial")
    optimize(_external_model(tmp_path, "w.bin"), tmp_path / "out.onnx", OptimizeOptions(validation=ValidationOptions()))
    assert not dead.exists() and live.read_bytes() == b"partial"
