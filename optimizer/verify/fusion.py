"""What onnxruntime really runs: which quantized groups became integer kernels.

A QDQ graph is only a request. onnxruntime fuses some groups (QLinearConv, MatMulNBits,
DynamicQuantizeMatMul ...) and leaves others as DequantizeLinear followed by a float op, which
shrinks the file but not the time, or worse. The check loads the model with
``optimized_model_filepath`` set and reads the graph onnxruntime saved. It only opens a session
(no run), so ``--timeout`` has nothing to stop here: graph optimization cannot be interrupted.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from optimizer.graph.walk import walk_model
from optimizer.verify.runtime import ModelSource, ProviderChoice, as_provider_choice, create_session, model_label

INTEGER_KERNELS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "MatMulNBits",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearConcat",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QLinearReduceMean",
        "QLinearWhere",
        "QAttention",
        "DynamicQuantizeLSTM",
        "GatherBlockQuantized",
        "ConvInteger",
        "MatMulInteger",
        "NhwcQLinearConv",
        "QEmbedLayerNormalization",
        "QOrderedMatMul",
    }
)
SLOW_KERNELS = {"ConvInteger": "ConvInteger runs 2-8x slower than a float Conv on onnxruntime's CPU provider"}
COMPUTE_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "MatMul",
        "Gemm",
        "FusedConv",
        "FusedMatMul",
        "FusedGemm",
        "NchwcConv",
        "Gather",
        "LSTM",
        "GRU",
        "Attention",
    }
)
DEQUANTIZE_OPS = frozenset({"DequantizeLinear"})
INTEGER_OPS_WRITTEN = ("MatMulInteger", "ConvInteger")
"""ONNX-standard integer ops a quantizer writes directly (the dynamic pattern), each one group."""


@dataclass
class FusionReport:
    """Quantized groups written versus integer kernels run, and why the rest stayed float."""

    model: str
    provider_used: str
    written_ops: dict[str, int]
    run_ops: dict[str, int]
    quantized_groups_written: int
    integer_kernels: dict[str, int]
    float_after_dequantize: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def likely_slower(self) -> bool:
        return bool(self.warnings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "provider_used": self.provider_used,
            "quantized_groups_written": self.quantized_groups_written,
            "integer_kernels": dict(sorted(self.integer_kernels.items())),
            "float_after_dequantize": list(self.float_after_dequantize),
            "likely_slower": self.likely_slower,
            "warnings": list(self.warnings),
            "written_ops": dict(sorted(self.written_ops.items())),
            "run_ops": dict(sorted(self.run_ops.items())),
        }

    def summary(self) -> str:
        kernels = ", ".join(f"{op} x{count}" for op, count in sorted(self.integer_kernels.items())) or "none"
        lines = [
            f"{self.quantized_groups_written} quantized group(s) written; onnxruntime ({self.provider_used}) "
            f"runs integer kernels: {kernels}"
        ]
        if self.float_after_dequantize:
            by_op = Counter(entry["op"] for entry in self.float_after_dequantize)
            lines.append(
                "stayed DequantizeLinear + float op: "
                + ", ".join(f"{op} x{count}" for op, count in sorted(by_op.items()))
            )
        lines += [f"warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def check_fusion(model: ModelSource, provider: str | ProviderChoice = "cpu") -> FusionReport:
    """Load ``model`` in onnxruntime, read the graph it optimized, and classify the groups."""
    choice = as_provider_choice(provider)
    written = _as_model(model)
    with tempfile.TemporaryDirectory(prefix="onnx-compress-fusion-") as folder:
        optimized_path = Path(folder) / "optimized.onnx"
        provider_used = _optimize(model, choice, optimized_path)
        run = onnx.load(str(optimized_path), load_external_data=False)
    return analyse(written, run, model_label(model), provider_used)


def analyse(written: onnx.ModelProto, run: onnx.ModelProto, label: str, provider_used: str) -> FusionReport:
    """Compare the written graph with the one onnxruntime runs (pure: no session)."""
    written_ops = op_counts(written)
    run_ops = op_counts(run)
    report = FusionReport(
        model=label,
        provider_used=provider_used,
        written_ops=written_ops,
        run_ops=run_ops,
        quantized_groups_written=len(_dequantized_compute(written.graph))
        + sum(written_ops.get(op, 0) for op in INTEGER_OPS_WRITTEN),
        integer_kernels={op: n for op, n in run_ops.items() if op in INTEGER_KERNELS},
        float_after_dequantize=_dequantized_compute(run.graph),
    )
    report.warnings = _warnings(report)
    return report


def _warnings(report: FusionReport) -> list[str]:
    warnings = [
        f"{reason} ({report.run_ops[op]} node(s))" for op, reason in SLOW_KERNELS.items() if op in report.run_ops
    ]
    by_op = Counter(entry["op"] for entry in report.float_after_dequantize)
    activation_dq = sum(1 for entry in report.float_after_dequantize if entry["operand"] == "activation")
    if activation_dq:
        warnings.append(
            f"{activation_dq} op(s) dequantize their activations and run in float: the Q/DQ pairs "
            "cost time without an integer kernel"
        )
    if by_op.get("Gather"):
        warnings.append(f"{by_op['Gather']} Gather(s) dequantize the whole table on every run")
    added_transposes = report.run_ops.get("Transpose", 0) - report.written_ops.get("Transpose", 0)
    if added_transposes > 2 * max(1, sum(report.integer_kernels.values())) and report.integer_kernels:
        warnings.append(
            f"onnxruntime added {added_transposes} layout Transpose node(s) around integer kernels: "
            "quantize the ops between them too"
        )
    return warnings


def _dequantized_compute(graph: onnx.GraphProto) -> list[dict[str, str]]:
    """Compute nodes that read a DequantizeLinear output, with which operand it is."""
    producers = {output: node for node in graph.node for output in node.output}
    initializers = {t.name for t in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        for name in node.input:
            producer = producers.get(name)
            if producer is None or producer.op_type not in DEQUANTIZE_OPS:
                continue
            source = producer.input[0] if producer.input else ""
            constant = source in initializers or (source in producers and producers[source].op_type == "Constant")
            operand = "weight" if constant else "activation"
            found.append({"node": node.name or node.output[0], "op": node.op_type, "operand": operand})
            break
    return found


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count by op type over every graph: main graph, subgraphs and model-local functions
    (a quantized node inside a function runs at each call)."""
    counts: Counter[str] = Counter()
    for site in walk_model(model, functions=True):
        counts.update(node.op_type for node in site.graph.node)
    return dict(counts)


def _as_model(model: ModelSource) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load(os.fspath(model), load_external_data=False)


OPTIMIZED_MODEL_CONFIG = {
    "session.optimized_model_external_initializers_file_name": "optimized.data",
    "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
}


def _optimize(model: ModelSource, choice: ProviderChoice, optimized_path: Path) -> str:
    return create_session(model, choice, optimized_model_path=optimized_path, config=OPTIMIZED_MODEL_CONFIG)[1]


QUANTIZED_OPS = frozenset(
    {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}
)


def has_dequantize(model: onnx.ModelProto) -> bool:
    """True when any graph of the model holds a quantized group (QDQ or the dynamic pattern)."""
    return bool(QUANTIZED_OPS & set(op_counts(model)))
