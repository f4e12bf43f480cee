"""A pass option set to 'auto' (``--quantize-mode auto``), chosen by measurement.

Each value of ``Pass.measured_choices`` is built on the input (a value that needs calibration data
is tried only with it; the passes before the auto pass up to the last lossy one, pruning say, run
once and every candidate starts from their output), checked by the same verdict as ``--validate``
(output-kind metrics, the lossy tolerance unless the user set one) and timed with onnxruntime
against the input, every candidate in the same interleaved rounds, next to a second session of
the input: its distance from 1.0, or its 95% confidence half-width if wider, is the noise floor.
A value in ``Pass.softened_choices`` (quantize: static) that fails the check is built again
(``retry_failed``): with ``Pass.unclipped_options`` (percentile 100), then with its first 1, 2, 4,
8, 16, 32 groups (``optimizer.verify.static_groups``, graph order) backed off to the pass's
next-best format (weight-only int8), until a build passes, then between the last count that
failed and the one that passed (``_bisect``: 16 and 32 try 24, then 20 or 28).
The choice: the fastest candidate that passes; among candidates within the noise floor of it, the
first in ``measured_choices`` (the most accurate), then the one with the fewest groups backed off.
Without calibration data nothing is measured: the option takes ``Pass.unmeasured_choice``.
Builds and checks run through ``optimizer.executor`` (``--workers``, ``--executor ray``); the
timing runs in this process after them, alone (trials sharing cores would be noise).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from optimizer.app_inputs import resolve_feed_options
from optimizer.auto_choice import choose, copy_twin_timings, time_candidates, why
from optimizer.auto_trials import AutoSettings, Candidate, build, check, init_worker, worker_trial
from optimizer.budget_trials import backed_off_passes
from optimizer.executor import ExecutorOptions, TrialPool, open_pool
from optimizer.fileio.save import save_model
from optimizer.optimize_options import ModelInput, OptimizeOptions, ValidationOptions
from optimizer.pass_base import Pass, PassContext
from optimizer.pipeline import Pipeline, PipelineResult
from optimizer.shortcuts import calibration_request
from optimizer.verify.runtime import external_data_locations
from optimizer.verify.static_groups import static_groups
from optimizer.verify.tolerances import LOSSY_TOLERANCE, with_default_tolerance

AUTO = "auto"


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
    """The groups backed off in the last static build tried (node, position), first layers first."""
    chosen_name: str = ""
    """The chosen candidate's name (its variant and the groups backed off, e.g. "static, 2 groups
    weight-only")."""
    timing_rounds: int = 0
    """Rounds the candidates were timed over: fewer than asked when more could not change the choice."""
    trials_on: str = "this process"
    """Where the builds and checks ran (``ExecutorOptions.describe``); timing always runs in this
    process after them, with no trial running: trials sharing cores would make it noise."""

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
    """Every candidate built so far, its file, its pipeline result and its passes; built and checked
    here, or in ``pool``'s workers (``optimizer.executor``), ``workers`` at a time."""

    source: onnx.ModelProto
    reference: ModelInput
    context: PassContext
    settings: AutoSettings
    folder: Path
    pool: TrialPool | None = None
    workers: int = 1
    candidates: list[Candidate] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    results: dict[str, PipelineResult] = field(default_factory=dict)
    passes: dict[str, list[Pass]] = field(default_factory=dict)
    digests: dict[str, Candidate] = field(default_factory=dict)

    def run(self, batch: list[tuple[Candidate, list[Pass]]]) -> list[tuple[Candidate, PipelineResult | None]]:
        """Build and check every candidate of ``batch``; a file byte-identical to an earlier one is
        checked once (here) and timed once. Returns the candidates as measured (a worker's copies)."""
        if self.pool is None or len(batch) < 2:
            return [(candidate, self._here(candidate, chosen)) for candidate, chosen in batch]
        done = self.pool.map(worker_trial, batch)
        pairs = zip(done, batch, strict=True)
        return [(candidate, self._keep(candidate, chosen, built)) for (candidate, built), (_, chosen) in pairs]

    def _here(self, candidate: Candidate, chosen: list[Pass]) -> PipelineResult | None:
        self.candidates.append(candidate)
        built = build(candidate, self.source, chosen, self.context)
        if built is None:
            return None
        path, twin = self._save(candidate, chosen, built)
        if twin is not candidate:
            candidate.same_as, candidate.passed, candidate.verdict = twin.name, twin.passed, twin.verdict
            candidate.violation = twin.violation
            return built
        self.paths[candidate.name] = path
        check(candidate, self.reference, path, self.settings)
        return built

    def _keep(self, candidate: Candidate, chosen: list[Pass], built: PipelineResult | None) -> PipelineResult | None:
        """A candidate a worker built and checked: saved here for timing."""
        self.candidates.append(candidate)
        if built is None:
            return None
        path, twin = self._save(candidate, chosen, built)
        if twin is not candidate:
            candidate.same_as = twin.name
        else:
            self.paths[candidate.name] = path
        return built

    def _save(self, candidate: Candidate, chosen: list[Pass], built: PipelineResult) -> tuple[Path, Candidate]:
        path = save_model(built.model, self.folder / f"candidate-{len(self.candidates)}.onnx")
        candidate.size_bytes = path.stat().st_size
        self.results[candidate.name], self.passes[candidate.name] = built, chosen
        return path, self.digests.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), candidate)


def choose_by_measurement(
    source: onnx.ModelProto,
    reference: ModelInput,
    passes: Sequence[Pass],
    index: int,
    context: PassContext,
    settings: AutoSettings,
    executor: ExecutorOptions | None = None,
) -> AutoChoice:
    """Build, check and time every candidate value of ``passes[index]``'s measured option; a
    softenable value that fails is tried again (``retry_failed``). Builds and
    checks run through ``executor`` (default: here); timing runs here, after them, alone."""
    item = passes[index]
    assert item.measured_option is not None
    ranking: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="onnx-compress-auto-") as folder,
        _pool(executor, source, reference, context, settings) as pool,
    ):
        workers = executor.workers if executor is not None and pool is not None else 1
        trials = _Trials(source, reference, context, settings, Path(folder), pool, workers)
        batch = []
        for value in item.measured_choices:
            candidate = Candidate(value)
            if context.calibration is None and calibration_request(item.name, {item.measured_option: value}):
                candidate.error = "needs calibration data"
                trials.candidates.append(candidate)
                continue
            batch.append((candidate, with_value(passes, index, value)))
        for (candidate, built), (_, chosen) in zip(trials.run(batch), batch, strict=True):
            if built is not None and candidate.passed is False and candidate.value in item.softened_choices:
                ranking = retry_failed(trials, chosen, index, candidate, built.model)
        preference = list(item.measured_choices)
        noise, rounds = time_candidates(trials.candidates, reference, trials.paths, settings, preference)
    copy_twin_timings(trials.candidates)
    chosen_candidate = choose(trials.candidates, noise, preference)
    return AutoChoice(
        item.name,
        item.measured_option,
        chosen_candidate.value,
        why(chosen_candidate, trials.candidates, noise),
        settings.feeds_label,
        noise,
        trials.candidates,
        trials.results.get(chosen_candidate.name),
        trials.passes.get(chosen_candidate.name) or with_value(passes, index, chosen_candidate.value),
        ranking,
        chosen_candidate.name,
        rounds,
        executor.describe() if executor is not None and pool is not None else "this process",
    )


@contextlib.contextmanager
def _pool(
    executor: ExecutorOptions | None,
    source: onnx.ModelProto,
    reference: ModelInput,
    context: PassContext,
    settings: AutoSettings,
) -> Iterator[TrialPool | None]:
    """Workers for the builds and checks when ``executor`` asks for them (a model too big for one
    protobuf message, or with lazily loaded weights, is built here)."""
    if executor is None or not executor.parallel or context.calibration is None:
        yield None
        return
    if source.ByteSize() >= 2**31 or external_data_locations(source):
        yield None
        return
    shared_reference = reference.SerializeToString() if isinstance(reference, onnx.ModelProto) else reference
    if not isinstance(shared_reference, bytes):
        shared_reference = os.fspath(shared_reference)
    calibration = [dict(feed) for feed in context.calibration()]
    initargs = (
        ("passes",),
        source.SerializeToString(),
        calibration,
        context.provider,
        context.timeout_s,
        shared_reference,
        settings,
        context.model_folder,
    )
    pool = open_pool(executor, init_worker, initargs)
    try:
        yield pool
    finally:
        pool.close()


CLEARLY_BETTER = 0.75
"""The wider ranges replace the defaults as the base for backing groups off only when they miss the
check by at most this share of what the defaults miss by: a check on 16 samples is noisy (YOLOv8n:
violation 1.71 vs 1.88, and the same box F1 on held-out photos; PP-OCRv4 det: 1.30 vs 3.83)."""
MAX_SOFTENED_TRIALS = 6
"""Builds with 1, 2, 4, 8, 16, 32 groups backed off, at most: past that, static int8 has little left
(PP-OCRv4 det: 32 of its 62 Convs weight-only passed at 0.83x fp32 time, weight-only int8 0.92x)."""


def retry_failed(
    trials: _Trials, chosen: list[Pass], index: int, failed: Candidate, model: onnx.ModelProto
) -> list[dict[str, Any]]:
    """A failing softenable candidate, built again: first with ``Pass.unclipped_options`` (wider
    ranges); then, from the defaults unless the wider ranges missed by clearly less, with its first
    1, 2, 4, 8, 16, 32 quantized groups (``static_groups``, graph order) backed off to the pass's
    next-best format, until a build passes. Returns the groups backed off in the last build
    (node, position), first first."""
    wider = chosen[index].unclipped_options()
    if wider:
        variant = ", ".join(f"{key} {value:g}" for key, value in wider.items())
        widened = [*chosen[:index], replace(chosen[index], **wider), *chosen[index + 1 :]]
        [(measured, built)] = trials.run([(Candidate(failed.value, variant=variant), widened)])
        if measured.passed:
            return []
        if built is not None and (measured.violation or math.inf) < CLEARLY_BETTER * (failed.violation or math.inf):
            failed, chosen, model = measured, widened, built.model
    names = static_groups(model)
    counts = sorted({min(2**step, len(names)) for step in range(MAX_SOFTENED_TRIALS)} - {0})
    tried: list[str] = []
    failed_count = 0
    for start in range(0, len(counts), trials.workers):
        measured_batch = _soften(trials, chosen, failed, names, counts[start : start + trials.workers])
        tried = measured_batch[-1].softened
        if any(candidate.error is not None for candidate in measured_batch):
            break
        passing = [len(candidate.softened) for candidate in measured_batch if candidate.passed]
        below = [len(c.softened) for c in measured_batch if not c.passed and len(c.softened) < min(passing or [0])]
        failed_count = max([failed_count, *below])
        if passing:
            tried = _bisect(trials, chosen, failed, names, failed_count, min(passing)) or names[: min(passing)]
            break
        failed_count = len(measured_batch[-1].softened)
    return [{"node": name, "position": names.index(name)} for name in tried]


BISECT_STEPS = 2
"""Builds between the last failing and the first passing count of groups backed off (16 and 32:
24, then 20 or 28): fewer groups weight-only is a faster model."""


def _bisect(trials: _Trials, chosen: list[Pass], failed: Candidate, names: list[str], low: int, high: int) -> list[str]:
    """The fewest groups backed off that pass, searched between ``low`` (failed) and ``high``
    (passed) in ``BISECT_STEPS`` builds; the groups of the last passing build ([] if none passed)."""
    passed: list[str] = []
    for _ in range(BISECT_STEPS):
        if high - low <= 1:
            break
        middle = (low + high) // 2
        [candidate] = _soften(trials, chosen, failed, names, [middle])
        if candidate.passed:
            high, passed = middle, candidate.softened
        else:
            low = middle
    return passed


def _soften(
    trials: _Trials, chosen: list[Pass], failed: Candidate, names: list[str], counts: list[int]
) -> list[Candidate]:
    """Builds and checks of ``failed`` with its first ``count`` groups weight-only, per count."""
    batch = [
        (
            Candidate(failed.value, variant=failed.variant, softened=names[:count]),
            backed_off_passes(chosen, [], names[:count]),
        )
        for count in counts
    ]
    return [candidate for candidate, _ in trials.run(batch)]


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
    only = passes[index].only_choice()
    if only is not None:
        return _only_choice(passes, index, *only)
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
    lossy = [position for position in range(index) if not passes[position].lossless]
    if not lossy:  # lossless passes are cheap to repeat, and a kept copy of their output is not
        return choose_by_measurement(source, reference, passes, index, context, settings, options.executor)
    split = lossy[-1] + 1
    prefix = Pipeline(list(passes[:split]), context=context).run(source)  # once, not once per candidate
    rest = list(passes[split:])
    choice = choose_by_measurement(prefix.model, reference, rest, index - split, context, settings, options.executor)
    return _after_prefix(choice, prefix, list(passes[:split]))


def _only_choice(passes: Sequence[Pass], index: int, value: str, why: str) -> AutoChoice:
    item = passes[index]
    assert item.measured_option is not None
    return AutoChoice(item.name, item.measured_option, value, why, passes=with_value(passes, index, value))


def _after_prefix(choice: AutoChoice, prefix: PipelineResult, passes: list[Pass]) -> AutoChoice:
    """``choice``, measured on the output of ``passes`` (``prefix``), as a choice over the whole
    pipeline: the passes before the auto pass and their reports come first."""
    result = choice.result
    if result is not None:
        result = PipelineResult(result.model, prefix.modified or result.modified, [*prefix.runs, *result.runs])
    return replace(choice, result=result, passes=[*passes, *(choice.passes or [])])


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
