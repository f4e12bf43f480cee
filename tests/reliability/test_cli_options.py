"""Issue 11, item 15 and the exit-3 acceptance item: every CLI number is checked at parse time,
user metrics are checked before use, and internal errors name their stage and pass."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from optimizer import registry
from optimizer.cli import main
from optimizer.errors import OptionError
from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.registry import parse_option_text
from optimizer.verify.metrics import check_metric_spec, load_metric

ROOT = Path(__file__).resolve().parents[2]
MLP = ROOT / "models" / "mlp.onnx"


def two_argument_metric(reference_outputs, candidate_outputs) -> float:
    return 1.0


def one_argument_metric(reference_outputs) -> float:
    return 1.0


def three_argument_metric(reference_outputs, candidate_outputs, extra) -> float:
    return 1.0


class CallableMetric:
    def __call__(self, reference_outputs, candidate_outputs) -> float:
        return 1.0


callable_instance = CallableMetric()
METRICS = "tests.reliability.test_cli_options"


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert captured.out == ""
    return lines[0]


def sha256_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


OPTIMIZE_BAD_VALUES = [
    ("--max-drop", "nan"), ("--max-drop", "-0.1"), ("--max-drop", "inf"),
    ("--timeout", "inf"), ("--timeout", "nan"), ("--timeout", "0"), ("--timeout", "-1"),
    ("--samples", "1e8"), ("--samples", str(10**9)), ("--samples", "0"), ("--samples", "-3"),
    ("--seed", "-1"), ("--seed", str(2**64)), ("--rounds", "0"), ("--max-trials", "0"), ("--workers", "0"),
    ("--workers", "100000"), ("--validate-max-memory", "-5"), ("--validate-max-memory", "12"),
    ("--max-input-bytes", "0"), ("--max-input-bytes", "-1"), ("--prune", "nan"), ("--prune", "1.5"),
    ("--prune", "-0.5"), ("--cluster", "99"), ("--cluster", "0"), ("--atol", "nan"), ("--atol", "-1"),
    ("--rtol", "inf"), ("--min-cosine", "2"), ("--min-sqnr", "inf"), ("--min-top1", "1.5"),
    ("--output-tolerance", "y:atol=inf"), ("--output-tolerance", "y:min-cosine=nan"),
    ("--shape", "x=99999999999x2"), ("--shape", "x=65536x65536x2"), ("--shape", "x=-4"),
    ("--metric", "nonsense"), ("--metric", "a b:c"), ("--metric", "os:"), ("--executor", "dask"),
]


def test_a_ray_address_without_the_ray_executor_is_refused(tmp_path, capsys):
    output = tmp_path / "out.onnx"
    code = main(["optimize", str(MLP), "-o", str(output), "--ray-address", "10.0.0.1:6379", "--json"])
    line = one_error_line(capsys)
    assert code == 2 and "needs --executor ray" in line and not output.exists()


@pytest.mark.parametrize(("flag", "value"), OPTIMIZE_BAD_VALUES, ids=[f"{f}={v}" for f, v in OPTIMIZE_BAD_VALUES])
def test_optimize_refuses_bad_numbers_at_parse_time(flag, value, tmp_path, capsys):
    output = tmp_path / "out.onnx"
    before = sha256_tree(MLP.parent)
    code = main(["optimize", str(MLP), "-o", str(output), f"{flag}={value}", "--json"])
    line = one_error_line(capsys)
    assert code == 2
    assert line.startswith("onnx-compress: error: ")
    assert flag in line
    assert not output.exists() and list(tmp_path.iterdir()) == []
    assert sha256_tree(MLP.parent) == before


OTHER_BAD_VALUES = [
    (["bench", str(MLP)], "--warmup", "-1"), (["bench", str(MLP)], "--rounds", "0"),
    (["bench", str(MLP)], "--threads", "0"), (["bench", str(MLP)], "--timeout", "inf"),
    (["bench", str(MLP)], "--samples", "1e8"), (["inspect", str(MLP)], "--top", "-1"),
    (["debug", str(MLP), str(MLP)], "--top", "-2"), (["validate", str(MLP), str(MLP)], "--atol", "nan"),
    (["validate", str(MLP), str(MLP)], "--validate-max-memory", "-5"),
    (["sensitivity", str(MLP)], "--target", "1.5"), (["sensitivity", str(MLP)], "--sparsities", "0.5,nan"),
    (["sensitivity", str(MLP)], "--sparsities", "0.5,1"), (["sensitivity", str(MLP)], "--min-elements", "-1"),
]


@pytest.mark.parametrize(("command", "flag", "value"), OTHER_BAD_VALUES,
                         ids=[f"{c[0]}{f}={v}" for c, f, v in OTHER_BAD_VALUES])
def test_every_command_refuses_bad_numbers(command, flag, value, capsys):
    assert main([*command, f"{flag}={value}"]) == 2
    line = one_error_line(capsys)
    assert flag in line and value.split(",")[-1] in line


def test_error_names_value_and_range(capsys):
    assert main(["optimize", str(MLP), "-o", "x.onnx", "--samples", "1e8"]) == 2
    assert one_error_line(capsys) == ("onnx-compress: error: argument --samples: invalid value '1e8': "
                                      "expected an integer from 1 to 10000")


def test_max_drop_nan_writes_nothing(tmp_path, capsys):
    """Before the fix --max-drop nan was accepted and --json failed after the output was written."""
    assert main(["optimize", str(MLP), "-o", str(tmp_path / "o.onnx"), "--max-drop", "nan", "--json"]) == 2
    assert "--max-drop" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_missing_argument_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["optimize"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "-o/--output" in err


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e400"])
def test_set_refuses_non_finite_floats(text, tmp_path, capsys):
    assert parse_option_text("prune", "sparsity", "0.25") == 0.25
    with pytest.raises(OptionError, match="finite"):
        parse_option_text("prune", "sparsity", text)
    assert main(["optimize", str(MLP), "-o", str(tmp_path / "o.onnx"), "--set", f"prune.sparsity={text}"]) == 2
    assert "sparsity" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_set_refuses_integers_out_of_range():
    assert parse_option_text("prune", "min_elements", str(2**63 - 1)) == 2**63 - 1
    with pytest.raises(OptionError, match="integer from"):
        parse_option_text("prune", "min_elements", str(2**63))


@pytest.mark.parametrize(("spec", "reason"), [
    ("os:system", "not a Python function"), ("builtins:len", "not a Python function"),
    ("collections:OrderedDict", "not a Python function"), ("no_such_module_xyz:f", "cannot import"),
    (f"{METRICS}:one_argument_metric", "exactly two positional"),
    (f"{METRICS}:three_argument_metric", "exactly two positional"),
    (f"{METRICS}:callable_instance", "not a Python function"),
])
def test_cli_refuses_unusable_user_metrics(spec, reason, tmp_path, capsys):
    """Before the fix --metric os:system ran os.system(reference, candidate): TypeError, exit 3."""
    code = main(["optimize", str(MLP), "-o", str(tmp_path / "o.onnx"), "--quantize", "int8", "--max-drop", "0.01",
                 "--metric", spec, "--metric-direction", "higher"])
    line = one_error_line(capsys)
    assert code == 2 and f"metric '{spec}'" in line and reason in line
    assert list(tmp_path.iterdir()) == []


def test_user_metric_with_two_arguments_is_accepted():
    check_metric_spec(f"{METRICS}:two_argument_metric")
    metric = load_metric(f"{METRICS}:two_argument_metric", higher_is_better=True)
    assert metric([], []) == 1.0


@pytest.mark.parametrize(("spec", "reason"), [
    ("os:system", "not a Python function"), ("collections:OrderedDict", "not a Python function"),
    (f"{METRICS}:one_argument_metric", "exactly two positional"),
    (f"{METRICS}:three_argument_metric", "exactly two positional"),
    (f"{METRICS}:callable_instance", "not a Python function"), ("nope_module_xyz:f", "cannot import"),
    (":f", "package.module:function"),
])
def test_user_metric_resolution_refuses(spec, reason):
    with pytest.raises(OptionError, match=reason):
        load_metric(spec, higher_is_better=True)


@registry.register
@dataclass(frozen=True, kw_only=True)
class _BuggyPass(Pass):
    """A pass with a bug, registered only while a test runs (see the fixture)."""

    name = "test-buggy-pass"
    summary = "raises ZeroDivisionError"

    def run(self, graph, context: PassContext) -> PassResult:
        return 1 / 0


registry._PASSES.pop(_BuggyPass.name)


@pytest.fixture
def buggy_pass(monkeypatch):
    monkeypatch.setitem(registry._PASSES, _BuggyPass.name, _BuggyPass)
    return _BuggyPass.name


def test_bug_in_a_pass_names_pass_and_stage(buggy_pass, tmp_path, capsys):
    code = main(["optimize", str(MLP), "-o", str(tmp_path / "o.onnx"), "--passes", f"cleanup,{buggy_pass}"])
    assert code == 3
    line = one_error_line(capsys)
    assert line == (f"onnx-compress: pass '{buggy_pass}' failed: ZeroDivisionError: division by zero "
                    "(internal error, stage: run passes; run with --debug for the traceback)")
    assert list(tmp_path.iterdir()) == []


def test_debug_keeps_the_traceback(buggy_pass, tmp_path, capsys):
    assert main(["optimize", str(MLP), "-o", str(tmp_path / "o.onnx"), "--passes", buggy_pass, "--debug"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "1 / 0" in err and f"pass: {buggy_pass}" in err


def test_bug_in_a_command_stage_names_the_stage(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("in the walker")
    monkeypatch.setattr("optimizer.graph.inspection._walk_model", broken)
    assert main(["inspect", str(MLP)]) == 3
    assert one_error_line(capsys).startswith(
        "onnx-compress: internal error (stage: inspect): ZeroDivisionError: in the walker")


def test_bug_while_publishing_names_the_stage(monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("in save")
    monkeypatch.setattr("optimizer.fileio.publish.save_model", broken)
    assert main(["optimize", str(MLP), "-o", str(tmp_path / "o.onnx")]) == 3
    assert "internal error (stage: publish): ZeroDivisionError: in save" in one_error_line(capsys)


def test_bad_input_is_never_marked_internal(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    assert main(["inspect", str(bad)]) == 2
    assert one_error_line(capsys).startswith("onnx-compress: error: ")
