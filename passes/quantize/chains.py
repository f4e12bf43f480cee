"""Weights that reach their reader through data-movement ops, stored as integers all the same.

A voice-activity model keeps its LSTM weights in If branches and hands them to the LSTM through
Slice and Squeeze; a TensorFlow export transposes a MatMul weight first. Such a weight is stored
as integers with the Cast/Mul chain at the weight (``fold`` form), and the Slice/Squeeze/...
chain is kept: onnxruntime folds the whole constant chain at load and runs fp32's graph. The
per-channel axis follows the chain: element positions are pushed through it
(``optimizer.graph.data_movement``), and the stored axis whose positions stay constant along
each reader's output-channel axis is the one scales run along. These weights are weight-only in
every mode (static and dynamic kernels need the weight next to its reader), int8 even when
4-bit is asked (a block needs the reader's dot-product axis next to the weight).

Every other float weight the collector meets is reported as left float, with its reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.calibration.quant_math import qtype
from optimizer.graph.data_movement import ChainReaders, NotApplied, follow_chain
from optimizer.graph.walk import TensorUse
from optimizer.graph.weights import Weight, assign_owners, collect_weights, weight_values
from optimizer.pass_base import PassReport
from passes.quantize.options import QuantizeOptions
from passes.quantize.targets import (
    Selection,
    excluded_nodes,
    is_quantization_parameter_reader,
    quantizable_nodes,
    weight_slots,
)
from passes.quantize.weights import WeightSpec, eight_bit_fallback, scale_axis
from passes.weight_guard import WeightGuard

BIAS_SLOTS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}


@dataclass
class ChainedWeight:
    """A weight read through a chain: its stored axis for per-channel scales, and its readers."""

    target: Weight
    axis: int | None
    readers: tuple[str, ...]


def collect_chained(
    root: gs.Graph, selection: Selection, report: PassReport, direct: list[Weight]
) -> list[ChainedWeight]:
    """Float weights not read directly by a quantizable slot, that reach one through data
    movement only; every other float weight is reported with why it stays float."""
    readers = ChainReaders.of(root)
    excluded = excluded_nodes(quantizable_nodes(root, selection), selection)
    is_leaf = _leaf_test(selection, excluded)
    taken = {id(w.tensor) for w in direct}
    guard = WeightGuard.of(root, allow_non_finite=selection.allow_non_finite)
    found: list[ChainedWeight] = []
    for weight in collect_weights(root):
        uses = readers.uses.get(id(weight.tensor), [])
        if (
            id(weight.tensor) in taken
            or not uses
            or any(u.index in weight_slots(u.node) or is_quantization_parameter_reader(u.node) for u in uses)
        ):
            continue  # quantized directly, reported by collect_targets, or a scale of quantized values
        reason = _dtype_reason(weight.values, selection)
        if reason is None:
            continue  # not a float weight (indices, shapes) or a scalar
        reason = reason or _bias_reason(uses) or guard.reason(weight.tensor, weight.values)
        traced = reason or _size_reason(weight.values, selection) or _trace(weight, readers, is_leaf)
        if isinstance(traced, str):
            report.skip("tensor", weight.name, traced)
            continue
        traced.target.uses.extend(uses)
        found.append(traced)
    assign_owners(root, [item.target for item in found])
    return found


def _dtype_reason(values: np.ndarray, selection: Selection) -> str | None:
    """None for what is not a float weight to consider (integers, scalars); a reason for a float16
    weight (reported: quantize reads float32); "" for a float32 one."""
    if values.dtype == np.float16 and values.size >= selection.min_weight_elements:
        return "stored as float16 (cast at load): quantize reads float32 weights"
    return "" if values.dtype == np.float32 and values.size > 1 else None


def _leaf_test(selection: Selection, excluded: dict[int, str]) -> Callable[[TensorUse], bool]:
    def is_leaf(use: TensorUse) -> bool:
        node = use.node
        if node.op not in selection.op_types or use.index not in weight_slots(node):
            return False
        if node.op == "Gather" and weight_values(node.inputs[1]) is not None:
            return False  # constant indices: a lookup done once, part of the chain
        if id(node) in excluded:
            raise NotApplied(f"reaches {node.op} '{node.name}', which {excluded[id(node)]}")
        return True

    return is_leaf


def _bias_reason(uses: list[TensorUse]) -> str:
    for use in uses:
        if BIAS_SLOTS.get(use.node.op) == use.index:
            return f"bias of {use.node.op} '{use.node.name}': added in float (static mode stores it as int32)"
    return ""


def _size_reason(values: np.ndarray, selection: Selection) -> str:
    if values.size < selection.min_weight_elements:
        return f"{values.size} elements < min_weight_elements={selection.min_weight_elements}"
    return ""


def _trace(weight: Weight, readers: ChainReaders, is_leaf: Callable[[TensorUse], bool]) -> ChainedWeight | str:
    """The chained weight, or why it is not one (its reader is not a weight input, or a
    data-movement op's parameter is computed at run time)."""
    if weight.node is not None and not isinstance(weight.node.attrs.get("value"), gs.Constant):
        return "held by a Constant node in a form other than a tensor value"
    try:
        axis, leaves = _stored_axis(weight.tensor, weight.values.shape, readers, is_leaf)
    except NotApplied as why:
        return f"not a weight input of a quantizable op: {why}"
    if not leaves:
        return "its data-movement chain reaches no reader"
    labels = tuple(dict.fromkeys(f"{use.node.op} '{use.node.name}'" for use in leaves))
    return ChainedWeight(weight, axis, labels)


def _stored_axis(
    tensor: gs.Tensor, shape: tuple[int, ...], readers: ChainReaders, is_leaf: Callable[[TensorUse], bool]
) -> tuple[int, list[TensorUse]]:
    """The stored axis whose positions are constant along every reader's output-channel axis
    (the largest such axis, else the largest stored axis), and the readers the chain reaches."""
    fitting, leaves = [], []
    for axis in range(len(shape)):
        along = [-1 if a == axis else 1 for a in range(len(shape))]
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(shape[axis]).reshape(along), shape))
        moved = follow_chain(tensor, positions, readers, is_leaf)
        leaves = [use for use, _ in moved]
        if shape[axis] > 1 and all(_constant_per_channel(use, array) for use, array in moved):
            fitting.append(axis)
    pool = fitting or list(range(len(shape)))
    return max(pool, key=lambda a: (shape[a], -a)), leaves


def _constant_per_channel(use: TensorUse, positions: np.ndarray) -> bool:
    """Within each output channel of the reader, the stored positions (those from this weight) agree."""
    if positions.ndim == 0:
        return True
    channel = scale_axis(use, positions.ndim)
    rows = np.moveaxis(positions, channel, 0).reshape(positions.shape[channel], -1)
    mine = rows >= 0
    lowest, highest = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    high = np.where(mine, rows, lowest).max(axis=1, initial=lowest)
    low = np.where(mine, rows, highest).min(axis=1, initial=highest)
    return bool(np.all((high == low) | ~mine.any(axis=1)))


def chained_specs(chained: list[ChainedWeight], options: QuantizeOptions) -> list[tuple[Weight, WeightSpec]]:
    """Weight-only, folded at load, per channel along the traced axis; 8-bit when 4-bit is asked."""
    specs = []
    for item in chained:
        wanted, symmetric, note = qtype(options.storage_type()), options.weights_symmetric(), ""
        if wanted.bits == 4:
            wanted, symmetric = eight_bit_fallback(wanted, options)
            note = f"{options.weight_type} blocks need the reader next to the weight; stored as {wanted.name}"
        axis = item.axis if options.per_channel else None
        reached = f"reaches {', '.join(item.readers)} through data-movement ops"
        specs.append(
            (item.target, WeightSpec(wanted, symmetric, axis, None, "fold", "; ".join(filter(None, [reached, note]))))
        )
    return specs
