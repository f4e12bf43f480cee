"""Fuzzing in CI: 300 seeded mutants of the sample models through every command that reads a model.

The run itself happens in a fresh process (tests.reliability.fuzz_runner) so that no onnxruntime
session this pytest process may hold is ever forked. It takes 70-100 s on two cores (1,200 runs). The
self-tests prove the harness sees each kind of failure it is meant to catch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from tests.helpers.samples import ROOT, SAMPLE_MODELS
from tests.reliability.fuzz_runner import (
    ALWAYS,
    ROTATION,
    SWEEP_OPSETS,
    Case,
    Command,
    Outcome,
    mutant_cases,
    run_cases,
)
from tests.reliability.mutate import PROTO_MUTATIONS, make_mutant, mutant_checksum

CI_SEED = 0
CI_MUTANTS = 300
CI_TIME_LIMIT_S = 400


@pytest.mark.slow
def test_fuzz_300_mutants_every_command_has_no_findings(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "tests.reliability.fuzz_runner", "--seed", str(CI_SEED),
                    "--mutants", str(CI_MUTANTS), "--extra", "2", "--json", str(summary_path)],
                   cwd=ROOT, check=True, timeout=CI_TIME_LIMIT_S)
    summary = json.loads(summary_path.read_text())
    assert summary["runs"] == CI_MUTANTS * 4
    assert summary["commands"] == sorted({c.name for c in ALWAYS + ROTATION})
    assert summary["exits"]["0"] > 0 and summary["exits"]["2"] > 0, summary["exits"]
    reports = [f"{f['signature']}\n{f['report']}" for f in summary["findings"]]
    assert not reports, (f"{len(reports)} findings in {time.monotonic() - started:.0f} s "
                         f"(reproduce: python benchmarks/fuzz.py --seed {CI_SEED} --start N --mutants 1):\n"
                         + "\n\n".join(reports[:40]))


def test_opset_sweep_of_the_samples_has_no_findings(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    subprocess.run([sys.executable, "-m", "tests.reliability.fuzz_runner", "--opset-sweep", "--json",
                    str(summary_path)], cwd=ROOT, check=True, timeout=CI_TIME_LIMIT_S)
    summary = json.loads(summary_path.read_text())
    assert summary["runs"] == len(SAMPLE_MODELS) * len(SWEEP_OPSETS) * sum(bool(c.outputs) for c in ALWAYS + ROTATION)
    reports = [f"{f['signature']}\n{f['report']}" for f in summary["findings"]]
    assert not reports, f"{len(reports)} findings:\n" + "\n\n".join(reports[:20])


def test_mutants_are_deterministic_and_varied() -> None:
    first = [mutant_checksum(make_mutant(7, index, SAMPLE_MODELS)) for index in range(40)]
    again = [mutant_checksum(make_mutant(7, index, SAMPLE_MODELS)) for index in range(40)]
    other = [mutant_checksum(make_mutant(8, index, SAMPLE_MODELS)) for index in range(40)]
    assert first == again
    assert first != other
    assert len(set(first)) == 40
    samples = {make_mutant(0, i, SAMPLE_MODELS).sample for i in range(len(SAMPLE_MODELS))}
    assert samples == {p.name for p in SAMPLE_MODELS}


def test_every_mutation_fires_on_some_sample() -> None:
    mutants = [make_mutant(0, index, SAMPLE_MODELS) for index in range(CI_MUTANTS)]
    described = " ".join(m for mutant in mutants for m in mutant.mutations)
    for marker in ("dims", "data_type", "raw_data length", "non-finite", "STRING", "-> Constant", "graph.input",
                   "op ", "custom-domain", "invalid UTF-8", "If with depth", "Loop", "external", "opset",
                   "dangling", "elem_type"):
        assert marker in described, marker
    assert len(PROTO_MUTATIONS) >= 19


def test_every_command_is_rotated_in() -> None:
    names = {case.command.name for case in mutant_cases(0, len(ROTATION), SAMPLE_MODELS)}
    assert names == {c.name for c in ALWAYS + ROTATION}


# --- the harness detects what it must ----------------------------------------------------------

_PROBE = Command("probe", ("probe", "{M}"), outputs=("out.onnx",))


def _run_fake(main, deadline_s: float = 30.0) -> Outcome:
    model = SAMPLE_MODELS[0].read_bytes()
    [outcome] = run_cases([Case("self-test", {"m.onnx": model}, _PROBE)], main=main, jobs=1, deadline_s=deadline_s)
    return outcome


def _kinds(outcome: Outcome) -> list[str]:
    return sorted(finding.kind for finding in outcome.findings)


def _write_valid_output(argv) -> int:
    onnx.save(onnx.load(argv[-1]), "out.onnx")
    return 0


def test_harness_passes_a_clean_run() -> None:
    assert _kinds(_run_fake(_write_valid_output)) == []


def test_harness_detects_exit_3() -> None:
    assert _kinds(_run_fake(lambda argv: 3)) == ["exit3"]


def test_harness_detects_an_escaped_exception() -> None:
    def main(argv):
        raise RuntimeError("escaped")
    assert _kinds(_run_fake(main)) == ["escaped"]


def test_harness_detects_a_hang_and_kills_it() -> None:
    started = time.monotonic()
    outcome = _run_fake(lambda argv: time.sleep(3600), deadline_s=1.0)
    assert _kinds(outcome) == ["hang"]
    assert time.monotonic() - started < 15


def test_harness_detects_a_signal_death() -> None:
    assert _kinds(_run_fake(lambda argv: os.abort())) == ["signal"]


def test_harness_detects_a_leftover_file() -> None:
    def main(argv):
        Path(".out.onnx.tmp-123").write_bytes(b"partial")
        return 2
    outcome = _run_fake(main)
    assert "leftover" in _kinds(outcome)


def test_harness_detects_a_leftover_in_tmpdir() -> None:
    def main(argv):
        import tempfile
        tempfile.mkdtemp(prefix="onnx-compress-")
        return _write_valid_output(argv)
    assert _kinds(_run_fake(main)) == ["leftover"]


def test_harness_detects_a_changed_input() -> None:
    def main(argv):
        with open(argv[-1], "ab") as stream:
            stream.write(b"\0")
        return 2
    assert "input-changed" in _kinds(_run_fake(main))


def test_harness_detects_a_multi_line_exit_2() -> None:
    def main(argv):
        print("Traceback (most recent call last):\nonnx-compress: error: x", file=sys.stderr)
        return 2
    assert _kinds(_run_fake(main)) == ["stderr"]


def test_harness_detects_an_unloadable_or_missing_output() -> None:
    def garbage(argv):
        Path("out.onnx").write_bytes(b"not a model")
        return 0
    assert _kinds(_run_fake(garbage)) == ["bad-output"]
    assert _kinds(_run_fake(lambda argv: 0)) == ["bad-output"]


def test_harness_detects_an_orphaned_child_process() -> None:
    def main(argv):
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        return 1
    assert _kinds(_run_fake(main)) == ["orphan"]
