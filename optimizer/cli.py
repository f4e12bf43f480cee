"""onnx-compress command line: a thin layer over optimizer.api; every flag is a library argument.

Exit codes: 0 success, 1 validation failed, 2 bad input or usage, 3 internal error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import onnx

import passes as _passes  # noqa: F401  (registers every pass)
from optimizer.api import (
    BitsOptions,
    BudgetOptions,
    FeedOptions,
    OptimizeOptions,
    ValidationOptions,
    model_summary,
    optimize,
    plan_passes,
    resolve_feeds,
    tool_version,
)
from optimizer.app_inputs import generated_feeds_hint
from optimizer.calibration.feeds import Feed, parse_shape_overrides
from optimizer.calibration.sensitivity import sensitivity_scan
from optimizer.cli_options import UsageError, output_kinds_from_args, tolerance_from_args
from optimizer.cli_parser import build_parser
from optimizer.errors import OnnxCompressError
from optimizer.executor import ExecutorOptions
from optimizer.fileio.model import load_model, load_model_with_files
from optimizer.graph.inspection import inspect_model
from optimizer.internal_errors import bad_input_message, internal_error_message
from optimizer.registry import get_pass_class, parse_option_text, pass_names, pass_options
from optimizer.report.html_page import bits_text
from optimizer.report.inspect_text import inspection_text
from optimizer.report.report import Report, check_reports_apart, write_report, write_text_atomic
from optimizer.shortcuts import SHORTCUTS
from optimizer.text import ControlEscapingWriter, escape_control, printable
from optimizer.verify.benchmark import BenchResult, benchmark
from optimizer.verify.isolation import run_comparison
from optimizer.verify.layer_debug import debug_layers
from optimizer.verify.tolerances import LOSSLESS_TOLERANCE, LOSSY_TOLERANCE, with_default_tolerance

EXIT_OK, EXIT_VALIDATION_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except argparse.ArgumentError as error:  # a bad option value: one line, exit 2, like bad input
        print(f"onnx-compress: error: {_one_line(str(error))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OnnxCompressError as error:  # the flags come from the registry: a broken plugin is bad input
        print(f"onnx-compress: error: {bad_input_message(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        with redirect_stdout(ControlEscapingWriter(sys.stdout)):
            return HANDLERS[args.command](args)
    except OnnxCompressError as error:
        print(f"onnx-compress: error: {bad_input_message(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("onnx-compress: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug, not bad input: say so, with the trace on request
        if args.debug:
            print(escape_control(traceback.format_exc(), keep_layout=True), end="", file=sys.stderr)
        print(f"onnx-compress: {internal_error_message(error, default_stage=args.command)}", file=sys.stderr)
        return EXIT_INTERNAL


def _run_optimize(args: argparse.Namespace) -> int:
    base = [name.strip() for name in args.passes.split(",") if name.strip()]
    if not base:
        raise UsageError("--passes names no pass")
    shortcut_values = {shortcut.dest: getattr(args, shortcut.dest) for shortcut in SHORTCUTS}
    names, options = plan_passes(base, options=parse_settings(args.settings), **shortcut_values)
    result = optimize(args.input, args.output, _optimize_options(args, names, options))
    if args.json:
        print(result.report.to_json(), end="")
    elif not args.quiet:
        _print_optimize_summary(result)
    return EXIT_OK if result.passed else EXIT_VALIDATION_FAILED


def _optimize_options(
    args: argparse.Namespace, names: list[str], options: dict[str, dict[str, Any]]
) -> OptimizeOptions:
    """The optimize flags as the library's typed options, group by group."""
    validation = ValidationOptions(
        tolerance=tolerance_from_args(args),
        isolate=args.isolate,
        max_memory_bytes=args.validate_max_memory,
        keep_failed=args.keep_failed,
        output_kinds=output_kinds_from_args(args),
    )
    direction = None if args.metric_direction is None else args.metric_direction == "higher"
    given = {
        "metric": args.metric,
        "output": args.metric_output,
        "max_trials": args.max_trials,
        "higher_is_better": direction,
    }
    shared = {key: value for key, value in given.items() if value is not None}  # the rest: the options' defaults
    budget = None if args.max_drop is None else BudgetOptions(max_drop=args.max_drop, **shared)
    bits = None if args.bits_per_weight is None else BitsOptions(bits_per_weight=args.bits_per_weight, **shared)
    return OptimizeOptions(
        executor=ExecutorOptions(kind=args.executor, workers=args.workers, ray_address=args.ray_address),
        passes=names,
        pass_options=options,
        calibration=args.calibration_data,
        provider=args.provider,
        timeout_s=args.timeout,
        progress=not (args.quiet or args.json),
        check_each_pass=args.check_each_pass,
        feeds=FeedOptions(
            source=args.data, shapes=parse_shape_overrides(args.shape), samples=args.samples, seed=args.seed
        ),
        validation=validation if args.validate else None,
        bench_rounds=args.rounds if args.bench else None,
        generate_tokens=args.generate_tokens,
        fusion_check=args.fusion_check,
        budget=budget,
        bits=bits,
        bisect=args.bisect,
        external_data=args.external_data,
        genai_files=args.genai_files,
        max_input_bytes=args.max_input_bytes,
        allow_symlinks_under=args.allow_symlinks_under,
        reports=args.report,
    )


def _print_optimize_summary(result) -> None:
    data = result.report.to_dict()
    for run in data["passes"]:
        counts = ", ".join(f"{k}={v}" for k, v in run["report"]["counts"].items()) or "no changes"
        skipped = len(run["report"]["skipped"])
        print(f"pass {run['name']}: {counts}" + (f"; {skipped} skipped (see --report)" if skipped else ""))
    before, after = data["input"], data["output"]
    if after and after["path"]:
        print(f"wrote {after['path']}: {after['size_bytes']:,} bytes (input {before['size_bytes']:,} bytes)")
    if result.comparison is not None:
        print(result.comparison.summary())
    if result.bench is not None:
        print(result.bench.to_markdown())
    if data["budget"]:
        budget = data["budget"]
        print(
            f"accuracy budget {'met' if budget['met'] else 'NOT met'}: {budget['metric']} {budget['value']:.6g} "
            f"(baseline {budget['baseline']:.6g}, drop {budget['drop']:.3g} <= {budget['max_drop']}?) after "
            f"{budget['trials']} trial(s); left uncompressed: {_layer_list(budget['backed_off'])}"
            + (f"; weight-only int8: {_layer_list(budget['weight_only'])}" if budget.get("weight_only") else "")
        )
    if data["bits"]:
        print(f"bits budget: {bits_text(data['bits'])}")
    if data["fusion"]:
        kernels = ", ".join(f"{op} x{n}" for op, n in data["fusion"]["integer_kernels"].items()) or "none"
        print(f"onnxruntime runs integer kernels: {kernels}")
    if data["bisect"]:
        found = data["bisect"]
        print(f"first bad pass: {found['first_bad_pass']} (#{found['index']}): {found['reason']}")
    for note in data["notes"]:
        print(f"note: {note}")


def _layer_list(names: list[str], shown: int = 6) -> str:
    """Up to ``shown`` layer names, else their count (the report lists them all)."""
    if not names:
        return "nothing"
    if len(names) <= shown:
        return ", ".join(names)
    return f"{len(names)} layers ({', '.join(names[:3])}, ...; see --report)"


def _feeds(args: argparse.Namespace, model: onnx.ModelProto, path: str) -> list[Feed]:
    """The inputs a command runs on: --data, else generated (--shape, --samples, --seed); ``path``:
    the model's file (a decoder's genai_config.json next to it gives its cache sizes)."""
    shapes = parse_shape_overrides(args.shape)
    folder = Path(path).parent
    return resolve_feeds(model, args.data, shapes=shapes, samples=args.samples, seed=args.seed, folder=folder)


def _run_validate(args: argparse.Namespace) -> int:
    reference = load_model(args.reference, allow_symlinks_under=args.allow_symlinks_under)
    load_model(args.candidate, allow_symlinks_under=args.allow_symlinks_under)
    feeds = _feeds(args, reference, args.reference)
    tolerance = with_default_tolerance(tolerance_from_args(args), LOSSLESS_TOLERANCE if args.exact else LOSSY_TOLERANCE)
    kinds = output_kinds_from_args(args)
    with generated_feeds_hint(feeds, args.data is None):
        comparison = run_comparison(
            args.reference,
            args.candidate,
            feeds,
            isolate=args.isolate,
            max_memory_bytes=args.validate_max_memory,
            tolerance=tolerance,
            provider=args.provider,
            timeout_s=args.timeout,
            output_kinds=kinds,
            generate_tokens=args.generate_tokens,
        )
    comparison.random_feeds = args.data is None
    print(json.dumps(comparison.to_dict(), indent=2) if args.json else comparison.summary())
    return EXIT_OK if comparison.passed else EXIT_VALIDATION_FAILED


def _run_bench(args: argparse.Namespace) -> int:
    first = load_model(args.models[0], allow_symlinks_under=args.allow_symlinks_under)
    for path in args.models[1:]:
        load_model(path, allow_symlinks_under=args.allow_symlinks_under)
    feeds = _feeds(args, first, args.models[0])
    with generated_feeds_hint(feeds, args.data is None):
        result = _bench(args, feeds)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_markdown())
    for note in [] if args.json else result.slower_notes():
        print(note)
    return EXIT_OK


def _bench(args: argparse.Namespace, feeds: list[Feed]) -> BenchResult:
    return benchmark(
        args.models,
        feeds,
        provider=args.provider,
        warmup=args.warmup,
        rounds=args.rounds,
        threads=args.threads,
        progress=not args.json,
        timeout_s=args.timeout,
        generate_tokens=args.generate_tokens,
    )


def _run_inspect(args: argparse.Namespace) -> int:
    inspection = inspect_model(
        load_model(args.model, allow_symlinks_under=args.allow_symlinks_under), path=args.model, top=args.top
    )
    print(json.dumps(inspection.to_dict(), indent=2) if args.json else inspection_text(inspection))
    return EXIT_OK


def _run_debug(args: argparse.Namespace) -> int:
    reference, reference_files = load_model_with_files(args.reference, allow_symlinks_under=args.allow_symlinks_under)
    candidate, candidate_files = load_model_with_files(args.candidate, allow_symlinks_under=args.allow_symlinks_under)
    check_reports_apart(args.report, [*reference_files, *candidate_files], args.data)
    feeds = _feeds(args, reference, args.reference)
    with generated_feeds_hint(feeds, args.data is None):
        layers = debug_layers(reference, candidate, feeds, provider=args.provider, timeout_s=args.timeout)
    report = Report(
        tool_version(),
        model_summary(reference, args.reference, reference_files),
        model_summary(candidate, args.candidate, candidate_files),
        layers=layers.to_rows(),
    )
    for path in args.report:
        write_report(report, path)
    print(json.dumps(layers.to_rows(), indent=2) if args.json else layers.summary(args.top))
    return EXIT_OK


def _run_sensitivity(args: argparse.Namespace) -> int:
    sparsities = list(args.sparsities)
    model, model_files = load_model_with_files(args.model, allow_symlinks_under=args.allow_symlinks_under)
    check_reports_apart(args.report, model_files, args.data, {".md": "markdown", ".json": "json"})
    feeds = _feeds(args, model, args.model)
    with generated_feeds_hint(feeds, args.data is None):
        table = sensitivity_scan(
            model,
            feeds,
            sparsities=sparsities,
            provider=args.provider,
            progress=not args.json,
            min_elements=args.min_elements,
            timeout_s=args.timeout,
        )
    if args.target is not None:
        table.allocate(args.target)
    for path in args.report:
        target = Path(path)
        if target.suffix.lower() not in (".md", ".json"):
            raise UsageError(f"--report '{path}': use .md or .json")
        markdown = target.suffix.lower() == ".md"
        text = (
            escape_control(table.to_markdown(), keep_layout=True) if markdown else json.dumps(table.to_dict(), indent=2)
        )
        write_text_atomic(target, text + "\n")
    print(json.dumps(table.to_dict(), indent=2) if args.json else table.to_markdown())
    return EXIT_OK


def _run_passes(args: argparse.Namespace) -> int:
    for name in pass_names():
        cls = get_pass_class(name)
        marker = " (lossless)" if cls.lossless else ""
        print(f"{name}{marker}: {cls.summary}")
        for spec in pass_options(name).values():
            print(f"    {name}.{spec.name} = {spec.default!r}  [{spec.type_name}] {spec.help}")
    return EXIT_OK


def parse_settings(settings: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["pass.option=value", ...]`` -> ``{"pass": {"option": typed value}}``."""
    options: dict[str, dict[str, Any]] = {}
    for item in settings:
        key, sep, text = item.partition("=")
        name, dot, option_name = key.rpartition(".")
        if not sep or not dot or not name or not option_name:
            raise UsageError(f"--set '{item}': expected PASS.OPTION=VALUE")
        options.setdefault(name, {})[option_name] = parse_option_text(name, option_name, text)
    return options


def _one_line(text: str) -> str:
    return printable(" ".join(text.split()))


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "optimize": _run_optimize,
    "validate": _run_validate,
    "bench": _run_bench,
    "inspect": _run_inspect,
    "debug": _run_debug,
    "sensitivity": _run_sensitivity,
    "passes": _run_passes,
}
"""The function that runs each subcommand of ``build_parser()``."""

if __name__ == "__main__":
    sys.exit(main())
