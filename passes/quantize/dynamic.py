"""Dynamic mode: MatMul activations are quantized at run time; every other weight is weight-only.

Each MatMul ``y = x @ W`` becomes the ONNX-standard pattern onnxruntime fuses into
DynamicQuantizeMatMul (0.28x of fp32 on a 384x1536 weight, FIELD-NOTES):
``DynamicQuantizeLinear(x) -> MatMulInteger(xq, Wq, xz[, Wz]) -> Cast -> Mul(xs * Ws)``.
One DynamicQuantizeLinear serves every MatMul reading the same activation (Q, K and V).
Convolutions are never dynamic: ConvInteger runs 2-8x slower than fp32 on CPU.

Dynamic quantization is per tensor and uint8, so an activation with outliers (the input of an
FFN down-projection after GELU) loses the most; ``dynamic_weight_only`` keeps such MatMuls
weight-only (MatMulNBits), which costs no accuracy for activations and little time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.calibration.quant_math import qtype, quantize_weight
from optimizer.graph.names import NameAllocator
from optimizer.graph.patterns import NamePatterns
from optimizer.graph.walk import TensorUse
from optimizer.graph.weights import Weight
from optimizer.internal_errors import working_on
from optimizer.pass_base import PassReport
from passes.quantize.common import QuantizedWeight
from passes.quantize.options import QuantizeOptions
from passes.quantize.tied import other_readers
from passes.quantize.weights import NAMED_REASON, WeightSpec, eight_bit_only, quantize_weight_only_all, weight_only_spec

OPSET_DYNAMIC = 11
GELU_OPS = ("Erf", "Gelu", "FastGelu", "BiasGelu", "QuickGelu")
GELU_SEARCH_DEPTH = 4
RULE_WORDS = ("auto", "gelu-output", "none")


@dataclass
class DynamicPlan:
    """Targets whose MatMul consumers run dynamically, and targets kept weight-only."""

    dynamic: list[Weight] = field(default_factory=list)
    weight_only: list[tuple[Weight, WeightSpec]] = field(default_factory=list)
    float_consumers: dict[int, str] = field(default_factory=dict)
    notes: list[dict[str, str]] = field(default_factory=list)
    opset: int = 1

    def required_opset(self) -> int:
        needs = [OPSET_DYNAMIC] if self.dynamic else [1]
        needs += [spec.required_opset() for _, spec in self.weight_only]
        return max(needs)


def plan_dynamic(
    graph: gs.Graph, targets: list[Weight], options: QuantizeOptions, *, calibrated: bool = False
) -> DynamicPlan:
    """Which MatMuls go dynamic; ``calibrated``: outlier channels will be measured (see
    quantize_outliers), which makes the 'auto' weight-only rule unnecessary."""
    plan = DynamicPlan(opset=graph.opset)
    eight_bit = qtype(options.weight_type).bits == 8
    for target in targets:
        matmuls = [c for c in target.uses if c.node.op == "MatMul"]
        small = target.values.ndim == 2 and target.values.shape[0] < options.dynamic_min_k
        named = eight_bit_only(target, options)
        if named or not eight_bit or small or target.values.ndim != 2 or len(matmuls) != len(target.uses):
            plan.weight_only.append((target, weight_only_spec(target, options, graph.opset)))
            if matmuls and named:
                plan.notes.append({"tensor": target.name, "reason": NAMED_REASON})
            if matmuls and small and eight_bit:
                plan.notes.append(
                    {
                        "tensor": target.name,
                        "reason": f"K={target.values.shape[0]} < "
                        f"dynamic_min_k={options.dynamic_min_k}: weight-only is faster",
                    }
                )
            continue
        for consumer in matmuls:
            reason = weight_only_reason(consumer, options.dynamic_weight_only, calibrated)
            if reason:
                plan.float_consumers[id(consumer.node)] = reason
        plan.dynamic.append(target)
    return plan


def weight_only_reason(consumer: TensorUse, rules: tuple[str, ...], calibrated: bool) -> str:
    """Why this MatMul stays weight-only in dynamic mode ('' when it goes dynamic)."""
    if "none" in rules:
        return ""
    gelu_rule = "gelu-output" in rules or ("auto" in rules and not calibrated)
    if gelu_rule and _comes_from(consumer.node.inputs[0], GELU_OPS, GELU_SEARCH_DEPTH):
        return "input comes from a GELU (outliers) and no calibration data measured them: weight-only keeps accuracy"
    patterns = tuple(r for r in rules if r not in RULE_WORDS)
    if patterns and NamePatterns(patterns).matches(consumer.node.name or ""):
        return "node name matches dynamic_weight_only"
    return ""


def _comes_from(tensor: gs.Tensor, ops: tuple[str, ...], depth: int) -> bool:
    if depth == 0 or isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
        return False
    producer = tensor.inputs[0]
    if producer.op in ops:
        return True
    return any(_comes_from(source, ops, depth - 1) for source in producer.inputs)


def dynamic_activations(root: gs.Graph, plan: DynamicPlan) -> list[str]:
    """Main-graph activations read by MatMuls that go dynamic (candidates for outlier splitting)."""
    names = set()
    for target in plan.dynamic:
        for consumer in target.uses:
            if consumer.graph is root and id(consumer.node) not in plan.float_consumers:
                names.add(consumer.node.inputs[0].name)
    return sorted(names)


def quantize_dynamic(
    graph: gs.Graph,
    plan: DynamicPlan,
    options: QuantizeOptions,
    names: NameAllocator,
    report: PassReport,
    outliers: dict[str, np.ndarray] | None = None,
) -> None:
    quantize_weight_only_all(plan.weight_only, names, report, plan.notes)
    activations: dict[tuple[int, int], ActivationPath] = {}
    outliers = outliers or {}
    weight_type = qtype(options.weight_type)
    for target in plan.dynamic:
        axis = 1 if options.per_channel else None
        with working_on("tensor", target.name):
            quantized = quantize_weight(target.values, weight_type, symmetric=options.weights_symmetric(), axis=axis)
            weight = QuantizedWeight(target, quantized, names)
        report.count(f"weights_{weight_type.name}")
        for consumer in target.uses:
            with working_on("node", consumer.node.name):
                _dynamic_consumer(graph, plan, consumer, weight, activations, outliers, names, report)
        _fold_for_other_readers(target, weight, report)


def _fold_for_other_readers(target: Weight, weight: QuantizedWeight, report: PassReport) -> None:
    """Nodes that read the float weight besides its MatMuls (a tied embedding's Transpose -> Gather)
    read the same integers through the folded form, so the file does not keep the float copy;
    onnxruntime folds it at load (fp32 speed there)."""
    others = other_readers(target)
    if not others:
        return
    weight.make_float_view("fold")
    readers = ", ".join(dict.fromkeys(f"{node.op} '{node.name}'" for node in others))
    report.details.setdefault("notes", []).append(
        f"{target.name}: also read by {readers}, which read(s) the int8 weight folded at load"
    )


def _dynamic_consumer(
    graph: gs.Graph,
    plan: DynamicPlan,
    consumer: TensorUse,
    weight: QuantizedWeight,
    activations: dict[tuple[int, int], ActivationPath],
    outliers: dict[str, np.ndarray],
    names: NameAllocator,
    report: PassReport,
) -> None:
    """One MatMul reading a dynamic weight: keep it float (with the reason) or rewrite it to MatMulInteger."""
    reason = plan.float_consumers.get(id(consumer.node))
    if reason:
        weight.make_float_view("fold")
        report.count("matmul_weight_only")
        report.details.setdefault("weight_only_matmuls", []).append({"node": consumer.node.name, "reason": reason})
        return
    source = consumer.node.inputs[0]
    key = (id(consumer.graph), id(source))
    if key not in activations:
        split = outliers.get(source.name) if consumer.graph is graph else None
        activations[key] = ActivationPath.build(consumer.graph, source, split, names)
        if split is not None and split.size > 1:
            report.count("outlier_channels_split", int(split.size) - 1)
    _rewrite_matmul(consumer, weight, activations[key], names)
    report.count("matmul_dynamic")


@dataclass
class ActivationPath:
    """The quantized form of one activation, shared by every dynamic MatMul that reads it."""

    quantized: gs.Variable
    scale: gs.Variable
    zero_point: gs.Variable
    outlier_index: np.ndarray | None = None
    outlier_values: gs.Variable | None = None

    @classmethod
    def build(
        cls, graph: gs.Graph, source: gs.Tensor, split: np.ndarray | None, names: NameAllocator
    ) -> ActivationPath:
        base = source.name
        quantize_input, outlier_values = source, None
        if split is not None and split.size > 1:
            quantize_input, outlier_values = _split_outliers(graph, source, split, names)
            split = split[:-1]
        outputs = [
            gs.Variable(names.fresh(base, suffix), dtype=dtype)
            for suffix, dtype in (
                ("_dynamic_quantized", np.uint8),
                ("_dynamic_scale", np.float32),
                ("_dynamic_zero_point", np.uint8),
            )
        ]
        graph.nodes.append(
            gs.Node("DynamicQuantizeLinear", names.fresh(base, "_DynamicQuantizeLinear"), {}, [quantize_input], outputs)
        )
        quantized, scale, zero_point = outputs
        return cls(
            quantized,
            scale,
            zero_point,
            outlier_index=split if outlier_values is not None else None,
            outlier_values=outlier_values,
        )


def _split_outliers(graph: gs.Graph, source: gs.Tensor, split: np.ndarray, names: NameAllocator):
    """(activation with outlier channels zeroed, the outlier channels alone); the last entry of
    ``split`` is the channel count."""
    base = source.name
    mask = np.ones(int(split[-1]), np.float32)
    split = split[:-1]
    mask[split] = 0.0
    masked = gs.Variable(names.fresh(base, "_inliers"), dtype=np.float32)
    picked = gs.Variable(names.fresh(base, "_outliers"), dtype=np.float32)
    graph.nodes.extend(
        [
            gs.Node(
                "Mul",
                names.fresh(base, "_InlierMask"),
                {},
                [source, gs.Constant(names.fresh(base, "_inlier_mask"), mask)],
                [masked],
            ),
            gs.Node(
                "Gather",
                names.fresh(base, "_OutlierGather"),
                {"axis": -1},
                [source, gs.Constant(names.fresh(base, "_outlier_index"), split.astype(np.int64))],
                [picked],
            ),
        ]
    )
    return masked, picked


def _rewrite_matmul(consumer: TensorUse, weight: QuantizedWeight, path: ActivationPath, names: NameAllocator) -> None:
    """MatMul(x, W) -> DynamicQuantizeLinear + MatMulInteger + Cast + Mul [+ outlier MatMul], same output."""
    node, graph = consumer.node, consumer.graph
    output = node.outputs[0]
    base = node.name or output.name
    x_q, x_scale, x_zero = path.quantized, path.scale, path.zero_point
    integer_inputs = [x_q, weight.integer, x_zero] + ([weight.zero_point] if weight.zero_point is not None else [])
    accumulated = gs.Variable(names.fresh(base, "_int32"), dtype=np.int32)
    as_float = gs.Variable(names.fresh(base, "_int32_float"), dtype=np.float32)
    combined_scale = gs.Variable(names.fresh(base, "_output_scale"), dtype=np.float32)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.extend(
        [
            gs.Node("MatMulInteger", names.fresh(base, "_MatMulInteger"), {}, integer_inputs, [accumulated]),
            gs.Node("Cast", names.fresh(base, "_Cast"), {"to": onnx.TensorProto.FLOAT}, [accumulated], [as_float]),
            gs.Node("Mul", names.fresh(base, "_ScaleMul"), {}, [x_scale, weight.scale], [combined_scale]),
        ]
    )
    if path.outlier_values is None or path.outlier_index is None:
        graph.nodes.append(gs.Node("Mul", names.fresh(base, "_Mul"), {}, [as_float, combined_scale], [output]))
        return
    inlier_part = gs.Variable(names.fresh(base, "_inlier_part"), dtype=np.float32)
    outlier_part = gs.Variable(names.fresh(base, "_outlier_part"), dtype=np.float32)
    outlier_rows = _outlier_rows(graph, weight, path.outlier_index, names)
    # one channel: an outer product, which a broadcast Mul computes faster than a K=1 MatMul
    outer = "Mul" if path.outlier_index.size == 1 else "MatMul"
    graph.nodes.extend(
        [
            gs.Node("Mul", names.fresh(base, "_Mul"), {}, [as_float, combined_scale], [inlier_part]),
            gs.Node(
                outer, names.fresh(base, "_Outlier" + outer), {}, [path.outlier_values, outlier_rows], [outlier_part]
            ),
        ]
    )
    bias_add = _bias_add(graph, output)
    if bias_add is None:
        graph.nodes.append(gs.Node("Add", names.fresh(base, "_OutlierAdd"), {}, [inlier_part, outlier_part], [output]))
        return
    # (inliers + bias) + outliers: onnxruntime folds the bias Add into DynamicQuantizeMatMul only
    # when it follows the integer MatMul directly (MiniLM: 0.545x -> 0.512x fp32 latency, with the Mul)
    result, biased = bias_add.outputs[0], gs.Variable(names.fresh(base, "_biased"), dtype=np.float32)
    bias_add.inputs[bias_add.inputs.index(output)] = inlier_part
    bias_add.outputs[0] = biased
    graph.nodes.append(gs.Node("Add", names.fresh(base, "_OutlierAdd"), {}, [biased, outlier_part], [result]))


def _bias_add(graph: gs.Graph, output: gs.Tensor) -> gs.Node | None:
    """The Add that adds a constant bias to ``output`` and is its only reader, if there is one."""
    readers = list(output.outputs)
    if len(readers) != 1 or any(t is output for t in graph.outputs):
        return None
    add = readers[0]
    if add.op != "Add" or add.domain not in ("", None, "ai.onnx") or len(add.inputs) != 2 or len(add.outputs) != 1:
        return None
    other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
    return add if isinstance(other, gs.Constant) else None


def _outlier_rows(graph: gs.Graph, weight: QuantizedWeight, index: np.ndarray, names: NameAllocator) -> gs.Variable:
    """Dequantized weight rows for the outlier channels, read from the integer weight (no float copy):
    Gather -> Cast -> [Sub zero point] -> Mul scale; all constant, so onnxruntime folds it at load."""
    base = weight.target.name
    quantized = weight.quantized
    rows = gs.Variable(names.fresh(base, "_outlier_rows_int"), dtype=quantized.values.dtype)
    as_float = gs.Variable(names.fresh(base, "_outlier_rows_cast"), dtype=np.float32)
    result = gs.Variable(names.fresh(base, "_outlier_rows"), dtype=np.float32)
    nodes = [
        gs.Node(
            "Gather",
            names.fresh(base, "_OutlierRows"),
            {"axis": 0},
            [weight.integer, gs.Constant(names.fresh(base, "_outlier_rows_index"), index.astype(np.int64))],
            [rows],
        ),
        gs.Node("Cast", names.fresh(base, "_OutlierRowsCast"), {"to": onnx.TensorProto.FLOAT}, [rows], [as_float]),
    ]
    if weight.zero_point is not None:
        zero = gs.Variable(names.fresh(base, "_outlier_rows_zero"), dtype=np.float32)
        centered = gs.Variable(names.fresh(base, "_outlier_rows_centered"), dtype=np.float32)
        nodes += [
            gs.Node(
                "Cast",
                names.fresh(base, "_OutlierZeroCast"),
                {"to": onnx.TensorProto.FLOAT},
                [weight.zero_point],
                [zero],
            ),
            gs.Node("Sub", names.fresh(base, "_OutlierRowsSub"), {}, [as_float, zero], [centered]),
        ]
        as_float = centered
    nodes.append(gs.Node("Mul", names.fresh(base, "_OutlierRowsMul"), {}, [as_float, weight.scale], [result]))
    graph.nodes.extend(nodes)
    return result
