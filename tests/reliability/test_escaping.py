"""Issue 11, item 16: names from a model never reach a terminal or a report as control sequences,
and ``$`` in a name is text in plots, not matplotlib mathtext."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.cli import main
from optimizer.report.html_page import render_html
from optimizer.report.report import render_markdown
from optimizer.text import ControlEscapingWriter, escape_control, plot_text, printable

OSC_TITLE = "\x1b]0;pwned\x07"
CLEAR = "\x1b[2J"
MATH = "a$x^{$"
CONTROL_CHARACTERS = [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]]


def hostile_model(path: Path) -> Path:
    """x -> MatMul(W) -> Relu -> MatMul(V) -> y, every name hostile."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"W{CLEAR}")
    second = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), f"V{OSC_TITLE}")
    nodes = [helper.make_node("MatMul", [f"x{OSC_TITLE}", weight.name], ["h"], name=MATH),
             helper.make_node("Relu", ["h"], [f"r{CLEAR}"], name=f"relu{OSC_TITLE}"),
             helper.make_node("MatMul", [f"r{CLEAR}", second.name], ["y"], name=f"mm{CLEAR}{MATH}")]
    graph = helper.make_graph(nodes, f"graph{OSC_TITLE}",
                              [helper.make_tensor_value_info(f"x{OSC_TITLE}", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [weight, second])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name=f"p{CLEAR}")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def assert_no_control(text: str, allowed: str = "\n") -> None:
    bad = sorted({c for c in text if c in CONTROL_CHARACTERS and c not in allowed})
    assert not bad, f"control characters {bad!r} in {text[:200]!r}"


@pytest.mark.parametrize("character", CONTROL_CHARACTERS, ids=[f"{ord(c):02x}" for c in CONTROL_CHARACTERS])
def test_escape_control_makes_every_control_visible(character):
    assert escape_control(f"a{character}b") == f"a\\x{ord(character):02x}b"
    assert printable(f"a{character}b") == f"a\\x{ord(character):02x}b"


def test_layout_characters_stay_when_asked():
    assert escape_control("a\nb\tc\x1b", keep_layout=True) == "a\nb\tc\\x1b"
    assert escape_control("plain ascii, ünïcödé, 中文") == "plain ascii, ünïcödé, 中文"


def test_plot_text_escapes_dollars_for_mathtext():
    assert plot_text(MATH) == r"a\$x^{\$"
    assert plot_text(OSC_TITLE) == "\\x1b]0;pwned\\x07"


def test_writer_escapes_what_it_writes():
    stream = io.StringIO()
    ControlEscapingWriter(stream).write(f"name {OSC_TITLE}\n")
    assert stream.getvalue() == "name \\x1b]0;pwned\\x07\n"


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_inspect_prints_no_control_sequences(json_flag, tmp_path, capsys):
    model = hostile_model(tmp_path / "m.onnx")
    assert main(["inspect", str(model), *json_flag]) == 0
    out = capsys.readouterr().out
    assert_no_control(out)
    assert "\\x1b" in out or "\\u001b" in out


def test_debug_report_with_hostile_names(tmp_path, capsys):
    """Before the fix mathtext failed on 'a$x^{$' (exit 3) and ESC reached the terminal and the reports."""
    pytest.importorskip("matplotlib")
    model, pruned = hostile_model(tmp_path / "m.onnx"), tmp_path / "p.onnx"
    assert main(["optimize", str(model), "-o", str(pruned), "--prune", "0.5", "--set", "prune.min_elements=1"]) == 0
    assert_no_control(capsys.readouterr().out)
    reports = [tmp_path / "r.html", tmp_path / "r.md", tmp_path / "r.json"]
    args = ["debug", str(model), str(pruned), *[a for r in reports for a in ("--report", str(r))]]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert_no_control(captured.out)
    assert_no_control(captured.err, "\n\r")
    assert "2 compressed layer(s)" in captured.out and "mm\\x1b[2Ja$x^{$" in captured.out
    page = reports[0].read_text(encoding="utf-8")
    assert_no_control(page)
    assert page.count("<figure") >= 1 and "a$x^{$" in page
    assert_no_control(reports[1].read_text(encoding="utf-8"))
    assert "\\x1b" in reports[1].read_text(encoding="utf-8")
    assert_no_control(reports[2].read_text(encoding="utf-8"))


def test_error_messages_escape_control_characters(tmp_path, capsys):
    missing = tmp_path / f"gone{OSC_TITLE}.onnx"
    assert main(["inspect", str(missing)]) == 2
    captured = capsys.readouterr()
    assert_no_control(captured.err)
    assert "gone\\x1b]0;pwned\\x07" in captured.err


def test_usage_errors_escape_control_characters(capsys):
    assert main(["optimize", "m.onnx", "-o", "o.onnx", "--samples", f"4{CLEAR}"]) == 2
    err = capsys.readouterr().err
    assert_no_control(err)
    assert "4\\x1b[2J" in err


def test_report_renderers_escape_names():
    data = {"tool_version": "0", "input": {"path": f"in{OSC_TITLE}.onnx", "size_bytes": 1, "weight_bytes": 1,
                                           "weight_bytes_by_dtype": {}},
            "output": None, "passes": [], "validation": None, "benchmark": None, "budget": None,
            "fusion": None, "bisect": None, "layers": [], "notes": [f"note {CLEAR}"]}
    markdown, page = render_markdown(data), render_html(data)
    assert_no_control(markdown)
    assert_no_control(page)
    assert "in\\x1b]0;pwned\\x07.onnx" in markdown and "note \\x1b[2J" in page


@pytest.mark.parametrize("debug", [[], ["--debug"]], ids=["plain", "debug"])
def test_internal_error_messages_and_tracebacks_are_escaped(debug, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ZeroDivisionError(f"bad {OSC_TITLE}")
    monkeypatch.setattr("optimizer.graph.inspection._walk_model", broken)
    assert main(["inspect", str(Path(__file__).resolve().parents[2] / "models" / "mlp.onnx"), *debug]) == 3
    err = capsys.readouterr().err
    assert_no_control(err)
    assert "bad \\x1b]0;pwned\\x07" in err
