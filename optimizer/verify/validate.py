"""Run a reference and a candidate model on the same feeds and compare every output.

Per output, in the manner of Polygraphy: max and mean absolute error, max relative error,
cosine similarity, SQNR, top-1 agreement for logits, bitwise equality, checked against a
tolerance per output. Metrics stream over samples in float64, so memory does not grow with the
number of samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from optimizer.calibration.feeds import TOKEN_IDS, Feed, check_feed, session_input_specs
from optimizer.errors import FeedError, OptionError, RuntimeSessionError
from optimizer.verify.comparison_text import short_number, summary_row
from optimizer.verify.generation import (
    GENERATE_TOKENS,
    GENERATION_PROMPTS,
    GenerationCheck,
    checked_tokens,
    generation_check,
)
from optimizer.verify.json_values import json_ready
from optimizer.verify.output_kinds import KIND_LIMITS, KindStats, checked_output_kinds, detector_layout, infer_kind
from optimizer.verify.runtime import (
    DEFAULT_TIMEOUT_S,
    ModelSource,
    ProviderChoice,
    as_provider_choice,
    checked_timeout,
    create_session,
    fallback_note,
    model_label,
    run_session,
)
from optimizer.verify.tolerances import LOSSLESS_TOLERANCE, Tolerance, resolve_tolerances

STAGE = "validation"
RELATIVE_ERROR_EPS = 1e-12


@dataclass
class OutputMetrics:
    """Metrics of one output over all samples.

    ``max_rel`` is ``max |ref - cand| / max |ref|`` over all samples (the error relative to the
    output's scale, what ``--rtol`` limits); an element-wise ratio would blow up wherever the
    reference is near zero. Numeric metrics cover only
    positions where both values are finite; NaN/Inf in one model but not the other are counted
    in ``nonfinite_mismatches`` and always fail. ``violation_ratio`` > 1 means failed; it ranks
    outputs by how badly they miss their tolerance.
    """

    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    sqnr_db: float
    top1_agreement: float | None
    exact: bool
    shape: tuple[int | None, ...]
    dtype: str
    passed: bool
    failures: list[str]
    nonfinite_mismatches: int = 0
    violation_ratio: float = 0.0
    kind: str = "dense"
    kind_reason: str = ""
    kind_metrics: dict[str, float | None] = field(default_factory=dict)
    """The metrics of the output's kind (``optimizer.verify.output_kinds``), each also on its worst sample."""
    worst_sample_cosine: float = 1.0


@dataclass
class Comparison:
    """Result of ``compare``: one ``OutputMetrics`` per output, in the reference's order."""

    outputs: list[OutputMetrics]
    passed: bool
    worst_output: str | None
    samples: int
    provider_requested: str
    provider_used: str
    provider_note: str | None
    tolerance: dict
    random_feeds: bool = False
    """The samples were generated (no real data): a PASS then says little about accuracy."""
    decided_by: str | None = None
    """Set when something other than the per-output limits decides ``passed`` (the accuracy budget)."""
    generation: GenerationCheck | None = None
    """A KV-cache decoder's greedy generation, candidate against reference (information; not in ``passed``)."""

    def to_dict(self) -> dict:
        """JSON-ready: non-finite floats become the strings "inf", "-inf" and "nan"."""
        return {key: json_ready(value) for key, value in asdict(self).items()}

    def summary(self) -> str:
        """A table per output, then "PASS" or "FAIL: worst output ..." on the last line."""
        header = ("output", "kind", "max_abs", "cosine", "worst", "SQNR dB", "top1", "kind metric", "verdict")
        rows = [header] + [summary_row(metrics) for metrics in self.outputs]
        widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip() for row in rows
        ]
        lines.insert(0, f"{self.samples} sample(s) on {self.provider_used}")
        if self.provider_note:
            lines.insert(1, f"note: {self.provider_note}")
        if self.generation is not None:
            lines.append(self.generation.summary)
        lines.append(self._verdict())
        return "\n".join(lines)

    def _verdict(self) -> str:
        if self.decided_by is not None:
            verdict = f"{'PASS' if self.passed else 'FAIL'} ({self.decided_by})"
        elif self.passed:
            verdict = "PASS"
        else:
            worst = next(metrics for metrics in self.outputs if metrics.name == self.worst_output)
            verdict = f"FAIL: worst output {worst.name!r} ({'; '.join(worst.failures)})"
        return verdict + self.feeds_caveat()

    def feeds_caveat(self) -> str:
        """What the verdict rests on, when that is only generated data (empty for real data)."""
        if not self.random_feeds:
            return ""
        return f" on {self.samples} random samples: not evidence of accuracy; give --data DIR"


@dataclass
class _OutputAccumulator:
    """Streaming float64 sums for one output; ``add`` once per sample."""

    name: str
    reference_dtype: np.dtype
    candidate_dtype: np.dtype
    shape: list[int | None] | None = None
    class_like: bool = False
    elements: int = 0
    finite_elements: int = 0
    exact_mismatches: int = 0
    nonfinite_mismatches: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    max_ref_abs: float = 0.0
    sum_ref_sq: float = 0.0
    sum_cand_sq: float = 0.0
    sum_dot: float = 0.0
    sum_err_sq: float = 0.0
    top1_matches: int = 0
    top1_rows: int = 0
    exact: bool = True
    kind: str | None = None
    """Set by the caller (``--output-kind``), else inferred from the first sample."""
    tokens: bool = False
    stats: KindStats | None = None
    sample_cosines: list[float] = field(default_factory=list)

    @property
    def compared_exactly(self) -> bool:
        return self.reference_dtype.kind != "f"

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        self._track_shape(reference.shape)
        self.elements += reference.size
        self.exact = self.exact and _bitwise_equal(reference, candidate)
        if reference.dtype.kind not in "fiub" or candidate.dtype.kind not in "fiub":
            self.exact_mismatches += int(np.count_nonzero(reference != candidate))
            return
        if self.compared_exactly:
            self.exact_mismatches += int(np.count_nonzero(reference != candidate))
        self._add_numeric(reference.astype(np.float64).ravel(), candidate.astype(np.float64).ravel())
        if not self.compared_exactly:
            self._add_kind(reference, candidate)
        if self.class_like and reference.ndim >= 2:
            matches = np.argmax(reference, axis=-1) == np.argmax(candidate, axis=-1)
            self.top1_matches += int(np.count_nonzero(matches))
            self.top1_rows += matches.size

    def _add_kind(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if self.stats is None:
            inferred, why = infer_kind(self.name, reference, self.tokens)
            kind = self.kind or inferred
            layout = why if kind == "detector" and inferred == "detector" else ""
            if kind == "detector" and not layout:
                layout = detector_layout(reference) or "score map [1, A, C]"
            self.stats = KindStats(kind, why if kind == inferred else "set by --output-kind", layout)
        self.stats.add(reference, candidate)

    def _track_shape(self, shape: tuple[int, ...]) -> None:
        if self.shape is None:
            self.shape = list(shape)
            self.class_like = self.reference_dtype.kind == "f" and len(shape) >= 2 and shape[-1] >= 2
        elif len(self.shape) == len(shape):
            self.shape = [old if old == new else None for old, new in zip(self.shape, shape, strict=False)]

    def _add_numeric(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        finite = np.isfinite(reference) & np.isfinite(candidate)
        if not finite.all():
            both_nan = np.isnan(reference) & np.isnan(candidate)
            same = (reference == candidate) | both_nan
            self.nonfinite_mismatches += int(np.count_nonzero(~finite & ~same))
            reference, candidate = reference[finite], candidate[finite]
        self.finite_elements += reference.size
        abs_diff = np.abs(reference - candidate)
        self.max_abs = max(self.max_abs, float(abs_diff.max(initial=0.0)))
        self.sum_abs += float(abs_diff.sum())
        self.max_ref_abs = max(self.max_ref_abs, float(np.abs(reference).max(initial=0.0)))
        self.sum_ref_sq += float(np.dot(reference, reference))
        self.sum_cand_sq += float(np.dot(candidate, candidate))
        dot, norms = float(np.dot(reference, candidate)), float(np.linalg.norm(reference) * np.linalg.norm(candidate))
        self.sample_cosines.append(dot / norms if norms > 0 else float(not reference.any() and not candidate.any()))
        self.sum_dot += dot
        self.sum_err_sq += float(np.dot(abs_diff, abs_diff))

    @property
    def max_rel(self) -> float:
        """max |ref - cand| / max |ref|; 0 when both are all zero, inf for a zero reference."""
        if self.max_abs == 0.0:
            return 0.0
        return self.max_abs / self.max_ref_abs if self.max_ref_abs > RELATIVE_ERROR_EPS else math.inf

    def cosine(self) -> float:
        """Cosine over all samples concatenated; two all-zero outputs count as identical (1.0)."""
        if self.exact or (self.sum_ref_sq == 0.0 and self.sum_cand_sq == 0.0):
            return 1.0
        if self.sum_ref_sq == 0.0 or self.sum_cand_sq == 0.0:
            return 0.0
        cosine = self.sum_dot / (math.sqrt(self.sum_ref_sq) * math.sqrt(self.sum_cand_sq))
        return min(1.0, max(-1.0, cosine))

    def sqnr_db(self) -> float:
        """10*log10(sum ref^2 / sum (ref-cand)^2); inf when identical, -inf for a zero reference."""
        if self.sum_err_sq == 0.0:
            return math.inf
        if self.sum_ref_sq == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.sum_ref_sq / self.sum_err_sq)


def _bitwise_equal(reference: np.ndarray, candidate: np.ndarray) -> bool:
    if reference.dtype != candidate.dtype or reference.shape != candidate.shape:
        return False
    if reference.dtype.kind == "O":
        return bool(np.array_equal(reference, candidate))
    return np.ascontiguousarray(reference).tobytes() == np.ascontiguousarray(candidate).tobytes()


def _check_limits(acc: _OutputAccumulator, tolerance: Tolerance) -> list[tuple[str, float]]:
    """(failure text, violation ratio) for every limit the output misses."""
    misses = []
    if acc.nonfinite_mismatches:
        misses.append(
            (
                f"{acc.nonfinite_mismatches} NaN/Inf value(s) in one model but not the other",
                math.inf,
            )
        )
    if acc.compared_exactly:
        if acc.exact_mismatches:
            text = f"{acc.exact_mismatches} of {acc.elements} elements differ ({acc.reference_dtype} compared exactly)"
            misses.append((text, math.inf))
        return misses
    checks: list[tuple[str, float | None, float | None, bool]] = [
        ("max_abs", acc.max_abs, tolerance.max_abs, False),
        ("max_rel", acc.max_rel, tolerance.max_rel, False),
    ]
    own_limits = tolerance.by_kind and acc.stats is not None and acc.stats.kind != "dense"
    if not own_limits:  # a recognised kind is judged by its own metrics, not a whole-tensor proxy
        checks += [
            ("cosine", acc.cosine(), tolerance.min_cosine, True),
            ("SQNR dB", acc.sqnr_db(), tolerance.min_sqnr_db, True),
        ]
    if acc.class_like:
        checks.append(("top-1 agreement", _top1(acc), tolerance.min_top1, True))
    for label, value, limit, is_minimum in checks:
        if limit is None or value is None or (value >= limit if is_minimum else value <= limit):
            continue
        sign = "<" if is_minimum else ">"
        misses.append((f"{label} {short_number(value)} {sign} {short_number(limit)}", _violation(label, value, limit)))
    if tolerance.by_kind and acc.stats is not None:
        misses += acc.stats.failures(KIND_LIMITS[acc.stats.kind])
    return misses


def _violation(label: str, value: float, limit: float) -> float:
    """How many times over its limit a metric is, comparable across metric kinds."""
    if label == "SQNR dB":
        return 10.0 ** ((limit - value) / 10.0)
    if label in ("cosine", "top-1 agreement"):
        allowed, actual = 1.0 - limit, 1.0 - value
    else:
        allowed, actual = limit, value
    return actual / allowed if allowed > 0 else math.inf


def _top1(acc: _OutputAccumulator) -> float | None:
    """Argmax agreement along the last axis; shown only where it means something (class scores)."""
    if not acc.class_like or acc.top1_rows == 0 or (acc.stats and not acc.stats.scores_classes):
        return None
    return acc.top1_matches / acc.top1_rows


def _finish(acc: _OutputAccumulator, tolerance: Tolerance) -> OutputMetrics:
    misses = _check_limits(acc, tolerance)
    dtype = str(acc.reference_dtype)
    if acc.candidate_dtype != acc.reference_dtype:
        dtype = f"{acc.reference_dtype} vs {acc.candidate_dtype}"
    numeric = acc.reference_dtype.kind in "fiub"
    mean_abs = acc.sum_abs / acc.finite_elements if acc.finite_elements else 0.0
    return OutputMetrics(
        name=acc.name,
        max_abs=acc.max_abs if numeric else math.nan,
        mean_abs=mean_abs if numeric else math.nan,
        max_rel=acc.max_rel if numeric else math.nan,
        cosine=acc.cosine() if numeric else math.nan,
        sqnr_db=acc.sqnr_db() if numeric else math.nan,
        top1_agreement=_top1(acc),
        exact=acc.exact,
        shape=tuple(acc.shape or ()),
        dtype=dtype,
        passed=not misses,
        failures=[text for text, _ in misses],
        nonfinite_mismatches=acc.nonfinite_mismatches,
        violation_ratio=max((ratio for _, ratio in misses), default=0.0),
        kind=acc.stats.kind if acc.stats is not None else "exact",
        kind_reason=acc.stats.why if acc.stats is not None else f"{acc.reference_dtype} compared exactly",
        kind_metrics=acc.stats.values() if acc.stats is not None else {},
        worst_sample_cosine=min(acc.sample_cosines, default=1.0) if numeric else math.nan,
    )


def _check_same_outputs(reference_names: list[str], candidate_names: list[str], labels: tuple[str, str]) -> None:
    only_reference = [name for name in reference_names if name not in candidate_names]
    only_candidate = [name for name in candidate_names if name not in reference_names]
    if only_reference or only_candidate:
        raise RuntimeSessionError(
            f"cannot compare {labels[0]} (reference) with {labels[1]} (candidate): outputs only in "
            f"reference: {', '.join(only_reference) or '-'}; only in candidate: {', '.join(only_candidate) or '-'}"
        )


def _check_same_layout(name: str, reference: np.ndarray, candidate: np.ndarray, index: int) -> None:
    if reference.shape != candidate.shape:
        raise RuntimeSessionError(
            f"sample {index}: output {name!r} has shape {reference.shape} in the reference but "
            f"{candidate.shape} in the candidate"
        )
    numeric = "fiub"
    if (reference.dtype.kind in numeric) != (candidate.dtype.kind in numeric) or (
        (reference.dtype.kind == "f") != (candidate.dtype.kind == "f")
    ):
        raise RuntimeSessionError(
            f"sample {index}: output {name!r} is {reference.dtype} in the reference but "
            f"{candidate.dtype} in the candidate"
        )


def _explicit_top1_misuse(
    tolerance: Tolerance | Mapping[str, Tolerance], accumulators: Sequence[_OutputAccumulator]
) -> None:
    if not isinstance(tolerance, Mapping):
        return
    for acc in accumulators:
        limit = tolerance.get(acc.name)
        if limit is not None and limit.min_top1 is not None and not acc.class_like:
            raise OptionError(
                f"min_top1 set for output {acc.name!r}, which is not class-like "
                f"(needs a float output of rank >= 2 with last dim >= 2, got shape {tuple(acc.shape or ())})"
            )


def _worst_output(outputs: Sequence[OutputMetrics]) -> str | None:
    failed = [metrics for metrics in outputs if not metrics.passed]
    if failed:
        return max(failed, key=lambda metrics: metrics.violation_ratio).name
    if not outputs:
        return None
    return min(outputs, key=lambda m: math.inf if math.isnan(m.sqnr_db) else m.sqnr_db).name


def _reference_runner(
    session: Any, cache: list[dict[str, np.ndarray]] | None, label: str, stage: str, timeout_s: float | None
) -> Callable[[int, Feed], dict[str, np.ndarray]]:
    """Feed ``index``'s reference outputs: from ``cache`` when filled before, else run (and cached)."""
    cached = list(cache) if cache else None

    def outputs(index: int, feed: Feed) -> dict[str, np.ndarray]:
        if cached is not None and index < len(cached):
            return cached[index]
        found = run_session(session, feed, label=label, stage=stage, timeout_s=timeout_s)
        if cache is not None and cached is None:
            cache.append(found)
        return found

    return outputs


def _accumulate(
    accumulators: dict[str, _OutputAccumulator],
    output_names: Sequence[str],
    pair: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
    index: int,
    kinds_and_tokens: tuple[Mapping[str, str], bool],
) -> None:
    """Add one sample's (reference, candidate) outputs to each output's accumulator."""
    kinds, tokens = kinds_and_tokens
    for name in output_names:
        ref_value, cand_value = pair[0][name], pair[1][name]
        _check_same_layout(name, ref_value, cand_value, index)
        if name not in accumulators:
            accumulators[name] = _OutputAccumulator(
                name, ref_value.dtype, cand_value.dtype, kind=kinds.get(name), tokens=tokens
            )
        accumulators[name].add(ref_value, cand_value)


def compare(
    reference: ModelSource,
    candidate: ModelSource,
    feeds: Iterable[Feed],
    *,
    tolerance: Tolerance | Mapping[str, Tolerance] = LOSSLESS_TOLERANCE,
    provider: str | ProviderChoice = "cpu",
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    output_kinds: Mapping[str, str] | None = None,
    stage: str = STAGE,
    reference_cache: list[dict[str, np.ndarray]] | None = None,
    generate_tokens: int = GENERATE_TOKENS,
) -> Comparison:
    """Run both models one sample at a time on the same feeds and check every output.
    ``reference_cache``: filled with the reference's outputs when empty, read when not (auto mode).
    Each output's kind (``optimizer.verify.output_kinds``) is inferred from its first sample unless
    ``output_kinds`` names it; the lossy default tolerance also applies that kind's limits. Feeds are
    checked against the reference's inputs; the candidate receives only the inputs it declares.
    Differing output names or shapes raise ``RuntimeSessionError``; a run longer than ``timeout_s``
    raises ``RunTimeoutError`` naming ``stage``. A KV-cache decoder also generates
    ``generate_tokens`` tokens greedily from prompts of the first samples (``Comparison.generation``;
    0 skips it)."""
    checked_timeout(timeout_s)
    generate_tokens = checked_tokens(generate_tokens)
    choice, labels = as_provider_choice(provider), (model_label(reference), model_label(candidate))
    reference_session, reference_provider = create_session(reference, choice)
    candidate_session, candidate_provider = create_session(candidate, choice)
    output_names = [node_arg.name for node_arg in reference_session.get_outputs()]
    _check_same_outputs(output_names, [arg.name for arg in candidate_session.get_outputs()], labels)
    tolerances = resolve_tolerances(tolerance, output_names)
    kinds = checked_output_kinds(output_kinds, output_names)
    specs = session_input_specs(reference_session)
    tokens = any(spec.name == TOKEN_IDS for spec in specs)  # a language model: its logits are next_token
    run_reference = _reference_runner(reference_session, reference_cache, labels[0], stage, timeout_s)
    accumulators: dict[str, _OutputAccumulator] = {}
    prompts: list[Feed] = []
    samples = 0
    for index, feed in enumerate(feeds):
        checked = check_feed(specs, feed, index)
        if generate_tokens and len(prompts) < GENERATION_PROMPTS:
            prompts.append(checked)
        candidate_outputs = run_session(candidate_session, checked, label=labels[1], stage=stage, timeout_s=timeout_s)
        pair = (run_reference(index, checked), candidate_outputs)
        _accumulate(accumulators, output_names, pair, index, (kinds, tokens))
        samples += 1
    if samples == 0:
        raise FeedError("no feeds given: need at least one sample to compare")
    _explicit_top1_misuse(tolerance, list(accumulators.values()))
    outputs = [_finish(accumulators[name], tolerances[name]) for name in output_names]
    sessions = (reference_session, candidate_session)
    generation = generation_check(sessions, labels, prompts, generate_tokens, stage=stage, timeout_s=timeout_s)
    return Comparison(
        outputs=outputs,
        passed=all(metrics.passed for metrics in outputs),
        worst_output=_worst_output(outputs),
        samples=samples,
        tolerance={name: asdict(tolerances[name]) for name in output_names},
        generation=generation,
        **_providers(choice, reference_provider, candidate_provider),
    )


def _providers(choice: ProviderChoice, reference_provider: str, candidate_provider: str) -> dict[str, Any]:
    """The provider fields of a ``Comparison``: asked for, used (by each model when they differ), note."""
    both = f"{reference_provider} (reference), {candidate_provider} (candidate)"
    return {
        "provider_requested": choice.requested,
        "provider_used": reference_provider if candidate_provider == reference_provider else both,
        "provider_note": fallback_note(choice, reference_provider),
    }
