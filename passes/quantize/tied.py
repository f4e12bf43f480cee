"""A 4-bit weight read by MatMul and, through a Transpose, by embedding lookups: tied input and
output embeddings (onnxruntime-genai's builder writes ``W -> Transpose -> Gather`` next to the head's
``MatMul(x, W)``, as do many small LLMs).

Read through one shared DequantizeLinear, the lookup would dequantize and transpose the whole
table at every inference, and onnxruntime would not fuse the head (it fuses only integers no other
node reads): a 16M-parameter decoder decoded at 6.6x fp32's time. Instead, as onnxruntime-genai's
builder does, one copy of the integers in MatMulNBits' layout ([N, K/block, block/2] bytes, rows of
the transposed weight) serves both: the head becomes MatMulNBits (com.microsoft, the accuracy level
onnxruntime gives the MatMulNBits it fuses from DequantizeLinear -> MatMul, so the same kernel) and
each lookup GatherBlockQuantized on a Reshape of the same bytes (rows gathered first, then only they
are dequantized), with the same scales and zero points. Both are bit-identical to the
DequantizeLinear forms. When K is not a whole number of blocks, the lookups read a transposed copy
(``serve_lookups``) and the head keeps its DequantizeLinear.

A weight with any other extra reader gets the folded form instead (``weights.weight_only_spec``):
onnxruntime folds it at load, so nothing is dequantized at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.graph.names import NameAllocator
from optimizer.graph.weights import Weight
from optimizer.pass_base import PassReport
from passes.quantize.common import QuantizedWeight, float_constant, integer_constant
from passes.quantize.targets import QUANTIZED_SUFFIX

LOOKUP_OP = "GatherBlockQuantized"
LOOKUP_DOMAIN = "com.microsoft"
NBITS_ACCURACY_LEVEL = 4
"""onnxruntime's default ``session.qdq_matmulnbits_accuracy_level`` on CPU: the MatMulNBits it fuses
from the untied MatMuls' DequantizeLinear get it, so the head runs the same kernel."""


@dataclass(frozen=True)
class TiedLookups:
    """A Transpose of the weight and the Gather lookups that read it."""

    transpose: gs.Node
    gathers: tuple[gs.Node, ...]


def other_readers(target: Weight) -> list[gs.Node]:
    """Nodes reading the weight's tensor that are not among its selected uses."""
    used = {id(use.node) for use in target.uses}
    return [node for node in target.consumers if id(node) not in used]


def tied_lookups(target: Weight) -> list[TiedLookups] | None:
    """The weight's other readers when each is a 2-D Transpose read only by row lookups (Gather,
    axis 0, of its output) in the weight's own graph; [] when it has none; None when some other
    reader is not of that shape (then only a folded form keeps run time free of dequantizing)."""
    found = []
    graph = target.owner
    for node in other_readers(target):
        if graph is None or target.values.ndim != 2 or not _is_2d_transpose(node, graph):
            return None
        table = node.outputs[0]
        gathers = tuple(table.outputs)
        if not gathers or any(table is output for output in graph.outputs):
            return None
        if not all(_is_row_lookup(gather, table, graph) for gather in gathers):
            return None
        found.append(TiedLookups(node, gathers))
    return found


def _is_2d_transpose(node: gs.Node, graph: gs.Graph) -> bool:
    perm = list(node.attrs.get("perm", [1, 0]))
    return node.op == "Transpose" and perm == [1, 0] and len(node.outputs) == 1 and _holds(graph, node)


def _is_row_lookup(node: gs.Node, table: gs.Tensor, graph: gs.Graph) -> bool:
    if node.op != "Gather" or len(node.inputs) != 2 or node.inputs[0] is not table or node.inputs[1] is table:
        return False
    return int(node.attrs.get("axis", 0)) == 0 and node.domain in ("", None, "ai.onnx") and _holds(graph, node)


def _holds(graph: gs.Graph, node: gs.Node) -> bool:
    return any(item is node for item in graph.nodes)


def serve_lookups(
    weight: QuantizedWeight, lookups: list[TiedLookups], names: NameAllocator, report: PassReport
) -> None:
    """Replace each lookup by GatherBlockQuantized on a transposed copy of ``weight``'s integers
    (blocked along the MatMul's dot-product axis, axis 0, which is the copy's last axis); the
    Transposes lose their readers and go at cleanup."""
    quantized, graph = weight.quantized, weight.target.owner
    assert graph is not None and quantized.axis == 0 and quantized.block_size is not None
    base = weight.target.name
    table = integer_constant(names.fresh(base, "_lookup" + QUANTIZED_SUFFIX), quantized.values.T, quantized.qtype)
    scale = float_constant(names.fresh(base, "_lookup_scale"), np.asarray(quantized.scale).T)
    zero_point = None
    if weight.zero_point is not None:
        zero_point = integer_constant(
            names.fresh(base, "_lookup_zero_point"), np.asarray(quantized.zero_point).T, quantized.qtype
        )
    attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": int(quantized.block_size)}
    for item in lookups:
        for gather in item.gathers:
            inputs = [table, gather.inputs[1], scale] + ([zero_point] if zero_point is not None else [])
            node = gs.Node(LOOKUP_OP, gather.name, attrs, inputs, list(gather.outputs), domain=LOOKUP_DOMAIN)
            gather.inputs.clear()
            gather.outputs.clear()
            graph.nodes.append(node)
            report.count("lookups_gather_block_quantized")
        item.transpose.inputs.clear()
        item.transpose.outputs.clear()
    extra = (quantized.values.size * quantized.qtype.bits + 7) // 8
    report.details.setdefault("notes", []).append(
        f"{base}: tied weight; its MatMul reads the {quantized.qtype.bits}-bit integers (MatMulNBits) and its "
        f"lookups read a transposed copy through {LOOKUP_OP} ({extra} bytes more): onnxruntime fuses "
        "MatMulNBits only for integers no other node reads"
    )


def serve_tied(weight: QuantizedWeight, lookups: list[TiedLookups], names: NameAllocator, report: PassReport) -> bool:
    """One shared copy for the MatMul uses and the lookups (True: the weight needs no float view),
    or, when K is not a whole number of blocks, the transposed copy for the lookups (False)."""
    quantized = weight.quantized
    block = int(quantized.block_size or 0)
    rows, columns = quantized.values.shape
    if not block or rows % block:
        serve_lookups(weight, lookups, names, report)
        return False
    graph, base = weight.target.owner, weight.target.name
    assert graph is not None
    shift = 8 if quantized.qtype.signed else 0  # MatMulNBits stores unsigned nibbles
    blocks = rows // block
    packed = _packed_rows(quantized.values.T.astype(np.int16) + shift).reshape(columns, blocks, block // 2)
    data = gs.Constant(names.fresh(base, "_nbits"), packed)
    scale = float_constant(names.fresh(base, "_nbits_scale"), np.asarray(quantized.scale).T)
    shared = [scale]
    if weight.zero_point is not None:
        zero = _packed_rows(np.asarray(quantized.zero_point).T.astype(np.int16) + shift)
        shared.append(gs.Constant(names.fresh(base, "_nbits_zero_point"), zero))
    table = gs.Variable(names.fresh(base, "_nbits_table"), dtype=np.uint8)
    row_shape = gs.Constant(names.fresh(base, "_nbits_table_shape"), np.array([columns, rows // 2], np.int64))
    graph.nodes.append(gs.Node("Reshape", names.fresh(base, "_nbits_Reshape"), {}, [data, row_shape], [table]))
    common = {"bits": 4, "block_size": block}
    for use in weight.target.uses:
        node = use.node
        attrs = {"K": rows, "N": columns, **common, "accuracy_level": NBITS_ACCURACY_LEVEL}
        inputs = [node.inputs[0], data, *shared]
        graph.nodes.append(gs.Node("MatMulNBits", node.name, attrs, inputs, list(node.outputs), domain=LOOKUP_DOMAIN))
        node.inputs.clear()
        node.outputs.clear()
        report.count("tied_matmul_nbits")
    lookup_attrs = {"gather_axis": 0, "quantize_axis": 1, **common}
    for item in lookups:
        for gather in item.gathers:
            inputs = [table, gather.inputs[1], *shared]
            graph.nodes.append(
                gs.Node(LOOKUP_OP, gather.name, lookup_attrs, inputs, list(gather.outputs), domain=LOOKUP_DOMAIN)
            )
            gather.inputs.clear()
            gather.outputs.clear()
            report.count("lookups_gather_block_quantized")
        item.transpose.inputs.clear()
        item.transpose.outputs.clear()
    report.details.setdefault("notes", []).append(
        f"{base}: tied weight; one 4-bit copy serves its MatMul (MatMulNBits) and its lookups ({LOOKUP_OP})"
    )
    return True


def _packed_rows(values: np.ndarray) -> np.ndarray:
    """Each row's 4-bit values two per byte, the first in the low nibble (an odd row padded with 0)."""
    if values.shape[1] % 2:
        values = np.pad(values, ((0, 0), (0, 1)))
    nibbles = values.astype(np.uint8) & 0x0F
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8)
