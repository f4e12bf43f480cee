"""A 4-bit weight read by MatMul and, through a Transpose, by embedding lookups, or the other way
round: tied input and output embeddings. onnxruntime-genai's builder writes ``W -> Transpose ->
Gather`` next to the head's ``MatMul(x, W)``; a Hugging Face export, once the share pass has re-tied
its transposed head copy, has ``Gather(W)`` and ``MatMul(x, Transpose(W))``.

Read through one shared DequantizeLinear, the lookup would dequantize and transpose the whole
table at every inference, and onnxruntime would not fuse the head (it fuses only integers no other
node reads): a 16M-parameter decoder decoded at 6.6x fp32's time. Instead, as onnxruntime-genai's
builder does, one copy of the integers in MatMulNBits' layout ([N, K/block, block/2] bytes, rows of
the transposed weight) serves both: the head becomes MatMulNBits (com.microsoft, the accuracy level
onnxruntime gives the MatMulNBits it fuses from DequantizeLinear -> MatMul, so the same kernel) and
each lookup GatherBlockQuantized on a Reshape of the same bytes (rows gathered first, then only they
are dequantized), with the same scales and zero points. The lookups are bit-identical to
DequantizeLinear -> Gather, the head to the MatMulNBits onnxruntime fuses from DequantizeLinear ->
MatMul. When K is not a whole number of blocks, the lookups read a transposed copy
(``serve_lookups``) and the head keeps its DequantizeLinear. In the reverse layout the stored table
already has MatMulNBits' rows; without whole blocks it keeps the folded form.

A weight with any other extra reader gets the folded form instead (``weights.weight_only_spec``):
onnxruntime folds it at load, so nothing is dequantized at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.calibration.quant_math import pack_4bit
from optimizer.graph.names import NameAllocator
from optimizer.graph.weights import Weight
from optimizer.pass_base import PassReport
from passes.quantize.common import QuantizedWeight, integer_constant, stored_scale
from passes.quantize.targets import QUANTIZED_SUFFIX

LOOKUP_OP = "GatherBlockQuantized"
LOOKUP_DOMAIN = "com.microsoft"
NBITS_ACCURACY_LEVEL = 4
"""onnxruntime's default ``session.qdq_matmulnbits_accuracy_level`` on CPU: the MatMulNBits it fuses
from the untied MatMuls' DequantizeLinear get it, so the head runs the same kernel."""


@dataclass(frozen=True)
class TiedLookups:
    """A Transpose of the weight and the nodes that read it (Gather lookups, or MatMuls in the
    reverse layout)."""

    transpose: gs.Node
    readers: tuple[gs.Node, ...]


def other_readers(target: Weight) -> list[gs.Node]:
    """Nodes reading the weight's tensor that are not among its selected uses."""
    used = {id(use.node) for use in target.uses}
    return [node for node in target.consumers if id(node) not in used]


def tied_lookups(target: Weight) -> list[TiedLookups] | None:
    """The weight's other readers when each is a 2-D Transpose read only by row lookups (Gather,
    axis 0, of its output) in the weight's own graph, and every use is a MatMul's B there; [] when
    it has none; None otherwise (then only a folded form keeps run time free of dequantizing)."""
    graph = target.owner
    others = other_readers(target)
    if others and (graph is None or not all(_reads_as_b(use.node, target.tensor, graph) for use in target.uses)):
        return None  # a use that MatMulNBits cannot stand in for (a Gemm, a MatMul in a subgraph ...)
    return _through_transposes(target, others, _is_row_lookup)


def _through_transposes(
    target: Weight, others: list[gs.Node], reads: Callable[[gs.Node, gs.Tensor, gs.Graph], bool]
) -> list[TiedLookups] | None:
    """``others`` (readers of a 2-D weight) when each is a 2-D Transpose in the weight's own graph
    whose output only ``reads`` nodes read; None when one is not."""
    graph, found = target.owner, []
    for node in others:
        if graph is None or target.values.ndim != 2 or not _is_2d_transpose(node, graph):
            return None
        product = node.outputs[0]
        readers = tuple(product.outputs)
        if not readers or any(product is output for output in graph.outputs):
            return None
        if not all(reads(reader, product, graph) for reader in readers):
            return None
        found.append(TiedLookups(node, readers))
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
    scale, made = stored_scale(names, base, "_lookup_scale", np.asarray(quantized.scale).T, quantized.qtype.bits)
    graph.nodes.extend(made)
    zero_point = None
    if weight.zero_point is not None:
        zero_point = integer_constant(
            names.fresh(base, "_lookup_zero_point"), np.asarray(quantized.zero_point).T, quantized.qtype
        )
    attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": int(quantized.block_size)}
    for item in lookups:
        for gather in item.readers:
            inputs = [table, gather.inputs[1], scale] + ([zero_point] if zero_point is not None else [])
            _replace(graph, gather, LOOKUP_OP, attrs, inputs)
            report.count("lookups_gather_block_quantized")
        detach(item.transpose)
    extra = (quantized.values.size * quantized.qtype.bits + 7) // 8
    report.details.setdefault("notes", []).append(
        f"{base}: tied weight; its MatMul reads the {quantized.qtype.bits}-bit integers (MatMulNBits) and its "
        f"lookups read a transposed copy through {LOOKUP_OP} ({extra} bytes more): onnxruntime fuses "
        "MatMulNBits only for integers no other node reads"
    )


def tied_heads(target: Weight) -> list[TiedLookups] | None:
    """The reverse layout (a Hugging Face export once the share pass re-ties it): the weight is the
    [N, K] table its uses look rows up in (Gather, axis 0), and each other reader is a 2-D Transpose
    read only as a MatMul's B. [] without other readers; None when some reader fits neither."""
    graph = target.owner
    if graph is None or target.values.ndim != 2 or not target.uses:
        return None
    if not all(use.index == 0 and _is_row_lookup(use.node, target.tensor, graph) for use in target.uses):
        return None
    return _through_transposes(target, other_readers(target), _reads_as_b)


def _reads_as_b(node: gs.Node, tensor: gs.Tensor, graph: gs.Graph) -> bool:
    inputs = node.inputs
    return (
        node.op == "MatMul"
        and len(inputs) == 2
        and inputs[1] is tensor
        and inputs[0] is not tensor
        and _holds(graph, node)
    )


@dataclass(frozen=True)
class SharedParts:
    """What one shared copy serves: the integers, scales and zero points as [N, K] rows (blocks
    along K), the float weight as the same rows, the MatMuls (the head), the Gathers (lookups) and
    the Transposes between them and the weight."""

    rows: tuple[np.ndarray, np.ndarray, np.ndarray | None]
    floats: np.ndarray
    matmuls: list[gs.Node]
    gathers: list[gs.Node]
    transposes: list[gs.Node]


@dataclass(frozen=True)
class TiedReaders:
    """A tied weight's readers in either layout: the MatMuls (the head), the Gathers (lookups), the
    Transposes between them and the weight, and whether the weight is stored as [N, K] rows
    (``rows_first``: the reverse layout) or as the head's [K, N]."""

    matmuls: list[gs.Node]
    gathers: list[gs.Node]
    transposes: list[gs.Node]
    rows_first: bool

    @staticmethod
    def of(target: Weight, form: str) -> TiedReaders | None:
        """The readers for the float view ``form`` ("dq": the builder's layout, else the reverse
        one), or None when the weight is not tied that way."""
        if form == "dq":
            lookups = tied_lookups(target)
            if not lookups:
                return None
            gathers = [gather for item in lookups for gather in item.readers]
            return TiedReaders([use.node for use in target.uses], gathers, [i.transpose for i in lookups], False)
        heads = tied_heads(target)
        if not heads:
            return None
        matmuls = [node for item in heads for node in item.readers]
        return TiedReaders(matmuls, [use.node for use in target.uses], [i.transpose for i in heads], True)


def shared_parts(weight: QuantizedWeight, form: str) -> SharedParts | None:
    """The parts one copy can serve, in either layout; None when the weight has no tied readers
    or K is not a whole number of blocks."""
    target, quantized = weight.target, weight.quantized
    block = int(quantized.block_size or 0)
    readers = TiedReaders.of(target, form) if block else None
    if readers is None or quantized.axis != int(readers.rows_first):
        return None
    zero = None if weight.zero_point is None else np.asarray(quantized.zero_point)
    values, scale, floats = quantized.values, np.asarray(quantized.scale), target.values
    if not readers.rows_first:
        values, scale, floats, zero = values.T, scale.T, floats.T, None if zero is None else zero.T
    if values.shape[1] % block:
        return None
    return SharedParts((values, scale, zero), floats, readers.matmuls, readers.gathers, readers.transposes)


def serve_tied_weight(weight: QuantizedWeight, form: str, names: NameAllocator, report: PassReport) -> bool:
    """Serve a blocked 4-bit weight's tied readers from one copy; True when no float view is needed.
    When K is not a whole number of blocks, the lookups read a transposed copy (False)."""
    parts = shared_parts(weight, form)
    if parts is not None:
        _serve_shared(weight, parts, names, report)
        return True
    lookups = tied_lookups(weight.target) if form == "dq" and weight.quantized.block_size else None
    if lookups:
        serve_lookups(weight, lookups, names, report)
    return False


@dataclass(frozen=True)
class NBitsRows:
    """Rows in MatMulNBits' layout: the packed data ([N, K/block, block*bits/8] bytes), its scale
    and zero point inputs, and the attributes both ops share."""

    data: gs.Constant
    shared: list[gs.Tensor]
    bits: int
    block: int
    columns: int
    depth: int

    def matmul(self, graph: gs.Graph, name: str, activation: gs.Tensor, outputs: list[gs.Tensor]) -> None:
        """A MatMulNBits node ``name``: ``activation`` times these rows, into ``outputs``."""
        attrs = {"K": self.depth, "N": self.columns, "bits": self.bits, "block_size": self.block}
        attrs["accuracy_level"] = NBITS_ACCURACY_LEVEL
        inputs = [activation, self.data, *self.shared]
        graph.nodes.append(gs.Node("MatMulNBits", name, attrs, inputs, outputs, domain=LOOKUP_DOMAIN))

    def table(self, graph: gs.Graph, names: NameAllocator, base: str) -> gs.Tensor:
        """The same bytes as [N, K * bits / 8] rows, the table GatherBlockQuantized reads."""
        table = gs.Variable(names.fresh(base, "_table"), dtype=np.uint8)
        shape = np.array([self.columns, self.depth * self.bits // 8], np.int64)
        reshape_inputs = [self.data, gs.Constant(names.fresh(base, "_table_shape"), shape)]
        graph.nodes.append(gs.Node("Reshape", names.fresh(base, "_Reshape"), {}, reshape_inputs, [table]))
        return table

    def lookup(self, table: gs.Tensor, indices: gs.Tensor, name: str, outputs: list[gs.Tensor]) -> gs.Node:
        """GatherBlockQuantized of rows ``indices`` of ``table``."""
        attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": self.block, "bits": self.bits}
        inputs = [table, indices, *self.shared]
        return gs.Node(LOOKUP_OP, name, attrs, inputs, outputs, domain=LOOKUP_DOMAIN)


def four_bit_rows(
    weight: QuantizedWeight, rows: tuple[np.ndarray, np.ndarray, np.ndarray | None], names: NameAllocator, base: str
) -> NBitsRows:
    """4-bit ``rows`` (integers, scales, zero points as [N, K] rows) packed for MatMulNBits."""
    values, scales, zeros = rows
    block, graph = int(weight.quantized.block_size or 0), weight.target.owner
    assert graph is not None and block
    columns, depth = values.shape
    shift = 8 if weight.quantized.qtype.signed else 0  # MatMulNBits stores unsigned nibbles
    packed = packed_rows(values.astype(np.int16) + shift).reshape(columns, depth // block, block // 2)
    data = gs.Constant(names.fresh(base, "_nbits"), packed)
    scale, made = stored_scale(names, base, "_nbits_scale", scales, weight.quantized.qtype.bits)
    graph.nodes.extend(made)
    shared: list[gs.Tensor] = [scale]
    if zeros is not None:
        shared.append(gs.Constant(names.fresh(base, "_nbits_zero_point"), packed_rows(zeros.astype(np.int16) + shift)))
    return NBitsRows(data, shared, 4, block, columns, depth)


def _serve_shared(weight: QuantizedWeight, parts: SharedParts, names: NameAllocator, report: PassReport) -> None:
    """The MatMuls become MatMulNBits on the rows, the Gathers GatherBlockQuantized on a Reshape
    of the same bytes."""
    graph, base = weight.target.owner, weight.target.name
    assert graph is not None
    nbits = four_bit_rows(weight, parts.rows, names, base)
    for node in parts.matmuls:
        nbits.matmul(graph, node.name, node.inputs[0], list(node.outputs))
        detach(node)
        report.count("tied_matmul_nbits")
    table = nbits.table(graph, names, base + "_nbits") if parts.gathers else None
    for node in parts.gathers:
        assert table is not None
        graph.nodes.append(nbits.lookup(table, node.inputs[1], node.name, list(node.outputs)))
        detach(node)
        report.count("lookups_gather_block_quantized")
    for node in parts.transposes:
        detach(node)
    report.details.setdefault("notes", []).append(
        f"{base}: tied weight; one 4-bit copy serves its MatMuls (MatMulNBits) and its lookups ({LOOKUP_OP})"
    )


def _replace(graph: gs.Graph, node: gs.Node, op: str, attrs: dict, inputs: list[gs.Tensor]) -> None:
    """``node`` replaced by an onnxruntime (com.microsoft) ``op`` of the same name and outputs."""
    graph.nodes.append(gs.Node(op, node.name, attrs, inputs, list(node.outputs), domain=LOOKUP_DOMAIN))
    detach(node)


def detach(node: gs.Node) -> None:
    """Disconnect ``node``; cleanup removes it."""
    node.inputs.clear()
    node.outputs.clear()


def packed_rows(values: np.ndarray) -> np.ndarray:
    """Each row's 4-bit values two per byte (``pack_4bit``'s order; an odd row padded with 0)."""
    if values.shape[1] % 2:
        values = np.pad(values, ((0, 0), (0, 1)))
    return np.frombuffer(pack_4bit(values), np.uint8).reshape(values.shape[0], -1)
