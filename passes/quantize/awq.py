"""AWQ-style activation-aware scales (``weight_rounding='awq'``), folded into the normalization
before the MatMuls, so the model computes what it did and the 4-bit rounding errs less where the
activations are large (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization").

A group is one activation read only by 4-bit MatMul weights (the Q/K/V projections after an
attention norm, the gate and up projections after the MLP norm), produced as output 0 of a
normalization whose scale (and output bias) only it reads. Per input channel ``s = rms(x)^alpha``
(normalized so max and min straddle 1), alpha from a grid of ``GRID`` values, chosen to minimize
the group's output error after rounding: ``trace(D^T H D)`` summed over its weights, with
``D = Q(diag(s) W) / s - W`` and ``H = X^T X`` from the calibration data (the statistics GPTQ
collects). Then the weights become ``diag(s) W`` and the norm's scale (and bias) ``/ s``; alpha 0
(no scaling) is on the grid, so a group is never worse than nearest rounding on the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.calibration.quant_math import quantize_weight
from optimizer.graph.weights import Weight
from passes.quantize.weights import WeightSpec

GRID = 20
NORM_SCALES = {
    "LayerNormalization": (1, 2),
    "RMSNormalization": (1,),
    "SimplifiedLayerNormalization": (1,),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2,),
}
"""Normalizations whose output 0 is (normalized x) * scale (+ bias): the inputs scaled with it."""


@dataclass(frozen=True)
class AwqGroup:
    """One activation, the normalization that writes it, and the 4-bit weights that read it."""

    activation: str
    norm: gs.Node
    targets: list[tuple[Weight, WeightSpec]]


def awq_group(graph: gs.Graph, activation: str, targets: list[tuple[Weight, WeightSpec]]) -> AwqGroup | str:
    """The group for ``activation`` when its scales can be folded, else why not."""
    tensor = graph.tensors().get(activation)
    if tensor is None or len(tensor.inputs) != 1:
        return "not computed by one node"
    norm = tensor.inputs[0]
    if norm.op not in NORM_SCALES or norm.outputs[0] is not tensor:
        return f"written by {norm.op} '{norm.name}', not a normalization's output 0"
    channels = {target.values.shape[0] for target, _ in targets}
    for index in NORM_SCALES[norm.op]:
        if index < len(norm.inputs) and not _own_constant(norm.inputs[index], norm, channels):
            return f"{norm.op} '{norm.name}' input {index} is not a stored vector over the channels only it reads"
    if tensor in graph.outputs:
        return "also a graph output"
    readers = {id(node) for node in tensor.outputs}
    weights = {id(use.node) for target, _ in targets for use in target.uses}
    if readers != weights:
        return "also read by nodes other than the 4-bit MatMuls"
    for target, _ in targets:
        if any(id(node) not in readers for node in target.consumers):
            return f"weight '{target.name}' is also read elsewhere (a tied embedding): scaling it would change that"
    return AwqGroup(activation, norm, targets)


def _own_constant(tensor: gs.Tensor, node: gs.Node, channels: set[int]) -> bool:
    if not isinstance(tensor, gs.Constant) or any(reader is not node for reader in tensor.outputs):
        return False
    shape = tuple(np.asarray(tensor.values).shape)
    return len(channels) == 1 and shape == (next(iter(channels)),)


def search_scales(group: AwqGroup, hessian: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(scales, alpha, output error at alpha over the error without scaling) for ``group``."""
    rms = np.sqrt(np.clip(np.diag(hessian), 0.0, None))
    live = rms > 0
    errors, candidates = [], []
    for alpha in np.arange(GRID) / GRID:
        scales = np.ones_like(rms)
        if live.any() and alpha > 0:
            raw = rms[live] ** alpha
            scales[live] = raw / np.sqrt(raw.max() * raw.min())
        candidates.append(scales)
        errors.append(sum(_scaled_error(target.values, spec, scales, hessian) for target, spec in group.targets))
    best = int(np.argmin(errors))
    return candidates[best], best / GRID, errors[best] / max(errors[0], 1e-30)


def _scaled_error(weight: np.ndarray, spec: WeightSpec, scales: np.ndarray, hessian: np.ndarray) -> float:
    weight = np.asarray(weight, np.float64)
    scaled = (weight * scales[:, None]).astype(np.float32)
    rounded = quantize_weight(scaled, spec.qtype, symmetric=spec.symmetric, axis=0, block_size=spec.block_size)
    difference = rounded.dequantized().astype(np.float64) / scales[:, None] - weight
    return float(np.einsum("kn,kj,jn->", difference, hessian, difference, optimize=True))


def fold_scales(group: AwqGroup, scales: np.ndarray) -> None:
    """Weights times ``scales`` along K, the norm's scale (and output bias) divided by them."""
    for target, _ in group.targets:
        target.write((np.asarray(target.values, np.float64) * scales[:, None]).astype(target.values.dtype))
    for index in NORM_SCALES[group.norm.op]:
        if index < len(group.norm.inputs):
            constant = group.norm.inputs[index]
            assert isinstance(constant, gs.Constant)  # awq_group checked it
            values = np.asarray(constant.values)
            constant.values = (values.astype(np.float64) / scales.reshape(values.shape)).astype(values.dtype)
