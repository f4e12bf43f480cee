"""The rows of a comparison's summary table, one per output."""

from __future__ import annotations

from typing import TYPE_CHECKING

from optimizer.verify.output_kinds import KIND_LIMITS

if TYPE_CHECKING:
    from optimizer.verify.validate import OutputMetrics


def summary_row(metrics: OutputMetrics) -> tuple[str, ...]:
    top1 = "-" if metrics.top1_agreement is None else f"{metrics.top1_agreement:.4f}"
    verdict = "exact" if metrics.exact else ("ok" if metrics.passed else "FAIL")
    return (
        metrics.name,
        metrics.kind,
        short_number(metrics.max_abs),
        f"{metrics.cosine:.6f}",
        f"{metrics.worst_sample_cosine:.4f}",
        f"{metrics.sqnr_db:.1f}",
        top1,
        _kind_cell(metrics.kind, metrics.kind_metrics),
        verdict,
    )


def _kind_cell(kind: str, values: dict[str, float | None]) -> str:
    """The first deciding metric of the output's kind and its worst sample, e.g. "f1 0.92 (worst 0.57)"."""
    for metric in (*KIND_LIMITS.get(kind, {}), "row_cosine"):
        value = values.get(metric)
        if value is not None:
            worst = values.get(f"{metric}_worst_sample")
            return f"{metric} {value:.4g}" + (f" (worst {worst:.4g})" if worst is not None else "")
    return "-"


def short_number(value: float) -> str:
    """Three significant digits: the numbers of the summary and of failure messages."""
    return f"{value:.3g}"
