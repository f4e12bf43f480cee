"""GPTQ rounding for 4-bit weight-only MatMuls (``weight_rounding``), fed by calibration data.

Which weights: blocked along the reduction axis (4-bit MatMul weights), every reader a main-graph
MatMul taking the weight as its second input. A weight read by several MatMuls uses the sum of
their inputs' ``X^T X``. Everything else is rounded to nearest, as without calibration data.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.calibration.gptq import DAMPING, HessianAccumulator, InverseFactor, gptq_quantize
from optimizer.calibration.observe import Sampling, observe_activations
from optimizer.calibration.quant_math import QuantizedTensor, quantize_weight
from optimizer.errors import PassError
from optimizer.graph.weights import Weight, is_constant_derived
from optimizer.internal_errors import working_on
from optimizer.pass_base import PassContext, PassReport
from passes.quantize.awq import awq_group, fold_scales, search_scales
from passes.quantize.options import QuantizeOptions
from passes.quantize.tied import tied_lookups
from passes.quantize.weights import WeightSpec


def wants_gptq(options: QuantizeOptions, context: PassContext) -> bool:
    """Whether this run rounds by GPTQ; an explicit request without data is an error."""
    if options.weight_rounding == "nearest" or options.mode != "weights":
        return False
    if context.calibration is None:
        if options.weight_rounding in ("gptq", "awq"):
            raise PassError(
                f"pass 'quantize' option weight_rounding='{options.weight_rounding}' needs calibration data "
                "(--calibration-data DIR or calibration=...)"
            )
        return False
    return options.weight_rounding in ("gptq", "awq") or options.storage_type() in ("int4", "uint4")


def gptq_inputs(graph: gs.Graph, target: Weight, spec: WeightSpec) -> list[str] | None:
    """Names of the activations multiplied by ``target``, or None when GPTQ does not apply."""
    if spec.block_size is None or spec.axis != 0 or target.values.ndim != 2:
        return None
    names = []
    memo: dict[int, bool | None] = {}
    for consumer in target.uses:
        node = consumer.node
        if consumer.graph is not graph or node.op != "MatMul" or node.inputs[1] is not target.tensor:
            return None
        if node.inputs[0] is target.tensor or is_constant_derived(node.inputs[0], memo):
            return None
        names.append(node.inputs[0].name)
    return list(dict.fromkeys(names))


TIED_DAMPING = 0.1
"""GPTQ's damping (a fraction of the Hessian's mean diagonal added to it) for a weight also read by
row lookups (a tied embedding and LM head): a lookup's error is the weight's own error, an identity
term beside the head's ``X^T X``; GPTQ with the head's alone moves error onto what the lookups read.
On the benchmark's tied 16M-parameter decoder, KL to fp32 of the table alone at 4 bits: 0.00322
round-to-nearest, 0.00207 at the usual 0.01, 0.00178 at 0.1, 0.00180 at 0.3, 0.00196 at 1."""

HESSIAN_BUDGET_BYTES = 1 << 30
"""X^T X accumulators held at once (float64, K x K each: 128 MB for K = 4096). Inputs beyond it
are measured in further calibration passes, so memory stays bounded on large models."""


def quantize_by_gptq(
    graph: gs.Graph,
    planned: list[tuple[Weight, WeightSpec]],
    options: QuantizeOptions,
    context: PassContext,
    report: PassReport,
) -> dict[int, QuantizedTensor]:
    """GPTQ-rounded integers for every target it applies to, keyed by ``id(target)``."""
    inputs = {id(target): tuple(found) for target, spec in planned if (found := gptq_inputs(graph, target, spec))}
    if not inputs:
        return {}
    channels = {name: target.values.shape[0] for target, _ in planned for name in inputs.get(id(target), ())}
    results: dict[int, QuantizedTensor] = {}
    gains: list[float] = []
    chunks = _chunks(list(dict.fromkeys(inputs.values())), channels)
    samples = 0
    for chunk in chunks:
        accumulators = {name: HessianAccumulator(channels[name]) for group in chunk for name in group}

        def visit(name: str, value: np.ndarray, accumulators=accumulators) -> None:
            if value.shape[-1] == channels[name]:
                accumulators[name].add(value)

        samples = observe_activations(
            graph,
            sorted(accumulators),
            lambda: context.calibration_feeds("quantize"),
            visit,
            Sampling(options.calibration_samples or None, context.provider, context.timeout_s),
            stage="GPTQ calibration",
        )
        if options.weight_rounding == "awq":
            awq_chunk(graph, planned, inputs, chunk, accumulators, report)
        else:
            _round_chunk(
                planned, inputs, chunk, accumulators, channels, results, gains, act_order=options.gptq_act_order
            )
    if results:
        report.count("weights_gptq", len(results))
    if options.weight_rounding == "awq":
        return results
    report.details["gptq"] = {
        "samples": samples,
        "weights": len(results),
        "act_order": options.gptq_act_order,
        "calibration_passes": len(chunks),
        "output_error_vs_nearest_median": round(float(np.median(gains)), 4) if gains else None,
    }
    return results


def _round_chunk(
    planned: list[tuple[Weight, WeightSpec]],
    inputs: dict[int, tuple[str, ...]],
    chunk: list[tuple[str, ...]],
    accumulators: dict[str, HessianAccumulator],
    channels: dict[str, int],
    results: dict[int, QuantizedTensor],
    gains: list[float],
    *,
    act_order: bool,
) -> None:
    """GPTQ-round every target whose input group is in ``chunk`` (one Hessian per shared input group);
    ``gains`` gets each weight's output error relative to round-to-nearest."""
    factors: dict[tuple[tuple[str, ...], float], tuple[np.ndarray, InverseFactor]] = {}
    for target, spec in planned:
        group = inputs.get(id(target))
        if group is None or group not in chunk or any(accumulators[name].rows == 0 for name in group):
            continue
        assert spec.block_size is not None  # gptq_inputs admits blocked weights only
        damping = TIED_DAMPING if tied_lookups(target) else DAMPING
        if (group, damping) not in factors:
            hessian = np.zeros((channels[group[0]],) * 2)
            for name in group:
                hessian = hessian + accumulators[name].hessian()
            factors[group, damping] = (hessian, InverseFactor(hessian, damping, act_order=act_order))
        hessian, factor = factors[group, damping]
        with working_on("tensor", target.name):
            quantized = gptq_quantize(
                target.values, factor, spec.qtype, symmetric=spec.symmetric, block_size=spec.block_size
            )
        nearest = quantize_weight(
            target.values, spec.qtype, symmetric=spec.symmetric, axis=0, block_size=spec.block_size
        )
        gains.append(
            _output_error(target.values, quantized, hessian)
            / max(_output_error(target.values, nearest, hessian), 1e-30)
        )
        results[id(target)] = quantized


def awq_chunk(
    graph: gs.Graph,
    planned: list[tuple[Weight, WeightSpec]],
    inputs: dict[int, tuple[str, ...]],
    chunk: list[tuple[str, ...]],
    accumulators: dict[str, HessianAccumulator],
    report: PassReport,
) -> None:
    """AWQ scales for every group of ``chunk`` that can fold them (``passes.quantize.awq``); the
    weights are then rounded to nearest, as they are (scaled or not)."""
    found = report.details.setdefault("awq", {"groups": {}, "skipped": {}})
    for group in chunk:
        targets = [(t, spec) for t, spec in planned if inputs.get(id(t)) == group]
        if len(group) != 1 or accumulators[group[0]].rows == 0:
            found["skipped"][" + ".join(group)] = "read by MatMuls of several inputs, or never seen in calibration"
            continue
        candidate = awq_group(graph, group[0], targets)
        if isinstance(candidate, str):
            found["skipped"][group[0]] = candidate
            continue
        with working_on("tensor", group[0]):
            scales, alpha, ratio = search_scales(candidate, accumulators[group[0]].hessian())
            fold_scales(candidate, scales)
        found["groups"][group[0]] = {"alpha": alpha, "output_error_vs_nearest": round(ratio, 4)}
        report.count("awq_groups_scaled" if alpha > 0 else "awq_groups_unscaled")


def _chunks(groups: list[tuple[str, ...]], channels: dict[str, int]) -> list[list[tuple[str, ...]]]:
    """Input groups split so each chunk's accumulators stay within ``HESSIAN_BUDGET_BYTES``."""
    chunks: list[list[tuple[str, ...]]] = []
    current: list[tuple[str, ...]] = []
    held: set[str] = set()
    for group in groups:
        grown = held | set(group)
        if current and sum(8 * channels[name] ** 2 for name in grown) > HESSIAN_BUDGET_BYTES:
            chunks.append(current)
            current, grown = [], set(group)
        current.append(group)
        held = grown
    if current:
        chunks.append(current)
    return chunks


def _output_error(weight: np.ndarray, quantized: QuantizedTensor, hessian: np.ndarray) -> float:
    """Mean squared error of ``X @ W`` the rounding causes: trace(D^T H D) with D the weight error."""
    difference = quantized.dequantized().astype(np.float64) - weight
    return float(np.einsum("kn,kj,jn->", difference, hessian, difference, optimize=True))
