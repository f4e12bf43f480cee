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

from dataclasses import fields, replace
from typing import Any, Final

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.calibration.observe import Sampling
from optimizer.graph.edit import cleanup, toposort
from optimizer.graph.names import NameAllocator
from optimizer.graph.weights import Weight
from optimizer.pass_base import Pass, PassContext, PassReport, PassResult
from optimizer.registry import register
from passes.quantize.chains import chained_specs, collect_chained
from passes.quantize.common import bytes_by_dtype, hopeless_activation
from passes.quantize.dynamic import DynamicPlan, dynamic_activations, plan_dynamic, quantize_dynamic
from passes.quantize.frequent_rows import frequent_tables
from passes.quantize.gptq import quantize_by_gptq, wants_gptq
from passes.quantize.integer_forms import fold_batch_norms, prepare_integer_forms
from passes.quantize.opset import ensure_opset
from passes.quantize.options import FINE_BLOCK, FREQUENT_ROW_CHOICES, QuantizeOptions
from passes.quantize.outliers import channel_absmax, outlier_channels
from passes.quantize.report import finish_report
from passes.quantize.static import StaticPlan, plan_static, quantize_static
from passes.quantize.targets import collect_targets
from passes.quantize.weights import WeightSpec, quantize_weight_only_all, weight_only_spec

UNMEASURED_MODE: Final = "dynamic"
"""What mode 'auto' means when nothing is measured: never slower than fp32 on CPU."""


@register
class QuantizePass(QuantizeOptions, Pass):
    name = "quantize"
    summary = "integer weights (weights), plus integer MatMuls at run time (dynamic) or QDQ (static)"
    backoff_option = "exclude_nodes"
    soften_option = "int8_weight_only_nodes"
    measured_option = "mode"
    measured_choices = ("weights", "dynamic", "static")
    softened_choices = ("static",)
    unmeasured_choice = UNMEASURED_MODE
    refine_option = "fine_block_nodes"
    block_option = "block_size"
    rows_option = "frequent_rows"
    rows_choices = FREQUENT_ROW_CHOICES

    def blocked(self) -> bool:
        return self.weight_type in ("int4", "uint4")

    def refinable(self) -> bool:
        return self.blocked() and self.block_size > FINE_BLOCK

    def only_choice(self) -> tuple[str, str] | None:
        if self.weight_type in ("int4", "uint4"):
            return "weights", "4-bit weights run as MatMulNBits in weights mode; dynamic and static modes are 8-bit"
        if self.weight_rounding in ("gptq", "awq"):
            return "weights", f"weight_rounding {self.weight_rounding!r} rounds weights-mode weights"
        if self.frequent_rows:
            return "weights", "frequent_rows applies to weights mode"
        return None

    def trial_options(self) -> dict[str, Any]:
        """Nearest rounding: a GPTQ build costs a calibration run and a solve per weight, and the
        rounding error it saves is much the same for every layer, so the layers rank the same."""
        return {"weight_rounding": "nearest"} if self.weight_rounding != "nearest" else {}

    def unclipped_options(self) -> dict[str, Any]:
        """Percentile 100 when static ranges are percentiles: PP-OCRv4 det's mask IoU goes from 0.618 to
        0.874 on its check images (YOLOv8n's box F1 from 0.812 to 0.829)."""
        if self.calibration_method == "percentile" and self.percentile < 100.0:
            return {"percentile": 100.0}
        return {}

    @property
    def config(self) -> QuantizeOptions:
        """The options alone, as the typed config the helpers take."""
        return QuantizeOptions(**{f.name: getattr(self, f.name) for f in fields(QuantizeOptions)})

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        options = self.config
        dropped = options.frequent_rows if options.mode == "auto" else 0.0
        if options.mode == "auto":  # optimize() measures; the pass alone takes the form never slower than fp32
            options = replace(options, mode=UNMEASURED_MODE, frequent_rows=0.0)
        report = PassReport()
        before = bytes_by_dtype(graph)
        if options.integer_forms:
            fold_batch_norms(graph, report)
            if options.mode == "static":
                prepare_integer_forms(graph, report)
            cleanup(graph)
            toposort(graph)
        targets, plan = _collect_and_plan(graph, options, context, report)
        required = _required_opset(plan)
        if int(graph.opset) < required:  # the conversion re-imports the graph: plan again on the new one
            report = PassReport()
            graph = ensure_opset(graph, required, report)
            targets, plan = _collect_and_plan(graph, options, context, report)
        if targets:
            names = NameAllocator(graph, reserve_node_names=True)
            if isinstance(plan, list):
                gptq = wants_gptq(options, context)
                rounded = quantize_by_gptq(graph, plan, options, context, report) if gptq else {}
                frequent = frequent_tables(graph, plan, options, context, report) if options.frequent_rows else {}
                quantize_weight_only_all(plan, names, report, rounded=rounded, frequent=frequent)
            elif isinstance(plan, DynamicPlan):
                _run_dynamic(graph, plan, options, names, report, context)
            else:
                quantize_static(graph, plan, options, names, report, context)
            cleanup(graph)
            toposort(graph)
        if dropped:
            report.details.setdefault("notes", []).append(
                f"frequent_rows: applies to weights mode (4-bit tables); this run is mode {UNMEASURED_MODE!r}"
            )
        finish_report(report, options, graph, before)
        return PassResult(graph, bool(targets) or "batchnorms_folded" in report.counts, report.to_dict())


def _run_dynamic(
    graph: gs.Graph,
    plan: DynamicPlan,
    options: QuantizeOptions,
    names: NameAllocator,
    report: PassReport,
    context: PassContext,
) -> None:
    calibration = context.calibration
    outliers = {}
    if calibration is not None:
        absmax = channel_absmax(
            graph,
            dynamic_activations(graph, plan),
            calibration,
            Sampling(options.calibration_samples or None, context.provider, context.timeout_s),
        )
        limit, ratio = options.outlier_channels, options.outlier_ratio
        split = {name: outlier_channels(values, ratio=ratio, limit=limit) for name, values in absmax.items()}
        kept = _keep_hopeless_activations_float(graph, plan, absmax, split, report)
        for name in kept if limit > 0 else ():
            if split[name].size:
                outliers[name] = np.append(split[name], absmax[name].size)
        if limit > 0:
            report.details["outlier_channels"] = {name: s[:-1].tolist() for name, s in sorted(outliers.items())}
    quantize_dynamic(graph, plan, options, names, report, outliers)


def _keep_hopeless_activations_float(
    graph: gs.Graph,
    plan: DynamicPlan,
    absmax: dict[str, np.ndarray],
    split: dict[str, np.ndarray],
    report: PassReport,
) -> list[str]:
    """The rule static mode applies (too_wide_for_8_bits), in dynamic mode, plus the dynamic range:
    a MatMul whose calibrated activation is too wide for 8 bits (a power spectrum up to 1e12), or
    whose channels left after the outlier split (``split``) spread so far that the median channel
    falls within one 8-bit step, keeps a float activation and an int8 weight-only weight. Returns
    the activations that stay dynamic."""
    hopeless = {}
    for name, values in absmax.items():
        reason = hopeless_activation(values, split.get(name, np.zeros(0, np.int64)))
        if reason:
            hopeless[name] = reason
            report.skip("tensor", name, f"{reason}: 8 bits cannot hold it; MatMul kept weight-only")
    for target in plan.dynamic:
        for use in target.uses:
            if use.graph is graph and use.node.inputs[0].name in hopeless:
                plan.float_consumers[id(use.node)] = hopeless[use.node.inputs[0].name]
    return [name for name in absmax if name not in hopeless]


Plan = list[tuple[Weight, WeightSpec]] | DynamicPlan | StaticPlan


def _collect_and_plan(
    graph: gs.Graph, options: QuantizeOptions, context: PassContext, report: PassReport
) -> tuple[list[Weight], Plan]:
    """Every weight to quantize (read directly, or through data movement) and the mode's plan."""
    targets = collect_targets(graph, options.selection(), report)
    chained = chained_specs(collect_chained(graph, options.selection(), report, targets), options)
    plan = _plan(graph, targets, options, context)
    if isinstance(plan, list):
        plan.extend(chained)
    else:
        plan.weight_only.extend(chained)
    return targets + [target for target, _ in chained], plan


def _plan(graph: gs.Graph, targets: list[Weight], options: QuantizeOptions, context: PassContext) -> Plan:
    """The mode's plan, made once per graph: weight-only specs, or the dynamic or static plan."""
    if options.mode == "weights":
        return [(target, weight_only_spec(target, options, graph.opset)) for target in targets]
    if options.mode == "dynamic":
        calibrated = context.calibration is not None and options.outlier_channels > 0
        return plan_dynamic(graph, targets, options, calibrated=calibrated)
    return plan_static(graph, targets, options)


def _required_opset(plan: Plan) -> int:
    """Opset the planned forms need (1 when nothing is planned)."""
    if isinstance(plan, list):
        return max((spec.required_opset() for _, spec in plan), default=1)
    return plan.required_opset()
