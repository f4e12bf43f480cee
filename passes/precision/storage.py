"""float16 storage: float32 weights stored as float16, cast back to float32 where they are read.

Every float32 weight (initializer or Constant node, in any graph) becomes a float16 initializer and
a Cast to float32 that takes over the weight's name, so its readers are untouched. onnxruntime
folds the Cast at load (constant folding, before its fusions), so the session runs fp32's graph at
fp32's speed from a file half the size; each value moves by at most float16's rounding (relative
2^-11 for normal values).

Left as float32, each reported with its reason: tensors under ``min_elements`` (scalars, epsilons,
shape-like floats: they weigh nothing and an epsilon of 1e-12 would round to 0); tensors whose
Cast node would cost more bytes than float16 saves (a 16-value BatchNorm mean); values beyond
float16's range (|x| > 65504 would become Inf); quantization parameters (scales of
Quantize/DequantizeLinear and of folded integer weights: their precision is the quantized
model's); graph inputs and outputs and training bindings (callers read or override them); names
matching ``exclude_tensors``. Run after ``quantize`` (``--quantize int8 --float16 storage``), it
stores what int8 left float (biases, norms, small weights) as float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.graph.edit import cleanup, toposort
from optimizer.graph.names import NameAllocator
from optimizer.graph.patterns import NamePatterns
from optimizer.graph.weights import Weight, assign_owners, collect_weights
from optimizer.internal_errors import working_on
from optimizer.pass_base import PassReport
from passes.quantize.targets import is_quantization_parameter_reader
from passes.weight_guard import WeightGuard

FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class StorageConfig:
    min_elements: int = 16
    exclude_tensors: tuple[str, ...] = ()
    keep_float32: tuple[str, ...] = ()
    """Op types or node names whose weights stay float32 (the accuracy budget's back-off)."""


def store_float16(graph: gs.Graph, config: StorageConfig, report: PassReport) -> bool:
    """Store every eligible float32 weight of ``graph`` as float16; True when one was."""
    guard = WeightGuard.of(graph, allow_non_finite=True)  # NaN and Inf are exact in float16
    chosen = []
    for weight in collect_weights(graph):
        if weight.values.dtype != np.float32:
            continue
        reason = _reason(weight, guard, config)
        if reason:
            report.skip("tensor", weight.name, reason)
        else:
            chosen.append(weight)
    if chosen:
        assign_owners(graph, chosen)
        names = NameAllocator(graph, reserve_node_names=True)
        for weight in chosen:
            with working_on("tensor", weight.name):
                _store(weight, names)
        cleanup(graph)
        toposort(graph)
    before = sum(w.nbytes for w in chosen)
    report.count("weights_float16", len(chosen))
    report.saved_bytes = before - before // 2
    report.details["max_relative_error"] = max((_relative_error(w.values) for w in chosen), default=0.0)
    return bool(chosen)


def _reason(weight: Weight, guard: WeightGuard, config: StorageConfig) -> str:
    values = weight.values
    if values.size < config.min_elements:
        return f"{values.size} elements < min_elements={config.min_elements}"
    if weight.protected:
        return weight.protected
    if NamePatterns(config.exclude_tensors).matches(weight.name):
        return "name matches exclude_tensors"
    keep = NamePatterns(config.keep_float32)
    if config.keep_float32 and any(keep.matches(node.op, node.name or "") for node in weight.consumers):
        return "read by a node named in keep_float32"
    if any(is_quantization_parameter_reader(node) for node in weight.consumers):
        return "a quantization parameter: its precision is the quantized model's"
    saved, cost = 2 * values.size, _cast_cost(weight.name)
    if saved <= cost:
        return f"float16 would save {saved} bytes and its Cast node costs about {cost}"
    largest = float(np.max(np.abs(values[np.isfinite(values)]), initial=0.0))
    if largest > FLOAT16_MAX:
        return f"values up to {largest:.4g} exceed float16's range ({FLOAT16_MAX:.0f})"
    return guard.reason(weight.tensor, values)


def _cast_cost(name: str) -> int:
    """Bytes the Cast node and the float16 initializer's longer name add to the file."""
    node = onnx.helper.make_node("Cast", [f"{name}_float16"], [name], name=f"{name}_Cast", to=onnx.TensorProto.FLOAT)
    return node.ByteSize() + 4 + len("_float16")


def _store(weight: Weight, names: NameAllocator) -> None:
    """A float16 initializer and a Cast to float32 that takes over the weight's tensor."""
    half = gs.Constant(names.fresh(weight.name, "_float16"), np.ascontiguousarray(weight.values.astype(np.float16)))
    output = weight.take_over(np.float32)
    cast = gs.Node("Cast", names.fresh(weight.name, "_Cast"), {"to": onnx.TensorProto.FLOAT}, [half], [output])
    if weight.owner is None:
        raise ValueError(f"weight '{weight.name}' has no graph to hold its Cast")
    weight.owner.nodes.append(cast)


def _relative_error(values: np.ndarray) -> float:
    """Largest |fp16(x) - x| / |x| over the normal float16 range (smaller values round to a fixed step)."""
    normal = np.abs(values) >= np.finfo(np.float16).tiny
    if not np.any(normal):
        return 0.0
    original = values[normal]
    rounded = original.astype(np.float16).astype(np.float32)
    return float(np.max(np.abs(rounded - original) / np.abs(original)))
