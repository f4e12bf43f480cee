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
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from optimizer.app_inputs import resolve_feed_options
from optimizer.errors import OptionError, PassError
from optimizer.fileio.save import save_model
from optimizer.optimize_options import ModelInput, OptimizeOptions, ValidationOptions
from optimizer.pass_base import Pass, PassContext
from optimizer.pipeline import Pipeline, PipelineResult
from optimizer.shortcuts import calibration_request
from optimizer.verify.benchmark import benchmark
from optimizer.verify.isolation import run_comparison
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def to_dict(self) -> dict[str, Any]:
        data = {key: value for key, value in asdict(self).items() if key not in ("result", "candidates")}
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
    )


def choose_by_measurement(
    source: onnx.ModelProto,
    reference: ModelInput,
    passes: Sequence[Pass],
    index: int,
    context: PassContext,
    settings: AutoSettings,
) -> AutoChoice:
    """Build, check and time every candidate value of ``passes[index]``'s measured option."""
    item = passes[index]
    assert item.measured_option is not None
    candidates, results = [], {}
    with tempfile.TemporaryDirectory(prefix="onnx-compress-auto-") as folder:
        paths: dict[str, Path] = {}
        digests: dict[str, Candidate] = {}
        for value in item.measured_choices:
            candidate, built = _build(source, passes, index, value, context)
            candidates.append(candidate)
            if built is None:
                continue
            path = save_model(built.model, Path(folder) / f"{value}.onnx")
            candidate.size_bytes = path.stat().st_size
            results[value] = built
            twin = digests.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), candidate)
            if twin is not candidate:
                candidate.same_as, candidate.passed, candidate.verdict = twin.value, twin.passed, twin.verdict
                continue
            paths[value] = path
            _check(candidate, reference, path, settings)
        noise = _time(candidates, reference, paths, settings)
        by_value = {c.value: c for c in candidates}
        for candidate in candidates:
            if candidate.same_as is not None:
                candidate.latency_ratio = by_value[candidate.same_as].latency_ratio
    chosen, why = _choose(candidates, noise, list(item.measured_choices))
    return AutoChoice(
        item.name,
        item.measured_option,
        chosen,
        why,
        settings.feeds_label,
        noise,
        candidates,
        results.get(chosen),
    )


def _build(
    source: onnx.ModelProto, passes: Sequence[Pass], index: int, value: str, context: PassContext
) -> tuple[Candidate, PipelineResult | None]:
    item = passes[index]
    candidate = Candidate(value)
    option = item.measured_option or ""
    if context.calibration is None and calibration_request(item.name, {option: value}):
        candidate.error = "needs calibration data"
        return candidate, None
    try:
        chosen = with_value(passes, index, value)
        start = time.perf_counter()
        built = Pipeline(chosen, context=context).run(source)
        candidate.tool_seconds = round(time.perf_counter() - start, 3)
    except (OptionError, PassError) as error:
        candidate.error = str(error)
        return candidate, None
    return candidate, built


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
        stage=f"auto mode, checking the {candidate.value} candidate,",
    )
    candidate.passed = comparison.passed
    candidate.verdict = comparison.summary().splitlines()[-1]


def _time(
    candidates: list[Candidate], reference: ModelInput, paths: dict[str, Path], settings: AutoSettings
) -> float | None:
    """Paired latency ratios against the input; returns the noise floor (a second input session)."""
    timed = [c for c in candidates if c.value in paths]
    if not timed:
        return None
    models = [reference, reference, *(paths[c.value] for c in timed)]
    names = ["input", "input again", *(c.value for c in timed)]
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


def _choose(candidates: list[Candidate], noise: float | None, preference: list[str]) -> tuple[str, str]:
    passing = [c for c in candidates if c.passed and c.latency_ratio is not None]
    floor = noise or 0.0
    if not passing:
        built = [c for c in candidates if c.error is None]
        fallback = built[0].value if built else preference[0]
        return fallback, f"no candidate passed the check: {fallback}, the most accurate form, is kept"
    fastest = min(c.latency_ratio for c in passing if c.latency_ratio is not None)
    close = [c for c in passing if c.latency_ratio is not None and c.latency_ratio <= fastest + floor]
    chosen = min(close, key=lambda c: preference.index(c.value))
    assert chosen.latency_ratio is not None
    why = (
        f"{chosen.value}: passes the check at {chosen.latency_ratio:.2f}x the input's time "
        f"(fastest passing {fastest:.2f}x, noise floor {floor:.2f})"
    )
    if chosen.latency_ratio > 1.0 + floor:
        why += "; every passing candidate is slower than the input"
    return chosen.value, why


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
