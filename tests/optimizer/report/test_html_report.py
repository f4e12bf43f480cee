"""The HTML report: self-contained, the same numbers as the Markdown report, and it renders in
headless Chromium without errors (CI installs Chromium; set ONNX_COMPRESS_REQUIRE_CHROMIUM=1 to
make its absence a failure instead of a skip)."""

from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess

import pytest

from optimizer.report.report import ModelSummary, Report, write_report


def full_report() -> Report:
    report = Report(
        "0.1.0",
        ModelSummary("in.onnx", 1_000_000, {"FLOAT": 990_000, "INT64": 80}),
        ModelSummary("out.onnx", 260_123, {"INT8": 247_500, "FLOAT": 2_048, "INT64": 80}),
        passes=[{"name": "quantize", "options": {}, "modified": True, "seconds": 1.2345,
                 "report": {"counts": {"weights_quantized": 7}, "saved_bytes": 742_500,
                            "skipped": [{"node": "head<&>", "reason": "excluded by --exclude 'head*'"}]}}],
        validation={"passed": False, "samples": 4, "provider_used": "CPUExecutionProvider",
                    "provider_requested": "cuda",
                    "provider_note": "CUDA requested but not available; falling back to CPU",
                    "outputs": [{"name": "logits", "max_abs": 0.0312, "mean_abs": 0.00411, "max_rel": 0.052,
                                 "cosine": 0.99871, "sqnr_db": 31.27, "top1_agreement": 0.975, "passed": False,
                                 "failures": ["max_abs 0.0312 > 0.01"]}]},
        benchmark={"provider_requested": "cpu", "warmup": 3, "rounds": 20,
                   "models": [{"name": "input", "size_bytes": 1_000_000, "session_create_ms": 12.5, "p50_ms": 4.25,
                               "p90_ms": 4.75, "ratio_p50": 1.0},
                              {"name": "output", "size_bytes": 260_123, "session_create_ms": 15.5, "p50_ms": 2.125,
                               "p90_ms": 2.5, "ratio_p50": 0.5}]},
        layers=[{"node": "fc1", "op": "MatMul", "bits": 8, "output_sqnr_db": 28.5, "status": "int8"},
                {"node": "fc2", "op": "MatMul", "bits": 32, "output_sqnr_db": 41.25, "status": "float (fell back)"}],
        budget={"metric": "cosine", "baseline": 1.0, "max_drop": 0.005, "met": True,
                "steps": [{"step": 0, "action": "all int8", "value": 0.9931, "drop": 0.0069, "met": False},
                          {"step": 1, "action": "fc1 -> float", "value": 0.9962, "drop": 0.0038, "met": True}]},
        fusion={"provider_used": "CPUExecutionProvider", "quantized_groups_written": 7,
                "integer_kernels": {"MatMulNBits": 6},
                "warnings": ["1 Gather(s) dequantize the whole table on every run"]},
        notes=["a note"],
    )
    return report


class _Collector(html.parser.HTMLParser):
    VOID = frozenset({"meta", "br", "img", "hr", "link", "input", "path", "use", "rect", "line", "circle", "polyline"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> _Collector:
    collector = _Collector()
    collector.feed(text)
    collector.close()
    return collector


def table_cells(markdown: str) -> list[str]:
    cells = []
    for line in markdown.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            cells += [
                c.strip() for c in line.strip("|").split("|") if re.fullmatch(r"-?[\d,]+(\.\d+)?(e[-+]\d+)?", c.strip())
            ]
    return cells


def test_html_is_self_contained_balanced_and_escaped():
    page = full_report().to_html()
    parsed = parse(page)
    assert parsed.errors == [] and parsed.stack == []
    assert not re.search(r'(?:src|href)="(?!#)', page), "only in-page references allowed"
    assert "<script" not in page
    assert "head&lt;&amp;&gt;" in page and "head<&>" not in page
    assert page.count("<svg") >= 3, "size, per-layer and latency plots"


def test_markdown_and_html_show_the_same_numbers():
    report = full_report()
    markdown, page = report.to_markdown(), report.to_html()
    text = " ".join(parse(page).text)
    cells = table_cells(markdown)
    assert len(cells) > 30
    for cell in cells:
        assert cell in text, f"{cell} is in the Markdown tables but not in the HTML"
    for section in ("Size", "Passes", "Per layer", "Accuracy budget", "Validation", "What onnxruntime runs", "Latency"):
        assert f"## {section}" in markdown and f"<h2>{section}</h2>" in page


def test_write_html_by_suffix(tmp_path):
    path = write_report(full_report(), tmp_path / "report.html")
    assert path.read_text().startswith("<!DOCTYPE html>")


def chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None and os.environ.get("ONNX_COMPRESS_REQUIRE_CHROMIUM") == "1":
        pytest.fail("Chromium is required here (ONNX_COMPRESS_REQUIRE_CHROMIUM=1) but not installed")
    return found


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0"]


def test_html_renders_in_headless_chromium(tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium not installed")
    page = write_report(full_report(), tmp_path / "report.html")
    profile = tmp_path / "profile"
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<h2>Accuracy budget</h2>" in dom.stdout and dom.stdout.count("<svg") >= 3
    assert "Uncaught" not in dom.stderr and "SyntaxError" not in dom.stderr
    shot = tmp_path / "report.png"
    result = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_budget_plot_steps_are_whole_numbers():
    pytest.importorskip("matplotlib")
    figures = full_report().to_html().split("<svg")
    budget = next(figure for figure in figures if "Metric after each step" in figure)
    ticks = re.findall(r'<g id="xtick_\d+">.*?>([^<>]*)</text>', budget, re.S)
    assert ticks and all(re.fullmatch(r"-?\d+", tick) for tick in ticks), ticks
