"""The terminal text of ``onnx-compress inspect``: one section per question a user asks about size."""

from __future__ import annotations

from optimizer.graph.inspect_values import non_finite_lines
from optimizer.graph.inspection import ModelInspection, human_bytes


def inspection_text(report: ModelInspection) -> str:
    """The whole report, as printed by ``onnx-compress inspect``."""
    return "\n".join(_text_report(report)) + "\n"


def _table(rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> list[str]:
    """Rows padded to column width, indented; columns listed in ``right`` align right."""
    if not rows:
        return ["  (none)"]
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[col]) if col in right else cell.ljust(widths[col]) for col, cell in enumerate(row)]
        lines.append(("  " + "  ".join(cells)).rstrip())
    return lines


def _share_rows(totals: dict[str, int], whole: int) -> list[tuple[str, ...]]:
    ordered = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
    return [(name, human_bytes(size), f"{100.0 * size / whole:.1f}%" if whole else "-") for name, size in ordered]


def _header_lines(report: ModelInspection) -> list[str]:
    where = report.path or "(in memory)"
    if report.file_size_bytes is not None:
        where += f"  ({human_bytes(report.file_size_bytes)} on disk)"
    opsets = ", ".join(f"{domain} {version}" for domain, version in report.opsets.items())
    return [
        f"Model: {where}",
        f"IR version {report.ir_version}; producer: {report.producer or '-'}; opsets: {opsets}",
    ]


def _tensor_rows(report: ModelInspection) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("name", "dtype", "shape", "size", "source", "graph", "consumers")]
    for info in report.largest_tensors:
        shape = "[" + ",".join(str(d) for d in info.shape) + "]"
        rows.append(
            (
                info.name,
                info.dtype,
                shape,
                human_bytes(info.size_bytes),
                info.source,
                info.graph,
                str(info.consumers),
            )
        )
    return rows


def _text_report(report: ModelInspection) -> list[str]:
    wasted = sum(group.wasted_bytes for group in report.duplicates)
    total_nodes = sum(report.nodes_by_op.values())
    lines = _header_lines(report)
    lines += ["", "Inputs", *_table([(text,) for text in report.inputs])]
    lines += ["", "Outputs", *_table([(text,) for text in report.outputs])]
    lines += ["", f"Nodes by op ({total_nodes} total, all graphs)"]
    lines += _table([(op, str(n)) for op, n in report.nodes_by_op.items()], right=(1,))
    lines += [
        "",
        f"Weights: {human_bytes(report.weight_bytes_total)} ({report.weight_bytes_total} bytes); "
        f"{report.constant_node_weights} in Constant nodes "
        f"({human_bytes(report.constant_node_weight_bytes)})",
    ]
    whole = report.weight_bytes_total
    lines += ["", "Weights by dtype"]
    lines += _table(_share_rows(report.weight_bytes_by_dtype, whole), right=(1, 2))
    lines += ["", "Weights by consuming op (first consumer)"]
    lines += _table(_share_rows(report.weight_bytes_by_op, whole), right=(1, 2))
    lines += ["", "Subgraphs", *_table([(text,) for text in report.subgraphs])]
    lines += ["", f"Largest tensors (top {len(report.largest_tensors)})"]
    lines += _table(_tensor_rows(report), right=(3, 6)) if report.largest_tensors else ["  (none)"]
    lines += ["", f"Duplicates ({human_bytes(wasted)} could be saved)"]
    lines += _table(
        [(g.kind, human_bytes(g.wasted_bytes), ", ".join(g.tensors)) for g in report.duplicates],
        right=(1,),
    )
    lines += ["", "Metadata keys", *_table([(key,) for key in report.metadata_keys])]
    lines += ["", "Non-finite weights (NaN/Inf)", *_table(non_finite_lines(report.non_finite), right=(1, 2, 3, 4))]
    return lines
