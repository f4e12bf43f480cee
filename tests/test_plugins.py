"""A pass from another package, registered through the ``onnx_compress.passes`` entry point group.

The plugin is laid out the way ``pip install --target DIR`` installs a package (the module and its
``.dist-info`` with ``entry_points.txt``), and DIR is put on PYTHONPATH of a CLI child process, so the
test needs no network, no build and leaves the test environment as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from tests.helpers.samples import MODELS_DIR, ROOT

PLUGIN_MODULE = '''
from dataclasses import dataclass

from optimizer.pass_base import Pass, PassContext, PassReport, PassResult, option
from optimizer.registry import register


@register
class DocStampPass(Pass):
    name = "doc-stamp"
    summary = "write a doc string on the graph (a test plugin)"
    lossless = True

    text: str = option("stamped by a plugin", "the doc string to write")

    def run(self, graph, context: PassContext) -> PassResult:
        modified = graph.doc_string != self.text
        graph.doc_string = self.text
        report = PassReport()
        report.count("graphs_stamped", int(modified))
        return PassResult(graph, modified, report.to_dict())
'''


def _install_plugin(target: Path, entry_value: str, module_text: str = PLUGIN_MODULE) -> Path:
    (target / "stamp_plugin.py").write_text(module_text)
    info = target / "stamp_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stamp-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[onnx_compress.passes]\ndoc-stamp = {entry_value}\n")
    return target


def _cli(plugin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "optimizer.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("entry_value", ["stamp_plugin", "stamp_plugin:DocStampPass"])
def test_plugin_pass_is_listed_and_runs(tmp_path: Path, entry_value: str) -> None:
    (tmp_path / "site").mkdir()
    plugin_dir = _install_plugin(tmp_path / "site", entry_value)
    listed = _cli(plugin_dir, "passes")
    assert listed.returncode == 0, listed.stderr
    assert "doc-stamp (lossless): write a doc string on the graph (a test plugin)" in listed.stdout
    output = tmp_path / "out.onnx"
    run = _cli(plugin_dir, "optimize", str(MODELS_DIR / "mlp.onnx"), "-o", str(output), "--json",
               "--passes", "doc-stamp", "--set", "doc-stamp.text=hello")
    assert run.returncode == 0, run.stderr
    (entry,) = json.loads(run.stdout)["passes"]
    assert entry["name"] == "doc-stamp" and entry["options"] == {"text": "hello"} and entry["modified"]
    assert entry["report"]["counts"] == {"graphs_stamped": 1}
    onnx.checker.check_model(onnx.load(output), full_check=True)


def test_without_the_plugin_the_pass_is_unknown(tmp_path: Path) -> None:
    run = _cli(tmp_path, "optimize", str(MODELS_DIR / "mlp.onnx"), "-o", str(tmp_path / "out.onnx"),
               "--passes", "doc-stamp")
    assert run.returncode == 2
    assert "unknown pass 'doc-stamp'" in run.stderr


def test_a_broken_plugin_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    plugin_dir = _install_plugin(tmp_path / "site", "stamp_plugin", "raise RuntimeError('half installed')\n")
    run = _cli(plugin_dir, "passes")
    assert run.returncode == 2
    assert "pass plugin 'doc-stamp' (stamp_plugin, entry point group onnx_compress.passes) failed to load: " \
           "RuntimeError: half installed" in run.stderr
    assert "Traceback" not in run.stderr
