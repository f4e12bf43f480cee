"""The onnx-compress argument parser: every subcommand's flags, with choices and help for the
compression shortcuts taken from the registry (optimizer.shortcuts). optimizer.cli runs the commands."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from optimizer.api import DEFAULT_PASSES, tool_version
from optimizer.cli_options import (
    MAX_BYTES,
    MAX_COUNT,
    MAX_SAMPLES,
    MAX_SEED,
    POSITIVE_SECONDS,
    OneLineParser,
    add_tolerance_arguments,
    float_in,
    float_list_in,
    int_in,
    metric_spec,
    shape_override,
)
from optimizer.executor import EXECUTORS
from optimizer.registry import parse_option_text
from optimizer.shortcuts import SHORTCUTS, Shortcut
from optimizer.verify.generation import GENERATE_TOKENS, MAX_TOKENS
from optimizer.verify.isolation import DEFAULT_TIMEOUT_S
from optimizer.verify.metrics import BUILTIN_METRICS

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
    sub = commands.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=EXAMPLES[name],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("--debug", action="store_true", help="print the traceback of internal errors")
    return sub


def _add_feed_arguments(sub: argparse.ArgumentParser) -> None:
    group = sub.add_argument_group("input data")
    group.add_argument(
        "--data",
        metavar="DIR",
        help="folder of .npz files, one sample each, keys = input names (default: seeded random feeds)",
    )
    group.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME=DxDx..",
        type=shape_override,
        help="fix a dynamic input shape for generated feeds, e.g. input_ids=1x128 (repeatable)",
    )
    group.add_argument(
        "--samples",
        type=int_in(1, MAX_SAMPLES),
        default=4,
        help=f"number of generated feeds, at most {MAX_SAMPLES} (default 4)",
    )
    group.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="seed for generated feeds (default 0)")
    group.add_argument(
        "--provider",
        default="cpu",
        help="execution provider: cpu or cuda (falls back to cpu "
        "with a message when CUDA is not available); default cpu",
    )


def _add_report(sub: argparse.ArgumentParser, help_text: str) -> None:
    sub.add_argument("--report", action="append", default=[], metavar="FILE", help=help_text)


def _add_json(sub: argparse.ArgumentParser, what: str = "", where: str = "") -> None:
    sub.add_argument("--json", action="store_true", help=f"print {what + ' ' if what else ''}as JSON{where}")


def _add_model_pair(sub: argparse.ArgumentParser, reference: str, candidate: str) -> None:
    """The two models a comparison reads, described as ``reference`` and ``candidate``."""
    sub.add_argument("reference", help=f"{reference} .onnx file")
    sub.add_argument("candidate", help=f"{candidate} .onnx file")


def _add_run_arguments(sub: argparse.ArgumentParser) -> None:
    """What a command that runs models in onnxruntime takes: symlinked data, --timeout, the feeds."""
    _add_symlink_argument(sub)
    _add_timeout_argument(sub)
    _add_feed_arguments(sub)


def _add_symlink_argument(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--allow-symlinks-under",
        action="append",
        default=[],
        metavar="DIR",
        help="external-data files may be symlinks into DIR (repeatable); a Hugging Face "
        "cache's blobs folder is allowed without it",
    )


def _add_isolation_arguments(sub: argparse.ArgumentParser) -> None:
    group = sub.add_argument_group("isolation")
    group.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="validate in a child process so an onnxruntime crash is reported, not fatal (default on)",
    )
    _add_timeout_argument(group, "; isolated validation: the whole comparison")
    group.add_argument(
        "--validate-max-memory",
        type=int_in(2**20, MAX_BYTES),
        metavar="BYTES",
        help="address-space limit of the validation process",
    )


def _add_timeout_argument(group, more: str = "") -> None:
    group.add_argument(
        "--timeout",
        type=POSITIVE_SECONDS,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"stop any onnxruntime run that takes longer, exit 2 (default {DEFAULT_TIMEOUT_S:g}{more})",
    )


def _add_optimize(commands) -> None:
    sub = _command(commands, "optimize", "run compression passes on a model and save the result")
    sub.add_argument("input", help="input .onnx file (never modified)")
    sub.add_argument("-o", "--output", required=True, help="output .onnx file")
    sub.add_argument(
        "--passes",
        default=",".join(DEFAULT_PASSES),
        help=f"comma-separated passes in order (default {','.join(DEFAULT_PASSES)}); see 'onnx-compress passes'",
    )
    sub.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PASS.OPTION=VALUE",
        dest="settings",
        help="set a pass option, e.g. constants-to-initializers.min_size_bytes=64 (repeatable)",
    )
    _add_compression_arguments(sub)
    sub.add_argument(
        "--calibration-data",
        metavar="DIR",
        help="folder of .npz feeds that passes needing data (static quantization, sensitivity) run on",
    )
    _add_check_arguments(sub)
    _add_budget_arguments(sub)
    _add_output_arguments(sub)
    _add_feed_arguments(sub)
    add_tolerance_arguments(sub)
    _add_isolation_arguments(sub)


def _add_check_arguments(sub: argparse.ArgumentParser) -> None:
    """Validation, benchmark, fusion check and reports of the output."""
    sub.add_argument("--validate", action="store_true", help="compare the output with the input in onnxruntime")
    sub.add_argument("--keep-failed", action="store_true", help="write the output even when validation fails")
    sub.add_argument("--bench", action="store_true", help="also time input and output, interleaved")
    sub.add_argument("--rounds", type=int_in(1, MAX_COUNT), default=20, help="benchmark rounds (default 20)")
    _add_generate_tokens(sub)
    sub.add_argument(
        "--fusion-check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="report which quantized groups onnxruntime runs as integer kernels "
        "(default: when the output has DequantizeLinear nodes)",
    )
    _add_report(sub, "write the report as .json, .md or .html (repeatable)")


def _add_output_arguments(sub: argparse.ArgumentParser) -> None:
    """How the run checks passes, stores the output, and what it prints."""
    sub.add_argument(
        "--check-each-pass",
        action="store_true",
        help="run onnx.checker (full_check) after every pass to name the pass that broke a model",
    )
    sub.add_argument(
        "--bisect",
        action="store_true",
        help="when a pass or validation fails, search for the first pass that broke the model",
    )
    sub.add_argument(
        "--external-data",
        choices=("auto", "always", "never"),
        default="auto",
        help="store weights in OUTPUT.HASH.data: auto (only past protobuf's 2 GB), always, never",
    )
    sub.add_argument(
        "--genai-files",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="copy the input folder's onnxruntime-genai config (decoder filename set to the output's) and "
        "tokenizer files next to the output, never over a file already there (default on)",
    )
    sub.add_argument("--max-input-bytes", type=int_in(1, MAX_BYTES), help="refuse input files larger than this")
    _add_symlink_argument(sub)
    _add_json(sub, "the report", " on stdout")
    sub.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _add_compression_arguments(sub: argparse.ArgumentParser) -> None:
    """The shortcut flags of optimizer.shortcuts; choices and help come from the passes' typed options."""
    compress = sub.add_argument_group("compression (added after --passes: prune, then quantize or cluster)")
    for shortcut in SHORTCUTS:
        compress.add_argument(
            shortcut.flag,
            dest=shortcut.dest,
            metavar=shortcut.metavar,
            choices=shortcut.choices(),
            type=_shortcut_type(shortcut),
            help=shortcut.help(),
        )


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
    budget.add_argument(
        "--max-drop",
        type=float_in(0.0, math.inf),
        metavar="X",
        help="back off the most harmful layers (first to weight-only int8, then to float) until --metric "
        "drops by at most X; implies --validate: the metric re-measured on the written file is the verdict",
    )
    budget.add_argument(
        "--bits-per-weight",
        type=float_in(1.0, 32.0),
        metavar="B",
        help="spend at most B stored bits per compressed weight (scales and zero points count): every layer in "
        "the --quantize format (4-bit blocks widened if needed), then the layers whose step up (4-bit blocks of "
        "32, then 8-bit) buys the most --metric per byte on --calibration-data, measured one trial per layer",
    )
    budget.add_argument(
        "--metric",
        type=metric_spec,
        help=f"{', '.join(BUILTIN_METRICS)} (kl: of the softmax over the last axis; perplexity: of the "
        "next-token logits on the tokens of input 'input_ids'), or "
        "package.module:function(reference_outputs, candidate_outputs) -> float (default: cosine for "
        "--max-drop; kl for --bits-per-weight, on the 'logits' output when the model has one)",
    )
    budget.add_argument(
        "--metric-direction",
        choices=("higher", "lower"),
        help="whether higher or lower is better (required for a user metric)",
    )
    budget.add_argument("--metric-output", metavar="NAME", help="compute a built-in metric on this output only")
    budget.add_argument(
        "--max-trials",
        type=int_in(1, MAX_COUNT),
        help="compression trials at most (default 24 for --max-drop, 256 for --bits-per-weight)",
    )
    trials = sub.add_argument_group("trials (auto mode builds and checks, accuracy budget): where they run")
    trials.add_argument(
        "--workers", type=int_in(1, 256), default=1, help="trials at a time: worker processes or Ray actors (default 1)"
    )
    trials.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="local: worker processes on this machine; ray: Ray actors (the ray extra), on --ray-address or a "
        "local Ray instance (default local)",
    )
    trials.add_argument("--ray-address", metavar="ADDR", help="an existing Ray cluster (ray://host:10001 or host:port)")


def _add_validate(commands) -> None:
    sub = _command(commands, "validate", "compare a candidate model with a reference in onnxruntime")
    _add_model_pair(sub, "reference", "candidate")
    sub.add_argument(
        "--exact",
        action="store_true",
        help="default tolerance max abs 1e-6 (for lossless changes) instead of cosine >= 0.99 and SQNR >= 20 dB",
    )
    _add_json(sub, "the comparison")
    _add_symlink_argument(sub)
    _add_feed_arguments(sub)
    add_tolerance_arguments(sub)
    _add_isolation_arguments(sub)
    _add_generate_tokens(sub)


def _add_generate_tokens(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--generate-tokens",
        type=int_in(0, MAX_TOKENS),
        default=GENERATE_TOKENS,
        metavar="N",
        help=f"a decoder with a KV cache (past_key_values.* inputs) also generates N tokens greedily from "
        f"prompts of the samples: validation reports how many match the reference's, the benchmark "
        f"prefill and decode tokens/s (default {GENERATE_TOKENS}; 0: off)",
    )


def _add_bench(commands) -> None:
    sub = _command(commands, "bench", "time several models on the same feeds, interleaved round by round")
    sub.add_argument("models", nargs="+", help=".onnx files; ratios are against the first")
    sub.add_argument("--warmup", type=int_in(0, MAX_COUNT), default=3, help="warm-up runs per model (default 3)")
    sub.add_argument("--rounds", type=int_in(1, MAX_COUNT), default=20, help="timed rounds (default 20)")
    sub.add_argument("--threads", type=int_in(1, 1024), help="onnxruntime intra-op threads (default: onnxruntime's)")
    _add_generate_tokens(sub)
    _add_json(sub, "the result")
    _add_run_arguments(sub)


def _add_inspect(commands) -> None:
    sub = _command(
        commands,
        "inspect",
        "show size by dtype and op, largest tensors, Constant-node weights, subgraphs and duplicated tensors",
    )
    sub.add_argument("model", help=".onnx file")
    sub.add_argument("--top", type=int_in(0, MAX_COUNT), default=10, help="largest tensors to list (default 10)")
    _add_json(sub)
    _add_symlink_argument(sub)


def _add_debug(commands) -> None:
    sub = _command(commands, "debug", "per-layer error of a compressed model against the original, worst first")
    _add_model_pair(sub, "original", "compressed")
    sub.add_argument("--top", type=int_in(0, MAX_COUNT), help="print only the N worst layers")
    _add_report(sub, "write the table into a report (.json, .md or .html; repeatable)")
    _add_json(sub, "the layers")
    _add_run_arguments(sub)


def _add_sensitivity(commands) -> None:
    sub = _command(
        commands,
        "sensitivity",
        "how much each layer's pruning changes the outputs, and per-layer "
        "sparsities that reach a target with the least error",
    )
    sub.add_argument("model", help=".onnx file")
    sub.add_argument(
        "--sparsities",
        default="0.25,0.5,0.75",
        type=float_list_in(0.0, 1.0, high_open=True),
        help="comma-separated sparsities to scan, each in [0, 1)",
    )
    sub.add_argument(
        "--target",
        type=float_in(0.0, 1.0, high_open=True),
        help="allocate per-layer sparsities reaching this overall sparsity",
    )
    sub.add_argument("--min-elements", type=int_in(0, MAX_BYTES), default=1024, help="skip weights with fewer elements")
    _add_report(sub, "save the table (.md or .json)")
    _add_json(sub)
    _add_run_arguments(sub)


def _add_passes(commands) -> None:
    _command(commands, "passes", "list the passes and their options")
