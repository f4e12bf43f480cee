"""Checked argparse ``type=`` functions: every number is finite and in range when the CLI parses it.

A bad value is a one-line usage error (exit 2) naming the flag, the value and the allowed range,
before any file is read; nothing reaches the library as NaN, infinity or a size to allocate.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Any

from optimizer.errors import OnnxCompressError
from optimizer.text import printable
from optimizer.verify.metrics import check_metric_spec
from optimizer.verify.output_kinds import KINDS
from optimizer.verify.validate import Tolerance

MAX_SAMPLES = 10_000
MAX_SEED = 2**32 - 1
MAX_COUNT = 1_000_000
MAX_BYTES = 2**62
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_SHAPE_DIM = 2**31 - 1
MAX_SHAPE_ELEMENTS = 2**30


class UsageError(OnnxCompressError):
    """A command-line argument is malformed."""


def _refuse(text: str, expected: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"invalid value '{printable(text)}': expected {expected}")


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An integer from ``low`` to ``high`` inclusive."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise _refuse(text, f"an integer from {low} to {high}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> Callable[[str], float]:
    """A finite number in the interval; ``low_open``/``high_open`` exclude the ends."""
    expected = _interval_text(low, high, low_open, high_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise _refuse(text, expected) from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            raise _refuse(text, expected)
        return value

    parse.__name__ = "number"
    return parse


def _interval_text(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if math.isinf(low) and math.isinf(high):
        return "a finite number"
    if math.isinf(high):
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    return f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def float_list_in(low: float, high: float, *, high_open: bool = False) -> Callable[[str], tuple[float, ...]]:
    """Comma-separated numbers, each checked like ``float_in``; at least one."""
    item = float_in(low, high, high_open=high_open)

    def parse(text: str) -> tuple[float, ...]:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            raise _refuse(text, "comma-separated numbers like 0.25,0.5")
        try:
            return tuple(item(part) for part in parts)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"in '{printable(text)}': {error}") from None

    parse.__name__ = "numbers"
    return parse


TOLERANCE_TYPES: dict[str, Callable[[str], float]] = {
    "atol": float_in(0.0, math.inf),
    "rtol": float_in(0.0, math.inf),
    "min-cosine": float_in(-1.0, 1.0),
    "min-sqnr": float_in(-math.inf, math.inf),
    "min-top1": float_in(0.0, 1.0),
}

POSITIVE_SECONDS = float_in(0.0, MAX_TIMEOUT_S, low_open=True)


def shape_override(text: str) -> str:
    """``NAME=DxD..`` with every dim from 0 to 2^31-1 and at most 2^30 elements in all."""
    name, sep, dims_text = text.rpartition("=")
    dims = [part.strip() for part in re.split(r"[x,]", dims_text.strip())]
    if not sep or not name.strip() or not all(part.isdecimal() and len(part) <= 10 for part in dims):
        raise _refuse(text, "NAME=DIMxDIM..., e.g. input_ids=1x128")
    values = [int(part) for part in dims]
    if any(value > MAX_SHAPE_DIM for value in values) or math.prod(values) > MAX_SHAPE_ELEMENTS:
        raise _refuse(text, f"dims from 0 to {MAX_SHAPE_DIM} and at most {MAX_SHAPE_ELEMENTS} elements")
    return text


def metric_spec(text: str) -> str:
    """A built-in metric name, or ``module:function`` that imports and takes two positional arguments."""
    try:
        check_metric_spec(text)
    except OnnxCompressError as error:
        raise argparse.ArgumentTypeError(printable(" ".join(str(error).split()))) from None
    return text


def output_tolerance(text: str) -> str:
    """``OUTPUT:KEY=VALUE[,KEY=VALUE]`` with known keys and values in each key's range."""
    name, sep, body = text.rpartition(":")
    if not sep or not name or not body:
        raise _refuse(text, "OUTPUT:KEY=VALUE[,KEY=VALUE]")
    for part in body.split(","):
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in TOLERANCE_TYPES:
            raise _refuse(text, f"KEY=VALUE pairs with KEY one of {', '.join(TOLERANCE_TYPES)}")
        try:
            TOLERANCE_TYPES[key.strip()](value)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"in '{printable(text)}', {key.strip()}: {error}") from None
    return text


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (flag, value, reason), exit 2; --help still has the usage.

    A bad option value is raised as ``argparse.ArgumentError`` (``exit_on_error=False``) so that
    ``main`` reports it like any bad input and returns 2.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {printable(' '.join(message.split()))} (see '{self.prog} --help')\n")


def add_tolerance_arguments(sub: argparse.ArgumentParser) -> None:
    """--atol, --rtol, --min-cosine, --min-sqnr, --min-top1 and --output-tolerance, range-checked."""
    group = sub.add_argument_group("tolerance (every output; default --atol 1e-6 for lossless passes)")
    group.add_argument("--atol", type=TOLERANCE_TYPES["atol"], help="maximum absolute error")
    group.add_argument("--rtol", type=TOLERANCE_TYPES["rtol"], help="maximum relative error (max |a-b| / max |a|)")
    group.add_argument("--min-cosine", type=TOLERANCE_TYPES["min-cosine"], help="minimum cosine similarity")
    group.add_argument("--min-sqnr", type=TOLERANCE_TYPES["min-sqnr"], help="minimum SQNR in dB")
    group.add_argument(
        "--min-top1", type=TOLERANCE_TYPES["min-top1"], help="minimum top-1 agreement for class-like outputs"
    )
    group.add_argument(
        "--output-tolerance",
        action="append",
        default=[],
        metavar="OUTPUT:KEY=V[,KEY=V]",
        type=output_tolerance,
        help="tolerance for one output, keys atol, rtol, min-cosine, min-sqnr, min-top1, e.g. "
        "logits:atol=1e-3,min-cosine=0.999 (repeatable; other outputs use the flags above)",
    )
    group.add_argument(
        "--output-kind",
        action="append",
        default=[],
        metavar="OUTPUT=KIND",
        type=output_kind,
        help=f"what an output is, when the inferred kind is wrong: {'|'.join(KINDS)} (repeatable; the "
        "default verdict applies that kind's metrics, see the README's 'What the verdict means')",
    )


def output_kind(text: str) -> str:
    """``OUTPUT=KIND`` with a known kind (the output name is checked once the model is loaded)."""
    name, sep, kind = text.rpartition("=")
    if not sep or not name or kind not in KINDS:
        raise _refuse(text, f"OUTPUT=KIND with KIND one of {', '.join(KINDS)}")
    return text


def output_kinds_from_args(args: argparse.Namespace) -> dict[str, str]:
    return dict(item.rpartition("=")[::2] for item in args.output_kind)


TOLERANCE_KEYS = {
    "atol": "max_abs",
    "rtol": "max_rel",
    "min-cosine": "min_cosine",
    "min-sqnr": "min_sqnr_db",
    "min-top1": "min_top1",
}


def tolerance_from_args(args: argparse.Namespace) -> Tolerance | dict[str, Tolerance] | None:
    """The global flags as one Tolerance, or a per-output mapping ("*" = the global flags; without
    them the caller's default applies to the outputs not named, see ``with_default_tolerance``)."""
    values = {
        "max_abs": args.atol,
        "max_rel": args.rtol,
        "min_cosine": args.min_cosine,
        "min_sqnr_db": args.min_sqnr,
        "min_top1": args.min_top1,
    }
    common = None if all(value is None for value in values.values()) else Tolerance(**values)
    if not args.output_tolerance:
        return common
    per_output = dict(parse_output_tolerance(item) for item in args.output_tolerance)
    return {"*": common, **per_output} if common is not None else per_output


def parse_output_tolerance(item: str) -> tuple[str, Tolerance]:
    """``"logits:atol=1e-3,min-cosine=0.99"`` -> ("logits", Tolerance(max_abs=0.001, min_cosine=0.99))."""
    name, sep, body = item.rpartition(":")
    if not sep or not name or not body:
        raise UsageError(f"--output-tolerance '{item}': expected OUTPUT:KEY=VALUE[,KEY=VALUE]")
    values: dict[str, Any] = {}
    for part in body.split(","):
        key, eq, text = part.partition("=")
        if not eq or key.strip() not in TOLERANCE_KEYS:
            raise UsageError(
                f"--output-tolerance '{item}': '{part}' is not KEY=VALUE with KEY one of {', '.join(TOLERANCE_KEYS)}"
            )
        try:
            values[TOLERANCE_KEYS[key.strip()]] = TOLERANCE_TYPES[key.strip()](text)
        except argparse.ArgumentTypeError as error:
            raise UsageError(f"--output-tolerance '{item}': {key.strip()}: {error}") from None
    return name, Tolerance(**values)
