"""quantize: store weights as integers; in dynamic and static modes compute in integers too.

Modes (``mode``):
- ``weights``: integer weights, float activations (MatMul -> MatMulNBits; elsewhere folded at load).
- ``dynamic`` (default): MatMul runs as DynamicQuantizeLinear + MatMulInteger + Cast + Mul, which
  onnxruntime fuses into DynamicQuantizeMatMul; every other weight is weight-only, because dynamic
  convolutions (ConvInteger) run 2-8x slower than fp32. Never slower than fp32 on CPU.
- ``static``: QDQ around each quantizable op with activation ranges from calibration data,
  placed so onnxruntime runs QLinearConv/QLinearMatMul and keeps neighbours quantized where the
  integer chain goes on (see passes/quantize/static.py).

4-bit MatMul weights are rounded by GPTQ when calibration data is given (``weight_rounding``).
Weights are quantized once however many nodes (and subgraphs) read them, the opset is raised with
onnx's version converter when a form needs it (per-channel DequantizeLinear: 13, 4-bit: 21), and
the report gives bytes by dtype before and after, with a warning when float weights remain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.errors import OptionError
from optimizer.graph.core import cleanup, toposort
from optimizer.pass_base import Pass, PassContext, PassReport, PassResult, option
from optimizer.registry import register
from passes.quantize.common import Names, bytes_by_dtype
from passes.quantize.dynamic import dynamic_activations, plan_dynamic, quantize_dynamic
from passes.quantize.gptq import quantize_by_gptq, wants_gptq
from passes.quantize.opset import ensure_opset
from passes.quantize.outliers import channel_absmax, outlier_channels
from passes.quantize.report import finish_report
from passes.quantize.static import plan_static, quantize_static
from passes.quantize.targets import WEIGHT_INPUTS, Selection, collect_targets
from passes.quantize.weights import quantize_weight_only, weight_only_spec
from passes.weight_guard import NON_FINITE_OPTION_HELP

DEFAULT_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Gather", "LSTM", "GRU", "RNN")


@register
@dataclass(frozen=True, kw_only=True)
class QuantizePass(Pass):
    name = "quantize"
    summary = "integer weights (weights), plus integer MatMuls at run time (dynamic) or QDQ (static)"
    backoff_option = "exclude_nodes"

    mode: Literal["weights", "dynamic", "static"] = option(
        "dynamic", "weights: weight-only; dynamic: MatMul quantized at run time, the rest weight-only "
        "(never slower on CPU); static: QDQ with calibrated activation ranges (needs calibration data)")
    weight_type: Literal["int8", "uint8", "int4", "uint4"] = option(
        "int8", "integer type of weights; 4-bit is blocked (block_size) on MatMul/Gemm/Gather, int8 elsewhere")
    activation_type: Literal["uint8", "int8"] = option("uint8", "integer type of activations in static mode")
    per_channel: bool = option(True, "one scale per output channel (False: one per tensor)")
    symmetric_weights: bool | None = option(
        None, "zero point 0 for weights; False: min/max with an integer zero point; None (auto): symmetric "
        "for 8-bit, asymmetric for 4-bit (16 levels are too few to waste one side)")
    symmetric_activations: bool = option(False, "zero point 0 for activations in static mode")
    block_size: int = option(32, "4-bit block length along the dot-product axis (a power of two >= 16)")
    weight_only_form: Literal["auto", "dequantize_linear", "fold_at_load"] = option(
        "auto", "float view of weight-only weights: DequantizeLinear (MatMul -> MatMulNBits, less memory at "
        "run time) or a Cast/Mul chain onnxruntime folds at load (fp32 speed); auto: DequantizeLinear for 4-bit "
        "MatMul only (8-bit MatMulNBits measured 1.28x fp32 on all-MiniLM-L6-v2, 4-bit 0.94x)")
    dynamic_weight_only: tuple[str, ...] = option(
        ("auto",), "MatMuls kept weight-only in dynamic and static modes: 'gelu-output' (input comes from a GELU, "
        "whose outliers per-tensor uint8 handles badly), 'auto' (gelu-output, except in dynamic mode when "
        "calibration data measures the outlier channels to split off), 'none', or node-name globs / re:")
    dynamic_min_k: int = option(
        256, "dynamic mode: MatMuls whose reduction dimension K is smaller stay weight-only (there the run-time "
        "quantization costs more than int8 saves: PP-OCRv4 rec's K=120/240 MatMuls ran 1.1-1.25x slower)")
    outlier_channels: int = option(
        8, "dynamic mode with calibration data: at most this many outlier input channels per activation "
        "computed in float beside the int8 MatMul (0: off)")
    outlier_ratio: float = option(12.0, "a channel is an outlier when its |max| exceeds this many times the median channel's")
    weight_rounding: Literal["auto", "nearest", "gptq"] = option(
        "auto", "weights mode: 'nearest' rounds each weight alone; 'gptq' (needs calibration data) rounds the rows "
        "of a blocked MatMul weight in turn and moves each rounding error onto the rows left, weighted by the "
        "input's X^T X, so the error of X @ W is what shrinks (GPTQ); auto: gptq for 4-bit with calibration data")
    calibration_samples: int = option(
        32, "calibration samples read (0: all): dynamic mode finds outlier channels on them, static mode its "
        "activation ranges, 4-bit GPTQ its X^T X. MiniLM and PP-OCRv4 det static: the same accuracy from 32 as "
        "from 100 samples; PP-OCRv4 rec: CER 0.019 from 32, 0.036 from 100 (benchmarks/results/quantize.md)")
    calibration_method: Literal["minmax", "percentile", "entropy", "mse"] = option(
        "percentile", "how static mode turns calibration statistics into activation ranges; entropy (KL) clips long "
        "tails hard and is for post-ReLU activations: on PP-OCRv4 det (Conv outputs before BatchNorm) it gave "
        "IoU 0.0 where percentile gave 0.949, mse 0.945, minmax 0.945")
    percentile: float = option(99.999, "percentile of |activation| kept by calibration_method=percentile")
    op_types: tuple[str, ...] = option(DEFAULT_OP_TYPES, "op types whose weights are quantized")
    exclude_nodes: tuple[str, ...] = option((), "node names left in float: globs, or regular expressions after 're:'")
    exclude_op_types: tuple[str, ...] = option((), "op types left in float")
    exclude_first: int = option(0, "leave the first N quantizable layers in float")
    exclude_last: int = option(0, "leave the last N quantizable layers in float")
    min_weight_elements: int = option(256, "leave weights with fewer elements in float")
    allow_non_finite: bool = option(False, NON_FINITE_OPTION_HELP)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.op_types) - set(WEIGHT_INPUTS))
        if unknown:
            raise OptionError(f"pass '{self.name}' option 'op_types': unknown {unknown}; valid: {', '.join(WEIGHT_INPUTS)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise OptionError(f"pass '{self.name}' option 'block_size' must be a power of two >= 16, got {self.block_size}")
        for key in ("exclude_first", "exclude_last", "min_weight_elements", "dynamic_min_k", "calibration_samples"):
            if getattr(self, key) < 0:
                raise OptionError(f"pass '{self.name}' option '{key}' must be >= 0, got {getattr(self, key)}")
        if self.outlier_channels < 0 or self.outlier_ratio <= 1.0:
            raise OptionError(f"pass '{self.name}' options 'outlier_channels' >= 0 and 'outlier_ratio' > 1 are required")
        for key in ("exclude_nodes", "dynamic_weight_only"):
            for pattern in getattr(self, key):
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as error:
                        raise OptionError(f"pass '{self.name}' option '{key}': bad regular expression "
                                          f"{pattern!r}: {error}") from None
        if self.weight_rounding == "gptq" and self.mode != "weights":
            raise OptionError(f"pass '{self.name}': weight_rounding 'gptq' applies to mode 'weights', not {self.mode!r}")
        if self.mode == "static" and self.weight_type not in ("int8", "uint8"):
            raise OptionError(f"pass '{self.name}': mode 'static' takes weight_type 'int8' or 'uint8' "
                              f"(QLinear kernels are 8-bit), got {self.weight_type!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise OptionError(f"pass '{self.name}' option 'percentile' must be in (0, 100], got {self.percentile}")

    def weights_symmetric(self) -> bool:
        if self.symmetric_weights is not None:
            return self.symmetric_weights
        return self.weight_type in ("int8", "uint8")

    def storage_type(self) -> str:
        """The integer type weights are stored as: asymmetric 4-bit (auto) uses uint4 and a zero
        point, the form onnxruntime's MatMulNBits takes natively."""
        if self.weight_type == "int4" and self.symmetric_weights is None:
            return "uint4"
        return self.weight_type

    def selection(self) -> Selection:
        return Selection(self.op_types, self.exclude_nodes, self.exclude_op_types, self.exclude_first,
                         self.exclude_last, self.min_weight_elements, self.allow_non_finite)

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        report = PassReport()
        before = bytes_by_dtype(graph)
        graph = ensure_opset(graph, self._required_opset(graph), report)
        targets = collect_targets(graph, self.selection(), report)
        if targets:
            names = Names(graph)
            if self.mode == "weights":
                planned = [(target, weight_only_spec(target, self, graph.opset)) for target in targets]
                rounded = quantize_by_gptq(graph, planned, self, context, report) if wants_gptq(self, context) else {}
                for target, spec in planned:
                    quantize_weight_only(target, spec, names, report, rounded.get(id(target)))
            elif self.mode == "dynamic":
                self._run_dynamic(graph, targets, names, report, context)
            else:
                quantize_static(graph, plan_static(graph, targets, self), self, names, report, context)
            cleanup(graph)
            toposort(graph)
        finish_report(report, self, graph, before)
        return PassResult(graph, bool(targets), report.to_dict())

    def _run_dynamic(self, graph, targets, names: Names, report: PassReport, context: PassContext) -> None:
        calibrated = context.calibration is not None and self.outlier_channels > 0
        plan = plan_dynamic(graph, targets, self, calibrated=calibrated)
        outliers = {}
        if calibrated:
            absmax = channel_absmax(graph, dynamic_activations(graph, plan), context.calibration,
                                    max_samples=self.calibration_samples or None, provider=context.provider,
                                    timeout_s=context.timeout_s)
            for name, values in absmax.items():
                split = outlier_channels(values, ratio=self.outlier_ratio, limit=self.outlier_channels)
                if split.size:
                    outliers[name] = np.append(split, values.size)
            report.details["outlier_channels"] = {name: split[:-1].tolist() for name, split in sorted(outliers.items())}
        quantize_dynamic(graph, plan, self, names, report, outliers)

    def _required_opset(self, graph: gs.Graph) -> int:
        """Opset the planned forms need, from a dry run of target collection."""
        targets = collect_targets(graph, self.selection(), PassReport())
        if not targets:
            return 1
        if self.mode == "weights":
            return max(weight_only_spec(t, self, graph.opset).required_opset() for t in targets)
        if self.mode == "dynamic":
            return plan_dynamic(graph, targets, self).required_opset()
        return plan_static(graph, targets, self).required_opset()
