"""Every Python example in the README runs as written: as a plain script (no main guard), from a
folder holding the bundled sample models, the way a newcomer pastes it into a file."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from optimizer.cli import main
from optimizer.fileio.model import load_model
from tests.helpers.samples import MODELS_DIR, ROOT, seeded_feeds

README = ROOT / "README.md"
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
QUICK_START = re.search(r"&& \.venv/bin/(onnx-compress optimize [^\n`]+)", README.read_text())


def test_the_readme_has_examples_to_run():
    assert len(PYTHON_BLOCKS) >= 2 and QUICK_START is not None


@pytest.mark.parametrize("how", ["script", "-c", "stdin"])
@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_example_runs_without_a_main_guard(tmp_path, index, how):
    """As a file, as ``python -c`` and from standard input (how a notebook or a REPL runs it: no
    ``__file__`` in ``__main__``); validation's child process must start in all three, within 120 s."""
    shutil.copytree(MODELS_DIR, tmp_path / "models")
    code = PYTHON_BLOCKS[index]
    script = tmp_path / "example.py"
    script.write_text(code)
    command = {"script": [sys.executable, str(script)], "-c": [sys.executable, "-c", code],
               "stdin": [sys.executable, "-"]}
    result = subprocess.run(command[how], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
                            input=code if how == "stdin" else None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.glob(".onnx-compress-*")) == [] and list(tmp_path.glob("*.tmp-*")) == []


def test_quick_start_command_runs(tmp_path):
    shutil.copytree(MODELS_DIR, tmp_path / "models")
    command = QUICK_START.group(1).split()
    result = subprocess.run([sys.executable, "-m", "optimizer.cli", *command[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1].startswith("PASS on 4 random samples")


PLACEHOLDERS = {"model.onnx": "cnn.onnx", "bert.onnx": "transformer_tied.onnx", "det.onnx": "cnn.onnx",
                "decoder.onnx": "decoder_kv.onnx"}
"""The usage examples' model names, and the bundled sample each one stands for here."""
USAGE = [
    shlex.split(line)
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    for line in block.replace("\\\n", " ").splitlines()
    if line.startswith("onnx-compress optimize ") and line.split()[2] in PLACEHOLDERS
]


def test_the_readme_has_usage_examples():
    assert len(USAGE) >= 8


@pytest.mark.parametrize("argv", USAGE, ids=[" ".join(argv[2:6]) for argv in USAGE])
def test_usage_example_runs_on_a_bundled_sample(tmp_path, monkeypatch, argv):
    """Each usage example exactly as written, its model a bundled sample and its folders (cal/,
    feeds/, ...) real .npz feeds of that sample; --provider cuda falls back to CPU here with a note."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(MODELS_DIR / PLACEHOLDERS[argv[2]], tmp_path / argv[2])
    model = load_model(tmp_path / argv[2])
    for seed, folder in enumerate(arg for arg in argv if arg.endswith("/")):
        (tmp_path / folder).mkdir()
        for index, feed in enumerate(seeded_feeds(model, count=8, seed=seed)):
            np.savez(tmp_path / folder / f"{index:03d}.npz", **feed)
    assert main(argv[1:]) == 0
    assert (tmp_path / argv[argv.index("-o") + 1]).exists()
