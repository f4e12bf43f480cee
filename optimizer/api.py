"""Library entry point: optimize() = load -> passes -> save -> validate -> report.

This module and ``optimizer.cli`` are the only core modules that import ``passes``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import onnx

import passes as _passes  # noqa: F401  (registers every pass)
from optimizer.budget import BackoffRule, BudgetResult, MetricSpec, PassSpec, backed_off_specs, search_budget
from optimizer.calibration.feeds import Feed, check_feed, check_feeds, generate_feeds, load_npz_feeds, model_input_specs
from optimizer.errors import ModelSaveError, OnnxCompressError, OptionError, PassError, RuntimeSessionError
from optimizer.fileio.lazy_io import check_sources_unchanged
from optimizer.fileio.model import (
    LAZY_LOAD_ABOVE_BYTES,
    fits_one_message,
    load_model,
    load_model_with_files,
    model_size_bytes,
)
from optimizer.fileio.output_files import (
    check_apart,
    commit,
    folder_files,
    previous_data_files,
    remove_dead_staging,
    remove_dead_temps,
    staging_prefix,
    warn,
)
from optimizer.fileio.save import check_output_file, save_model
from optimizer.fileio.tensor_checks import custom_domain_ops
from optimizer.graph.inspection import weight_bytes_by_dtype
from optimizer.graph.sparse_storage import to_sparse_initializers
from optimizer.pass_base import CalibrationFactory, Pass, PassContext
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass, get_pass_class
from optimizer.report.report import ModelSummary, Report, check_writes_apart, write_report
from optimizer.verify.benchmark import BenchResult, benchmark
from optimizer.verify.fusion import check_fusion, op_counts
from optimizer.verify.isolation import DEFAULT_TIMEOUT_S, NOT_VALIDATED, compare_isolated
from optimizer.verify.pass_bisect import bisect_passes
from optimizer.verify.runtime import RunTimeoutError
from optimizer.verify.validate import Comparison, Tolerance, compare

DEFAULT_PASSES: tuple[str, ...] = ("constants-to-initializers", "share", "cleanup")
PruneMode = Literal["uniform", "global", "nm", "sensitivity", "channels"]
LOSSLESS_TOLERANCE = Tolerance(max_abs=1e-6)
LOSSY_TOLERANCE = Tolerance(min_cosine=0.99, min_sqnr_db=20.0)
ModelInput = str | os.PathLike | bytes | onnx.ModelProto
FeedSource = str | os.PathLike | Iterable[Mapping[str, Any]] | None
ExternalData = Literal["auto", "always", "never"]


@dataclass
class OptimizeResult:
    model: onnx.ModelProto
    output_path: Path | None
    modified: bool
    report: Report
    comparison: Comparison | None
    bench: BenchResult | None

    @property
    def passed(self) -> bool:
        """False only when validation ran and failed."""
        return self.comparison is None or self.comparison.passed


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
            raise OptionError(f"options given for pass '{name}', which is not in the pipeline ({', '.join(map(str, chosen))})")
    return [item if isinstance(item, Pass) else create_pass(item, **dict(options.get(item, {}))) for item in chosen]


def plan_passes(
    base: Sequence[str] = DEFAULT_PASSES,
    *,
    prune: float | None = None,
    prune_mode: PruneMode = "uniform",
    quantize: str | None = None,
    quantize_mode: str | None = None,
    cluster_bits: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Pass names and options for the common requests, in the order that composes well:
    normalize and share first, then prune, then quantize or cluster (zeros stay zeros)."""
    if quantize is not None and cluster_bits is not None:
        raise OptionError("quantize and cluster both rewrite the same weights: choose one")
    names = list(base)
    merged: dict[str, dict[str, Any]] = {name: dict(values) for name, values in (options or {}).items()}
    if prune is not None:
        name = "prune-channels" if prune_mode == "channels" else "prune"
        names.append(name)
        merged.setdefault(name, {}).update({"ratio": prune} if name == "prune-channels" else {"sparsity": prune, "mode": prune_mode})
    if quantize is not None:
        names.append("quantize")
        merged.setdefault("quantize", {})["weight_type"] = quantize
        if quantize_mode is not None:
            merged["quantize"]["mode"] = quantize_mode
    if cluster_bits is not None:
        names.append("cluster")
        merged.setdefault("cluster", {})["bits"] = cluster_bits
    return list(dict.fromkeys(names)), merged


def optimize(
    model: ModelInput,
    output: str | os.PathLike | None = None,
    *,
    passes: Sequence[str | Pass] | None = None,
    pass_options: Mapping[str, Mapping[str, Any]] | None = None,
    calibration: FeedSource = None,
    validate: bool = False,
    feeds: FeedSource = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    samples: int = 4,
    seed: int = 0,
    tolerance: Tolerance | Mapping[str, Tolerance] | None = None,
    provider: str = "cpu",
    bench: bool = False,
    bench_rounds: int = 20,
    fusion_check: bool | None = None,
    max_drop: float | None = None,
    metric: str = "cosine",
    metric_higher_is_better: bool | None = None,
    metric_output: str | None = None,
    max_trials: int = 24,
    workers: int = 1,
    check_each_pass: bool = False,
    isolate: bool = True,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    validate_max_memory_bytes: int | None = None,
    bisect: bool = False,
    external_data: ExternalData = "auto",
    keep_failed: bool = False,
    max_input_bytes: int | None = None,
    progress: bool = False,
    allow_symlinks_under: Sequence[str | os.PathLike] = (),
    reports: Sequence[str | os.PathLike] = (),
) -> OptimizeResult:
    """Run passes on ``model``; save to ``output`` when given; validate and benchmark on request.

    With ``validate`` the saved file itself is compared with the input on ``feeds`` (an .npz
    folder, an iterable of feed dicts, or, when None, ``samples`` seeded random feeds). When
    validation fails the output is not written unless ``keep_failed``. The input is never changed.
    ``calibration`` (an .npz folder or an iterable of feed dicts) is what passes that need data,
    such as static quantization, run the model on, with the same ``provider``. ``fusion_check``
    (default: when the output holds DequantizeLinear nodes) reports what onnxruntime really runs.

    With ``max_drop``, ``metric`` (a built-in name or package.module:function) is measured on
    ``feeds`` and layers are backed off, most harmful first, until it drops by at most
    ``max_drop`` against the original (see optimizer.budget); at most ``max_trials`` trials, run
    in ``workers`` processes.

    Validation runs in a child process (``isolate``) with ``timeout_s``, so an onnxruntime crash
    becomes an error that says so; every other onnxruntime run (calibration, GPTQ, benchmark, budget
    search) is stopped after ``timeout_s`` too (``RunTimeoutError``). With ``bisect``, a failed check
    is followed by a search for the first pass that broke the model (report["bisect"]).

    External data may be a symlink into ``allow_symlinks_under`` folders or a Hugging Face
    cache's blobs folder (see ``load_model``). An input that changes during the run (checked
    before anything is written or published) is a ``ModelLoadError``; nothing is written.

    ``reports`` (.json, .md or .html paths) are written last. Every file the run would write
    (output, reports) is checked against every file it reads (the input, its external data, the
    ``feeds`` and ``calibration`` folders) before any work; a collision is a ``ModelSaveError``.
    The fusion check never fails a run: a failure is a note in the report and a warning.
    """
    source, protected, reference = _load(model, max_input_bytes, allow_symlinks_under)
    protected = (*protected, *folder_files(feeds), *folder_files(calibration))
    check_writes_apart([*([output] if output is not None else []), *reports], reports, protected)
    custom_ops = custom_domain_ops(source)
    if custom_ops and validate:
        raise RuntimeSessionError(f"{reference or 'model'}: custom-domain ops {', '.join(custom_ops)} cannot run in "
                                  f"onnxruntime; {NOT_VALIDATED}")
    chosen = build_passes(passes, pass_options)
    budget = None
    if max_drop is not None:
        budget = _search_budget(source, chosen, BudgetRequest(
            metric, metric_higher_is_better, metric_output, max_drop, max_trials, workers, timeout_s,
            tuple(map(os.fspath, allow_symlinks_under))),
            resolve_feeds(source, feeds, shapes=shapes, samples=samples, seed=seed),
            calibration, provider, progress, reference)
        chosen = build_passes(*_specs_as_arguments(budget_specs(chosen, budget.backed_off)))
    context = PassContext(calibration=calibration_factory(source, calibration), provider=provider, progress=progress,
                          timeout_s=timeout_s)
    pipeline = Pipeline(chosen, check_each_pass=check_each_pass, context=context)
    checks = None
    if validate or bench or bisect:
        if tolerance is None:
            tolerance = LOSSLESS_TOLERANCE if all(p.lossless for p in chosen) else LOSSY_TOLERANCE
        checks = _Checks(resolve_feeds(source, feeds, shapes=shapes, samples=samples, seed=seed), tolerance,
                         provider, validate, bench, bench_rounds, isolate, timeout_s, validate_max_memory_bytes)
    try:
        result = pipeline.run(source)
    except RunTimeoutError as error:
        raise error.naming(reference) from error
    except PassError as error:
        if not bisect:
            raise
        found = bisect_passes(source, chosen, checks.feeds, tolerance=checks.tolerance, provider=provider,
                              context=context, isolate=isolate, timeout_s=timeout_s)
        raise PassError(f"{error}; bisect: first bad pass {found.first_bad_pass!r} ({found.reason})") from error
    sparse_names = sorted({name for run in result.runs for name in run.report.get("details", {}).get("sparse_tensors", [])})
    if sparse_names:
        result.model = to_sparse_initializers(result.model, names=sparse_names, storage="sparse")[0]
    report = Report(tool_version(), _summary(source, reference), passes=[run.to_dict() for run in result.runs])
    if sparse_names:
        report.notes.append(f"{len(sparse_names)} tensor(s) stored as sparse_initializer; onnxruntime loads them, "
                            "but onnx's full checker (1.23) rejects any sparse initializer")
    if custom_ops:
        report.notes.append(f"custom-domain ops passed through untouched, {NOT_VALIDATED}: {', '.join(custom_ops)}")
    if budget is not None:
        report.budget = budget.to_dict()
        report.layers = _budget_layers(budget)
    comparison = timing = None
    if validate or bench:
        saved, comparison, timing = _save_checked(result.model, output, reference or source, checks, report,
                                                  external_data, protected, keep_failed)
        report.validation = comparison.to_dict() if comparison else None
        report.benchmark = timing.to_dict() if timing else None
        if comparison is not None and not comparison.passed and bisect:
            report.bisect = bisect_passes(source, chosen, checks.feeds, tolerance=checks.tolerance, provider=provider,
                                          context=context, isolate=isolate, timeout_s=timeout_s).to_dict()
    else:
        saved = _save(result.model, output, external_data, protected) if output is not None else None
        report.output = _summary(result.model, saved)
    if fusion_check or (fusion_check is None and has_dequantize(result.model)):
        _add_fusion(report, saved if saved is not None else result.model, provider)
    for path in reports:
        write_report(report, path)
    return OptimizeResult(result.model, saved, result.modified, report, comparison, timing)



@dataclass(frozen=True)
class BudgetRequest:
    metric: str
    higher_is_better: bool | None
    output: str | None
    max_drop: float
    max_trials: int
    workers: int
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    allow_symlinks_under: tuple[str, ...] = ()


def budget_specs(chosen: Sequence[Pass], backed_off: Sequence[str]) -> list[PassSpec]:
    """The pipeline as picklable specs, with ``backed_off`` layers excluded where a pass can."""
    specs = []
    for item in chosen:
        if get_pass_class(item.name) is not type(item):
            raise OptionError(f"the accuracy budget needs registered passes; '{item.name}' is not the registered one")
        specs.append(PassSpec(item.name, item.options()))
    return backed_off_specs(specs, _backoff_rules(chosen), backed_off)


def _backoff_rules(chosen: Sequence[Pass]) -> list[BackoffRule]:
    return [BackoffRule(item.name, item.backoff_option) for item in chosen if item.backoff_option]


def _specs_as_arguments(specs: Sequence[PassSpec]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise OptionError("the accuracy budget needs each pass at most once in the pipeline")
    return names, {spec.name: dict(spec.options) for spec in specs}


def _search_budget(source: onnx.ModelProto, chosen: Sequence[Pass], request: BudgetRequest, feeds: list[Feed],
                   calibration: FeedSource, provider: str, progress: bool, path: Path | None) -> BudgetResult:
    factory = calibration_factory(source, calibration)
    return search_budget(
        source, budget_specs(chosen, []), _backoff_rules(chosen),
        MetricSpec(request.metric, request.higher_is_better, request.output), feeds,
        max_drop=request.max_drop, max_trials=request.max_trials, workers=request.workers, provider=provider,
        calibration=list(factory()) if factory else None, progress=progress, worker_imports=("passes",),
        model_path=str(path) if path is not None else None, return_model=False, timeout_s=request.timeout_s,
        allow_symlinks_under=request.allow_symlinks_under)


def _budget_layers(budget: BudgetResult) -> list[dict[str, Any]]:
    """The final per-layer choice: every ranked layer, compressed or backed off, and why."""
    rows = []
    for rank, layer in enumerate(budget.ranking):
        backed_off = layer in budget.backed_off
        rows.append({"node": layer, "status": "backed off (kept uncompressed)" if backed_off else "compressed",
                     "reason": f"rank {rank + 1} by {budget.ranking_method}" if backed_off else ""})
    return rows


@dataclass(frozen=True)
class _Checks:
    feeds: list[Feed]
    tolerance: Tolerance | Mapping[str, Tolerance]
    provider: str
    validate: bool
    bench: bool
    bench_rounds: int
    isolate: bool
    timeout_s: float | None
    max_memory_bytes: int | None

    def compare(self, reference: ModelInput, candidate: Path) -> Comparison:
        if self.isolate:
            return compare_isolated(reference, candidate, self.feeds, tolerance=self.tolerance,
                                    provider=self.provider, timeout_s=self.timeout_s,
                                    max_memory_bytes=self.max_memory_bytes)
        return compare(reference, candidate, self.feeds, tolerance=self.tolerance, provider=self.provider,
                       timeout_s=self.timeout_s)


def _save_checked(model: onnx.ModelProto, output: str | os.PathLike | None, reference: ModelInput, checks: _Checks,
                  report: Report, external_data: ExternalData, protected: Sequence[Path],
                  keep_failed: bool) -> tuple[Path | None, Comparison | None, BenchResult | None]:
    """Save to a staging folder next to the output, check the staged file, then move it in."""
    with _staging_folder(output) as staging:
        staged = _save(model, Path(staging) / _output_name(output), external_data, protected)
        comparison = checks.compare(reference, staged) if checks.validate else None
        timing = benchmark([reference, staged], checks.feeds, names=["input", "output"], provider=checks.provider,
                           rounds=checks.bench_rounds, timeout_s=checks.timeout_s) if checks.bench else None
        saved = None
        if output is not None and (comparison is None or comparison.passed or keep_failed):
            saved = _publish(staged, Path(output), protected)
        elif output is not None:
            report.notes.append(f"validation failed: '{output}' was not written (keep_failed=False)")
        report.output = _summary(model, saved or staged)
        if saved is None:
            report.output.path = None
    return saved, comparison, timing


QUANTIZED_OPS = frozenset({"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                           "ConvInteger"})


def has_dequantize(model: onnx.ModelProto) -> bool:
    """True when any graph of the model holds a quantized group (QDQ or the dynamic pattern)."""
    return bool(QUANTIZED_OPS & set(op_counts(model.graph)))


def _add_fusion(report: Report, model: onnx.ModelProto | Path, provider: str) -> None:
    if isinstance(model, onnx.ModelProto) and not fits_one_message(model):
        report.notes.append("fusion check skipped: the model exceeds 2 GB and was not written")
        return
    try:
        fusion = check_fusion(model, provider)
    except (OnnxCompressError, RuntimeError, ValueError, OSError) as error:
        message = f"fusion check failed (the output is written and valid): {error}"
        report.notes.append(message)
        warn(message)
        return
    report.fusion = fusion.to_dict()
    report.notes.extend(f"fusion check: {warning}" for warning in fusion.warnings)


def resolve_feeds(
    model: onnx.ModelProto,
    feeds: FeedSource,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    samples: int = 4,
    seed: int = 0,
) -> list[Feed]:
    """Feeds checked against the model's inputs: from a folder, an iterable, or generated."""
    specs = model_input_specs(model)
    if feeds is None:
        if samples < 1:
            raise OptionError(f"samples must be >= 1, got {samples}")
        return generate_feeds(specs, count=samples, seed=seed, shapes=shapes)
    if isinstance(feeds, (str, os.PathLike)):
        feeds = load_npz_feeds(feeds)
    return check_feeds(specs, feeds)


def calibration_factory(model: onnx.ModelProto, calibration: FeedSource) -> CalibrationFactory | None:
    """A factory that yields the calibration feeds anew on every call, checked against the model.

    A folder is re-read on each call (memory stays bounded); an iterable is read once and kept.
    """
    if calibration is None:
        return None
    specs = model_input_specs(model)
    if isinstance(calibration, (str, os.PathLike)):
        folder = calibration
        load_npz_feeds(folder)
        return lambda: (check_feed(specs, feed, index) for index, feed in enumerate(load_npz_feeds(folder)))
    kept = check_feeds(specs, calibration)
    return lambda: iter(kept)


def _load(model: ModelInput, max_input_bytes: int | None,
          allow_symlinks_under: Sequence[str | os.PathLike] = ()) -> tuple[onnx.ModelProto, tuple[Path, ...], Path | None]:
    if isinstance(model, (str, os.PathLike)):
        loaded, files = load_model_with_files(model, max_input_bytes=max_input_bytes,
                                              lazy_above_bytes=LAZY_LOAD_ABOVE_BYTES,
                                              allow_symlinks_under=allow_symlinks_under)
        return loaded, files, Path(model)
    return load_model(model, max_input_bytes=max_input_bytes), (), None


def model_summary(model: onnx.ModelProto, path: str | os.PathLike | None) -> ModelSummary:
    """Path, size on disk (or serialized) and stored weight bytes by dtype."""
    return _summary(model, Path(path) if path is not None else None)


def _summary(model: onnx.ModelProto, path: Path | None) -> ModelSummary:
    size = _size_on_disk(path) if path is not None else model_size_bytes(model)
    return ModelSummary(str(path) if path is not None else None, size, weight_bytes_by_dtype(model))


def _size_on_disk(path: Path) -> int:
    """The model file plus the data files it records (content-named, next to it)."""
    data_files = [path.parent / name for name in previous_data_files(path)]
    return path.stat().st_size + sum(data.stat().st_size for data in data_files if data.exists())


def _save(model: onnx.ModelProto, path: str | os.PathLike, external_data: ExternalData,
          protected: Sequence[Path]) -> Path:
    choices = {"auto": None, "always": True, "never": False}
    check_sources_unchanged(protected)
    if external_data not in choices:
        raise OptionError(f"external_data must be one of {', '.join(choices)}, got {external_data!r}")
    return save_model(model, path, external_data=choices[external_data], protected_paths=protected)


def _output_name(output: str | os.PathLike | None) -> str:
    return Path(output).name if output is not None else "candidate.onnx"


def _staging_folder(output: str | os.PathLike | None) -> tempfile.TemporaryDirectory:
    """A temporary folder next to the output, so the final move is a rename on one file system.

    Its name carries our process id and start time; folders and temporary files whose owner
    is provably dead (see optimizer.fileio.output_files) are removed first.
    """
    folder = None
    if output is not None:
        folder = Path(output).parent
        if not folder.is_dir():
            raise ModelSaveError(f"{output}: output folder '{folder}' does not exist or is not a folder")
        remove_dead_temps(folder)
        for stale in remove_dead_staging(folder):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        return tempfile.TemporaryDirectory(prefix=staging_prefix(), dir=folder)
    except OSError as error:
        raise ModelSaveError(f"{output}: cannot write in output folder '{folder}': {error.strerror or error}") from error


def _publish(staged: Path, output: Path, protected: Sequence[Path]) -> Path:
    """Move a validated file and its content-named data file in; the model's rename commits."""
    check_sources_unchanged(protected)
    final = save_target_check(output, protected)
    data_names = previous_data_files(staged)
    if len(data_names) > 1:
        raise ModelSaveError(f"{output}: the staged model records {len(data_names)} data files")
    data_name = data_names[0] if data_names else None
    if data_name is not None:
        save_target_check(final.with_name(data_name), protected)
    commit(final, staged, staged.with_name(data_name) if data_name else None, data_name, protected)
    return final


def save_target_check(output: Path, protected: Sequence[Path]) -> Path:
    """The same refusals save_model makes, for a file staged elsewhere and moved in."""
    check_output_file(output)
    check_apart([output], protected, "a file this run reads")
    return output
