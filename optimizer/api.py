"""Library entry point: optimize() = plan -> load -> run passes -> publish (validate, benchmark) -> report.

This module and ``optimizer.cli`` are the only core modules that import ``passes``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

import passes as _passes  # noqa: F401  (registers every pass)
from optimizer.app_inputs import (
    calibration_factory,
    genai_files_notes,
    generated_feeds_hint,
    load_input,
    model_summary,
    resolve_feed_options,
    resolve_feeds,
    runnable_reference,
)
from optimizer.auto_mode import AutoChoice, auto_pass_index, auto_stage
from optimizer.bits_budget import BitsResult
from optimizer.budget import (
    BudgetResult,
    MetricSpec,
    backed_off_passes,
    budget_layers,
    final_budget_check,
)
from optimizer.budget_stages import bits_stage, budget_stage, check_bits_request
from optimizer.calibration.feeds import Feed
from optimizer.errors import OptionError, PassError, RuntimeSessionError
from optimizer.fileio.output_files import folder_files, warn
from optimizer.fileio.publish import publish, save_unchanged_sources, staged_name, staging_folder
from optimizer.fileio.save import check_output_target
from optimizer.fileio.tensor_checks import custom_domain_ops
from optimizer.graph.sparse_storage import to_sparse_initializers
from optimizer.internal_errors import stage
from optimizer.optimize_options import (
    BitsOptions,
    BudgetOptions,
    FeedOptions,
    FeedSource,
    ModelInput,
    OptimizeOptions,
    OptimizeResult,
    ValidationOptions,
)
from optimizer.pass_base import Pass, PassContext
from optimizer.pipeline import Pipeline, PipelineResult
from optimizer.registry import create_pass, get_pass_class
from optimizer.report.report import Report, check_writes_apart, write_report
from optimizer.report_notes import add_fusion, size_notes
from optimizer.shortcuts import calibration_request, shortcut_options
from optimizer.verify.benchmark import BenchResult, benchmark
from optimizer.verify.fusion import has_dequantize
from optimizer.verify.generation import checked_tokens
from optimizer.verify.isolation import NOT_VALIDATED, run_comparison
from optimizer.verify.pass_bisect import BisectResult, bisect_passes
from optimizer.verify.runtime import RunTimeoutError
from optimizer.verify.tolerances import LOSSLESS_TOLERANCE, LOSSY_TOLERANCE, with_default_tolerance
from optimizer.verify.validate import Comparison, Tolerance

__all__ = [  # the library's entry points; the option classes live in optimizer.optimize_options
    "DEFAULT_PASSES",
    "BitsOptions",
    "BudgetOptions",
    "FeedOptions",
    "FeedSource",
    "ModelInput",
    "OptimizeOptions",
    "OptimizeResult",
    "ValidationOptions",
    "build_passes",
    "model_summary",
    "optimize",
    "plan_passes",
    "resolve_feeds",
    "tool_version",
]

DEFAULT_PASSES: tuple[str, ...] = ("constants-to-initializers", "share", "cleanup")


def tool_version() -> str:
    try:
        return metadata.version("onnx-compress")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_passes(
    names: Sequence[str | Pass] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Pass]:
    """Pass instances from names (default: DEFAULT_PASSES) and per-pass options by pass name."""
    chosen = list(DEFAULT_PASSES if names is None else names)
    options = dict(options or {})
    named = {item for item in chosen if isinstance(item, str)}
    for name in sorted(options):
        get_pass_class(name)
        if name not in named:
            raise OptionError(
                f"options given for pass '{name}', which is not in the pipeline ({', '.join(map(str, chosen))})"
            )
    return [item if isinstance(item, Pass) else create_pass(item, **dict(options.get(item, {}))) for item in chosen]


def plan_passes(
    base: Sequence[str] = DEFAULT_PASSES,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    **shortcuts: Any,
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Pass names and options for the shortcut requests (``optimizer.shortcuts.SHORTCUTS``, keyed by
    ``dest``: prune, prune_mode, quantize, quantize_mode, cluster_bits, ...), in the order that
    composes well: normalize and share first, then prune, then quantize or cluster (zeros stay zeros)."""
    added, shortcut_values = shortcut_options(shortcuts)
    merged: dict[str, dict[str, Any]] = {name: dict(values) for name, values in (options or {}).items()}
    for name, values in shortcut_values.items():
        merged.setdefault(name, {}).update(values)
    return list(dict.fromkeys([*base, *added])), merged


def optimize(
    model: ModelInput, output: str | os.PathLike | None = None, options: OptimizeOptions | None = None
) -> OptimizeResult:
    """Run passes on ``model``; save to ``output`` when given; validate and benchmark on request.

    The stages, each named in an internal error: plan (passes built, calibration data checked before
    any work) -> load -> feeds -> auto mode (an 'auto' option, see ``optimizer.auto_mode``) -> accuracy
    budget (with ``options.budget``) -> run passes -> publish (staged
    next to the output, validated and benchmarked there, then moved in atomically) -> fusion check ->
    report. ``OptimizeOptions`` documents every option. The input is never changed; when validation
    fails the output is not written unless ``keep_failed``. An input that changes during the run is a
    ``ModelLoadError`` and nothing is written. The fusion check never fails a run: at worst a note.
    """
    options = options or OptimizeOptions()
    if options.budget is not None and options.validation is None:  # a budget's verdict is measured
        options = replace(options, validation=ValidationOptions())
    with stage("plan"):
        chosen = _plan_stage(options)
    with stage("load"):
        run = _load_stage(model, output, options, chosen)
    with stage("feeds"):
        run.checks = _checks(run)
    index = auto_pass_index(run.chosen)
    if index is not None:
        with stage("auto mode"):
            reference = runnable_reference(run.source, run.reference, run.model_files)
            data = _given_data(run)
            run.auto = auto_stage(run.source, reference, run.chosen, index, run.context, options, data)
            assert run.auto.passes is not None  # auto_stage always says which passes it chose
            run.chosen = run.auto.passes
    if options.bits is not None:
        with stage("bits budget"):
            run.bits = bits_stage(run.source, run.chosen, run.context, options, run.reference)
            run.chosen = run.bits.passes
    if options.budget is not None:
        with stage("accuracy budget"):
            assert run.checks is not None  # a budget implies validation
            budget = run.budget = budget_stage(
                run.source, run.chosen, run.checks.feeds, run.context, options, run.reference
            )
            run.chosen = backed_off_passes(run.chosen, budget.backed_off, budget.weight_only)
    else:
        budget = None
    result = _run_stage(run)
    report = _new_report(run, result, budget)
    saved, comparison, timing = _publish_stage(run, result.model, report)
    if options.fusion_check or (options.fusion_check is None and has_dequantize(result.model)):
        with stage("fusion check"):
            add_fusion(report, saved if saved is not None else result.model, options.provider)
    with stage("report"):
        for path in options.reports:
            write_report(report, path)
    return OptimizeResult(result.model, saved, result.modified, report, comparison, timing)


@dataclass
class _Run:
    """What the stages share: the request, the loaded input, the passes and where checks run."""

    options: OptimizeOptions
    output: str | os.PathLike | None
    source: onnx.ModelProto
    reference: Path | None
    protected: tuple[Path, ...]
    custom_ops: list[str]
    chosen: list[Pass]
    context: PassContext
    checks: _Checks | None = None
    model_files: tuple[Path, ...] = ()
    budget: BudgetResult | None = None
    auto: AutoChoice | None = None
    bits: BitsResult | None = None


def _given_data(run: _Run) -> list[Feed] | None:
    """The user's --data samples, checked (and completed for a decoder), or None without --data."""
    if run.options.feeds.source is None:
        return None
    if run.checks is not None:
        return run.checks.feeds
    return resolve_feed_options(run.source, run.options.feeds, run.reference)


def _plan_stage(options: OptimizeOptions) -> list[Pass]:
    """The passes, built once; a pass that needs calibration data without it is refused here."""
    chosen = build_passes(options.passes, options.pass_options)
    checked_tokens(options.generate_tokens)
    if options.bits is not None:
        check_bits_request(options, chosen)
    if options.budget is not None and options.budget.metric == "perplexity" and options.feeds.source is None:
        raise OptionError(
            "--metric perplexity is measured on real token sequences; without --data DIR (feeds=...) the "
            "inputs would be generated at random: give held-out samples with input_ids"
        )
    if options.calibration is None:
        for item in chosen:
            request = calibration_request(item.name, item.options())
            if request is not None:
                raise OptionError(
                    f"{request} needs calibration data: --calibration-data DIR (calibration=... in the library)"
                )
    return chosen


def _load_stage(
    model: ModelInput, output: str | os.PathLike | None, options: OptimizeOptions, chosen: list[Pass]
) -> _Run:
    """Load the input; refuse writes over anything the run reads, and validation of custom ops."""
    source, model_files, reference = load_input(model, options.max_input_bytes, options.allow_symlinks_under)
    protected = (*model_files, *folder_files(options.feeds.source), *folder_files(options.calibration))
    check_writes_apart([*([output] if output is not None else []), *options.reports], options.reports, protected)
    if output is not None:
        check_output_target(output)
    custom_ops = custom_domain_ops(source)
    if custom_ops and options.validation is not None:
        raise RuntimeSessionError(
            f"{reference or 'model'}: custom-domain ops {', '.join(custom_ops)} cannot run in "
            f"onnxruntime; {NOT_VALIDATED}"
        )
    with stage("calibration"):
        factory = calibration_factory(source, options.calibration, reference.parent if reference else None)
    context = PassContext(
        calibration=factory,
        provider=options.provider,
        progress=options.progress,
        timeout_s=options.timeout_s,
        model_folder=reference.parent if reference else None,
    )
    return _Run(options, output, source, reference, protected, custom_ops, chosen, context, model_files=model_files)


def _checks(run: _Run) -> _Checks | None:
    """Feeds and tolerance for validation, benchmark and bisect, resolved before the passes run."""
    options = run.options
    validation = options.validation
    if validation is None and options.bench_rounds is None and not options.bisect:
        return None
    tolerance = validation.tolerance if validation is not None else None
    default = LOSSLESS_TOLERANCE if all(p.lossless for p in run.chosen) else LOSSY_TOLERANCE
    tolerance = with_default_tolerance(tolerance, default)
    settings = validation or ValidationOptions()
    return _Checks(
        resolve_feed_options(run.source, options.feeds, run.reference),
        tolerance,
        options.provider,
        validation is not None,
        options.bench_rounds,
        settings.isolate,
        options.timeout_s,
        settings.max_memory_bytes,
        options.feeds.source is None,
        settings.output_kinds,
        options.generate_tokens,
    )


def _run_stage(run: _Run) -> PipelineResult:
    """The passes in order; a failing pass is bisected on request; sparse storage is applied last."""
    pipeline = Pipeline(run.chosen, check_each_pass=run.options.check_each_pass, context=run.context)
    built = run.auto.result if run.auto is not None and run.budget is None and run.bits is None else None
    try:
        with stage("run passes"):
            result = built if built is not None and not run.options.check_each_pass else pipeline.run(run.source)
    except RunTimeoutError as error:
        raise error.naming(run.reference) from error
    except PassError as error:
        if not run.options.bisect or run.checks is None:
            raise
        with stage("bisect"):
            found = _bisect(run)
        raise PassError(f"{error}; bisect: first bad pass {found.first_bad_pass!r} ({found.reason})") from error
    sparse_names = _sparse_names(result)
    if sparse_names:
        with stage("run passes"):
            result.model = to_sparse_initializers(result.model, names=sparse_names, storage="sparse")[0]
    return result


def _sparse_names(result: PipelineResult) -> list[str]:
    """Tensors the passes asked to store as sparse_initializer (applied once, after every pass)."""
    return sorted({name for item in result.runs for name in item.report.get("details", {}).get("sparse_tensors", [])})


def _bisect(run: _Run) -> BisectResult:
    assert run.checks is not None
    return bisect_passes(
        run.source,
        run.chosen,
        run.checks.feeds,
        tolerance=run.checks.tolerance,
        provider=run.options.provider,
        context=run.context,
        isolate=run.checks.isolate,
        timeout_s=run.options.timeout_s,
    )


def _new_report(run: _Run, result: PipelineResult, budget: BudgetResult | None) -> Report:
    report = Report(
        tool_version(),
        model_summary(run.source, run.reference, run.model_files),
        passes=[item.to_dict() for item in result.runs],
    )
    sparse_names = _sparse_names(result)
    if sparse_names:
        report.notes.append(
            f"{len(sparse_names)} tensor(s) stored as sparse_initializer; onnxruntime loads them, "
            "but onnx's full checker (1.23) rejects any sparse initializer"
        )
    if run.auto is not None:
        report.auto = run.auto.to_dict()
        report.notes.append(f"{run.auto.pass_name} {run.auto.option} auto: {run.auto.why}")
    if run.custom_ops:
        report.notes.append(f"custom-domain ops passed through untouched, {NOT_VALIDATED}: {', '.join(run.custom_ops)}")
    if run.bits is not None:
        report.bits = run.bits.to_dict()
        report.layers = [choice.to_dict() for choice in run.bits.layers]
        report.notes.extend(run.bits.notes)
    if budget is not None:
        report.budget = budget.to_dict()
        report.layers = budget_layers(budget)
        if budget.mostly_undone():
            note = budget.mostly_undone_text()
            warn(note)
            report.notes.append(note)
    return report


def _publish_stage(
    run: _Run, model: onnx.ModelProto, report: Report
) -> tuple[Path | None, Comparison | None, BenchResult | None]:
    """Write the output: straight (atomically) when nothing checks it, else staged, checked, moved in."""
    options, checks = run.options, run.checks
    checked = checks is not None and (checks.validate or checks.bench_rounds is not None)
    if not checked and (run.output is None or not _may_keep_input_bytes(run)):
        with stage("publish"):
            saved = (
                save_unchanged_sources(model, run.output, options.external_data, run.protected)
                if run.output is not None
                else None
            )
        report.output = model_summary(model, saved)
        size_notes(run.chosen, report)
        report.notes += genai_files_notes(run.reference, saved, options.genai_files)
        return saved, None, None
    saved, comparison, timing = _save_checked(run, model, checks, report)
    size_notes(run.chosen, report)
    report.notes += genai_files_notes(run.reference, saved, options.genai_files)
    for note in timing.slower_notes() if timing is not None else []:
        warn(note)
        report.notes.append(note)
    report.validation = comparison.to_dict() if comparison else None
    report.benchmark = timing.to_dict() if timing else None
    if comparison is not None and not comparison.passed and options.bisect:
        with stage("bisect"):
            report.bisect = _bisect(run).to_dict()
    return saved, comparison, timing


@dataclass(frozen=True)
class _Checks:
    feeds: list[Feed]
    tolerance: Tolerance | Mapping[str, Tolerance]
    provider: str
    validate: bool
    bench_rounds: int | None
    isolate: bool
    timeout_s: float | None
    max_memory_bytes: int | None
    random_feeds: bool
    output_kinds: Mapping[str, str]
    generate_tokens: int

    def compare(self, reference: ModelInput, candidate: Path) -> Comparison:
        settings: dict[str, Any] = {
            "tolerance": self.tolerance,
            "provider": self.provider,
            "output_kinds": self.output_kinds,
            "generate_tokens": self.generate_tokens,
        }
        with generated_feeds_hint(self.feeds, self.random_feeds):
            limits: dict[str, Any] = {
                "isolate": self.isolate,
                "max_memory_bytes": self.max_memory_bytes,
                "timeout_s": self.timeout_s,
            }
            comparison = run_comparison(reference, candidate, self.feeds, **limits, **settings)
        comparison.random_feeds = self.random_feeds
        return comparison


def _save_checked(
    run: _Run, model: onnx.ModelProto, checks: _Checks | None, report: Report
) -> tuple[Path | None, Comparison | None, BenchResult | None]:
    """Save to a staging folder next to the output, check the staged file, then move it in."""
    output, reference = run.output, runnable_reference(run.source, run.reference, run.model_files)
    keep_failed = run.options.validation is not None and run.options.validation.keep_failed
    with stage("publish"):
        staging = staging_folder(output)
    with staging as folder:
        with stage("publish"):
            staged = save_unchanged_sources(
                model, Path(folder) / staged_name(output), run.options.external_data, run.protected
            )
            if _keep_input_bytes(run, staged):
                report.notes.append("lossless passes did not make the file smaller: the output keeps the input's bytes")
        with stage("validate"):
            comparison = checks.compare(reference, staged) if checks is not None and checks.validate else None
            if comparison is not None and checks is not None:
                _budget_decides(run, checks, reference, staged, comparison)
        if comparison is not None and comparison.random_feeds and not all(p.lossless for p in run.chosen):
            note = f"lossy passes validated on {comparison.samples} random samples only: give real inputs (--data DIR)"
            warn(note)
            report.notes.append(note)
        with stage("benchmark"):
            timing = (
                benchmark(
                    [reference, staged],
                    checks.feeds,
                    names=["input", "output"],
                    provider=checks.provider,
                    rounds=checks.bench_rounds,
                    timeout_s=checks.timeout_s,
                    generate_tokens=checks.generate_tokens,
                )
                if checks is not None and checks.bench_rounds
                else None
            )
        saved = None
        if output is not None and (comparison is None or comparison.passed or keep_failed):
            with stage("publish"):
                saved = publish(staged, Path(output), run.protected)
        elif output is not None:
            report.notes.append(f"validation failed: '{output}' was not written (keep_failed=False)")
        report.output = model_summary(model, saved or staged)
        if saved is None:
            report.output.path = None
    return saved, comparison, timing


def _budget_decides(run: _Run, checks: _Checks, reference: ModelInput, staged: Path, comparison: Comparison) -> None:
    """With --max-drop and no explicit tolerance, the budget's metric on the same data is the
    verdict: a budget met is a PASS (the per-output metrics stay in the report as information)."""
    budget, options = run.budget, run.options
    explicit = options.validation is not None and options.validation.tolerance is not None
    if budget is None or options.budget is None or explicit:
        return
    spec = MetricSpec(options.budget.metric, options.budget.higher_is_better, options.budget.output)
    met, text = final_budget_check(
        reference, staged, checks.feeds, budget, spec, provider=checks.provider, timeout_s=checks.timeout_s
    )
    comparison.passed, comparison.decided_by = met, text


def _may_keep_input_bytes(run: _Run) -> bool:
    """Lossless passes on a single-file input: the output is staged so it can keep the input's bytes."""
    return run.reference is not None and len(run.model_files) == 1 and all(p.lossless for p in run.chosen)


def _keep_input_bytes(run: _Run, staged: Path) -> bool:
    """A lossless run never grows a file: when the staged output of lossless passes is larger than
    a single-file input, the input's own bytes replace it (the same model, as the user stored it)."""
    if run.reference is None or not _may_keep_input_bytes(run):
        return False
    if any(staged.parent.glob(f"{staged.name}.*.data")) or staged.stat().st_size <= run.reference.stat().st_size:
        return False
    shutil.copyfile(run.reference, staged)
    return True
