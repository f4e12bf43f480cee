"""Weight-only quantization: integer initializers, activations stay float.

Per op (FIELD-NOTES, onnxruntime 1.32 CPU):
- 4-bit MatMul: DequantizeLinear blocked along K (opset 21), which onnxruntime fuses into
  MatMulNBits (0.94x fp32 on all-MiniLM-L6-v2 here).
- Everything else (8-bit MatMul, Conv, ConvTranspose, Gemm, Gather, LSTM/GRU/RNN): the Cast/Mul
  chain onnxruntime folds at load, so run time is fp32's. A DequantizeLinear there runs on every
  inference (a Conv also loses its NCHWc layout: 1.23x); 8-bit MatMulNBits measured 1.28x fp32
  on this machine (FIELD-NOTES saw 0.72-0.82x elsewhere): weight_only_form=dequantize_linear
  asks for it anyway (less memory at run time).
- 4-bit is blocked along the reduction axis (MatMul, Gemm) or the row (Gather); convolutions and
  recurrent weights stay int8, since one 4-bit scale per output channel loses too much.
- A 4-bit MatMul weight that other nodes read too: embedding lookups through a Transpose (tied
  embeddings) share one copy with it through MatMulNBits and GatherBlockQuantized (``tied``); any
  other reader makes the weight take the folded form, so no DequantizeLinear runs at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from optimizer.calibration.quant_math import QType, QuantizedTensor, qtype, quantize_weight
from optimizer.graph.axes import weight_axes
from optimizer.graph.names import NameAllocator
from optimizer.graph.patterns import NamePatterns
from optimizer.graph.walk import TensorUse
from optimizer.graph.weights import Weight
from optimizer.internal_errors import working_on
from optimizer.pass_base import PassReport
from passes.quantize.common import FloatForm, QuantizedWeight
from passes.quantize.frequent_rows import serve_split
from passes.quantize.options import FINE_BLOCK, QuantizeOptions
from passes.quantize.tied import other_readers, serve_tied_weight, shared_parts, tied_lookups

BLOCKED_OPS = ("MatMul", "Gemm", "Gather")
DQ_FUSED_OPS = ("MatMul",)
OPSET_PER_CHANNEL_DQ = 13
OPSET_4BIT = 21

WeightOnlyForm = Literal["auto", "dequantize_linear", "fold_at_load"]


@dataclass(frozen=True)
class WeightSpec:
    """How one weight is stored: integer type, granularity and float view."""

    qtype: QType
    symmetric: bool
    axis: int | None
    block_size: int | None
    form: FloatForm
    note: str = ""

    def required_opset(self) -> int:
        if self.qtype.bits == 4 or self.block_size is not None:
            return OPSET_4BIT
        if self.form == "dq" and self.axis is not None:
            return OPSET_PER_CHANNEL_DQ
        return 1


def scale_axis(consumer: TensorUse, ndim: int) -> int:
    """The axis per-channel scales run along: a Gather table's lookup axis (one scale per row, as
    GatherBlockQuantized wants), else the output-channel axis."""
    axes = weight_axes(consumer.node, consumer.index, ndim)
    return axes.output if axes.lookup is None else axes.lookup


def block_axis(consumer: TensorUse, ndim: int) -> int | None:
    """The axis a 4-bit block runs along (the dot-product axis; a Gather table's feature axis), or
    None: blocks are only built for 2-D weights of ``BLOCKED_OPS``."""
    if ndim != 2 or consumer.node.op not in BLOCKED_OPS:
        return None
    return weight_axes(consumer.node, consumer.index, ndim).reduction


NAMED_REASON = "a reader is named in int8_weight_only_nodes (e.g. backed off by the accuracy budget)"


def eight_bit_only(target: Weight, options: QuantizeOptions) -> bool:
    """True when a reader of ``target`` is named in ``int8_weight_only_nodes``: the weight is stored
    int8 weight-only and its readers keep float activations."""
    patterns = options.int8_weight_only_nodes
    return bool(patterns) and any(NamePatterns(patterns).matches(use.node.name or "") for use in target.uses)


def block_length(target: Weight, options: QuantizeOptions) -> int:
    """``block_size``, or FINE_BLOCK when a reader is named in ``fine_block_nodes`` (and it is shorter)."""
    patterns = options.fine_block_nodes
    if patterns and any(NamePatterns(patterns).matches(use.node.name or "") for use in target.uses):
        return min(options.block_size, FINE_BLOCK)
    return options.block_size


def weight_only_spec(target: Weight, options: QuantizeOptions, opset: int) -> WeightSpec:
    """Integer type, axis, block and float view for ``target`` under the pass ``options``."""
    if eight_bit_only(target, options):
        options = options.eight_bit()
    ndim = target.values.ndim
    first = target.uses[0]
    wanted = qtype(options.storage_type())
    form = _form(target, options.weight_only_form, wanted.bits)
    note = ""
    if form == "dq" and options.weight_only_form == "auto" and tied_lookups(target) is None:
        form = "fold"
        readers = ", ".join(f"{node.op} '{node.name}'" for node in other_readers(target))
        note = f"also read by {readers}: a DequantizeLinear would run there at every inference; folded at load"
    if wanted.bits == 4:
        axis, block = block_axis(first, ndim), block_length(target, options)
        blocks_fit = axis is not None and (form == "dq" or target.values.shape[axis] % block == 0)
        if blocks_fit and all(c.node.op in BLOCKED_OPS for c in target.uses):
            return WeightSpec(wanted, options.weights_symmetric(), axis, block, form, note)
        wanted, symmetric = eight_bit_fallback(wanted, options)
        fallback = f"{options.weight_type} needs a blocked dot-product axis; stored as {wanted.name} per channel"
        note = "; ".join(filter(None, [note, fallback]))
    else:
        symmetric = options.weights_symmetric()
    axis = scale_axis(first, ndim) if options.per_channel and ndim > 0 else None
    if form == "dq" and axis is not None and opset < OPSET_PER_CHANNEL_DQ and options.weight_only_form == "auto":
        form = "fold"
    return WeightSpec(wanted, symmetric, axis, None, form, note)


def eight_bit_fallback(wanted: QType, options: QuantizeOptions) -> tuple[QType, bool]:
    """The 8-bit type (and symmetry) a 4-bit request falls back to where blocks cannot be built."""
    fallback = qtype("int8" if wanted.signed or options.symmetric_weights is None else "uint8")
    return fallback, True if options.symmetric_weights is None else options.symmetric_weights


def _form(target: Weight, choice: WeightOnlyForm, bits: int) -> FloatForm:
    if choice == "dequantize_linear":
        return "dq"
    if choice == "fold_at_load":
        return "fold"
    return "dq" if bits == 4 and all(c.node.op in DQ_FUSED_OPS for c in target.uses) else "fold"


def quantize_weight_only_all(
    planned: list[tuple[Weight, WeightSpec]],
    names: NameAllocator,
    report: PassReport,
    notes: list[dict[str, str]] | None = None,
    rounded: dict[int, QuantizedTensor] | None = None,
    frequent: dict[int, np.ndarray] | None = None,
) -> None:
    """Every weight-only target (a failure names its tensor), then ``notes``: why MatMuls stayed
    weight-only. ``rounded``: integers already chosen (GPTQ), by ``id(target)``; ``frequent``: the
    rows of tied tables stored at 8 bits (``frequent_rows``), by ``id(target)``."""
    for target, spec in planned:
        with working_on("tensor", target.name):
            key = id(target)
            quantize_weight_only(target, spec, names, report, (rounded or {}).get(key), (frequent or {}).get(key))
    if notes:
        report.details.setdefault("weight_only_matmuls", []).extend(notes)


def quantize_weight_only(
    target: Weight,
    spec: WeightSpec,
    names: NameAllocator,
    report: PassReport,
    quantized: QuantizedTensor | None = None,
    frequent: np.ndarray | None = None,
) -> QuantizedWeight:
    """Store ``target`` as integers (rounded to nearest unless ``quantized`` is given, e.g. by
    GPTQ) and give every reader its dequantized value; a tied table's ``frequent`` rows at 8 bits."""
    if quantized is None:
        quantized = quantize_weight(
            target.values, spec.qtype, symmetric=spec.symmetric, axis=spec.axis, block_size=spec.block_size
        )
    weight = QuantizedWeight(target, quantized, names)
    report.count(f"weights_{spec.qtype.name}")
    parts = shared_parts(weight, spec.form) if frequent is not None else None
    if parts is not None and frequent is not None:
        serve_split(weight, parts, frequent, names, report)
        return weight
    if frequent is not None:
        report.skip("tensor", target.name, "frequent_rows: K is not a whole number of blocks; all rows at 4 bits")
    if spec.block_size is not None and serve_tied_weight(weight, spec.form, names, report):
        return weight
    weight.make_float_view(spec.form)
    report.count(f"weight_only_{spec.form}")
    if spec.note:
        report.details.setdefault("notes", []).append(f"{target.name}: {spec.note}")
    return weight
