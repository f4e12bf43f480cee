"""A pass option set to 'auto' (``--quantize-mode auto``), chosen by measurement.

Each value of ``Pass.measured_choices`` is built on the input (a value that needs calibration data
is tried only with it), checked by the same verdict as ``--validate`` (output-kind metrics, the
lossy tolerance unless the user set one) and timed with onnxruntime against the input, every
candidate in the same interleaved rounds, next to a second session of the input whose paired
ratio is the noise floor. The choice: the fastest candidate that passes; among candidates within
the noise floor of it, the first in ``measured_choices`` (the most accurate); never one slower than
the input by more than the noise floor when a candidate that runs the input's own ops passes.
Without calibration data nothing is measured: the option takes ``Pass.unmeasured_choice``.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from optimizer.app_inputs import resolve_feed_options
from optimizer.budget_trials import backed_off_passes
from optimizer.errors import OptionError, PassError
from optimizer.fileio.save import save_model
from optimizer.optimize_options import ModelInput, OptimizeOptions, ValidationOptions
from optimizer.pass_base import Pass, PassContext
from optimizer.pipeline import Pipeline, PipelineResult
from optimizer.shortcuts import calibration_request
from optimizer.verify.benchmark import benchmark
from optimizer.verify.isolation import run_comparison
from optimizer.verify.quant_noise import activation_noise, rank_groups
from optimizer.verify.tolerances import LOSSY_TOLERANCE, Tolerance, with_default_tolerance

AUTO = "auto"


@dataclass(frozen=True)
class AutoSettings:
    """What the candidates are checked on: feeds (``feeds_label`` says which), the verdict's
    tolerance and output kinds, where onnxruntime runs, and how many latency rounds."""

    feeds: list[dict[str, Any]]
    feeds_label: str
    tolerance: Tolerance | Mapping[str, Tolerance]
    output_kinds: Mapping[str, str]
    provider: str
    timeout_s: float | None
    rounds: int = 20
    reference_outputs: list[dict[str, Any]] = field(default_factory=list, compare=False, repr=False)
    """The input's outputs on ``feeds``, filled by the first check and read by the others."""


@dataclass
class Candidate:
    value: str
    size_bytes: int | None = None
    tool_seconds: float | None = None
    passed: bool | None = None
    verdict: str = ""
    latency_ratio: float | None = None
    error: str | None = None
    same_as: str | None = None
    """Another candidate whose file came out byte-identical (a CNN has no MatMul for dynamic mode
    to change): its check and timing stand for this one, measured once."""
    softened: list[str] = field(default_factory=list)
    """The groups (compute nodes) backed off to the pass's next-best format, worst-rounded first."""

    @property
    def name(self) -> str:
        if not self.softened:
            return self.value
        return f"{self.value}, {len(self.softened)} group{'s' if len(self.softened) > 1 else ''} weight-only"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


@dataclass
class AutoChoice:
    pass_name: str
    option: str
    chosen: str
    why: str
    evaluated_on: str = ""
    noise_floor: float | None = None
    candidates: list[Candidate] = field(default_factory=list)
    result: PipelineResult | None = None
    """The chosen candidate's pipeline result, reused instead of running the passes again."""
    passes: list[Pass] | None = None
    """The chosen candidate's passes (with its backed-off groups), for the stages after auto."""
    ranking: list[dict[str, Any]] = field(default_factory=list)
    """The groups a failing candidate rounds worst (node, rounding SQNR in dB), in back-off order."""

    def to_dict(self) -> dict[str, Any]:
        skip = ("result", "candidates", "passes")
        data = {key: value for key, value in asdict(self).items() if key not in skip}
        return {**data, "candidates": [c.to_dict() for c in self.candidates]}


def auto_pass_index(passes: Sequence[Pass]) -> int | None:
    """The position of the first pass whose measured option is 'auto', or None."""
    for index, item in enumerate(passes):
        if item.measured_option and getattr(item, item.measured_option) == AUTO:
            return index
    return None


def with_value(passes: Sequence[Pass], index: int, value: str) -> list[Pass]:
    item = passes[index]
    assert item.measured_option is not None
    return [*passes[:index], replace(item, **{item.measured_option: value}), *passes[index + 1 :]]


def unmeasured(passes: Sequence[Pass], index: int) -> AutoChoice:
    item = passes[index]
    assert item.measured_option is not None and item.unmeasured_choice is not None
    return AutoChoice(
        item.name,
        item.measured_option,
        item.unmeasured_choice,
        "no calibration data: nothing to measure the candidates on",
        passes=with_value(passes, index, item.unmeasured_choice),
    )


@dataclass
class _Trials:
    """Every candidate built so far, its file, its pipeline result and its passes."""

    source: onnx.ModelProto
    reference: ModelInput
    context: PassContext
    settings: AutoSettings
    folder: Path
    candidates: list[Candidate] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    results: dict[str, PipelineResult] = field(default_factory=dict)
    passes: dict[str, list[Pass]] = field(default_factory=dict)
    digests: dict[str, Candidate] = field(default_factory=dict)

    def add(self, candidate: Candidate, chosen: list[Pass]) -> PipelineResult | None:
        """Build ``candidate`` with ``chosen`` passes, save it and check it (once per distinct file)."""
        self.candidates.append(candidate)
        built = _build(candidate, self.source, chosen, self.context)
        if built is None:
            return None
        path = save_model(built.model, self.folder / f"candidate-{len(self.candidates)}.onnx")
        candidate.size_bytes = path.stat().st_size
        self.results[candidate.name], self.passes[candidate.name] = built, chosen
        twin = self.digests.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), candidate)
        if twin is not candidate:
            candidate.same_as, candidate.passed, candidate.verdict = twin.name, twin.passed, twin.verdict
            return built
        self.paths[candidate.name] = path
        _check(candidate, self.reference, path, self.settings)
        return built


def choose_by_measurement(
    source: onnx.ModelProto,
    reference: ModelInput,
    passes: Sequence[Pass],
    index: int,
    context: PassContext,
    settings: AutoSettings,
) -> AutoChoice:
    """Build, check and time every candidate value of ``passes[index]``'s measured option; a
    softenable value that fails is tried again with its worst-rounded groups backed off."""
    item = passes[index]
    assert item.measured_option is not None
    ranking: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="onnx-compress-auto-") as folder:
        trials = _Trials(source, reference, context, settings, Path(folder))
        for value in item.measured_choices:
            candidate = Candidate(value)
            if context.calibration is None and calibration_request(item.name, {item.measured_option: value}):
                candidate.error = "needs calibration data"
                trials.candidates.append(candidate)
                continue
            built = trials.add(candidate, with_value(passes, index, value))
            if built is not None and candidate.passed is False and value in item.softened_choices:
                ranking = soften_search(trials, with_value(passes, index, value), value, built.model)
        noise = _time(trials.candidates, reference, trials.paths, settings)
        by_name = {c.name: c for c in trials.candidates}
        for candidate in trials.candidates:
            if candidate.same_as is not None:
                candidate.latency_ratio = by_name[candidate.same_as].latency_ratio
    chosen = _choose(trials.candidates, noise, list(item.measured_choices))
    return AutoChoice(
        item.name,
        item.measured_option,
        chosen.value,
        _why(chosen, trials.candidates, noise),
        settings.feeds_label,
        noise,
        trials.candidates,
        trials.results.get(chosen.name),
        trials.passes.get(chosen.name) or with_value(passes, index, chosen.value),
        ranking,
    )


RANK_SAMPLES = 4
"""Check samples the rounding-noise ranking runs the failing candidate on."""
MAX_SOFTENED_TRIALS = 5
"""Builds with 1, 2, 4, 8, 16 groups backed off, at most: past that, static int8 has little left."""


def soften_search(trials: _Trials, chosen: list[Pass], value: str, failed: onnx.ModelProto) -> list[dict[str, Any]]:
    """Back off the groups the failing ``value`` candidate rounds worst (``quant_noise``) to the
    pass's next-best format, 1, 2, 4, ... of them, until a build passes the check. Returns the
    ranking of the groups tried (node, rounding SQNR in dB), worst first."""
    settings = trials.settings
    feeds = settings.feeds[:RANK_SAMPLES]
    ranked = rank_groups(
        failed, activation_noise(failed, feeds, provider=settings.provider, timeout_s=settings.timeout_s)
    )
    names = [name for name, _ in ranked]
    counts = sorted({min(2**step, len(names)) for step in range(MAX_SOFTENED_TRIALS)} - {0})
    tried = 0
    for count in counts:
        candidate = Candidate(value, softened=names[:count])
        trials.add(candidate, backed_off_passes(chosen, [], names[:count]))
        tried = count
        if candidate.passed or candidate.error is not None:
            break
    return [{"node": name, "rounding_sqnr_db": _decibels(score)} for name, score in ranked[:tried]]


def _decibels(noise_ratio: float) -> float | None:
    return round(-10.0 * math.log10(noise_ratio), 1) if 0 < noise_ratio < math.inf else None


def _build(
    candidate: Candidate, source: onnx.ModelProto, chosen: list[Pass], context: PassContext
) -> PipelineResult | None:
    try:
        start = time.perf_counter()
        built = Pipeline(chosen, context=context).run(source)
        candidate.tool_seconds = round(time.perf_counter() - start, 3)
    except (OptionError, PassError) as error:
        candidate.error = str(error)
        return None
    return built


def _check(candidate: Candidate, reference: ModelInput, path: Path, settings: AutoSettings) -> None:
    comparison = run_comparison(
        reference,
        path,
        settings.feeds,
        isolate=False,
        tolerance=settings.tolerance,
        provider=settings.provider,
        output_kinds=settings.output_kinds,
        timeout_s=settings.timeout_s,
        stage=f"auto mode, checking the {candidate.name} candidate,",
        reference_cache=settings.reference_outputs,
    )
    candidate.passed = comparison.passed
    candidate.verdict = comparison.summary().splitlines()[-1]


def _time(
    candidates: list[Candidate], reference: ModelInput, paths: dict[str, Path], settings: AutoSettings
) -> float | None:
    """Paired latency ratios against the input; returns the noise floor (a second input session)."""
    timed = [c for c in candidates if c.name in paths]
    if not timed:
        return None
    models = [reference, reference, *(paths[c.name] for c in timed)]
    names = ["input", "input again", *(c.name for c in timed)]
    result = benchmark(
        models,
        settings.feeds[:1],
        names=names,
        provider=settings.provider,
        rounds=settings.rounds,
        timeout_s=settings.timeout_s,
    )
    for candidate, timing in zip(timed, result.models[2:], strict=True):
        candidate.latency_ratio = round(timing.ratio_paired, 4)
    return round(abs(result.models[1].ratio_paired - 1.0), 4)


def _choose(candidates: list[Candidate], noise: float | None, preference: list[str]) -> Candidate:
    """The fastest passing candidate; within the noise floor of it, the most accurate (first in
    ``preference``, fewest groups backed off); with none passing, the most accurate built one."""
    passing = [c for c in candidates if c.passed and c.latency_ratio is not None]
    if not passing:
        built = [c for c in candidates if c.error is None]
        return built[0] if built else candidates[0]
    fastest = min(c.latency_ratio for c in passing if c.latency_ratio is not None)
    close = [c for c in passing if c.latency_ratio is not None and c.latency_ratio <= fastest + (noise or 0.0)]
    return min(close, key=lambda c: (preference.index(c.value), len(c.softened)))


def _why(chosen: Candidate, candidates: list[Candidate], noise: float | None) -> str:
    floor = noise or 0.0
    if not chosen.passed or chosen.latency_ratio is None:
        return f"no candidate passed the check: {chosen.name}, the most accurate form, is kept"
    fastest = min(c.latency_ratio for c in candidates if c.passed and c.latency_ratio is not None)
    why = (
        f"{chosen.name}: passes the check at {chosen.latency_ratio:.2f}x the input's time "
        f"(fastest passing {fastest:.2f}x, noise floor {floor:.2f})"
    )
    if chosen.softened:
        why += f"; backed off to weight-only int8: {', '.join(chosen.softened)}"
    if chosen.latency_ratio > 1.0 + floor:
        why += "; every passing candidate is slower than the input"
    return why


CHECK_SAMPLES = 16


def auto_stage(
    source: onnx.ModelProto,
    reference: ModelInput,
    passes: Sequence[Pass],
    index: int,
    context: PassContext,
    options: OptimizeOptions,
    data: list[dict[str, Any]] | None = None,
) -> AutoChoice:
    """optimize()'s auto stage: measure when there is calibration data, else the unmeasured value.
    ``data``: the user's --data feeds, already resolved (None: resolved here when given)."""
    if context.calibration is None:
        return unmeasured(passes, index)
    validation = options.validation or ValidationOptions()
    feeds, label = _check_feeds(source, passes[index], context, options, data)
    settings = AutoSettings(
        feeds,
        label,
        with_default_tolerance(validation.tolerance, LOSSY_TOLERANCE),
        validation.output_kinds,
        options.provider,
        options.timeout_s,
        options.bench_rounds or 20,
    )
    return choose_by_measurement(source, reference, passes, index, context, settings)


def _check_feeds(
    source: onnx.ModelProto,
    item: Pass,
    context: PassContext,
    options: OptimizeOptions,
    data: list[dict[str, Any]] | None,
) -> tuple[list[dict[str, Any]], str]:
    """The user's --data when given; else calibration samples the pass does not read (those past its
    ``calibration_samples``), or, when there are none, the calibration samples themselves."""
    if options.feeds.source is not None:
        return data if data is not None else resolve_feed_options(source, options.feeds), "the validation data (--data)"
    assert context.calibration is not None
    used = int(getattr(item, "calibration_samples", 0) or 0)
    samples = [dict(feed) for feed in itertools.islice(context.calibration(), used + CHECK_SAMPLES)]
    held_out = samples[used : used + CHECK_SAMPLES] if used else []
    if held_out:
        return held_out, f"{len(held_out)} calibration samples the pass did not calibrate on"
    return samples[:CHECK_SAMPLES], (
        f"{min(len(samples), CHECK_SAMPLES)} calibration samples (also calibrated on: give --data DIR or more "
        f"than {used} calibration samples for a held-out check)"
    )
