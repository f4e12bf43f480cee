"""Same input and options, byte-identical output: across PYTHONHASHSEED values and working
directories (the CLI in child processes, one per seed, run side by side), and when saving
twice over an existing output (which must not grow its external data)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import passes  # noqa: F401  (registers every pass)
from optimizer.cli import main
from optimizer.registry import get_pass_class, pass_names
from tests.helpers.providers import runnable_here
from tests.helpers.samples import MODELS_DIR, seeded_feeds
from tests.reliability.child import ROOT

HASH_SEEDS = ("0", "1", "4242")
MODELS = ("transformer_tied", "constant_weights", "if_subgraph", "cnn")
LAYOUTS = {"inline": [], "external": ["--external-data", "always"]}

_CHILD = r"""
import importlib, json, sys
for module in json.loads(sys.argv[2]):
    importlib.import_module(module)
from optimizer.cli import main
codes = {label: main(argv) for label, argv in json.loads(sys.argv[1])}
print(json.dumps(codes))
"""


def _runs(workspace: Path) -> list[tuple[str, list[str]]]:
    """(label, CLI arguments) for every model: the default pipeline in both layouts, and each
    registered pass alone with calibration data (a pass whose option 'auto' is chosen by measured
    latency runs once per value it chooses from: the measurement itself is not reproducible, each
    choice is). Outputs are relative to the child's cwd."""
    runs = []
    for model in MODELS:
        source = str(workspace / "in" / f"{model}.onnx")
        for layout, extra in LAYOUTS.items():
            runs.append((f"{model}-default-{layout}", ["optimize", source, "-o",
                         f"out/{model}-default-{layout}.onnx", "--quiet", *extra]))  # fmt: skip
        for name in pass_names():
            for label, pinned in _pass_runs(model, name):
                runs.append((label, ["optimize", source, "-o", f"out/{label}.onnx", "--quiet", "--passes", name,
                             *pinned, "--calibration-data", str(workspace / "calibration" / model)]))  # fmt: skip
    return runs


def _pass_runs(model: str, name: str) -> list[tuple[str, list[str]]]:
    """(label, option arguments) of pass ``name`` alone on ``model``: once per measured choice."""
    measured = get_pass_class(name).measured_option
    if not measured:
        return [(f"{model}-{name}", [])]
    values = get_pass_class(name).measured_choices
    return [(f"{model}-{name}-{value}", ["--set", f"{name}.{measured}={value}"]) for value in values]


def _pass_modules() -> list[str]:
    """The modules of every pass registered here, so the children know the same passes."""
    return sorted({get_pass_class(name).__module__ for name in pass_names()})


def _prepare_inputs(workspace: Path) -> None:
    for model in MODELS:
        (workspace / "in").mkdir(exist_ok=True)
        (workspace / "in" / f"{model}.onnx").write_bytes((MODELS_DIR / f"{model}.onnx").read_bytes())
        folder = workspace / "calibration" / model
        folder.mkdir(parents=True)
        for index, feed in enumerate(seeded_feeds(onnx.load(MODELS_DIR / f"{model}.onnx"), count=4)):
            np.savez(folder / f"sample{index}.npz", **feed)


@pytest.fixture(scope="module")
def runs_by_seed(tmp_path_factory) -> tuple[Path, list[str], dict[str, dict[str, int]]]:
    workspace = tmp_path_factory.mktemp("determinism")
    _prepare_inputs(workspace)
    runs = _runs(workspace)
    children = {}
    for seed in HASH_SEEDS:
        cwd = workspace / f"cwd-{seed}"
        (cwd / "out").mkdir(parents=True)
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-c", _CHILD, json.dumps(runs), json.dumps(_pass_modules())]
        children[seed] = subprocess.Popen(command, cwd=cwd, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    codes = {}
    for seed, child in children.items():
        stdout, stderr = child.communicate(timeout=600)
        assert child.returncode == 0, stderr
        codes[seed] = json.loads(stdout.strip().splitlines()[-1])
    return workspace, [label for label, _ in runs], codes


def _output_files(workspace: Path, seed: str, label: str) -> dict[str, bytes]:
    folder = workspace / f"cwd-{seed}" / "out"
    return {path.name: path.read_bytes() for path in sorted(folder.glob(f"{label}.onnx*"))}


def _assert_identical_across_seeds(runs_by_seed, label: str) -> None:
    workspace, _, codes = runs_by_seed
    assert len({codes[seed][label] for seed in HASH_SEEDS}) == 1, {s: codes[s][label] for s in HASH_SEEDS}
    files = {seed: _output_files(workspace, seed, label) for seed in HASH_SEEDS}
    if codes[HASH_SEEDS[0]][label] == 0:
        assert files[HASH_SEEDS[0]], f"{label}: nothing written"
    for seed in HASH_SEEDS[1:]:
        assert files[seed].keys() == files[HASH_SEEDS[0]].keys()
        for name, data in files[seed].items():
            assert data == files[HASH_SEEDS[0]][name], (
                f"{name} differs between PYTHONHASHSEED {HASH_SEEDS[0]} and {seed}"
            )


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("model", MODELS)
def test_default_pipeline_is_byte_identical_across_hash_seeds_and_cwds(runs_by_seed, model, layout):
    _assert_identical_across_seeds(runs_by_seed, f"{model}-default-{layout}")
    workspace = runs_by_seed[0]
    assert runs_by_seed[2][HASH_SEEDS[0]][f"{model}-default-{layout}"] == 0
    if layout == "external":
        assert list((workspace / f"cwd-{HASH_SEEDS[0]}" / "out").glob(f"{model}-default-{layout}.onnx.*.data"))


@pytest.mark.parametrize("name", pass_names())
def test_every_pass_is_byte_identical_across_hash_seeds(runs_by_seed, name):
    codes = runs_by_seed[2][HASH_SEEDS[0]]
    labels = [label for model in MODELS for label, _ in _pass_runs(model, name)]
    if runnable_here(name):
        assert any(codes[label] == 0 for label in labels), f"'{name}' ran on no sample model"
    else:  # e.g. bfloat16 compute, without CUDA here: refused (exit 2) the same way every time
        assert all(codes[label] == 2 for label in labels)
    for label in labels:
        _assert_identical_across_seeds(runs_by_seed, label)


@pytest.mark.parametrize("extra", [[], ["--validate"]], ids=["plain", "validate"])
def test_saving_twice_over_an_existing_output_is_identical_and_does_not_grow(tmp_path, extra, capsys):
    source = tmp_path / "m.onnx"
    source.write_bytes((MODELS_DIR / "transformer_tied.onnx").read_bytes())
    output = tmp_path / "out.onnx"
    argv = ["optimize", str(source), "-o", str(output), "--quiet", "--external-data", "always", *extra]
    assert main(argv) == 0
    first = {path.name: path.read_bytes() for path in sorted(tmp_path.glob("out.onnx*"))}
    assert main(argv) == 0
    second = {path.name: path.read_bytes() for path in sorted(tmp_path.glob("out.onnx*"))}
    data_names = [name for name in first if name != "out.onnx"]
    assert second == first and len(data_names) == 1 and re.fullmatch(r"out\.onnx\.[0-9a-f]{16}\.data", data_names[0])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.onnx", "out.onnx", data_names[0]]
