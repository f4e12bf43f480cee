"""One report object for a run: passes, sizes by dtype before and after, validation, benchmark.

Written as JSON for scripts and as Markdown for people; both come from ``to_dict`` so they
always show the same numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer.errors import OnnxCompressError, OptionError
from optimizer.fileio.output_files import check_apart, folder_files, temp_file
from optimizer.report.html_page import (
    AUTO_COLUMNS,
    DECODING_COLUMNS,
    DECODING_TEXT,
    RANKING_COLUMNS,
    RANKING_TEXT,
    bits_text,
    format_number,
    generation_text,
    kind_text,
    layer_columns,
    output_label,
    render_html,
    sample_kind,
    timing_rounds_text,
)
from optimizer.text import escape_control

REPORT_FORMATS = {".json": "json", ".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html"}


@dataclass
class ModelSummary:
    """Where a model is and how big it is: on disk, and its stored weights by dtype."""

    path: str | None
    size_bytes: int
    weight_bytes_by_dtype: dict[str, int]

    @property
    def weight_bytes(self) -> int:
        return sum(self.weight_bytes_by_dtype.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size_bytes": self.size_bytes,
            "weight_bytes": self.weight_bytes,
            "weight_bytes_by_dtype": dict(sorted(self.weight_bytes_by_dtype.items())),
        }


@dataclass
class Report:
    tool_version: str
    input: ModelSummary
    output: ModelSummary | None = None
    passes: list[dict[str, Any]] = field(default_factory=list)
    validation: dict[str, Any] | None = None
    benchmark: dict[str, Any] | None = None
    layers: list[dict[str, Any]] | None = None
    budget: dict[str, Any] | None = None
    bits: dict[str, Any] | None = None
    fusion: dict[str, Any] | None = None
    bisect: dict[str, Any] | None = None
    auto: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "onnx-compress",
            "tool_version": self.tool_version,
            "input": self.input.to_dict(),
            "output": self.output.to_dict() if self.output else None,
            "passes": self.passes,
            "validation": self.validation,
            "benchmark": self.benchmark,
            "layers": self.layers,
            "budget": self.budget,
            "bits": self.bits,
            "fusion": self.fusion,
            "bisect": self.bisect,
            "auto": self.auto,
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=False) + "\n"

    def to_markdown(self) -> str:
        return render_markdown(self.to_dict())

    def to_html(self) -> str:
        return render_html(self.to_dict())


def render_markdown(data: dict[str, Any]) -> str:
    """Markdown for a report dict (the same dict ``to_json`` writes)."""
    lines = [f"# onnx-compress report (version {data['tool_version']})", ""]
    lines += _size_section(data["input"], data["output"])
    lines += _passes_section(data["passes"])
    if data.get("auto"):
        lines += _auto_section(data["auto"])
    if data.get("layers"):
        lines += _layers_section(data["layers"])
    if data.get("budget"):
        lines += _budget_section(data["budget"])
    if data.get("bits"):
        lines += _heading("Bits budget", bits_text(data["bits"]))
    if data["validation"]:
        lines += _validation_section(data["validation"])
    if data.get("fusion"):
        lines += _fusion_section(data["fusion"])
    if data["benchmark"]:
        lines += _benchmark_section(data["benchmark"])
    if data.get("bisect"):
        found = data["bisect"]
        lines += [
            "## Bisect",
            "",
            f"first bad pass: {found.get('first_bad_pass')} (#{found.get('index')}): {found.get('reason')}",
            "",
        ]
    if data["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in data["notes"]] + [""]
    return escape_control("\n".join(lines), keep_layout=True)


def _size_section(before: dict[str, Any], after: dict[str, Any] | None) -> list[str]:
    lines = ["## Size", "", f"- input: `{before['path']}`"]
    if after:
        lines.append(f"- output: `{after['path']}`" if after["path"] else f"- output: {output_label(after)}")
    lines += ["", "| | before | after | change |", "|---|---:|---:|---:|"]
    rows = [
        ("file (bytes)", before["size_bytes"], after["size_bytes"] if after else None),
        ("weights (bytes)", before["weight_bytes"], after["weight_bytes"] if after else None),
    ]
    dtypes = sorted(set(before["weight_bytes_by_dtype"]) | set((after or {}).get("weight_bytes_by_dtype", {})))
    for dtype in dtypes:
        rows.append(
            (
                f"{dtype} weights",
                before["weight_bytes_by_dtype"].get(dtype, 0),
                after["weight_bytes_by_dtype"].get(dtype, 0) if after else None,
            )
        )
    for label, old, new in rows:
        lines.append(f"| {label} | {old:,} | {_num(new)} | {_ratio(old, new)} |")
    return [*lines, ""]


def _passes_section(passes: list[dict[str, Any]]) -> list[str]:
    lines = ["## Passes", ""]
    if not passes:
        return [*lines, "No pass ran.", ""]
    lines += ["| pass | modified | counts | saved bytes | skipped | seconds |", "|---|---|---|---:|---:|---:|"]
    for run in passes:
        report = run["report"]
        counts = ", ".join(f"{k}={v}" for k, v in report.get("counts", {}).items()) or "-"
        lines.append(
            f"| {run['name']} | {'yes' if run['modified'] else 'no'} | {counts} | "
            f"{report.get('saved_bytes', 0):,} | {len(report.get('skipped', []))} | {_num(run['seconds'])} |"
        )
    skips = [(run["name"], skip) for run in passes for skip in run["report"].get("skipped", [])]
    if skips:
        lines += ["", "Skipped:", ""]
        for name, skip in skips:
            what = ", ".join(f"{k} `{v}`" for k, v in skip.items() if k != "reason")
            lines.append(f"- {name}: {what}: {skip['reason']}")
    return [*lines, ""]


def _auto_section(auto: dict[str, Any]) -> list[str]:
    """The candidates an 'auto' option was chosen from: size, latency against the input, verdict."""
    lines = _heading(
        f"{auto.get('pass_name')} {auto.get('option')} auto: {auto.get('chosen_name') or auto.get('chosen')}",
        f"{auto.get('why')}. Checked on {auto.get('evaluated_on') or '-'}; built and checked in "
        f"{auto.get('trials_on') or 'this process'}, then timed here alone (no trial running)"
        f"{timing_rounds_text(auto)}; "
        f"latency_ratio is the median paired ratio to the input, noise floor {_num(auto.get('noise_floor'))}.",
    )
    candidates = auto.get("candidates") or []
    lines += ["", *(_table(list(AUTO_COLUMNS), candidates) if candidates else [])]
    ranking = auto.get("ranking") or []
    if ranking:
        lines += ["", f"{RANKING_TEXT}:", "", *_table(list(RANKING_COLUMNS), ranking)]
    return [*lines, ""]


def _layers_section(layers: list[dict[str, Any]]) -> list[str]:
    keys = layer_columns(layers)
    return ["## Per layer", "", *_table(keys, layers), ""]


def _budget_section(budget: dict[str, Any]) -> list[str]:
    lines = [
        *_heading(
            "Accuracy budget",
            f"metric **{budget.get('metric')}**, baseline {_num(budget.get('baseline'))}, "
            f"allowed drop {_num(budget.get('max_drop'))}: {'met' if budget.get('met') else 'not met'}",
        ),
        "",
    ]
    steps = budget.get("steps", [])
    keys = [
        k
        for k in ("step", "action", "float_layers", "weight_only_layers", "value", "drop", "met")
        if any(k in s for s in steps)
    ]
    if steps:
        lines += _table(keys, steps)
    return [*lines, ""]


def _fusion_section(fusion: dict[str, Any]) -> list[str]:
    kernels = ", ".join(f"{op} x{n}" for op, n in fusion.get("integer_kernels", {}).items()) or "none"
    lines = _heading(
        "What onnxruntime runs",
        f"{fusion.get('quantized_groups_written')} quantized group(s) written; integer kernels: {kernels} "
        f"({fusion.get('provider_used')}).",
    )
    lines += [f"- warning: {w}" for w in fusion.get("warnings", [])]
    return [*lines, ""]


def _validation_section(validation: dict[str, Any]) -> list[str]:
    verdict = "PASS" if validation.get("passed") else "FAIL"
    lines = _heading(
        "Validation",
        f"{verdict} on {validation.get('samples')} {sample_kind(validation)}, provider "
        f"{validation.get('provider_used')} (requested {validation.get('provider_requested')}).",
    )
    if validation.get("provider_note"):
        lines.append(f"Note: {validation['provider_note']}")
    lines += [
        "",
        "| output | kind | max abs | mean abs | max rel | cosine | SQNR dB | top-1 | kind metrics | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for out in validation.get("outputs", []):
        verdict = "pass" if out.get("passed") else "FAIL: " + "; ".join(out.get("failures", []))
        lines.append(
            f"| {out['name']} | {out.get('kind', '-')} | {_num(out.get('max_abs'))} | {_num(out.get('mean_abs'))} | "
            f"{_num(out.get('max_rel'))} | {_num(out.get('cosine'))} | {_num(out.get('sqnr_db'))} | "
            f"{_num(out.get('top1_agreement'))} | {kind_text(out)} | {verdict} |"
        )
    generation = generation_text(validation)
    return [*lines, *(["", f"{generation}."] if generation else []), ""]


def _benchmark_section(benchmark: dict[str, Any]) -> list[str]:
    lines = _heading(
        "Latency",
        f"Provider {benchmark.get('provider_requested')}, warm-up "
        f"{benchmark.get('warmup')}, {benchmark.get('rounds')} interleaved rounds.",
    )
    lines += ["", "| model | size bytes | session ms | p50 ms | p90 ms | ratio p50 |", "|---|---:|---:|---:|---:|---:|"]
    for row in benchmark.get("models", []):
        lines.append(
            f"| {row['name']} | {row['size_bytes']:,} | {_num(row['session_create_ms'])} | "
            f"{_num(row['p50_ms'])} | {_num(row['p90_ms'])} | {_num(row['ratio_p50'])} |"
        )
    decoding = benchmark.get("decoding") or []
    if decoding:
        lines += ["", f"{DECODING_TEXT}:", "", *_table(list(DECODING_COLUMNS), decoding)]
    if benchmark.get("decoding_note"):
        lines += ["", f"Generation not timed: {benchmark['decoding_note']}"]
    return [*lines, ""]


def _heading(title: str, text: str) -> list[str]:
    """A section's first lines: its title and one line of text."""
    return [f"## {title}", "", text]


def _table(keys: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """A Markdown table: one column per key, one line per row (missing values as '-')."""
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(_num(row.get(k)) for k in keys) + " |" for row in rows]


def _num(value: Any) -> str:
    return format_number(value)


def _ratio(old: int, new: int | None) -> str:
    if new is None:
        return "-"
    if old == 0:
        return "-" if new == 0 else "new"
    return f"{(new - old) / old * 100:+.1f}%"


def check_report_path(path: str | os.PathLike, formats: Mapping[str, str] = REPORT_FORMATS) -> Path:
    """Refuse, before any work, a report path with an unknown suffix, a missing folder, or a
    folder or other non-file in the way (so writing it at the end cannot fail for those)."""
    target = Path(path)
    if target.suffix.lower() not in formats:
        raise OptionError(f"report '{target}': unknown format; use one of {', '.join(sorted(formats))}")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxCompressError(f"report '{target}': folder '{folder}' does not exist")
    if target.exists() and not target.is_file():
        raise OnnxCompressError(f"report '{target}': exists and is not a regular file")
    return target


def check_writes_apart(
    written: Sequence[str | os.PathLike],
    reports: Sequence[str | os.PathLike],
    read: Sequence[str | os.PathLike],
    formats: Mapping[str, str] = REPORT_FORMATS,
) -> None:
    """Before any work: report formats and folders, and no file written (``written``, which
    includes ``reports``) aliasing a file read or another file written (optimizer.fileio.output_files)."""
    for path in reports:
        check_report_path(path, formats)
    check_apart(written, read, "a file this run reads")
    for index, path in enumerate(written):
        check_apart([path], written[index + 1 :], "another file this run writes")


def check_reports_apart(
    reports: Sequence[str | os.PathLike],
    model_files: Sequence[str | os.PathLike],
    data: str | os.PathLike | None,
    formats: Mapping[str, str] = REPORT_FORMATS,
) -> None:
    """``debug``/``sensitivity``: their reports must not alias the models or data they read."""
    check_writes_apart(reports, reports, [*model_files, *folder_files(data)], formats)


def write_report(report: Report, path: str | os.PathLike) -> Path:
    """Write ``report`` as JSON or Markdown by the file's suffix, atomically."""
    target = check_report_path(path)
    kind = REPORT_FORMATS[target.suffix.lower()]
    text = {"json": report.to_json, "markdown": report.to_markdown, "html": report.to_html}[kind]()
    write_text_atomic(target, text)
    return target


def write_text_atomic(target: Path, text: str) -> None:
    """Write a text file via a temporary file in the same folder; nothing partial on failure.

    The temporary name carries our process id and start time (see optimizer.fileio.output_files)."""
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxCompressError(f"report '{target}': folder '{folder}' does not exist")
    try:
        descriptor, temporary = temp_file(folder, target.name)
    except OSError as error:
        raise OnnxCompressError(f"report '{target}': cannot write: {error.strerror or error}") from error
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise OnnxCompressError(f"report '{target}': cannot write: {error.strerror or error}") from error
