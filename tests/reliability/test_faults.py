"""Faults while writing: a full disk, an output path that would overwrite something it must not,
and SIGKILL in the middle of a save. The output path must hold either nothing or the previous
complete file, temporary files must go (at once, or on the next run), and inputs never change."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from optimizer.fileio.model import load_model
from optimizer.fileio.output_files import file_digest
from optimizer.fileio.save import save_model
from tests.reliability.child import ROOT, error_lines, run_cli_child, tree_state, weight_model

KILL_MODEL_BYTES = 200 * 2**20
TEMP_MARK = ".tmp-"


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path


def temps_in(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if TEMP_MARK in name or name.startswith(".onnx-compress-"))


# --------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("mode", [[], ["--external-data", "always"], ["--validate"]],
                         ids=["inline", "external-data", "validate"])  # fmt: skip
def test_disk_full_exits_non_zero_and_leaves_nothing(workspace, mode):
    source = workspace / "model" / "m.onnx"
    source.write_bytes(weight_model(500_000).SerializeToString())
    before = tree_state(workspace / "model")
    output = workspace / "out" / "o.onnx"
    run = run_cli_child(["optimize", str(source), "-o", str(output), *mode], workspace=workspace,
                        file_size_limit_bytes=1_000_000)  # fmt: skip
    assert run.returncode == 2, run.stderr
    lines = error_lines(run.stderr)
    assert len(lines) == 1 and "o.onnx" in lines[0] and "cannot write" in lines[0], run.stderr
    assert os.listdir(workspace / "out") == []
    assert tree_state(workspace / "model") == before


def test_disk_full_keeps_the_previous_output(workspace):
    source = workspace / "model" / "m.onnx"
    source.write_bytes(weight_model(500_000).SerializeToString())
    output = workspace / "out" / "o.onnx"
    save_model(weight_model(1000, seed=1), output)
    previous = output.read_bytes()
    run = run_cli_child(["optimize", str(source), "-o", str(output)], workspace=workspace,
                        file_size_limit_bytes=1_000_000)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert output.read_bytes() == previous and os.listdir(workspace / "out") == ["o.onnx"]


# --------------------------------------------------------------------------- refused outputs


def _external_input(folder: Path, data_name: str = "w.bin") -> Path:
    model = weight_model(4096)
    save_model(model, folder / "m.onnx", external_data=True)
    (written,) = folder.glob("m.onnx.*.data")
    data_name = data_name.format(digest=file_digest(written)[:16])
    os.rename(written, folder / data_name)
    stored = onnx.load(folder / "m.onnx", load_external_data=False)
    for entry in stored.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = data_name
    (folder / "m.onnx").write_bytes(stored.SerializeToString())
    return folder / "m.onnx"


def _symlink_elsewhere(workspace: Path) -> tuple[Path, list[str]]:
    victim = workspace / "victim.onnx"
    victim.write_bytes(b"someone else's file")
    (workspace / "out" / "link.onnx").symlink_to(victim)
    return workspace / "out" / "link.onnx", []


REFUSED_OUTPUTS = {
    "symlink-elsewhere": _symlink_elsewhere,
    "the-input": lambda w: (w / "model" / "m.onnx", []),
    "the-input-respelled": lambda w: (w / "out" / ".." / "model" / "." / "m.onnx", []),
    "hard-link-to-input": lambda w: (os.link(w / "model" / "m.onnx", w / "out" / "h.onnx"),
                                     w / "out" / "h.onnx")[1:] + ([],),
    "the-input-external-data": lambda w: (w / "model" / "w.bin", []),
    "data-file-aliases-input-data": lambda w: (w / "model" / "o.onnx", ["--external-data", "always"]),
}  # fmt: skip


@pytest.mark.parametrize("validate", [False, True], ids=["plain", "validate"])
@pytest.mark.parametrize("case", sorted(REFUSED_OUTPUTS))
def test_output_that_would_overwrite_something_is_refused(workspace, case, validate):
    # the output's data file is named by its content: o.onnx.HASH.data (optimizer.fileio.output_files)
    data_name = "o.onnx.{digest}.data" if case == "data-file-aliases-input-data" else "w.bin"
    source = _external_input(workspace / "model", data_name)
    output, extra = REFUSED_OUTPUTS[case](workspace)
    before = tree_state(workspace)
    run = run_cli_child(["optimize", str(source), "-o", str(output), *extra]
                        + (["--validate"] if validate else []), workspace=workspace)  # fmt: skip
    assert run.returncode == 2, run.stderr
    lines = error_lines(run.stderr)
    assert len(lines) == 1 and lines[0].startswith("onnx-compress: error: "), run.stderr
    assert Path(output).name in lines[0]
    after = tree_state(workspace)
    for state in (before, after):
        for name in [name for name in state if name.startswith(("cwd", "tmp"))]:
            del state[name]
    assert after == before


# --------------------------------------------------------------------------- SIGKILL mid-write

_KILL_CHILD = r"""
import os, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from tests.reliability.child import weight_model
from optimizer.fileio.save import save_model
model = weight_model(int(sys.argv[3]) // 4, seed=7)
real_write = os.write
def slow_write(fd, data):
    time.sleep(0.001)
    return real_write(fd, data[: 2**20])
os.write = slow_write
print("ready", flush=True)
save_model(model, sys.argv[2], external_data=sys.argv[4] == "external")
print("finished", flush=True)
"""


def _kill_at_fraction(output: Path, fraction: float, layout: str) -> float:
    """Start a child saving a 200 MB model to ``output``; SIGKILL it when the temp file being
    written reaches ``fraction`` of its final size. Returns the fraction seen at the kill."""
    command = [sys.executable, "-c", _KILL_CHILD, str(ROOT), str(output), str(KILL_MODEL_BYTES),
               layout]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        prefix = f".{output.name}{'.data' if layout == 'external' else ''}.tmp-"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sizes = [entry.stat().st_size for entry in os.scandir(output.parent)
                     if entry.name.startswith(prefix)]  # fmt: skip
            if sizes and max(sizes) >= fraction * KILL_MODEL_BYTES:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
                return max(sizes) / KILL_MODEL_BYTES
            time.sleep(0.0005)
        raise AssertionError("the save never reached the fraction")
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["inline", "external"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_sigkill_mid_write_leaves_previous_file_and_next_run_cleans_up(workspace, fraction, layout):
    output = workspace / "out" / "o.onnx"
    previous_model = weight_model(1000, seed=1)
    save_model(previous_model, output, external_data=layout == "external")
    previous = tree_state(workspace / "out")
    seen = _kill_at_fraction(output, fraction, layout)
    assert fraction <= seen < 1.0, f"killed at {seen:.2%}, not mid-write"
    assert temps_in(workspace / "out"), "a killed save leaves its temporary file behind"
    assert {name: state for name, state in tree_state(workspace / "out").items()
            if TEMP_MARK not in name} == previous  # fmt: skip
    assert load_model(output).SerializeToString() == previous_model.SerializeToString()
    save_model(weight_model(2000, seed=2), output, external_data=layout == "external")
    assert temps_in(workspace / "out") == []
    assert load_model(output).graph.initializer[0].dims == [2000]


@pytest.mark.slow
def test_sigkill_of_first_save_leaves_no_output_and_the_cli_cleans_up(workspace):
    output = workspace / "out" / "o.onnx"
    _kill_at_fraction(output, 0.5, "inline")
    assert not output.exists() and len(temps_in(workspace / "out")) == 1
    source = workspace / "model" / "m.onnx"
    source.write_bytes(weight_model(2000, seed=2).SerializeToString())
    run = run_cli_child(["optimize", str(source), "-o", str(output), "--quiet"], workspace=workspace)
    assert run.returncode == 0, run.stderr
    assert temps_in(workspace / "out") == []
    assert load_model(output).graph.initializer[0].dims == [2000]
