"""onnx-compress command line: a thin layer over optimizer.api; every flag is a library argument.

Exit codes: 0 success, 1 validation failed, 2 bad input or usage, 3 internal error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import passes as _passes  # noqa: F401  (registers every pass)
from optimizer.api import (
    DEFAULT_PASSES,
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
from optimizer.calibration.feeds import parse_shape_overrides
from optimizer.calibration.sensitivity import sensitivity_scan
from optimizer.cli_options import (
    MAX_BYTES,
    MAX_COUNT,
    MAX_SAMPLES,
    MAX_SEED,
    POSITIVE_SECONDS,
    OneLineParser,
    UsageError,
    add_tolerance_arguments,
    float_in,
    float_list_in,
    int_in,
    metric_spec,
    shape_override,
    tolerance_from_args,
)  # fmt: skip
from optimizer.errors import OnnxCompressError
from optimizer.fileio.model import load_model, load_model_with_files
from optimizer.graph.inspection import inspect_model
from optimizer.internal_errors import bad_input_message, internal_error_message
from optimizer.registry import get_pass_class, parse_option_text, pass_names, pass_options
from optimizer.report.inspect_text import inspection_text
from optimizer.report.report import Report, check_reports_apart, write_report, write_text_atomic
from optimizer.shortcuts import SHORTCUTS, Shortcut
from optimizer.text import ControlEscapingWriter, escape_control, printable
from optimizer.verify.benchmark import benchmark
from optimizer.verify.isolation import DEFAULT_TIMEOUT_S, compare_isolated
from optimizer.verify.layer_debug import debug_layers
from optimizer.verify.validate import Tolerance, compare

EXIT_OK, EXIT_VALIDATION_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

EXAMPLES = {
    "optimize": """examples:
  onnx-compress optimize models/mlp.onnx -o mlp.out.onnx --validate
  onnx-compress optimize bert.onnx -o bert.int8.onnx --quantize int8 --quantize-mode dynamic --validate
  onnx-compress optimize cnn.onnx -o cnn.int8.onnx --quantize int8 --quantize-mode static --calibration-data cal/
  onnx-compress optimize bert.onnx -o small.onnx --quantize int8 --max-drop 0.005 --metric cosine --data held_out/
  onnx-compress optimize model.onnx -o sparse.onnx --prune 0.5 --prune-mode global
  onnx-compress optimize model.onnx -o small.onnx --passes constants-to-initializers,cleanup \\
      --set constants-to-initializers.min_size_bytes=64 --report report.md --report report.json
  onnx-compress optimize bert.onnx -o out.onnx --validate --data feeds/ --provider cuda --bench""",
    "validate": """examples:
  onnx-compress validate original.onnx compressed.onnx
  onnx-compress validate a.onnx b.onnx --data feeds/ --atol 1e-4 --min-cosine 0.999 --json""",
    "bench": """examples:
  onnx-compress bench original.onnx compressed.onnx --rounds 50
  onnx-compress bench model.onnx --shape input_ids=1x128 --provider cuda""",
    "inspect": """examples:
  onnx-compress inspect models/transformer_tied.onnx
  onnx-compress inspect model.onnx --top 20 --json""",
    "passes": """examples:
  onnx-compress passes""",
    "sensitivity": """examples:
  onnx-compress sensitivity model.onnx --data calibration/ --target 0.5 --report sensitivity.md
  onnx-compress sensitivity model.onnx --sparsities 0.25,0.5,0.75 --json""",
    "debug": """examples:
  onnx-compress debug original.onnx compressed.onnx --data feeds/
  onnx-compress debug original.onnx compressed.onnx --top 10 --report layers.html""",
}




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
            return args.handler(args)
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


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="onnx-compress",
        description="Make exported ONNX models smaller and faster, and check them against the original "
                    "with onnxruntime.",
        epilog="exit codes: 0 success, 1 validation failed, 2 bad input or usage, 3 internal error",
    )
    parser.add_argument("--version", action="version", version=f"onnx-compress {tool_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_optimize(commands)
    _add_validate(commands)
    _add_bench(commands)
    _add_inspect(commands)
    _add_debug(commands)
    _add_sensitivity(commands)
    _add_passes(commands)
    return parser


def _command(commands, name: str, help_text: str) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--debug", action="store_true", help="print the traceback of internal errors")
    return sub


def _add_feed_arguments(sub: argparse.ArgumentParser) -> None:
    group = sub.add_argument_group("input data")
    group.add_argument("--data", metavar="DIR", help="folder of .npz files, one sample each, keys = input names "
                       "(default: seeded random feeds)")
    group.add_argument("--shape", action="append", default=[], metavar="NAME=DxDx..", type=shape_override,
                       help="fix a dynamic input shape for generated feeds, e.g. input_ids=1x128 (repeatable)")
    group.add_argument("--samples", type=int_in(1, MAX_SAMPLES), default=4,
                       help=f"number of generated feeds, at most {MAX_SAMPLES} (default 4)")
    group.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="seed for generated feeds (default 0)")
    group.add_argument("--provider", default="cpu", help="execution provider: cpu or cuda (falls back to cpu "
                       "with a message when CUDA is not available); default cpu")


def _add_symlink_argument(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--allow-symlinks-under", action="append", default=[], metavar="DIR",
                     help="external-data files may be symlinks into DIR (repeatable); a Hugging Face "
                          "cache's blobs folder is allowed without it")


def _add_isolation_arguments(sub: argparse.ArgumentParser) -> None:
    group = sub.add_argument_group("isolation")
    group.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                       help="validate in a child process so an onnxruntime crash is reported, not fatal (default on)")
    _add_timeout_argument(group, "; isolated validation: the whole comparison")
    group.add_argument("--validate-max-memory", type=int_in(2**20, MAX_BYTES), metavar="BYTES",
                       help="address-space limit of the validation process")


def _add_timeout_argument(group, more: str = "") -> None:
    group.add_argument("--timeout", type=POSITIVE_SECONDS, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                       help=f"stop any onnxruntime run that takes longer, exit 2 (default {DEFAULT_TIMEOUT_S:g}{more})")


def _add_optimize(commands) -> None:
    sub = _command(commands, "optimize", "run compression passes on a model and save the result")
    sub.add_argument("input", help="input .onnx file (never modified)")
    sub.add_argument("-o", "--output", required=True, help="output .onnx file")
    sub.add_argument("--passes", default=",".join(DEFAULT_PASSES),
                     help=f"comma-separated passes in order (default {','.join(DEFAULT_PASSES)}); "
                          "see 'onnx-compress passes'")
    sub.add_argument("--set", action="append", default=[], metavar="PASS.OPTION=VALUE", dest="settings",
                     help="set a pass option, e.g. constants-to-initializers.min_size_bytes=64 (repeatable)")
    _add_compression_arguments(sub)
    sub.add_argument("--calibration-data", metavar="DIR",
                     help="folder of .npz feeds that passes needing data (static quantization, sensitivity) run on")
    sub.add_argument("--validate", action="store_true", help="compare the output with the input in onnxruntime")
    sub.add_argument("--keep-failed", action="store_true", help="write the output even when validation fails")
    sub.add_argument("--bench", action="store_true", help="also time input and output, interleaved")
    sub.add_argument("--rounds", type=int_in(1, MAX_COUNT), default=20, help="benchmark rounds (default 20)")
    sub.add_argument("--fusion-check", action=argparse.BooleanOptionalAction, default=None,
                     help="report which quantized groups onnxruntime runs as integer kernels "
                          "(default: when the output has DequantizeLinear nodes)")
    sub.add_argument("--report", action="append", default=[], metavar="FILE",
                     help="write the report as .json, .md or .html (repeatable)")
    _add_budget_arguments(sub)
    sub.add_argument("--check-each-pass", action="store_true",
                     help="run onnx.checker (full_check) after every pass to name the pass that broke a model")
    sub.add_argument("--bisect", action="store_true",
                     help="when a pass or validation fails, search for the first pass that broke the model")
    sub.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                     help="store weights in OUTPUT.HASH.data: auto (only past protobuf's 2 GB), always, never")
    sub.add_argument("--max-input-bytes", type=int_in(1, MAX_BYTES), help="refuse input files larger than this")
    _add_symlink_argument(sub)
    sub.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    sub.add_argument("--quiet", action="store_true", help="print nothing but errors")
    _add_feed_arguments(sub)
    add_tolerance_arguments(sub)
    _add_isolation_arguments(sub)
    sub.set_defaults(handler=_run_optimize)


def _add_compression_arguments(sub: argparse.ArgumentParser) -> None:
    """The shortcut flags of optimizer.shortcuts; choices and help come from the passes' typed options."""
    compress = sub.add_argument_group("compression (added after --passes: prune, then quantize or cluster)")
    for shortcut in SHORTCUTS:
        compress.add_argument(shortcut.flag, dest=shortcut.dest, metavar=shortcut.metavar,
                              choices=shortcut.choices(), type=_shortcut_type(shortcut), help=shortcut.help())


def _shortcut_type(shortcut: Shortcut) -> Callable[[str], Any]:
    """Range-checked numbers, the pass's own text parsing for other free values, str for choices."""
    if shortcut.choices() is not None:
        return str
    annotation = shortcut.spec().annotation
    if shortcut.bounds is not None:
        low, high = shortcut.bounds
        if annotation is int:
            return int_in(int(low), int(high))
        return float_in(low, high, high_open=shortcut.high_open)

    def parse(text: str) -> Any:
        return parse_option_text(shortcut.pass_name, shortcut.option, text)
    parse.__name__ = shortcut.spec().type_name
    return parse


def _add_budget_arguments(sub: argparse.ArgumentParser) -> None:
    """--max-drop and the metric it is measured with."""
    budget = sub.add_argument_group("accuracy budget (measured on --data, held out from --calibration-data)")
    budget.add_argument("--max-drop", type=float_in(0.0, math.inf), metavar="X",
                        help="back off the most harmful layers until --metric drops by at most X")
    budget.add_argument("--metric", default="cosine", type=metric_spec,
                        help="cosine, sqnr, max_abs, top1, topk, or package.module:function(reference_outputs, "
                             "candidate_outputs) -> float (default cosine)")
    budget.add_argument("--metric-direction", choices=("higher", "lower"),
                        help="whether higher or lower is better (required for a user metric)")
    budget.add_argument("--metric-output", metavar="NAME", help="compute a built-in metric on this output only")
    budget.add_argument("--max-trials", type=int_in(1, MAX_COUNT), default=24,
                        help="compression trials at most (default 24)")
    budget.add_argument("--workers", type=int_in(1, 256), default=1, help="trials in parallel processes (default 1)")


def _add_validate(commands) -> None:
    sub = _command(commands, "validate", "compare a candidate model with a reference in onnxruntime")
    sub.add_argument("reference", help="reference .onnx file")
    sub.add_argument("candidate", help="candidate .onnx file")
    sub.add_argument("--json", action="store_true", help="print the comparison as JSON")
    _add_symlink_argument(sub)
    _add_feed_arguments(sub)
    add_tolerance_arguments(sub)
    _add_isolation_arguments(sub)
    sub.set_defaults(handler=_run_validate)


def _add_bench(commands) -> None:
    sub = _command(commands, "bench", "time several models on the same feeds, interleaved round by round")
    sub.add_argument("models", nargs="+", help=".onnx files; ratios are against the first")
    sub.add_argument("--warmup", type=int_in(0, MAX_COUNT), default=3, help="warm-up runs per model (default 3)")
    sub.add_argument("--rounds", type=int_in(1, MAX_COUNT), default=20, help="timed rounds (default 20)")
    sub.add_argument("--threads", type=int_in(1, 1024), help="onnxruntime intra-op threads (default: onnxruntime's)")
    sub.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_symlink_argument(sub)
    _add_timeout_argument(sub)
    _add_feed_arguments(sub)
    sub.set_defaults(handler=_run_bench)


def _add_inspect(commands) -> None:
    sub = _command(commands, "inspect", "show size by dtype and op, largest tensors, Constant-node weights, "
                                        "subgraphs and duplicated tensors")
    sub.add_argument("model", help=".onnx file")
    sub.add_argument("--top", type=int_in(0, MAX_COUNT), default=10, help="largest tensors to list (default 10)")
    sub.add_argument("--json", action="store_true", help="print as JSON")
    _add_symlink_argument(sub)
    sub.set_defaults(handler=_run_inspect)


def _add_debug(commands) -> None:
    sub = _command(commands, "debug", "per-layer error of a compressed model against the original, worst first")
    sub.add_argument("reference", help="original .onnx file")
    sub.add_argument("candidate", help="compressed .onnx file")
    sub.add_argument("--top", type=int_in(0, MAX_COUNT), help="print only the N worst layers")
    sub.add_argument("--report", action="append", default=[], metavar="FILE",
                     help="write the table into a report (.json, .md or .html; repeatable)")
    sub.add_argument("--json", action="store_true", help="print the layers as JSON")
    _add_symlink_argument(sub)
    _add_timeout_argument(sub)
    _add_feed_arguments(sub)
    sub.set_defaults(handler=_run_debug)


def _add_sensitivity(commands) -> None:
    sub = _command(commands, "sensitivity", "how much each layer's pruning changes the outputs, and per-layer "
                                            "sparsities that reach a target with the least error")
    sub.add_argument("model", help=".onnx file")
    sub.add_argument("--sparsities", default="0.25,0.5,0.75", type=float_list_in(0.0, 1.0, high_open=True),
                     help="comma-separated sparsities to scan, each in [0, 1)")
    sub.add_argument("--target", type=float_in(0.0, 1.0, high_open=True),
                     help="allocate per-layer sparsities reaching this overall sparsity")
    sub.add_argument("--min-elements", type=int_in(0, MAX_BYTES), default=1024, help="skip weights with fewer elements")
    sub.add_argument("--report", action="append", default=[], metavar="FILE", help="save the table (.md or .json)")
    sub.add_argument("--json", action="store_true", help="print as JSON")
    _add_symlink_argument(sub)
    _add_timeout_argument(sub)
    _add_feed_arguments(sub)
    sub.set_defaults(handler=_run_sensitivity)


def _add_passes(commands) -> None:
    sub = _command(commands, "passes", "list the passes and their options")
    sub.set_defaults(handler=_run_passes)


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


def _optimize_options(args: argparse.Namespace, names: list[str],
                      options: dict[str, dict[str, Any]]) -> OptimizeOptions:
    """The optimize flags as the library's typed options, group by group."""
    validation = ValidationOptions(tolerance=tolerance_from_args(args), isolate=args.isolate,
                                   max_memory_bytes=args.validate_max_memory, keep_failed=args.keep_failed)
    budget = None if args.max_drop is None else BudgetOptions(
        max_drop=args.max_drop, metric=args.metric, output=args.metric_output, max_trials=args.max_trials,
        workers=args.workers,
        higher_is_better=None if args.metric_direction is None else args.metric_direction == "higher")
    return OptimizeOptions(
        passes=names, pass_options=options, calibration=args.calibration_data, provider=args.provider,
        timeout_s=args.timeout, progress=not (args.quiet or args.json), check_each_pass=args.check_each_pass,
        feeds=FeedOptions(source=args.data, shapes=parse_shape_overrides(args.shape), samples=args.samples,
                          seed=args.seed),
        validation=validation if args.validate else None, bench_rounds=args.rounds if args.bench else None,
        fusion_check=args.fusion_check, budget=budget, bisect=args.bisect, external_data=args.external_data,
        max_input_bytes=args.max_input_bytes, allow_symlinks_under=args.allow_symlinks_under, reports=args.report)


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
        print(f"accuracy budget {'met' if budget['met'] else 'NOT met'}: {budget['metric']} {budget['value']:.6g} "
              f"(baseline {budget['baseline']:.6g}, drop {budget['drop']:.3g} <= {budget['max_drop']}?) after "
              f"{budget['trials']} trial(s); backed off: {', '.join(budget['backed_off']) or 'nothing'}")
    if data["fusion"]:
        kernels = ", ".join(f"{op} x{n}" for op, n in data["fusion"]["integer_kernels"].items()) or "none"
        print(f"onnxruntime runs integer kernels: {kernels}")
    if data["bisect"]:
        found = data["bisect"]
        print(f"first bad pass: {found['first_bad_pass']} (#{found['index']}): {found['reason']}")
    for note in data["notes"]:
        print(f"note: {note}")


def _run_validate(args: argparse.Namespace) -> int:
    reference = load_model(args.reference, allow_symlinks_under=args.allow_symlinks_under)
    load_model(args.candidate, allow_symlinks_under=args.allow_symlinks_under)
    feeds = resolve_feeds(reference, args.data, shapes=parse_shape_overrides(args.shape),
                          samples=args.samples, seed=args.seed)
    tolerance = tolerance_from_args(args) or Tolerance(max_abs=1e-6)
    if args.isolate:
        comparison = compare_isolated(args.reference, args.candidate, feeds, tolerance=tolerance,
                                      provider=args.provider, timeout_s=args.timeout,
                                      max_memory_bytes=args.validate_max_memory)
    else:
        comparison = compare(args.reference, args.candidate, feeds, tolerance=tolerance, provider=args.provider,
                             timeout_s=args.timeout)
    print(json.dumps(comparison.to_dict(), indent=2) if args.json else comparison.summary())
    return EXIT_OK if comparison.passed else EXIT_VALIDATION_FAILED


def _run_bench(args: argparse.Namespace) -> int:
    first = load_model(args.models[0], allow_symlinks_under=args.allow_symlinks_under)
    for path in args.models[1:]:
        load_model(path, allow_symlinks_under=args.allow_symlinks_under)
    feeds = resolve_feeds(first, args.data, shapes=parse_shape_overrides(args.shape),
                          samples=args.samples, seed=args.seed)
    result = benchmark(args.models, feeds, provider=args.provider, warmup=args.warmup, rounds=args.rounds,
                       threads=args.threads, progress=not args.json, timeout_s=args.timeout)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_markdown())
    return EXIT_OK


def _run_inspect(args: argparse.Namespace) -> int:
    inspection = inspect_model(load_model(args.model, allow_symlinks_under=args.allow_symlinks_under),
                               path=args.model, top=args.top)
    print(json.dumps(inspection.to_dict(), indent=2) if args.json else inspection_text(inspection))
    return EXIT_OK


def _run_debug(args: argparse.Namespace) -> int:
    reference, reference_files = load_model_with_files(args.reference, allow_symlinks_under=args.allow_symlinks_under)
    candidate, candidate_files = load_model_with_files(args.candidate, allow_symlinks_under=args.allow_symlinks_under)
    check_reports_apart(args.report, [*reference_files, *candidate_files], args.data)
    feeds = resolve_feeds(reference, args.data, shapes=parse_shape_overrides(args.shape),
                          samples=args.samples, seed=args.seed)
    layers = debug_layers(reference, candidate, feeds, provider=args.provider, timeout_s=args.timeout)
    report = Report(tool_version(), model_summary(reference, args.reference), model_summary(candidate, args.candidate),
                    layers=layers.to_rows())
    for path in args.report:
        write_report(report, path)
    print(json.dumps(layers.to_rows(), indent=2) if args.json else layers.summary(args.top))
    return EXIT_OK


def _run_sensitivity(args: argparse.Namespace) -> int:
    sparsities = list(args.sparsities)
    model, model_files = load_model_with_files(args.model, allow_symlinks_under=args.allow_symlinks_under)
    check_reports_apart(args.report, model_files, args.data, {".md": "markdown", ".json": "json"})
    feeds = resolve_feeds(model, args.data, shapes=parse_shape_overrides(args.shape), samples=args.samples,
                          seed=args.seed)
    table = sensitivity_scan(model, feeds, sparsities=sparsities, provider=args.provider, progress=not args.json,
                             min_elements=args.min_elements, timeout_s=args.timeout)
    if args.target is not None:
        table.allocate(args.target)
    for path in args.report:
        target = Path(path)
        if target.suffix.lower() not in (".md", ".json"):
            raise UsageError(f"--report '{path}': use .md or .json")
        markdown = target.suffix.lower() == ".md"
        text = (escape_control(table.to_markdown(), keep_layout=True) if markdown
                else json.dumps(table.to_dict(), indent=2))
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


if __name__ == "__main__":
    sys.exit(main())
