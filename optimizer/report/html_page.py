"""Self-contained HTML for a report dict: tables plus inline SVG plots, no external files.

It renders the same dict that the JSON and Markdown reports come from, so the three show the
same numbers. Plots need matplotlib (the ``report`` extra); without it the tables are complete
and a note says the plots were left out.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from typing import Any

from optimizer.text import plot_text, printable

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#1b1b1b;line-height:1.4;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d0d0d0;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,td.t{text-align:left}
.pass{color:#176b28;font-weight:600}.fail{color:#b00020;font-weight:600}
.note{color:#555;font-style:italic}figure{margin:.8em 0}svg{max-width:100%;height:auto}
"""


LAYER_COLUMNS = (
    "node",
    "op",
    "kind",
    "bits",
    "sparsity",
    "weight_sqnr_db",
    "output_sqnr_db",
    "output_cosine",
    "status",
    "reason",
)


def render_html(data: dict[str, Any]) -> str:
    """The whole page for a report dict (``Report.to_dict()``)."""
    plots = _Plots()
    parts = [f"<h1>onnx-compress report <small>version {_e(data['tool_version'])}</small></h1>"]
    parts += _size_section(data, plots)
    parts += _passes_section(data.get("passes", []))
    if data.get("auto"):
        parts += _auto_section(data["auto"])
    if data.get("layers"):
        parts += _layers_section(data["layers"], plots)
    if data.get("budget"):
        parts += _budget_section(data["budget"], plots)
    if data.get("bits"):
        parts += ["<h2>Bits budget</h2>", f"<p>{_e(bits_text(data['bits']))}</p>"]
    if data.get("validation"):
        parts += _validation_section(data["validation"])
    if data.get("fusion"):
        parts += _fusion_section(data["fusion"])
    if data.get("benchmark"):
        parts += _benchmark_section(data["benchmark"], plots)
    if data.get("bisect"):
        found = data["bisect"]
        parts += [
            "<h2>Bisect</h2>",
            f"<p>first bad pass: {_e(found.get('first_bad_pass'))} "
            f"(#{_e(found.get('index'))}): {_e(found.get('reason'))}</p>",
        ]
    notes = list(data.get("notes", [])) + plots.notes
    if notes:
        parts += ["<h2>Notes</h2>", "<ul>"] + [f"<li>{_e(note)}</li>" for note in notes] + ["</ul>"]
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>onnx-compress report</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def output_label(after: dict[str, Any]) -> str:
    """The output's path, or why there is none (a failed validation keeps the file unwritten)."""
    return str(after["path"]) if after.get("path") else "not written (see the notes)"


def _size_section(data: dict[str, Any], plots: _Plots) -> list[str]:
    before, after = data["input"], data.get("output")
    rows = [
        ["file (bytes)", before["size_bytes"], after["size_bytes"] if after else None],
        ["weights (bytes)", before["weight_bytes"], after["weight_bytes"] if after else None],
    ]
    dtypes = sorted(set(before["weight_bytes_by_dtype"]) | set((after or {}).get("weight_bytes_by_dtype", {})))
    for dtype in dtypes:
        rows.append(
            [
                f"{dtype} weights",
                before["weight_bytes_by_dtype"].get(dtype, 0),
                (after or {}).get("weight_bytes_by_dtype", {}).get(dtype, 0) if after else None,
            ]
        )
    out = [
        "<h2>Size</h2>",
        f"<p>input: <code>{_e(before['path'])}</code>"
        + (f"<br>output: {_e(output_label(after))}" if after and not after["path"] else "")
        + (f"<br>output: <code>{_e(after['path'])}</code>" if after and after["path"] else "")
        + "</p>",
        _table(["", "before", "after"], rows),
    ]
    if after and dtypes:
        out.append(
            plots.bars(
                "Weight bytes by dtype",
                dtypes,
                {
                    "before": [before["weight_bytes_by_dtype"].get(d, 0) for d in dtypes],
                    "after": [after["weight_bytes_by_dtype"].get(d, 0) for d in dtypes],
                },
                "bytes",
            )
        )
    return out


def _passes_section(passes: list[dict[str, Any]]) -> list[str]:
    out = ["<h2>Passes</h2>"]
    if not passes:
        return [*out, "<p>No pass ran.</p>"]
    rows = []
    for run in passes:
        report = run["report"]
        counts = ", ".join(f"{k}={v}" for k, v in report.get("counts", {}).items()) or "-"
        rows.append(
            [
                run["name"],
                "yes" if run["modified"] else "no",
                counts,
                report.get("saved_bytes", 0),
                len(report.get("skipped", [])),
                run["seconds"],
            ]
        )
    out.append(_table(["pass", "modified", "counts", "saved bytes", "skipped", "seconds"], rows))
    skips = [(run["name"], skip) for run in passes for skip in run["report"].get("skipped", [])]
    if skips:
        out.append("<details><summary>Skipped, with reasons</summary><ul>")
        for name, skip in skips:
            what = ", ".join(f"{k} {v}" for k, v in skip.items() if k != "reason")
            out.append(f"<li>{_e(name)}: {_e(what)}: {_e(skip['reason'])}</li>")
        out.append("</ul></details>")
    return out


def _layers_section(layers: list[dict[str, Any]], plots: _Plots) -> list[str]:
    keys = layer_columns(layers)
    out = ["<h2>Per layer</h2>", _table(keys, [[layer.get(k) for k in keys] for layer in layers])]
    sqnr = [
        (layer["node"], layer["output_sqnr_db"])
        for layer in layers
        if isinstance(layer.get("output_sqnr_db"), (int, float))
    ]
    if sqnr:
        out.append(
            plots.bars(
                "Output SQNR per layer (dB, worst first)",
                [n for n, _ in sqnr],
                {"SQNR dB": [v for _, v in sqnr]},
                "dB",
                horizontal=True,
            )
        )
    return out


def layer_columns(layers: list[dict[str, Any]]) -> list[str]:
    """The per-layer columns that some row fills, in a fixed order (Markdown and HTML alike)."""
    return [key for key in LAYER_COLUMNS if any(key in layer for layer in layers)]


RANKING_COLUMNS = ("node", "position")
RANKING_TEXT = (
    "Groups backed off to weight-only int8 in the last static build tried, first layers first "
    "(position among the static groups)"
)
AUTO_COLUMNS = ("name", "size_bytes", "latency_ratio", "passed", "verdict", "tool_seconds", "same_as", "error")


def timing_rounds_text(auto: dict[str, Any]) -> str:
    """ ", over N rounds" when the report says how many rounds the candidates were timed over."""
    rounds = auto.get("timing_rounds")
    return f", over {rounds} rounds" if rounds else ""


def _auto_section(auto: dict[str, Any]) -> list[str]:
    candidates = auto.get("candidates") or []
    chosen = auto.get("chosen_name") or auto.get("chosen")
    out = [
        f"<h2>{_e(auto.get('pass_name'))} {_e(auto.get('option'))} auto: {_e(chosen)}</h2>",
        f"<p>{_e(auto.get('why'))}. Checked on {_e(auto.get('evaluated_on') or '-')}; built and checked in "
        f"{_e(auto.get('trials_on') or 'this process')}, then timed here alone (no trial running)"
        f"{_e(timing_rounds_text(auto))}; "
        f"latency_ratio is the median paired ratio to the input, noise floor {_num(auto.get('noise_floor'))}.</p>",
    ]
    if candidates:
        out.append(_table(AUTO_COLUMNS, [[c.get(k) for k in AUTO_COLUMNS] for c in candidates]))
    ranking = auto.get("ranking") or []
    if ranking:
        out.append(f"<p>{_e(RANKING_TEXT)}</p>")
        out.append(_table(RANKING_COLUMNS, [[row.get(k) for k in RANKING_COLUMNS] for row in ranking]))
    return out


def bits_text(bits: dict[str, Any]) -> str:
    """One paragraph: the budget, what every layer as requested took, what the chosen mix takes."""
    base, final = bits.get("base", {}), bits.get("final", {})
    return (
        f"{final.get('bits_per_weight')} bits per weight ({'within' if bits.get('met') else 'OVER'} "
        f"{bits.get('bits_per_weight_budget')}; {final.get('bits_per_parameter')} per parameter, the "
        f"left-alone tensors included), {bits.get('metric')} {format_number(final.get('value'))} on the "
        f"calibration data; every layer as requested: {base.get('bits_per_weight')} bits per weight, "
        f"{bits.get('metric')} {format_number(base.get('value'))} (nearest rounding, block_size "
        f"{bits.get('block_size')}); finer blocks: {len(bits.get('finer', []))} layer(s), next-best "
        f"format: {len(bits.get('next_best', []))}"
        + (f"; the tied table's most-used {bits['rows']:g} of rows in the next-best format" if bits.get("rows") else "")
        + f"; {bits.get('trials')} trials"
    )


def _budget_section(budget: dict[str, Any], plots: _Plots) -> list[str]:
    steps = budget.get("steps", [])
    out = [
        "<h2>Accuracy budget</h2>",
        f"<p>metric <b>{_e(budget.get('metric'))}</b>, baseline {_num(budget.get('baseline'))}, "
        f"allowed drop {_num(budget.get('max_drop'))}: "
        + ("<span class='pass'>met</span>" if budget.get("met") else "<span class='fail'>not met</span>")
        + "</p>",
    ]
    if steps:
        keys = [
            k
            for k in ("step", "action", "float_layers", "weight_only_layers", "value", "drop", "met")
            if any(k in s for s in steps)
        ]
        out.append(_table(keys, [[s.get(k) for k in keys] for s in steps]))
        values = [s.get("value") for s in steps if isinstance(s.get("value"), (int, float))]
        if values:
            out.append(
                plots.line("Metric after each step", list(range(len(values))), values, "step", "metric", integer_x=True)
            )
    return out


def kind_text(output: dict[str, Any]) -> str:
    """The output's kind metrics, each with its worst sample: "f1 0.92 (worst 0.57), ..."."""
    values = output.get("kind_metrics") or {}
    parts = []
    for metric, value in values.items():
        if metric.endswith("_worst_sample") or not isinstance(value, (int, float)):
            continue
        worst = values.get(f"{metric}_worst_sample")
        parts.append(f"{metric} {value:.4g}" + (f" (worst {worst:.4g})" if isinstance(worst, (int, float)) else ""))
    return ", ".join(parts) or "-"


DECODING_COLUMNS = (
    "name",
    "prompt_tokens",
    "new_tokens",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "prefill_ratio",
    "decode_ratio",
    "decode_halfwidth",
)
DECODING_TEXT = (
    "Generating (a KV-cache decoder): a prefill of the prompt, then one token at a time; ratios of time to "
    "the first model"
)


def generation_text(validation: dict[str, Any]) -> str | None:
    """The greedy-generation sentence of a decoder's validation (the words the summary prints)."""
    found = validation.get("generation") or {}
    return found.get("summary") or None


def sample_kind(validation: dict[str, Any]) -> str:
    """'samples', or what generated samples are worth as evidence."""
    if validation.get("random_feeds"):
        return "random samples (not evidence of accuracy; give real inputs with --data DIR)"
    return "samples"


def _validation_section(validation: dict[str, Any]) -> list[str]:
    verdict = "<span class='pass'>PASS</span>" if validation.get("passed") else "<span class='fail'>FAIL</span>"
    out = [
        "<h2>Validation</h2>",
        f"<p>{verdict} on {_e(validation.get('samples'))} {_e(sample_kind(validation))}, "
        f"provider {_e(validation.get('provider_used'))} (requested {_e(validation.get('provider_requested'))}).</p>",
    ]
    if validation.get("provider_note"):
        out.append(f"<p class='note'>{_e(validation['provider_note'])}</p>")
    rows = [
        [
            o["name"],
            o.get("kind", "-"),
            o.get("max_abs"),
            o.get("mean_abs"),
            o.get("max_rel"),
            o.get("cosine"),
            o.get("sqnr_db"),
            o.get("top1_agreement"),
            kind_text(o),
            "pass" if o.get("passed") else "FAIL: " + "; ".join(o.get("failures", [])),
        ]
        for o in validation.get("outputs", [])
    ]
    header = [
        "output",
        "kind",
        "max abs",
        "mean abs",
        "max rel",
        "cosine",
        "SQNR dB",
        "top-1",
        "kind metrics",
        "verdict",
    ]
    out.append(_table(header, rows))
    generation = generation_text(validation)
    if generation:
        out.append(f"<p>{_e(generation)}.</p>")
    return out


def _fusion_section(fusion: dict[str, Any]) -> list[str]:
    kernels = ", ".join(f"{op} x{n}" for op, n in fusion.get("integer_kernels", {}).items()) or "none"
    out = [
        "<h2>What onnxruntime runs</h2>",
        f"<p>{_e(fusion.get('quantized_groups_written'))} quantized group(s) written; integer kernels: "
        f"{_e(kernels)} ({_e(fusion.get('provider_used'))}).</p>",
    ]
    out += [f"<p class='fail'>warning: {_e(w)}</p>" for w in fusion.get("warnings", [])]
    return out


def _benchmark_section(benchmark: dict[str, Any], plots: _Plots) -> list[str]:
    rows = [
        [m["name"], m["size_bytes"], m["session_create_ms"], m["p50_ms"], m["p90_ms"], m["ratio_p50"]]
        for m in benchmark.get("models", [])
    ]
    out = [
        "<h2>Latency</h2>",
        f"<p>provider {_e(benchmark.get('provider_requested'))}, warm-up {_e(benchmark.get('warmup'))}, "
        f"{_e(benchmark.get('rounds'))} interleaved rounds.</p>",
        _table(["model", "size bytes", "session ms", "p50 ms", "p90 ms", "ratio p50"], rows),
    ]
    if rows:
        out.append(
            plots.bars(
                "Latency (ms)", [r[0] for r in rows], {"p50": [r[3] for r in rows], "p90": [r[4] for r in rows]}, "ms"
            )
        )
    decoding = benchmark.get("decoding") or []
    if decoding:
        out.append(f"<p>{_e(DECODING_TEXT)}.</p>")
        out.append(_table(DECODING_COLUMNS, [[row.get(key) for key in DECODING_COLUMNS] for row in decoding]))
    if benchmark.get("decoding_note"):
        out.append(f"<p class='note'>Generation not timed: {_e(benchmark['decoding_note'])}</p>")
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"<td>{_num(value)}</td>" if numeric or value is None else f"<td class='t'>{_num(value)}</td>"


def format_number(value: Any) -> str:
    """One number format for the Markdown and HTML reports: thousands separators, 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _num(value: Any) -> str:
    return _e(format_number(value))


def _e(value: Any) -> str:
    return html.escape(printable(value), quote=True)


class _Plots:
    """Inline SVG figures from matplotlib, or a note when it is not installed."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self._pyplot: Any = None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as pyplot

            pyplot.rcParams["svg.fonttype"] = "none"
            pyplot.rcParams["svg.hashsalt"] = "onnx-compress"
            self._pyplot = pyplot
        except ImportError:
            self._pyplot = None
            self.notes.append("plots left out: matplotlib is not installed (pip install 'onnx-compress[report]')")

    def bars(
        self, title: str, labels: Sequence[str], series: dict[str, Sequence[float]], unit: str, horizontal: bool = False
    ) -> str:
        if self._pyplot is None:
            return ""
        figure, axes = self._pyplot.subplots(figsize=(8, max(2.5, 0.28 * len(labels)) if horizontal else 3.2))
        labels, unit = [plot_text(label) for label in labels], plot_text(unit)
        width = 0.8 / max(1, len(series))
        for index, (name, values) in enumerate(series.items()):
            positions = [i + index * width for i in range(len(labels))]
            (axes.barh if horizontal else axes.bar)(positions, values, width, label=plot_text(name))
        ticks = [i + width * (len(series) - 1) / 2 for i in range(len(labels))]
        if horizontal:
            axes.set_yticks(ticks, labels, fontsize=7)
            axes.invert_yaxis()
            axes.set_xlabel(unit)
        else:
            axes.set_xticks(ticks, labels, rotation=30, ha="right", fontsize=8)
            axes.set_ylabel(unit)
        if len(series) > 1:
            axes.legend()
        return self._finish(figure, axes, title)

    def line(
        self, title: str, xs: Sequence[float], ys: Sequence[float], x_label: str, y_label: str, integer_x: bool = False
    ) -> str:
        """A line plot; ``integer_x``: ticks only at whole numbers (steps, counts)."""
        if self._pyplot is None:
            return ""
        figure, axes = self._pyplot.subplots(figsize=(7, 3))
        axes.plot(xs, ys, marker="o")
        if integer_x:
            axes.xaxis.set_major_locator(self._pyplot.MaxNLocator(integer=True))
        axes.set_xlabel(plot_text(x_label))
        axes.set_ylabel(plot_text(y_label))
        return self._finish(figure, axes, title)

    def _finish(self, figure, axes, title: str) -> str:
        axes.set_title(plot_text(title))
        figure.tight_layout()
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
        self._pyplot.close(figure)
        svg = buffer.getvalue()
        return f"<figure role='img' aria-label='{_e(title)}'>{svg[svg.index('<svg') :]}</figure>"
