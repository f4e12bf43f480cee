"""float16 (or bfloat16) computation, with float32 islands where the lower precision would break
the model.

A node computes in the target type when its schema has a form for it (every type parameter that
binds a float32 tensor admits the target) and none of these keeps it float32, each reported:
- it holds subgraphs (If/Loop/Scan): its inputs and outputs stay float32, its bodies convert;
- precision: reductions and sums (ReduceSum/Mean/..., CumSum), Exp/Log/Pow, Softmax/LogSoftmax,
  Range and normalizations that compute statistics themselves (Instance/Group/MeanVariance);
- sizes: it computes on values derived from Shape/Size (float arithmetic on sizes must be exact),
  or casts floats to integers, or integers to floats;
- range: a float input or output whose calibrated |x| exceeds ``range_limit`` (float16 tops out at
  65504; calibration data, or generated samples when none is given, decides);
- the user named its op type or node.
Graph inputs and outputs keep float32 (``keep_io_types``); weights read by a converted node are
stored in the target type (a float32 reader gets a Cast back, which onnxruntime folds at load); one
Cast per tensor and direction, shared by every reader in a graph. Casts the model already has to
float32 are retargeted inside converted regions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.graph.names import NameAllocator
from optimizer.graph.patterns import NamePatterns
from optimizer.graph.tensor_types import SlotTypes, slot_types
from optimizer.graph.walk import iter_graphs, node_subgraphs
from optimizer.graph.weights import weight_values
from optimizer.pass_base import PassReport
from passes.weight_guard import WeightGuard

FLOAT = onnx.TensorProto.FLOAT
FLOAT32_OPS = frozenset(
    {
        "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
        "ReduceProd", "CumSum", "Exp", "Log", "Pow", "Softmax", "LogSoftmax", "Range", "InstanceNormalization",
        "GroupNormalization", "MeanVarianceNormalization", "LpNormalization", "RandomNormal", "RandomUniform",
        "RandomNormalLike", "RandomUniformLike",
    }
)  # fmt: skip
SIZE_SOURCES = frozenset({"Shape", "Size"})
TINY_CHECKED = 64
"""Constants up to this many elements are checked for values that round to 0 (epsilons)."""
SMALL_CONSTANT = 8
"""Constants up to this many elements (axes, scalars) can take part in size arithmetic."""
QUANTIZATION_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
INTEGER_SOURCES = frozenset({"DequantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"})


@dataclass(frozen=True)
class Target:
    """The lower-precision float type a model computes in."""

    name: str
    elem_type: int
    dtype: np.dtype
    largest: float

    @property
    def type_string(self) -> str:
        return f"tensor({self.name})"


def float16_target() -> Target:
    return Target("float16", onnx.TensorProto.FLOAT16, np.dtype(np.float16), float(np.finfo(np.float16).max))


def bfloat16_target() -> Target:
    import ml_dtypes  # onnx's own dependency

    return Target("bfloat16", onnx.TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16), 3.3895e38)


@dataclass(frozen=True)
class ComputeConfig:
    """What converts: the target type, what stays float32 by name, and the calibrated range limit."""

    target: Target
    keep_float32: tuple[str, ...] = ()
    range_limit: float = 16384.0


@dataclass
class _State:
    config: ComputeConfig
    types: dict[str, int]
    ranges: dict[str, float]
    size_derived: set[int]
    opset: int
    report: PassReport
    guard: WeightGuard
    low: set[int] = field(default_factory=set)
    """ids of the tensors that hold the target type after conversion."""
    pinned: list[gs.Tensor] = field(default_factory=list)
    """Every tensor whose id is a key here, kept alive: a collected tensor's id can be reused by a
    new one (a weight no reader holds any more, then a new Cast output)."""

    converted: dict[int, tuple[gs.Node, SlotTypes]] = field(default_factory=dict)

    def mark_low(self, tensor: gs.Tensor) -> None:
        self.low.add(id(tensor))
        self.pinned.append(tensor)


def convert_compute(
    root: gs.Graph, types: dict[str, int], config: ComputeConfig, ranges: dict[str, float], report: PassReport
) -> bool:
    """Convert ``root`` in place; True when some node now computes in the target type. ``types``:
    every tensor's element type before conversion (``optimizer.graph.tensor_types``)."""
    state = _State(config, types, ranges, _size_derived(root), int(root.opset), report, WeightGuard.of(root))
    for graph in iter_graphs(root):
        for node in graph.nodes:
            _decide(node, state)
    if not state.converted:
        return False
    names = NameAllocator(root, reserve_node_names=True)
    casts = _Casts(names, state)
    for node, _ in state.converted.values():
        _retype_node(node, state)
    for graph in list(iter_graphs(root)):
        nodes = list(graph.nodes)  # not the Casts added below
        _keep_outputs_float32(graph, state, casts)
        for node in nodes:
            _rewire_inputs(graph, node, state, casts)
    _store_once(root, casts)
    report.count("nodes_" + config.target.name, len(state.converted))
    report.count("casts_inserted", casts.count)
    return True


def _decide(node: gs.Node, state: _State) -> None:
    slots = slot_types(node, state.opset)
    if slots is None:
        if _reads_or_writes_float(node, state):
            state.report.skip("node", _label(node), "no ONNX schema (custom or unknown op): kept float32")
        return
    if not _reads_or_writes_float(node, state):
        return
    reason = _keep_reason(node, slots, state)
    if reason:
        state.report.skip("node", _label(node), reason)
        return
    state.converted[id(node)] = (node, slots)
    for index, tensor in enumerate(node.outputs):
        if state.types.get(tensor.name) == FLOAT and state.config.target.type_string in slots.allowed(
            slots.outputs[index]
        ):
            state.mark_low(tensor)


def _reads_or_writes_float(node: gs.Node, state: _State) -> bool:
    return any(state.types.get(t.name) == FLOAT for t in [*node.inputs, *node.outputs])


def _keep_reason(node: gs.Node, slots: SlotTypes, state: _State) -> str:
    config, target = state.config, state.config.target
    if node_subgraphs(node):
        return "holds subgraphs: its inputs and outputs stay float32 (the bodies are converted)"
    if node.op in FLOAT32_OPS:
        return f"precision: {node.op} computes in float32 (sums, exponentials and statistics lose too much)"
    if node.op in QUANTIZATION_OPS:
        return "a quantization node: its scales and zero points stay as they are"
    if _next_to_quantization(node):
        return "reads dequantized values or feeds a QuantizeLinear: onnxruntime fuses it into an integer kernel"
    if NamePatterns(config.keep_float32).matches(node.op, node.name or ""):
        return "named in keep_float32 (op type or node name)"
    unknown = [t.name for t in [*node.inputs, *node.outputs] if t.name and t.name not in state.types]
    if unknown:
        return f"the type of {unknown[0]} is unknown (a sequence or optional, or inference could not type it)"
    form = _value_form_reason(node, state)
    if form:
        return form
    if node.op == "Cast":
        source = state.types.get(node.inputs[0].name)
        if int(node.attrs.get("to", 0)) != FLOAT or source != FLOAT:
            return "a Cast between float32 and another type: kept float32 (sizes and indices stay exact)"
    if any(id(t) in state.size_derived and state.types.get(t.name) == FLOAT for t in node.inputs):
        return "computes on tensor sizes (Shape/Size): float32 keeps them exact"
    bound = list(zip([*node.inputs, *node.outputs], [*slots.inputs, *slots.outputs], strict=True))
    params = {s for t, s in bound if state.types.get(t.name) == FLOAT and s in slots.constraints}
    for param in sorted(params):
        if target.type_string not in slots.allowed(param):
            return f"{node.op} has no {target.name} form (type {param})"
        unknown = [t.name for t, s in bound if s == param and t.name and state.types.get(t.name) != FLOAT]
        if unknown:
            return f"{unknown[0]} shares type {param} with a float32 tensor but its type is unknown or differs"
    return _range_reason(node, state)


def _value_form_reason(node: gs.Node, state: _State) -> str:
    """Constant/ConstantOfShape values that cannot be retyped or would not survive the target type,
    and ops whose output type a dtype attribute sets."""
    if "dtype" in node.attrs:
        return f"{node.op}'s output type is set by its dtype attribute"
    if node.op not in ("Constant", "ConstantOfShape"):
        return ""
    value = node.attrs.get("value")
    if not isinstance(value, gs.Constant):
        return f"{node.op} without a tensor value (a scalar form or the float32 default): kept float32"
    return _lossy_values(value.name, np.asarray(value.values), state)


def _lossy_values(name: str, values: np.ndarray, state: _State) -> str:
    """Why ``values`` do not survive the target type: beyond the range limit, or nonzero values
    that round to 0 (an epsilon of 1e-12); "" when they do."""
    finite = values[np.isfinite(values)]
    largest = float(np.max(np.abs(finite), initial=0.0))
    if largest > state.config.range_limit:
        return f"range: {name} holds {largest:.4g} > {state.config.range_limit:.4g}"
    if finite.size <= TINY_CHECKED and np.any((finite != 0) & (finite.astype(state.config.target.dtype) == 0)):
        return f"{name} holds a nonzero value that is 0 in {state.config.target.name} (an epsilon)"
    return ""


def _next_to_quantization(node: gs.Node) -> bool:
    """Reads a DequantizeLinear/MatMulInteger/... output (directly or through its Cast to float), or
    feeds a quantizer."""
    for tensor in node.inputs:
        producer = _producer(tensor)
        if producer is not None and producer.op == "Cast":
            producer = _producer(producer.inputs[0]) if _producer(producer.inputs[0]) else producer
        if producer is not None and producer.op in INTEGER_SOURCES:
            return True
    return any(reader.op in QUANTIZATION_OPS for tensor in node.outputs for reader in tensor.outputs)


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if isinstance(tensor, gs.Variable) and tensor.inputs else None


def _range_reason(node: gs.Node, state: _State) -> str:
    limit = state.config.range_limit
    for tensor in [*node.inputs, *node.outputs]:
        values = weight_values(tensor)
        if values is not None and np.asarray(values).dtype == np.float32:
            reason = _lossy_values(tensor.name, np.asarray(values), state)
            if reason:
                return reason
        largest = state.ranges.get(tensor.name)
        if largest is not None and largest > limit:
            return f"range: |{tensor.name}| reaches {largest:.4g} > {limit:.4g} on the calibration samples"
    return ""


def _size_derived(root: gs.Graph) -> set[int]:
    """ids of tensors computed from Shape/Size outputs and small constants only (sizes, not data)."""
    derived: set[int] = set()
    for graph in iter_graphs(root):
        for node in graph.nodes:
            inputs = [t for t in node.inputs if t.name]
            small = [t for t in inputs if id(t) not in derived and _small_constant(t)]
            from_sizes = [t for t in inputs if id(t) in derived]
            if node.op in SIZE_SOURCES or (from_sizes and len(from_sizes) + len(small) == len(inputs)):
                derived.update(id(t) for t in node.outputs)
    return derived


def _small_constant(tensor: gs.Tensor) -> bool:
    values = weight_values(tensor)
    return values is not None and np.asarray(values).size <= SMALL_CONSTANT


def _retype_node(node: gs.Node, state: _State) -> None:
    target = state.config.target
    if node.op == "Cast":
        node.attrs["to"] = target.elem_type
    value = node.attrs.get("value")
    if node.op in ("Constant", "ConstantOfShape") and isinstance(value, gs.Constant):
        value.values = np.asarray(value.values).astype(target.dtype)
    for tensor in node.outputs:
        if id(tensor) in state.low and isinstance(tensor, gs.Variable):
            tensor.dtype = target.dtype


def _wants_low(node: gs.Node, index: int, slots: SlotTypes, state: _State) -> bool:
    type_string = slots.inputs[index]
    return type_string in slots.constraints and state.config.target.type_string in slots.allowed(type_string)


class _Casts:
    """One Cast per (graph, tensor, direction), shared by every reader in that graph; weights read in
    the target type are stored in it (once)."""

    def __init__(self, names: NameAllocator, state: _State) -> None:
        self.names, self.state, self.count = names, state, 0
        self.made: dict[tuple[int, int, int], gs.Tensor] = {}

    def low(self, graph: gs.Graph, tensor: gs.Tensor) -> gs.Tensor:
        target = self.state.config.target
        stored = isinstance(tensor, gs.Constant) and np.asarray(tensor.values).dtype == np.float32
        if stored and not self.state.guard.reason(tensor, None):  # an overridable input keeps its float32
            key = (0, id(tensor), target.elem_type)
            if key not in self.made:
                values = np.asarray(tensor.values).astype(target.dtype)
                self.made[key] = gs.Constant(self.names.fresh(tensor.name, f"_{target.name}"), values)
                self.state.pinned.append(tensor)
                self.state.report.count("weights_" + target.name)
            return self.made[key]
        return self._cast(graph, tensor, target.elem_type, target.dtype)

    def float32(self, graph: gs.Graph, tensor: gs.Tensor) -> gs.Tensor:
        return self._cast(graph, tensor, FLOAT, np.dtype(np.float32))

    def _cast(self, graph: gs.Graph, tensor: gs.Tensor, to: int, dtype: np.dtype) -> gs.Tensor:
        key = (id(graph), id(tensor), to)
        if key not in self.made:
            suffix = "_float32" if to == FLOAT else f"_{self.state.config.target.name}"
            output = gs.Variable(self.names.fresh(tensor.name, suffix), dtype=dtype)
            graph.nodes.append(gs.Node("Cast", self.names.fresh(tensor.name, "_Cast"), {"to": to}, [tensor], [output]))
            self.made[key] = output
            self.state.pinned.append(tensor)
            self.count += 1
            if to != FLOAT:
                self.state.mark_low(output)
        return self.made[key]


def _rewire_inputs(graph: gs.Graph, node: gs.Node, state: _State, casts: _Casts) -> None:
    entry = state.converted.get(id(node))
    for index, tensor in enumerate(node.inputs):
        is_low = id(tensor) in state.low
        if entry is not None and _wants_low(node, index, entry[1], state):
            if not is_low and state.types.get(tensor.name) == FLOAT:
                node.inputs[index] = casts.low(graph, tensor)
        elif is_low:
            node.inputs[index] = casts.float32(graph, tensor)


def _store_once(root: gs.Graph, casts: _Casts) -> None:
    """A float32 reader of a weight stored in the target type reads it through a Cast back (folded
    at load), so the weight is stored once."""
    target = casts.state.config.target.elem_type
    for graph in list(iter_graphs(root)):
        for node in list(graph.nodes):
            for index, tensor in enumerate(node.inputs):
                stored = casts.made.get((0, id(tensor), target))
                if stored is not None:
                    node.inputs[index] = casts.float32(graph, stored)


def _keep_outputs_float32(graph: gs.Graph, state: _State, casts: _Casts) -> None:
    """A graph output computed in the target type is written as float32 under its own name."""
    own = {id(node) for node in graph.nodes}
    for position, tensor in enumerate(graph.outputs):
        if id(tensor) not in state.low or not tensor.inputs or id(tensor.inputs[0]) not in own:
            continue
        producer, readers = tensor.inputs[0], list(tensor.outputs)
        renamed = gs.Variable(casts.names.fresh(tensor.name, f"_{state.config.target.name}"), dtype=tensor.dtype)
        producer.outputs[producer.outputs.index(tensor)] = renamed
        for reader in readers:  # the graph's other readers keep the value in the target type
            for index, source in enumerate(list(reader.inputs)):
                if source is tensor:
                    reader.inputs[index] = renamed
        state.mark_low(renamed)
        state.low.discard(id(tensor))
        tensor.dtype = np.float32
        graph.nodes.append(gs.Node("Cast", casts.names.fresh(tensor.name, "_Cast"), {"to": FLOAT}, [renamed], [tensor]))
        casts.count += 1
        graph.outputs[position] = tensor


def _label(node: gs.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op)
