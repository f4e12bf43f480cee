"""A tied embedding and LM head with its most-used rows at 8 bits (``QuantizeOptions.frequent_rows``).

On a small decoder the tied table is most of the 4-bit error: on the benchmark's 16M-parameter
model, the table alone at 4 bits costs KL 0.00178 to fp32, everything else together about 0.0005.
Most of it is the lookups of common tokens (every position reads one) and the head's columns for
them (they are the likely next tokens). The calibration text says which rows those are: the rows
its lookups read most are stored at 8 bits (symmetric, blocks along K), the rest at 4, and both
uses read the two parts:

- the head: MatMulNBits over each part, their outputs concatenated (frequent rows first) and put
  back in vocabulary order by a Gather along the last axis;
- each lookup: the token's position in that order (a Gather on an int32 table), then
  GatherBlockQuantized on each part at a clipped index, and a Where on ``position < F``.

Every node is a standard op or one onnxruntime's CPU provider runs (MatMulNBits and
GatherBlockQuantized take bits 8). Rows never looked up in the calibration data stay at 4 bits.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.calibration.observe import Sampling, observe_activations
from optimizer.calibration.quant_math import qtype, quantize_weight
from optimizer.errors import PassError
from optimizer.graph.names import NameAllocator
from optimizer.graph.weights import Weight
from optimizer.pass_base import PassContext, PassReport
from passes.quantize.common import QuantizedWeight, float_constant
from passes.quantize.options import QuantizeOptions
from passes.quantize.tied import LOOKUP_OP, NBitsRows, SharedParts, TiedReaders, detach, four_bit_rows

if TYPE_CHECKING:
    from passes.quantize.weights import WeightSpec

EIGHT_BIT_BLOCKS = (128, 64, 32, 16)
"""Block lengths tried for the 8-bit rows, longest first (a float32 scale per 128 values is 0.25
bits per weight); the first that divides K."""
EIGHT_BIT_ZERO = 128
"""MatMulNBits' and GatherBlockQuantized's default zero point for 8 bits: symmetric int8 + 128."""


Tables = dict[int, tuple[Weight, list[gs.Node], int]]
"""Per target (``id``): the weight, its lookups (Gather nodes) and its row count."""


def lookup_counts(
    graph: gs.Graph, tables: Tables, options: QuantizeOptions, context: PassContext
) -> dict[int, np.ndarray]:
    """How often the calibration data looks up each row of each table (``id(target)`` -> counts).
    ``tables``: per target, its lookups (Gather nodes) and row count. A lookup whose indices are a
    graph input is counted from the feeds; any other is observed by running the model."""
    if context.calibration is None:
        raise PassError(
            "pass 'quantize' option frequent_rows counts the rows the calibration data looks up: "
            "none was given (--calibration-data DIR or calibration=...)"
        )
    readers: dict[str, list[int]] = {}
    for key, (_, gathers, _) in tables.items():
        for gather in gathers:
            readers.setdefault(gather.inputs[1].name, []).append(key)
    counts = {key: np.zeros(rows, np.int64) for key, (_, _, rows) in tables.items()}

    def visit(name: str, indices: np.ndarray) -> None:
        for key in readers[name]:
            counts[key] += _bincount(indices, counts[key].size)

    inputs = {tensor.name for tensor in graph.inputs}
    sampling = Sampling(options.calibration_samples or None, context.provider, context.timeout_s)
    direct = sorted(name for name in readers if name in inputs)
    for feed in itertools.islice(context.calibration_feeds("quantize"), sampling.max_samples):
        for name in direct:
            visit(name, np.asarray(feed[name]))
    inner = sorted(name for name in readers if name not in inputs)
    observe_activations(
        graph, inner, lambda: context.calibration_feeds("quantize"), visit, sampling, "lookup counts", integers=True
    )
    return counts


def _bincount(indices: np.ndarray, rows: int) -> np.ndarray:
    """Lookups per row; negative indices count from the end, as Gather reads them."""
    flat = indices.astype(np.int64).ravel()
    flat = np.where(flat < 0, flat + rows, flat)
    return np.bincount(flat[(flat >= 0) & (flat < rows)], minlength=rows)


def frequent(counts: np.ndarray, fraction: float) -> np.ndarray:
    """The rows looked up most, ``fraction`` of all rows (at least one) and only rows looked up at
    all, most-used first (ties by row number)."""
    wanted = min(max(1, round(fraction * counts.size)), int(np.count_nonzero(counts)), counts.size - 1)
    return np.argsort(-counts, kind="stable")[:wanted].astype(np.int64)


def frequent_tables(
    graph: gs.Graph,
    planned: list[tuple[Weight, WeightSpec]],
    options: QuantizeOptions,
    context: PassContext,
    report: PassReport,
) -> dict[int, np.ndarray]:
    """The rows to store at 8 bits per tied 4-bit table (``id(target)`` -> rows, most-used first)."""
    tables: Tables = {}
    for target, spec in planned:
        found = _table_lookups(graph, target, spec)
        if found is not None:
            tables[id(target)] = (target, *found)
    if not tables:
        report.details.setdefault("notes", []).append(
            "frequent_rows: no 4-bit weight here is both looked up (Gather) and multiplied (MatMul) in the main graph"
        )
        return {}
    chosen = {}
    for key, counts in lookup_counts(graph, tables, options, context).items():
        rows = frequent(counts, options.frequent_rows)
        if rows.size:
            chosen[key] = rows
        else:
            report.skip("tensor", tables[key][0].name, "frequent_rows: the calibration data looks up none of its rows")
    return chosen


def _table_lookups(graph: gs.Graph, target: Weight, spec: WeightSpec) -> tuple[list[gs.Node], int] | None:
    """A tied table's lookups in the main graph and its row count (the vocabulary), else None."""
    if spec.block_size is None or spec.qtype.bits != 4 or target.owner is not graph or target.values.ndim != 2:
        return None
    readers = TiedReaders.of(target, spec.form)
    if readers is None or not readers.gathers:
        return None
    return readers.gathers, int(target.values.shape[0 if readers.rows_first else 1])


def eight_bit_rows(floats: np.ndarray, names: NameAllocator, base: str) -> NBitsRows:
    """``floats`` ([F, K] rows) as symmetric 8-bit MatMulNBits rows (zero point implied, 128)."""
    columns, depth = floats.shape
    block = next(size for size in EIGHT_BIT_BLOCKS if depth % size == 0)
    quantized = quantize_weight(floats, qtype("int8"), symmetric=True, axis=1, block_size=block)
    stored = (quantized.values.astype(np.int16) + EIGHT_BIT_ZERO).astype(np.uint8)
    data = gs.Constant(names.fresh(base, "_nbits8"), stored.reshape(columns, depth // block, block))
    scale = float_constant(names.fresh(base, "_nbits8_scale"), np.asarray(quantized.scale))
    return NBitsRows(data, [scale], 8, block, columns, depth)


def serve_split(
    weight: QuantizedWeight, parts: SharedParts, top: np.ndarray, names: NameAllocator, report: PassReport
) -> None:
    """Rows ``top`` at 8 bits, the rest at 4 (``weight``'s integers), for the head and the lookups."""
    graph, base = weight.target.owner, weight.target.name
    assert graph is not None and top.size
    values, scales, zeros = parts.rows
    order = np.concatenate([top, np.setdiff1d(np.arange(values.shape[0]), top)])
    rest = order[top.size :]
    four = four_bit_rows(weight, (values[rest], scales[rest], None if zeros is None else zeros[rest]), names, base)
    eight = eight_bit_rows(parts.floats[top], names, base)
    position = np.empty(order.size, np.int32)
    position[order] = np.arange(order.size, dtype=np.int32)
    positions = gs.Constant(names.fresh(base, "_row_position"), position)
    for node in parts.matmuls:
        _split_head(graph, node, eight, four, positions, names)
        report.count("tied_matmul_nbits")
    if parts.gathers:
        tables = (eight.table(graph, names, base + "_nbits8"), four.table(graph, names, base + "_nbits"))
        for node in parts.gathers:
            _split_lookup(graph, node, (eight, four), tables, positions, names)
            report.count("lookups_gather_block_quantized")
    for node in parts.transposes:
        detach(node)
    report.count("tied_frequent_rows", int(top.size))
    readers = sorted({node.name for node in parts.matmuls + parts.gathers if node.name})
    report.details.setdefault("frequent_rows", {})[base] = {"rows": int(top.size), "readers": readers}
    report.details.setdefault("notes", []).append(
        f"{base}: tied weight; its {top.size} rows the calibration data looks up most at 8 bits, the other "
        f"{rest.size} at 4, one copy each for its MatMuls (MatMulNBits) and its lookups ({LOOKUP_OP})"
    )


def _split_head(
    graph: gs.Graph, node: gs.Node, eight: NBitsRows, four: NBitsRows, positions: gs.Constant, names: NameAllocator
) -> None:
    """``node`` (x @ W) as both parts' MatMulNBits, concatenated, gathered back to vocabulary order."""
    parts = [gs.Variable(names.fresh(node.name, suffix), dtype=np.float32) for suffix in ("_frequent", "_rest")]
    eight.matmul(graph, names.fresh(node.name, "_frequent_MatMulNBits"), node.inputs[0], [parts[0]])
    four.matmul(graph, names.fresh(node.name, "_rest_MatMulNBits"), node.inputs[0], [parts[1]])
    joined = gs.Variable(names.fresh(node.name, "_joined"), dtype=np.float32)
    graph.nodes.append(gs.Node("Concat", names.fresh(node.name, "_Concat"), {"axis": -1}, parts, [joined]))
    outputs = list(node.outputs)
    detach(node)
    graph.nodes.append(gs.Node("Gather", node.name, {"axis": -1}, [joined, positions], outputs))


def _split_lookup(
    graph: gs.Graph,
    node: gs.Node,
    rows: tuple[NBitsRows, NBitsRows],
    tables: tuple[gs.Tensor, gs.Tensor],
    positions: gs.Constant,
    names: NameAllocator,
) -> None:
    """``node`` (Gather of table rows) as the token's position, a lookup in each part at a clipped
    index, and a Where on which part holds it."""
    name, count = node.name, rows[0].columns
    indices, outputs = node.inputs[1], list(node.outputs)
    detach(node)

    def made(op: str, inputs: list[gs.Tensor], attrs: dict | None = None, dtype=np.int32) -> gs.Variable:
        output = gs.Variable(names.fresh(name, f"_{op}_out"), dtype=dtype)
        graph.nodes.append(gs.Node(op, names.fresh(name, f"_{op}"), attrs or {}, inputs, [output]))
        return output

    def scalar(label: str, value: int) -> gs.Constant:
        return gs.Constant(names.fresh(name, label), np.array(value, np.int32))

    position = made("Gather", [positions, indices], {"axis": 0})
    frequent_index = made("Min", [position, scalar("_last_frequent", count - 1)])
    rest_index = made("Max", [made("Sub", [position, scalar("_frequent_rows", count)]), scalar("_zero", 0)])
    is_frequent = made("Less", [position, scalar("_frequent_limit", count)], dtype=np.bool_)
    axes = gs.Constant(names.fresh(name, "_last_axis"), np.array([-1], np.int64))
    condition = made("Unsqueeze", [is_frequent, axes], dtype=np.bool_)
    looked_up = []
    clipped = (frequent_index, rest_index)
    for part, table, index, label in zip(rows, tables, clipped, ("_frequent", "_rest"), strict=True):
        output = gs.Variable(names.fresh(name, label), dtype=np.float32)
        graph.nodes.append(part.lookup(table, index, names.fresh(name, label + "_" + LOOKUP_OP), [output]))
        looked_up.append(output)
    graph.nodes.append(gs.Node("Where", name, {}, [condition, *looked_up], outputs))
