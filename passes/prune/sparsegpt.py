"""The prune pass's SparseGPT: one ``X^T X`` per input activation, measured on calibration data
and shared by every weight that multiplies it (Q, K and V of one attention block), then
``optimizer.calibration.sparsegpt`` per weight.

It applies to 2-D MatMul weights read as the second operand, and to Gemm weights (transA=0), in the
main graph; every other weight is pruned by magnitude, with the reason in the report. X^T X is
K x K float64 per input; inputs are measured in as many calibration passes as keep them under
``HESSIAN_BUDGET_BYTES`` at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.calibration.channel_obs import relative_output_error
from optimizer.calibration.gptq import HessianAccumulator, InverseFactor
from optimizer.calibration.observe import Sampling, observe_activations
from optimizer.calibration.sparsegpt import sparsegpt_prune
from optimizer.graph.weights import Weight, is_constant_derived
from optimizer.internal_errors import working_on
from optimizer.pass_base import PassReport

HESSIAN_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True)
class SparseGptSettings:
    sparsity: float
    nm: tuple[int, int] | None
    damping: float
    sampling: Sampling


@dataclass(frozen=True)
class Operand:
    """A weight as SparseGPT reads it: the activations it multiplies and whether it is stored N x K."""

    inputs: tuple[str, ...]
    transposed: bool


def operand(graph: gs.Graph, weight: Weight) -> Operand | str:
    """How ``weight`` multiplies its inputs, or why SparseGPT does not apply."""
    if weight.values.ndim != 2:
        return f"{weight.values.ndim}-D weight: SparseGPT prunes 2-D MatMul/Gemm weights"
    names, transposed = [], set()
    memo: dict[int, bool | None] = {}
    for use in weight.uses:
        node = use.node
        if use.graph is not graph:
            return f"read inside a subgraph of {node.op} '{node.name}'"
        if node.op not in ("MatMul", "Gemm") or use.index != 1 or int(node.attrs.get("transA", 0)):
            return f"read by {node.op} '{node.name}' at input {use.index}: SparseGPT covers X @ W of MatMul/Gemm"
        if is_constant_derived(node.inputs[0], memo):
            return f"{node.op} '{node.name}' multiplies two constants"
        names.append(node.inputs[0].name)
        transposed.add(node.op == "Gemm" and bool(node.attrs.get("transB", 0)))
    if len(transposed) != 1:
        return "its readers disagree on its layout (transB)"
    return Operand(tuple(dict.fromkeys(names)), transposed.pop())


def prune_by_sparsegpt(
    graph: gs.Graph,
    weights: list[Weight],
    feeds: Callable[[], Iterable],
    settings: SparseGptSettings,
    report: PassReport,
) -> dict[str, np.ndarray]:
    """SparseGPT-pruned values for every weight it applies to (the others are reported)."""
    operands: dict[str, Operand] = {}
    for weight in weights:
        found = operand(graph, weight)
        if isinstance(found, str):
            report.skip("tensor", weight.name, f"pruned by magnitude: {found}")
        else:
            operands[weight.name] = found
    channels = {
        name: weight.values.shape[1 if operands[weight.name].transposed else 0]
        for weight in weights
        if weight.name in operands
        for name in operands[weight.name].inputs
    }
    results: dict[str, np.ndarray] = {}
    layers: list[dict[str, object]] = []
    samples = 0
    for chunk in _chunks(list(dict.fromkeys(item.inputs for item in operands.values())), channels):
        hessians, samples = _hessians(graph, chunk, channels, feeds, settings)
        for weight in weights:
            solvable = operands.get(weight.name)
            if solvable is not None and set(solvable.inputs) <= set(chunk) and weight.name not in results:
                with working_on("tensor", weight.name):
                    results[weight.name], errors = _solve(weight, solvable, hessians, settings)
                layers.append({"tensor": weight.name, **errors})
    report.details["sparsegpt"] = {"samples": samples, "weights": len(results), "layers": layers}
    return results


def _solve(
    weight: Weight, found: Operand, hessians: dict[str, np.ndarray], settings: SparseGptSettings
) -> tuple[np.ndarray, dict[str, float]]:
    """The pruned and updated weight, and the layer's relative output error on the calibration data
    with the same zeros but no update (``output_error_before``) and after the update."""
    hessian = np.mean([hessians[name] for name in found.inputs], axis=0)
    values = weight.values.T if found.transposed else weight.values
    pruned = sparsegpt_prune(values, InverseFactor(hessian, settings.damping), settings.sparsity, settings.nm)
    errors = {
        "sparsity": round(float(np.mean(pruned == 0)), 4),
        "output_error_before": round(relative_output_error(hessian, values, np.where(pruned == 0, 0.0, values)), 6),
        "output_error_after": round(relative_output_error(hessian, values, pruned), 6),
    }
    return np.ascontiguousarray(pruned.T if found.transposed else pruned), errors


def _hessians(
    graph: gs.Graph,
    names: list[str],
    channels: dict[str, int],
    feeds: Callable[[], Iterable],
    settings: SparseGptSettings,
) -> tuple[dict[str, np.ndarray], int]:
    accumulators = {name: HessianAccumulator(channels[name]) for name in names}

    def visit(name: str, value: np.ndarray) -> None:
        if value.shape[-1] == channels[name]:
            accumulators[name].add(value)

    samples = observe_activations(
        graph,
        names,
        feeds,
        visit,
        settings.sampling,
        stage="SparseGPT calibration",
    )
    return {name: accumulator.hessian() for name, accumulator in accumulators.items()}, samples


def _chunks(groups: list[tuple[str, ...]], channels: dict[str, int]) -> list[list[str]]:
    """The inputs, a weight's inputs always together, grouped so that each group's K x K float64
    accumulators fit the budget (a group larger than it alone)."""
    chunks: list[list[str]] = [[]]
    used = 0
    for group in groups:
        new = [name for name in group if name not in chunks[-1]]
        size = sum(8 * channels[name] ** 2 for name in new)
        if chunks[-1] and used + size > HESSIAN_BUDGET_BYTES:
            chunks.append([])
            used = 0
            new = list(group)
            size = sum(8 * channels[name] ** 2 for name in new)
        chunks[-1].extend(new)
        used += size
    return [sorted(chunk) for chunk in chunks if chunk]
