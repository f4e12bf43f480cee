"""Per-layer error analysis: where a compressed model departs from the original.

Both models run on the same feeds with the compute nodes' outputs exposed, matched by tensor
name (passes keep the names of the tensors they do not remove). For every compressed node it
gives the weight error (effective weight, i.e. after DequantizeLinear, against the original)
and the SQNR and cosine of its output, ranked worst first. Output errors are cumulative: a
layer inherits the error of the layers before it, so the first bad layer in graph order is
where to look.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from optimizer.calibration.expose import expose_outputs
from optimizer.verify.json_values import json_ready
from optimizer.verify.runtime import DEFAULT_TIMEOUT_S, as_provider_choice, checked_timeout, create_session, run_session

COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Gather", "LSTM", "GRU"})
WEIGHT_INPUT = {"Gather": 0}
PASS_THROUGH = frozenset({"Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze"})


@dataclass
class LayerError:
    node: str
    op: str
    output: str
    kind: str
    bits: int | None = None
    sparsity: float | None = None
    weight_sqnr_db: float | None = None
    weight_max_abs: float | None = None
    output_sqnr_db: float | None = None
    output_cosine: float | None = None
    reference_node: str = ""
    candidate_output: str = ""
    """The candidate's tensor compared with ``output`` (the reference's), when the names differ: a
    node that absorbed its activation (static int8 drops a Relu its range clips) writes the
    activation's tensor, and its own value is compared with the reference node's output."""

    def to_dict(self) -> dict[str, Any]:
        return {key: json_ready(value) for key, value in self.__dict__.items()}


@dataclass
class LayerDebugReport:
    layers: list[LayerError]
    samples: int
    unmatched: list[str] = field(default_factory=list)

    def to_rows(self) -> list[dict[str, Any]]:
        return [layer.to_dict() for layer in self.layers]

    def summary(self, top: int | None = None) -> str:
        rows = self.layers if top is None else self.layers[:top]
        header = (
            f"{'node':32s} {'op':10s} {'kind':10s} {'bits':>4s} {'sparsity':>8s} {'w SQNR':>8s} "
            f"{'out SQNR':>9s} {'cosine':>9s}"
        )
        lines = [f"{len(self.layers)} compressed layer(s), {self.samples} sample(s); worst first", header]
        for layer in rows:
            lines.append(
                f"{layer.node[:32]:32s} {layer.op[:10]:10s} {layer.kind:10s} {_fmt(layer.bits, 'd'):>4s} "
                f"{_fmt(layer.sparsity, '.3f'):>8s} {_fmt(layer.weight_sqnr_db, '.1f'):>8s} "
                f"{_fmt(layer.output_sqnr_db, '.1f'):>9s} {_fmt(layer.output_cosine, '.5f'):>9s}"
            )
        if self.unmatched:
            lines.append(f"not matched by output name: {', '.join(self.unmatched)}")
        return "\n".join(lines)


def debug_layers(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    provider: str = "cpu",
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> LayerDebugReport:
    """Compare every compressed node's weight and output with the original's, worst first.

    A model run longer than ``timeout_s`` raises ``RunTimeoutError``."""
    checked_timeout(timeout_s)
    layers, unmatched = _match_layers(reference, candidate)
    if not layers:
        return LayerDebugReport([], sum(1 for _ in feeds), unmatched)
    weight_names = {layer.output: name for layer, name in layers if name is not None}
    candidate_constants = _constants(candidate.graph)
    computed_weights = sorted({name for name in weight_names.values() if name not in candidate_constants})
    outputs = [layer.output for layer, _ in layers]
    renamed = {layer.output: layer.candidate_output or layer.output for layer, _ in layers}
    choice = as_provider_choice(provider)
    reference_session, _ = create_session(expose_outputs(reference, outputs, prune=True), choice)
    exposed = list(dict.fromkeys([*renamed.values(), *computed_weights]))
    candidate_session, _ = create_session(expose_outputs(candidate, exposed, prune=True), choice)
    stats = {name: _Accumulator() for name in outputs}
    samples = 0
    for feed in feeds:
        want = run_session(
            reference_session, dict(feed), label="the reference", stage="layer debug", timeout_s=timeout_s
        )
        got = run_session(
            candidate_session, dict(feed), label="the candidate", stage="layer debug", timeout_s=timeout_s
        )
        if samples == 0:
            _weight_errors(reference, [layer for layer, _ in layers], weight_names, {**candidate_constants, **got})
        for name in outputs:
            stats[name].add(want[name], got[renamed[name]])
        samples += 1
    for layer, _ in layers:
        layer.output_sqnr_db, layer.output_cosine = stats[layer.output].result()
    ranked = sorted((layer for layer, _ in layers), key=_badness)
    return LayerDebugReport(ranked, samples, unmatched)


def _match_layers(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
) -> tuple[list[tuple[LayerError, str | None]], list[str]]:
    """Candidate nodes whose output name is a reference compute node's output, and that changed."""
    ref_nodes = {out: node for node in reference.graph.node if node.op_type in COMPUTE_OPS for out in node.output[:1]}
    ref_weights = _constants(reference.graph)
    cand_constants = _constants(candidate.graph)
    producers = {out: node for node in candidate.graph.node for out in node.output}
    fused = _fused_nodes(reference, candidate)
    matched, unmatched = [], []
    for output, ref_node in ref_nodes.items():
        node = producers.get(output) or fused.get(ref_node.name)
        if node is None:
            unmatched.append(ref_node.name or output)
            continue
        weight_input = _weight_input(ref_node)
        ref_weight = ref_weights.get(weight_input)
        cand_weight_name = _weight_input(node) if node.op_type == ref_node.op_type else None
        kind, bits, source = _classify(node, ref_node, cand_weight_name, producers, cand_constants, ref_weight)
        if kind is None:
            continue
        layer = LayerError(
            node.name or output, node.op_type, output, kind, bits=bits, reference_node=ref_node.name or output
        )
        layer.candidate_output = node.output[0] if node.output[0] != output else ""
        if kind == "pruned" and source is not None:
            layer.sparsity = float(np.mean(source == 0))
        matched.append((layer, cand_weight_name if ref_weight is not None else None))
    return matched, unmatched


def _fused_nodes(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Candidate compute nodes by name, for reference nodes whose output tensor is gone: the node
    absorbed its activation (static int8 removes a Relu its output range already clips) and writes
    the activation's tensor instead; its own value is still the reference node's output."""
    names = {node.name for node in reference.graph.node if node.name}
    return {
        node.name: node
        for node in candidate.graph.node
        if node.name in names and node.op_type in COMPUTE_OPS and node.output
    }


def _classify(node, ref_node, weight_name, producers, constants, ref_weight):
    """('quantized' | 'pruned' | 'changed' | None, bits, candidate weight values if stored as float)."""
    if node.op_type != ref_node.op_type:
        return "quantized", None, None
    name = weight_name
    while name in producers and producers[name].op_type in PASS_THROUGH:
        name = producers[name].input[0]
    if name in producers and producers[name].op_type == "DequantizeLinear":
        integer = constants.get(producers[name].input[0])
        bits = _bits(integer) if integer is not None else None
        return "quantized", bits, None
    values = constants.get(name)
    if values is None or ref_weight is None or values.shape != ref_weight.shape:
        return (None, None, None) if values is None or ref_weight is None else ("changed", None, values)
    if np.array_equal(values, ref_weight):
        return None, None, None
    pruned = np.all((values == ref_weight) | (values == 0))
    return ("pruned" if pruned else "changed"), None, values


def _weight_errors(
    reference: onnx.ModelProto,
    layers: list[LayerError],
    weight_names: dict[str, str],
    candidate_values: Mapping[str, np.ndarray],
) -> None:
    """Weight SQNR against the reference weight, or against it with the BatchNormalization after it
    folded in (static int8 folds it), whichever explains the candidate's weight."""
    ref_constants = _constants(reference.graph)
    ref_nodes = {node.output[0]: node for node in reference.graph.node if node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in reference.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for layer in layers:
        name = weight_names.get(layer.output)
        ref_weight = ref_constants.get(_weight_input(ref_nodes[layer.output])) if layer.output in ref_nodes else None
        if name is None or ref_weight is None or name not in candidate_values:
            continue
        effective = np.asarray(candidate_values[name], np.float64)
        if effective.shape != ref_weight.shape:
            continue
        choices = [
            ref_weight.astype(np.float64),
            *_batchnorm_folded(readers.get(layer.output, []), ref_weight, ref_constants),
        ]
        errors = [effective - choice for choice in choices]
        best = min(range(len(choices)), key=lambda i: float((errors[i] ** 2).sum()))
        noise = float((errors[best] ** 2).sum())
        signal = max(float((choices[best] ** 2).sum()), 1e-300)
        layer.weight_sqnr_db = math.inf if noise == 0 else 10 * math.log10(signal / noise)
        layer.weight_max_abs = float(np.abs(errors[best]).max(initial=0.0))


def _batchnorm_folded(
    readers: list[onnx.NodeProto], weight: np.ndarray, constants: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    """The weight with the BatchNormalization folded in when that is the output's only reader (else [])."""
    if len(readers) != 1 or readers[0].op_type != "BatchNormalization" or len(readers[0].input) < 5:
        return []
    gamma, _, _, var = (constants.get(name) for name in readers[0].input[1:5])
    epsilon = next((a.f for a in readers[0].attribute if a.name == "epsilon"), 1e-5)
    if gamma is None or var is None or gamma.size != weight.shape[0]:
        return []
    factor = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + epsilon)
    return [weight.astype(np.float64) * factor.reshape(-1, *([1] * (weight.ndim - 1)))]


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _weight_input(node: onnx.NodeProto) -> str:
    index = WEIGHT_INPUT.get(node.op_type, 1)
    return node.input[index] if len(node.input) > index else ""


def _bits(values: np.ndarray) -> int:
    return 4 if values.dtype.name in ("int4", "uint4") else 8 * values.dtype.itemsize


class _Accumulator:
    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.cand_norm = 0.0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref = np.asarray(reference, np.float64).ravel()
        cand = np.asarray(candidate, np.float64).ravel()
        diff = ref - cand
        self.signal += float(ref @ ref)
        self.noise += float(diff @ diff)
        self.dot += float(ref @ cand)
        self.cand_norm += float(cand @ cand)

    def result(self) -> tuple[float, float]:
        sqnr = math.inf if self.noise == 0 else 10 * math.log10(max(self.signal, 1e-300) / self.noise)
        denominator = math.sqrt(self.signal * self.cand_norm)
        cosine = 1.0 if denominator == 0 else self.dot / denominator
        return sqnr, cosine


def _badness(layer: LayerError) -> tuple[float, str]:
    sqnr = layer.output_sqnr_db if layer.output_sqnr_db is not None else math.inf
    return sqnr, layer.node


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)
