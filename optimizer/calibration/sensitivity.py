"""Sensitivity of a model's outputs to pruning each weight, and per-layer sparsity allocation.

``sensitivity_scan`` prunes one weight at a time (magnitude rule, several sparsities) and runs
the model on calibration feeds, measuring cosine and SQNR of all float outputs against the
unpruned model. The weights are turned into graph inputs once, so one onnxruntime session
serves the whole scan instead of one session per (layer, sparsity).

``SensitivityTable.allocate`` picks per-layer sparsities that reach a parameter-weighted
target with the least summed output noise (Lagrangian relaxation over the measured curves:
noise powers of small independent perturbations add up).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from optimizer.errors import FeedError, OptionError
from optimizer.progress import progress_bar
from optimizer.verify.runtime import (
    DEFAULT_TIMEOUT_S,
    ProviderChoice,
    as_provider_choice,
    checked_timeout,
    create_session,
    run_outputs,
)

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
SCANNED_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
LAMBDA_RANGE = (1e-30, 1e10)
BISECTION_STEPS = 200


def magnitude_order(values: np.ndarray) -> np.ndarray:
    """Flat indices from smallest to largest magnitude; ties keep index order (stable)."""
    return np.argsort(np.abs(values.ravel()), kind="stable")


def zero_count(sparsity: float, size: int) -> int:
    """round(sparsity * size) with halves rounded up, the same on every platform."""
    return int(np.floor(sparsity * size + 0.5))


@dataclass
class LayerSensitivity:
    """Output agreement when only this weight is pruned, one entry per scanned sparsity."""

    name: str
    elements: int
    cosine: list[float]
    sqnr_db: list[float]

    def noise(self) -> list[float]:
        """Relative output noise power per sparsity, made non-decreasing (a monotone envelope)."""
        values = [0.0 if math.isinf(db) else 10.0 ** (-db / 10.0) for db in self.sqnr_db]
        return list(np.maximum.accumulate(values)) if values else []


@dataclass
class SensitivityTable:
    sparsities: tuple[float, ...]
    layers: list[LayerSensitivity]
    samples: int
    provider_used: str
    allocation: dict[str, float] = field(default_factory=dict)

    def allocate(self, target: float) -> dict[str, float]:
        """Per-layer sparsities whose parameter-weighted mean reaches ``target`` (or the most
        the scanned grid allows) with the least summed noise; stored in ``self.allocation``."""
        if not 0.0 <= target < 1.0:
            raise OptionError(f"target sparsity must be in [0, 1), got {target}")
        total = sum(layer.elements for layer in self.layers)
        needed = target * total
        if needed <= 0 or not self.layers:
            self.allocation = {layer.name: 0.0 for layer in self.layers}
            return dict(self.allocation)
        low, high = LAMBDA_RANGE
        if self._pruned(self._choose(high)) < needed:
            choice = self._choose(high)
        else:
            for _ in range(BISECTION_STEPS):
                middle = math.sqrt(low * high)
                if self._pruned(self._choose(middle)) >= needed:
                    high = middle
                else:
                    low = middle
                if high / low < 1.0 + 1e-9:
                    break
            choice = self._choose(high)
        self.allocation = dict(zip((layer.name for layer in self.layers), choice, strict=False))
        return dict(self.allocation)

    def _choose(self, weight: float) -> list[float]:
        """Each layer's sparsity minimizing noise - weight * pruned parameters."""
        picks = []
        for layer in self.layers:
            options = [(0.0, 0.0), *list(zip(self.sparsities, layer.noise(), strict=False))]
            costs = [noise - weight * layer.elements * sparsity for sparsity, noise in options]
            picks.append(options[int(np.argmin(costs))][0])
        return picks

    def _pruned(self, picks: list[float]) -> float:
        return sum(layer.elements * pick for layer, pick in zip(self.layers, picks, strict=False))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["sparsities"] = list(self.sparsities)
        for layer in data["layers"]:
            layer["sqnr_db"] = [db if math.isfinite(db) else "inf" for db in layer["sqnr_db"]]
        return data

    def to_markdown(self) -> str:
        """One row per layer, most sensitive first: cosine at each scanned sparsity, and the allocation."""
        header = ["layer", "elements"] + [f"cos@{s:g}" for s in self.sparsities]
        if self.allocation:
            header.append("allocated")
        lines = [
            f"{self.samples} sample(s) on {self.provider_used}; most sensitive layer first",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for layer in self.layers:
            row = [layer.name, str(layer.elements)] + [f"{c:.4f}" for c in layer.cosine]
            if self.allocation:
                row.append(f"{self.allocation.get(layer.name, 0.0):.2f}")
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)


def sensitivity_scan(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    weights: Sequence[str] | None = None,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    provider: str | ProviderChoice = "cpu",
    progress: bool = False,
    min_elements: int = 1024,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> SensitivityTable:
    """Measure each weight's effect on the outputs when pruned alone, at every sparsity.

    ``weights`` names main-graph initializers or Constant-node outputs; by default, float
    weights of Conv, ConvTranspose, Gemm and MatMul with at least ``min_elements`` elements.
    A model run longer than ``timeout_s`` raises ``RunTimeoutError``.
    """
    _check_sparsities(sparsities)
    checked_timeout(timeout_s)
    feed_list = [dict(feed) for feed in feeds]
    if not feed_list:
        raise FeedError("sensitivity_scan needs at least one calibration feed")
    names = list(weights) if weights is not None else default_scan_weights(model, min_elements)
    scan_model, values = weights_as_inputs(model, names)
    session, provider_used = create_session(scan_model, as_provider_choice(provider))
    data_names = [arg.name for arg in session.get_inputs() if arg.name not in values]
    samples = [{name: feed[name] for name in data_names} for feed in feed_list]
    runner = _Runner(session, samples, values, timeout_s)
    layers = []
    with progress_bar(total=len(names) * len(sparsities), desc="sensitivity", unit="run", enabled=progress) as bar:
        for name in names:
            layers.append(runner.layer(name, tuple(sparsities), bar))
    layers.sort(key=_most_sensitive_first)
    return SensitivityTable(tuple(sparsities), layers, len(samples), provider_used)


def _most_sensitive_first(layer: LayerSensitivity) -> tuple[float, str]:
    """Layers whose pruning adds the most output noise (at the highest scanned sparsity) first."""
    noise = layer.noise()
    return (-(noise[-1] if noise else 0.0), layer.name)


def _check_sparsities(sparsities: Sequence[float]) -> None:
    if not sparsities or any(not 0.0 < s < 1.0 for s in sparsities) or list(sparsities) != sorted(set(sparsities)):
        raise OptionError(f"sparsities must be increasing values in (0, 1), got {list(sparsities)}")


class _Runner:
    """Runs the scan model with all weights fed; one weight replaced at a time."""

    def __init__(
        self, session, samples: list[dict[str, np.ndarray]], values: dict[str, np.ndarray], timeout_s: float | None
    ) -> None:
        self.session, self.samples, self.values, self.timeout_s = session, samples, values, timeout_s
        self.reference = [self._run(sample, values) for sample in samples]

    def _run(self, sample: dict[str, np.ndarray], values: Mapping[str, np.ndarray]) -> np.ndarray:
        outputs = run_outputs(
            self.session,
            None,
            {**sample, **values},
            label="the scan model",
            stage="sensitivity scan",
            timeout_s=self.timeout_s,
        )
        floats = [np.asarray(o, np.float64).ravel() for o in outputs if np.asarray(o).dtype.kind == "f"]
        return np.concatenate(floats) if floats else np.zeros(0)

    def layer(self, name: str, sparsities: tuple[float, ...], bar) -> LayerSensitivity:
        original = self.values[name]
        order = magnitude_order(original)
        cosines, sqnrs = [], []
        for sparsity in sparsities:
            pruned = original.ravel().copy()
            pruned[order[: zero_count(sparsity, original.size)]] = 0
            fed = {**self.values, name: pruned.reshape(original.shape)}
            cosine, sqnr = self._agreement([self._run(s, fed) for s in self.samples])
            cosines.append(cosine)
            sqnrs.append(sqnr)
            bar.update(1)
        return LayerSensitivity(name, int(original.size), cosines, sqnrs)

    def _agreement(self, candidates: list[np.ndarray]) -> tuple[float, float]:
        dot = ref_sq = cand_sq = err_sq = 0.0
        for reference, candidate in zip(self.reference, candidates, strict=False):
            dot += float(reference @ candidate)
            ref_sq += float(reference @ reference)
            cand_sq += float(candidate @ candidate)
            err_sq += float(np.sum((reference - candidate) ** 2))
        cosine = 1.0 if ref_sq == cand_sq == 0 else dot / max(math.sqrt(ref_sq * cand_sq), 1e-300)
        sqnr = math.inf if err_sq == 0 else 10.0 * math.log10(max(ref_sq, 1e-300) / err_sq)
        return round(min(1.0, cosine), 8), sqnr


def default_scan_weights(model: onnx.ModelProto, min_elements: int) -> list[str]:
    """Float weights read only in the weight slot of Conv, ConvTranspose, Gemm or MatMul."""
    dense = _main_graph_weights(model.graph)
    slots: dict[str, bool] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in dense:
                ok = node.domain in ("", "ai.onnx") and SCANNED_OPS.get(node.op_type) == index
                slots[name] = slots.get(name, True) and ok
    return sorted(
        name for name, ok in slots.items() if ok and dense[name].dtype.kind == "f" and dense[name].size >= min_elements
    )


def _main_graph_weights(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            tensor = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            if tensor is not None:
                found[node.output[0]] = numpy_helper.to_array(tensor)
    return found


def weights_as_inputs(model: onnx.ModelProto, names: Sequence[str]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of ``model`` in which the named weights are graph inputs, and their values."""
    scan = onnx.ModelProto()
    scan.CopyFrom(model)
    graph, wanted = scan.graph, set(names)
    available = _main_graph_weights(graph)
    missing = sorted(wanted - set(available))
    if missing:
        raise OptionError(f"cannot scan {', '.join(missing)}: not a main-graph initializer or Constant output")
    values = {name: available[name] for name in names}
    kept = [t for t in graph.initializer if t.name not in wanted]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in wanted)]
    del graph.node[:]
    graph.node.extend(nodes)
    declared = {value.name for value in graph.input}
    for name in names:
        if name not in declared:
            elem_type = onnx.helper.np_dtype_to_tensor_dtype(values[name].dtype)
            graph.input.append(onnx.helper.make_tensor_value_info(name, elem_type, list(values[name].shape)))
    return scan, values
