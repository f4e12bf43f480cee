"""cluster: store MatMul/Gemm/Conv weights and Gather embeddings as a small codebook plus indices.

Lossy. Each chosen weight gets k = 2^bits centroids (per tensor or per output channel) from a
deterministic 1-D k-means, and its values become indices into them. Indices of codebooks up to
4 bits are packed two per byte (four for 2-bit) into a uint8 tensor, so the file holds ~bits/32
of the float32 weight. Decoding is standard ONNX that works from opset 13 on without raising the
model's opset (UINT4 tensors would need opset 21): BitShift/Sub/Concat unpack the bytes (as uint32
below opset 14, where Sub has no uint8 kernel), Cast
makes int64 indices, Gather (per tensor) or GatherElements (per channel) reads the codebook.
Every input of that chain is constant, so onnxruntime folds it at session creation: run time is
that of the float model, only the file is smaller. The report gives, per tensor, k-means error
next to symmetric uniform quantization at the same bit width and granularity (MSE, SQNR).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.errors import OptionError
from optimizer.graph.axes import weight_axes
from optimizer.graph.edit import toposort
from optimizer.graph.names import NameAllocator
from optimizer.graph.opsets import DEFAULT_DOMAINS
from optimizer.graph.walk import ScopeTree
from optimizer.graph.weights import Weight, collect_weights, is_constant_derived
from optimizer.internal_errors import working_on
from optimizer.pass_base import Pass, PassContext, PassReport, PassResult, option
from optimizer.registry import register
from passes.share.kmeans import (
    assign,
    error_metrics,
    kmeans_rows,
    pack,
    slots_per_byte,
    uniform_fake_quantize,
)
from passes.weight_guard import WeightGuard

WEIGHT_SLOTS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}
BIAS_SLOTS = {"Gemm": 2, "Conv": 2, "ConvTranspose": 2}
LOOKUP_OPS = ("Gather", "GatherElements", "GatherND")
UINT8_SUB_OPSET = 14
DECODE_MIN_OPSET = 11
KNOWN_OPS = ("Conv", "ConvTranspose", "Gather", "Gemm", "MatMul")


@register
class ClusterWeightsPass(Pass):
    name = "cluster"
    summary = "k-means codebook (2^bits entries) per tensor or output channel; packed indices decoded by Gather"

    bits: int = option(4, "codebook size 2^bits, 2..8; 2-4 bits are packed 4 or 2 indices per byte")
    granularity: Literal["per-channel", "per-tensor"] = option(
        "per-channel", "one codebook per output channel (Gather embeddings: per feature column) or per tensor"
    )
    min_elements: int = option(4096, "leave weights with fewer elements in float")
    ops: tuple[str, ...] = option(KNOWN_OPS, "weights read by these ops are clustered: " + ", ".join(KNOWN_OPS))
    iterations: int = option(50, "maximum Lloyd iterations per codebook")
    pack_indices: bool = option(True, "pack indices of codebooks up to 4 bits several per byte")

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise OptionError(f"pass '{self.name}' option 'bits' must be in 2..8, got {self.bits}")
        if self.min_elements < 1 or self.iterations < 1:
            raise OptionError(
                f"pass '{self.name}' options 'min_elements' and 'iterations' must be >= 1, "
                f"got {self.min_elements} and {self.iterations}"
            )
        unknown = sorted(set(self.ops) - set(KNOWN_OPS))
        if unknown or not self.ops:
            raise OptionError(
                f"pass '{self.name}' option 'ops' must be a non-empty list of "
                f"{', '.join(KNOWN_OPS)}; got {', '.join(unknown) or '(empty)'}"
            )

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        report = PassReport()
        if graph.opset < DECODE_MIN_OPSET:
            report.skip(
                "model",
                "opset",
                f"opset {graph.opset} < {DECODE_MIN_OPSET}: the decoding ops "
                "(BitShift, GatherElements) do not exist there",
            )
            return PassResult(graph, False, report.to_dict())
        tree, names = ScopeTree.build(graph), NameAllocator(graph, reserve_node_names=False)
        tensors = []
        guard = WeightGuard.of(graph)  # never allow_non_finite: a codebook cannot hold NaN or Inf
        for weight in collect_weights(graph):
            with working_on("tensor", weight.name):
                axis = self._choose(weight, tree, report, guard)
                if axis is not None:
                    tensors.append(self._cluster(weight, axis, tree, names, report, graph.opset < UINT8_SUB_OPSET))
        if tensors:
            toposort(graph)
            report.details["tensors"] = tensors
        return PassResult(graph, bool(tensors), report.to_dict())

    def _choose(self, weight: Weight, tree: ScopeTree, report: PassReport, guard: WeightGuard) -> int | None:
        """The channel axis (-1 for per tensor) if ``weight`` should be clustered, else None."""
        readers = [(node, i) for node in weight.consumers for i, t in enumerate(node.inputs) if t is weight.tensor]
        weight_reads = [
            (n, i)
            for n, i in readers
            if n.op in self.ops and WEIGHT_SLOTS.get(n.op) == i and n.domain in DEFAULT_DOMAINS
        ]
        label = weight.label(tree)
        if not weight_reads:
            if weight.values.dtype.kind == "f" and any(BIAS_SLOTS.get(n.op) == i for n, i in readers):
                report.skip("tensor", label, "bias: small and sensitive, kept in float")
            return None
        reason = self._refusal(weight, readers, guard)
        if reason:
            report.skip("tensor", label, reason)
            return None
        ndim = weight.values.ndim  # one codebook per output column; none below 2-D
        axes = sorted({weight_axes(node, slot, ndim).output if ndim >= 2 else -1 for node, slot in weight_reads})
        axis = axes[0]
        if self.granularity == "per-tensor" or len(axes) != 1 or axis not in (0, weight.values.ndim - 1):
            axis = -1  # readers disagree, or a middle axis (ConvTranspose): one codebook for the tensor
        stored = self._stored_bytes(weight.values, axis)
        if stored >= weight.nbytes:
            report.skip(
                "tensor",
                label,
                f"codebooks and indices ({stored} B) would not be smaller than the weight ({weight.nbytes} B)",
            )
            return None
        return axis

    def _stored_bytes(self, values: np.ndarray, axis: int) -> int:
        books = 1 if axis < 0 else values.shape[axis]
        slots = slots_per_byte(self.bits, values.size) if self.pack_indices else 1
        return books * 2**self.bits * values.itemsize + -(-values.size // slots)

    def _refusal(self, weight: Weight, readers, guard: WeightGuard) -> str:
        if weight.values.dtype.kind != "f":
            return f"{weight.values.dtype} weight: only float weights are clustered"
        guarded = guard.reason(weight.tensor, weight.values)
        if guarded:
            return guarded
        if weight.protected:
            return weight.protected
        if weight.values.size < self.min_elements:
            return f"{weight.values.size} elements < min_elements={self.min_elements}"
        if any(node.domain not in DEFAULT_DOMAINS for node, _ in readers):
            return "read by a custom-domain op"
        if any(node.op in LOOKUP_OPS and i == 0 and is_constant_derived(node.inputs[1], {}) for node, i in readers):
            return "a lookup table read with constant indices (e.g. a codebook already)"
        return ""

    def _cluster(self, weight: Weight, axis: int, tree: ScopeTree, names, report: PassReport, widen: bool) -> dict:
        values = weight.values
        rows = _rows(values, axis)
        k = 2**self.bits
        codebook = kmeans_rows(rows, k, iterations=self.iterations).astype(values.dtype)
        codes = assign(rows, codebook)
        decoded = np.take_along_axis(codebook, codes.astype(np.int64), axis=1)
        mse, sqnr = error_metrics(rows, decoded)
        uniform_mse, uniform_sqnr = error_metrics(rows, uniform_fake_quantize(rows, self.bits))
        slots = slots_per_byte(self.bits, values.size) if self.pack_indices else 1
        stored = _decode_graph(weight, axis, codebook, codes, slots, tree, names, widen)
        report.count("tensors_clustered")
        report.saved_bytes += weight.nbytes - stored
        return {
            "tensor": weight.label(tree),
            "shape": list(values.shape),
            "bits": self.bits,
            "granularity": "per-tensor" if axis < 0 else f"per-channel (axis {axis})",
            "kmeans_mse": mse,
            "kmeans_sqnr_db": sqnr,
            "uniform_mse": uniform_mse,
            "uniform_sqnr_db": uniform_sqnr,
            "indices_per_byte": slots,
            "bytes_before": weight.nbytes,
            "bytes_after": stored,
        }


def _rows(values: np.ndarray, axis: int) -> np.ndarray:
    """The values as ``[codebooks, values per codebook]``."""
    if axis < 0:
        return values.reshape(1, -1)
    return np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)


def _decode_graph(weight: Weight, axis: int, codebook, codes, slots: int, tree: ScopeTree, names, widen: bool) -> int:
    """Replace ``weight`` by codebook + indices + decoding nodes; returns the bytes now stored.

    ``widen``: unpack in uint32, for opsets before 14 (no uint8 Sub there)."""
    where = weight.home if weight.node is not None else tree.common_ancestor(weight.reader_graphs(tree))
    values, base = weight.values, weight.name
    output = (
        weight.tensor if weight.node is not None else gs.Variable(base, dtype=values.dtype, shape=list(values.shape))
    )
    if weight.node is not None:
        weight.detach_constant_node()
    else:
        for node in weight.consumers:
            for index, tensor in enumerate(node.inputs):
                if tensor is weight.tensor:
                    node.inputs[index] = output

    def constant(suffix: str, array: np.ndarray) -> gs.Constant:
        return gs.Constant(names.fresh(f"{base}.{suffix}"), np.ascontiguousarray(array))

    def add(op: str, inputs: list, attrs: dict | None = None, out: gs.Tensor | None = None) -> gs.Tensor:
        out = out or gs.Variable(names.fresh(f"{base}.{op.lower()}"))
        tree.add_node(where, gs.Node(op, name=f"cluster/{out.name}", attrs=attrs or {}, inputs=inputs, outputs=[out]))
        return out

    if axis < 0:
        stored, table_values, op, gather_axis = codes.reshape(values.shape), codebook.reshape(-1), "Gather", 0
    elif axis == 0:
        stored, table_values, op, gather_axis = codes, codebook, "GatherElements", 1
    else:
        stored, table_values, op, gather_axis = codes.T, codebook.T, "GatherElements", 0
    packed = constant("codes", pack(stored, slots) if slots > 1 else stored)
    indices = _unpack_nodes(packed, slots, constant, add, widen)
    if slots > 1:
        indices = add("Reshape", [indices, constant("codes_shape", np.array(stored.shape, np.int64))])
    indices = add("Cast", [indices], {"to": onnx.TensorProto.INT64})
    table = constant("codebook", table_values)
    if stored.shape == values.shape:
        add(op, [table, indices], {"axis": gather_axis}, output)
    else:
        gathered = add(op, [table, indices], {"axis": gather_axis})
        add("Reshape", [gathered, constant("shape", np.array(values.shape, np.int64))], None, output)
    return int(packed.values.nbytes + table.values.nbytes)


def _unpack_nodes(packed: gs.Constant, slots: int, constant, add, widen: bool) -> gs.Tensor:
    """BitShift/Sub nodes that split each byte into ``slots`` codes, concatenated slot by slot."""
    if slots == 1:
        return packed
    width = np.array(8 // slots, dtype=np.uint32 if widen else np.uint8)
    shift = constant("shift", width)
    shifted: gs.Tensor = add("Cast", [packed], {"to": onnx.TensorProto.UINT32}) if widen else packed
    parts = []
    for slot in range(slots):
        if slot == slots - 1:
            parts.append(shifted)
            break
        upper = add("BitShift", [shifted, shift], {"direction": "RIGHT"})
        restored = add("BitShift", [upper, shift], {"direction": "LEFT"})
        parts.append(add("Sub", [shifted, restored]))
        shifted = upper
    return add("Concat", parts, {"axis": 0})
