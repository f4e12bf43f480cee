"""prune: zero the smallest-magnitude weights of Conv, ConvTranspose, Gemm and MatMul.

Modes (``auto``, the default: with calibration data, ``sparsegpt`` on the MatMul/Gemm weights it
applies to and ``wanda`` on the others; without, ``uniform``):
- ``uniform``: every eligible tensor gets exactly round(sparsity * size) zeros (halves up).
- ``global``: one threshold over all eligible tensors on a normalized score,
  ``|w| / rms(w)`` with ``rms`` the root mean square of the weight's own tensor. Dividing by the
  layer's RMS puts every layer on the same scale, so a layer whose weights are small overall (a
  wide layer with a small init scale, an embedding) is not wiped out by one raw threshold while
  a layer with large weights keeps everything; layers still end up with different sparsities.
- ``nm``: N:M semi-structured sparsity along the reduction axis (see ``passes.prune.nm``).
- ``sensitivity``: per-tensor sparsities allocated from a calibration scan
  (``optimizer.calibration.sensitivity``) so the parameter-weighted sparsity reaches the target with the
  least output error.
- ``wanda``: each output keeps the weights with the largest |w| x ||x_j||_2, the input feature's norm
  on calibration data (``passes.prune.wanda``); ``nm`` ranks by the same score when given
  calibration data (``criterion``). The removed weights' mean contribution (w x the mean of their
  input feature) then moves into the bias of MatMul and Gemm layers (``bias_correction``), so their
  outputs keep their mean.
- ``sparsegpt``: the row-by-row solver of SparseGPT on each MatMul/Gemm weight's X^T X: prunes and
  updates the weights left to keep X @ W (``passes.prune.sparsegpt``); ``nm`` with criterion
  ``sparsegpt`` (or ``auto``, with calibration data) does the same for N:M. The weights it does not
  cover (Conv, weights in subgraphs) are ranked by Wanda's score, or by magnitude where there are
  no input statistics either.

Zeros are exact, so pruning composes with any quantizer that maps 0.0 to exactly 0 (symmetric,
or zero point on the integer grid). Zeroed weights do not shrink a dense file: ``storage``
records, per tensor, whether a sparse_initializer (int64 indices) would be smaller; the
conversion itself runs on the saved model (``optimizer.graph.sparse_storage``), because onnx's full
checker cannot infer shapes through sparse initializers.
"""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.calibration.observe import Sampling
from optimizer.calibration.sensitivity import DEFAULT_SPARSITIES, sensitivity_scan
from optimizer.errors import OptionError, PassError
from optimizer.graph.patterns import NamePatterns
from optimizer.graph.sparse_storage import storage_choice
from optimizer.graph.walk import TensorUse, tensor_uses
from optimizer.graph.weights import Weight, constant_weight
from optimizer.internal_errors import working_on
from optimizer.pass_base import Pass, PassContext, PassReport, PassResult, option
from optimizer.registry import register
from passes.prune.nm import follows_nm, nm_prune, weight_layout
from passes.prune.sparsegpt import SparseGptSettings, prune_by_sparsegpt
from passes.prune.wanda import (
    FeatureInput,
    WandaStatistics,
    correct_biases,
    feature_input,
    feature_scale,
    input_statistics,
    output_axis,
    prune_rows,
    wanda_scores,
)
from passes.prune.weights import (
    WEIGHT_SLOTS,
    check_selection,
    is_default_domain,
    magnitude_order,
    role_of,
    sparsity_of,
    zero_count,
    zero_flat,
)
from passes.weight_guard import NON_FINITE_OPTION_HELP, WeightGuard

DEFAULT_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
BIAS_CORRECTED_OPS = ("Gemm", "MatMul")
"""Layers whose bias Wanda's correction changes by default. On MiniLM's MatMuls it took 1 - cosine from
0.393 to 0.313 at 70%; on the Convs of PP-OCRv4 det (IoU 0.953 -> 0.950 at 30%, 0.810 -> 0.778 at 50%)
and YOLOv8n (F1 0.677 -> 0.667 at 30%) it did not help, with 1x1 Convs alone too."""
ALREADY_AT_TARGET_SLACK = 1e-6


@register
class PrunePass(Pass):
    name = "prune"
    summary = (
        "zero weights by magnitude (uniform, global, N:M, sensitivity) or from calibration data (Wanda, SparseGPT)"
    )
    backoff_option = "exclude"

    mode: Literal["auto", "uniform", "global", "nm", "sensitivity", "wanda", "sparsegpt"] = option(
        "auto",
        "uniform per tensor, one global normalized threshold, N:M pattern, allocated by a sensitivity scan, "
        "wanda (per output, the lowest |w| x input-feature norm on calibration data) or sparsegpt (prune and "
        "update the other weights to keep X @ W, from X^T X on calibration data); the last two need it; "
        "auto: with calibration data, sparsegpt where it applies and wanda for the other weights, without it "
        "uniform; modes sparsegpt and auto rank the weights SparseGPT does not cover by Wanda's score",
    )
    criterion: Literal["auto", "magnitude", "wanda", "sparsegpt"] = option(
        "auto",
        "what mode nm ranks by: |w|, Wanda's |w| x input-feature norm, or SparseGPT (which also updates the "
        "weights left; Wanda where it does not apply); auto: sparsegpt with calibration data, else magnitude",
    )
    calibration_samples: int = option(
        256,
        "calibration samples Wanda's norms and SparseGPT's X^T X are measured on (SparseGPT fits them: on MiniLM"
        " at 70%, 32 sentences gave cosine 0.744 and R@1 0.520, 288 gave 0.778 and 0.707)",
    )
    damping: float = option(
        0.03,
        "SparseGPT: added to X^T X's diagonal, as a fraction of its mean, before it is inverted; more trusts the "
        "calibration data less. MiniLM held-out 1 - cosine at 30/50/70%: with 256 sentences 0.011/0.062/0.205 "
        "at 0.03, 0.012/0.064/0.210 at 0.1; with 32 sentences 0.017/0.085/0.265 at 0.03, 0.017/0.084/0.256 at 0.1",
    )
    sparsity: float = option(
        0.3,
        "fraction of weights to zero, in [0, 1) (not used by mode nm); the default 0.3 keeps even tiny "
        "random models within cosine 0.93 of the original",
    )
    nm: tuple[int, ...] = option((2, 4), "N,M for mode nm: keep N of every M weights along the reduction axis")
    op_types: tuple[str, ...] = option(DEFAULT_OP_TYPES, "ops whose weights are pruned; add Gather for embeddings")
    min_elements: int = option(1024, "leave weights with fewer elements alone")
    include: tuple[str, ...] = option((), "only tensors whose name or consumer node name matches (glob, or re:REGEX)")
    exclude: tuple[str, ...] = option((), "leave tensors whose name or consumer node name matches (glob, or re:REGEX)")
    storage: Literal["dense", "sparse", "auto"] = option(
        "dense", "how pruned tensors should be saved: dense, sparse_initializer, or whichever is smaller"
    )
    bias_correction: Literal["auto", "all", "off"] = option(
        "auto",
        "weights Wanda ranks: add each removed weight's mean contribution on the calibration data (w x the mean "
        "of its input feature) to its layer's bias, so the outputs keep their mean; auto: MatMul and Gemm layers "
        "(MiniLM at 70%: 1 - cosine 0.393 without, 0.313 with), all: Conv too (on PP-OCRv4 det and YOLOv8n it "
        "lowered IoU and F1), off",
    )
    scan_samples: int = option(16, "calibration samples the sensitivity scan runs (mode sensitivity)")
    allow_non_finite: bool = option(False, NON_FINITE_OPTION_HELP)

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise OptionError(f"pass 'prune' option 'sparsity' must be in [0, 1), got {self.sparsity}")
        if len(self.nm) != 2 or not 0 < self.nm[0] < self.nm[1]:
            raise OptionError(f"pass 'prune' option 'nm' must be two integers N,M with 0 < N < M, got {self.nm}")
        check_selection(self.name, self.op_types, WEIGHT_SLOTS, self.include + self.exclude)
        if not 0.0 < self.damping <= 10.0:
            raise OptionError(f"pass 'prune' option 'damping' must be in (0, 10], got {self.damping}")
        if self.min_elements < 0 or self.scan_samples < 1 or self.calibration_samples < 1:
            raise OptionError(
                "pass 'prune' options 'min_elements' must be >= 0, 'scan_samples' and 'calibration_samples' >= 1"
            )

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        report = PassReport()
        if self.mode == "auto":
            report.details["mode"] = (
                "auto: sparsegpt where it applies, wanda elsewhere (calibration data given)"
                if context.calibration is not None
                else "auto: uniform magnitude (no calibration data)"
            )
        weights = self._eligible(graph, report)
        solved = self._sparsegpt(graph, weights, context, report)
        rest = [weight for weight in weights if weight.name not in solved and not self._at_target(weight)]
        wanda = self._wanda(graph, rest, context, report) if rest and self._uses_wanda(context) else None
        scores = wanda.scores if wanda is not None else {}
        if self.mode == "nm":
            targets = self._nm_targets(weights, report, scores)
        elif self.mode in ("wanda", "sparsegpt") or (self.mode == "auto" and scores):
            targets = self._magnitude_targets([w for w in rest if w.name not in scores], self._uniform(rest))
            targets.update(self._per_output_targets([w for w in rest if w.name in scores], scores))
        else:
            sparsities = self._sparsities(weights, graph, context, report)
            targets = self._magnitude_targets(weights, sparsities)
        targets.update(solved)
        corrected = False
        if wanda is not None and self.bias_correction != "off":
            layers = BIAS_CORRECTED_OPS if self.bias_correction == "auto" else DEFAULT_OP_TYPES
            corrected = correct_biases(graph, weights, targets, wanda, layers, report)
        modified = self._apply(weights, targets, report) or corrected
        return PassResult(graph, modified, report.to_dict())

    def _eligible(self, graph: gs.Graph, report: PassReport) -> list[Weight]:
        """Constant weights in a prunable slot of every consumer, after the size and name filters."""
        weights = []
        guard = WeightGuard.of(graph, allow_non_finite=self.allow_non_finite)
        for name, uses in sorted(tensor_uses(graph).items()):
            weight = constant_weight(uses[0].node.inputs[uses[0].index], uses)
            if weight is None:
                continue
            reason = self._ineligible_reason(weight)
            if reason is None:
                reason = guard.reason(weight.tensor, weight.values) or None
            if reason is None:
                weights.append(weight)
            elif reason:
                report.skip("tensor", name, reason)
        return weights

    def _ineligible_reason(self, weight: Weight) -> str | None:
        """None when eligible; "" when not worth a report line (small non-weight constants)."""
        values = weight.values
        slots = [use for use in weight.uses if self._is_weight_slot(use)]
        if not slots:
            return role_of(weight.uses[0], values) if values.size >= self.min_elements else ""
        others = [use for use in weight.uses if not self._is_weight_slot(use)]
        if others:
            use = others[0]
            return f"also read by {use.node.op} '{use.node.name}' at input {use.index}, not a prunable weight slot"
        if values.dtype.kind != "f":
            return f"{values.dtype} weight; only floating-point weights are pruned"
        if values.size < self.min_elements:
            return f"{values.size} elements < min_elements={self.min_elements}"
        names = [weight.name] + [use.node.name for use in weight.uses]
        if self.include and not NamePatterns(self.include).matches(*names):
            return "matches no 'include' pattern"
        if self.exclude and NamePatterns(self.exclude).matches(*names):
            return "matches an 'exclude' pattern"
        return None

    def _is_weight_slot(self, use) -> bool:
        node = use.node
        return (
            node.op in self.op_types
            and is_default_domain(node)
            and WEIGHT_SLOTS[node.op] == use.index
            and _gather_on_rows(node)
        )

    def _sparsities(
        self, weights: list[Weight], graph: gs.Graph, context: PassContext, report: PassReport
    ) -> dict[str, float] | None:
        """Per-tensor sparsity (uniform, sensitivity); None means one global threshold."""
        if self.mode == "global":
            return None
        if self.mode == "sensitivity" and weights:
            return self._allocated(weights, graph, context, report)
        return self._uniform(weights)

    def _allocated(
        self, weights: list[Weight], graph: gs.Graph, context: PassContext, report: PassReport
    ) -> dict[str, float]:
        current = _overall_sparsity(weights)
        if current + ALREADY_AT_TARGET_SLACK >= self.sparsity:
            report.details["allocation"] = f"already at {current:.4f} >= target {self.sparsity}; nothing to do"
            return {weight.name: 0.0 for weight in weights}
        feeds = list(itertools.islice(context.calibration_feeds(self.name), self.scan_samples))
        if not feeds:
            raise PassError("pass 'prune' mode 'sensitivity' got no calibration samples")
        main = [w.name for w in weights if all(use.graph is graph for use in w.uses)]
        model = gs.export_onnx(graph.copy(), do_type_check=False)
        table = sensitivity_scan(
            model,
            feeds,
            weights=main,
            sparsities=DEFAULT_SPARSITIES,
            provider=context.provider,
            progress=context.progress,
            timeout_s=context.timeout_s,
        )
        allocation = table.allocate(self.sparsity)
        for weight in weights:
            allocation.setdefault(weight.name, self.sparsity)
        report.details["allocation"] = {name: round(value, 4) for name, value in sorted(allocation.items())}
        return allocation

    def _magnitude_targets(self, weights: list[Weight], sparsities: dict[str, float] | None) -> dict[str, np.ndarray]:
        if sparsities is None:
            return _global_targets(weights, self.sparsity)
        targets = {}
        for weight in weights:
            values = weight.values
            count = zero_count(sparsities[weight.name], values.size)
            with working_on("tensor", weight.name):
                targets[weight.name] = zero_flat(values, magnitude_order(values)[:count]) if count else values
        return targets

    def _sparsegpt(
        self, graph: gs.Graph, weights: list[Weight], context: PassContext, report: PassReport
    ) -> dict[str, np.ndarray]:
        """SparseGPT's pruned and updated values (modes sparsegpt and auto, nm with criterion sparsegpt
        or auto; auto only with calibration data)."""
        nm_criterion = self.criterion if self.mode == "nm" else None
        wanted = self.mode in ("sparsegpt", "auto") or nm_criterion in ("sparsegpt", "auto")
        optional = self.mode == "auto" or nm_criterion == "auto"
        if not wanted or (optional and context.calibration is None):
            return {}
        if context.calibration is None:
            raise PassError(f"pass 'prune' mode '{self.mode}' with SparseGPT needs calibration data")
        n, m = self.nm
        settings = SparseGptSettings(
            self.sparsity,
            (n, m) if self.mode == "nm" else None,
            self.damping,
            Sampling(self.calibration_samples, context.provider, context.timeout_s),
        )
        eligible = [weight for weight in weights if not self._at_target(weight)]
        return prune_by_sparsegpt(graph, eligible, lambda: context.calibration_feeds(self.name), settings, report)

    def _at_target(self, weight: Weight) -> bool:
        """Already pruned as asked (or not N:M-eligible): SparseGPT leaves it, so a rerun changes nothing."""
        if self.mode != "nm":
            return sparsity_of(weight.values) >= self.sparsity - ALREADY_AT_TARGET_SLACK
        n, m = self.nm
        layout = weight_layout(weight.uses, weight.values.shape, m)
        return isinstance(layout, str) or follows_nm(weight.values, layout, n, m)

    def _uses_wanda(self, context: PassContext) -> bool:
        """Wanda ranks: mode wanda and nm with criterion wanda; with calibration data, the weights
        SparseGPT does not cover in modes auto and sparsegpt and in nm with criterion auto or sparsegpt."""
        if self.mode == "wanda" or (self.mode == "nm" and self.criterion == "wanda"):
            return True
        data_aware = self.mode in ("auto", "sparsegpt") or (self.mode == "nm" and self.criterion != "magnitude")
        return data_aware and context.calibration is not None

    def _uniform(self, weights: list[Weight]) -> dict[str, float]:
        return {weight.name: self.sparsity for weight in weights}

    def _wanda(
        self, graph: gs.Graph, weights: list[Weight], context: PassContext, report: PassReport
    ) -> WandaStatistics:
        """Wanda scores per weight, and the input statistics behind them; a weight without input
        statistics is left out (ranked by |w|), with its reason in the report."""
        if context.calibration is None:
            raise PassError(f"pass 'prune' mode '{self.mode}' with Wanda scores needs calibration data")
        found = {
            weight.name: [feature_input(use, weight.values.ndim, graph) for use in weight.uses] for weight in weights
        }
        inputs = {item for items in found.values() for item in items if isinstance(item, FeatureInput)}
        settings = Sampling(self.calibration_samples, context.provider, context.timeout_s)
        statistics, samples = input_statistics(graph, inputs, lambda: context.calibration_feeds(self.name), settings)
        report.details["criterion"] = f"wanda: |w| x input-feature L2 norm over {samples} calibration samples"
        norms = {item: stats.norm for item, stats in statistics.items()}
        scores = {}
        for weight in weights:
            scales = [
                _scale(weight, use, item, norms) for use, item in zip(weight.uses, found[weight.name], strict=True)
            ]
            reasons = [scale for scale in scales if isinstance(scale, str)]
            if reasons:
                report.skip("tensor", weight.name, f"ranked by magnitude: {reasons[0]}")
                continue
            scores[weight.name] = wanda_scores(weight, [scale for scale in scales if not isinstance(scale, str)])
        return WandaStatistics(scores, found, statistics)

    def _per_output_targets(self, weights: list[Weight], scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per output, the lowest-scoring ``sparsity`` of its weights zeroed (magnitude where no score)."""
        targets = {}
        for weight in weights:
            with working_on("tensor", weight.name):
                axis = output_axis(weight.uses[0])
                ranking = scores.get(weight.name, np.abs(weight.values))
                targets[weight.name] = prune_rows(weight.values, ranking, axis, self.sparsity)
        return targets

    def _nm_targets(
        self, weights: list[Weight], report: PassReport, scores: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        n, m = self.nm
        targets, eligible = {}, []
        for weight in weights:
            values = weight.values
            layout = weight_layout(weight.uses, values.shape, m)
            if isinstance(layout, str):
                report.skip("tensor", weight.name, f"not N:M eligible: {layout}")
                continue
            eligible.append(weight.name)
            with working_on("tensor", weight.name):
                ranking = scores.get(weight.name)
                done = follows_nm(values, layout, n, m)  # already N:M: a rerun's input norms differ
                targets[weight.name] = values if done else nm_prune(values, layout, n, m, ranking)
        report.details["nm_eligible"] = eligible
        return targets

    def _apply(self, weights: list[Weight], targets: dict[str, np.ndarray], report: PassReport) -> bool:
        modified = False
        tensors, storage, total, zeros = {}, {}, 0, 0
        for weight in weights:
            if weight.name not in targets:
                continue
            before, after = weight.values, targets[weight.name]
            if not np.array_equal(before, after):
                with working_on("tensor", weight.name):
                    weight.write(after)
                modified = True
                report.count("tensors_pruned")
                report.count("weights_zeroed", int(np.count_nonzero(before)) - int(np.count_nonzero(after)))
            tensors[weight.name] = {
                "elements": int(after.size),
                "sparsity_before": round(sparsity_of(before), 6),
                "sparsity_after": round(sparsity_of(after), 6),
            }
            storage[weight.name] = storage_choice(after, self.storage)
            total, zeros = total + after.size, zeros + int(after.size - np.count_nonzero(after))
        report.count("tensors_eligible", len(tensors))
        report.details.update(
            {
                "mode": report.details.get("mode", self.mode),
                "tensors": tensors,
                "storage": storage,
                "achieved_sparsity": round(zeros / total, 6) if total else 0.0,
            }
        )
        report.details["sparse_tensors"] = sorted(n for n, s in storage.items() if s["stored_as"] == "sparse")
        return modified


def _scale(
    weight: Weight, use: TensorUse, item: FeatureInput | str, norms: dict[FeatureInput, np.ndarray]
) -> np.ndarray | str:
    """One reader's input norms laid out against ``weight``, or why there are none."""
    if isinstance(item, str):
        return item
    if item not in norms:
        return f"no calibration sample produced '{item.tensor}'"
    return feature_scale(weight, use, norms[item])


def _gather_on_rows(node: gs.Node) -> bool:
    return node.op != "Gather" or int(node.attrs.get("axis", 0)) == 0


def _overall_sparsity(weights: list[Weight]) -> float:
    total = sum(w.values.size for w in weights)
    zeros = sum(w.values.size - np.count_nonzero(w.values) for w in weights)
    return zeros / total if total else 1.0


def _global_targets(weights: list[Weight], sparsity: float) -> dict[str, np.ndarray]:
    """One threshold over ``|w| / rms(w)`` across all tensors (in name order, stable ties)."""
    if not weights:
        return {}
    scores = []
    for weight in weights:
        values = np.abs(weight.values.astype(np.float64).ravel())
        rms = float(np.sqrt(np.mean(values * values)))
        scores.append(values / rms if rms > 0 else values)
    flat = np.concatenate(scores)
    count = zero_count(sparsity, flat.size)
    chosen = np.zeros(flat.size, dtype=bool)
    chosen[np.argsort(flat, kind="stable")[:count]] = True
    targets, start = {}, 0
    for weight in weights:
        values = weight.values
        mask = chosen[start : start + values.size]
        start += values.size
        targets[weight.name] = zero_flat(values, np.flatnonzero(mask)) if mask.any() else values
    return targets
