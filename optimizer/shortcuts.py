"""The one table from shortcut flags (``--quantize``, ``--prune``, ...) to pass options.

The CLI builds its flags from this table (choices and help come from the pass's typed fields in the
registry), and ``api.plan_passes`` turns the same values into passes and options, so the two cannot
disagree. A modifier (``--quantize-mode``, ``--exclude``, ...) sets an option of its pass wherever that
pass is in the pipeline; when the pass is not there, ``build_passes`` refuses the option (exit 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from optimizer.errors import OptionError
from optimizer.registry import OptionSpec, pass_options


@dataclass(frozen=True)
class Shortcut:
    """``flag`` sets ``option`` of pass ``pass_name``; ``stage`` > 0 means the flag also adds the pass.

    Passes added by flags go after the base pipeline in stage order (1 prune, 2 quantize or cluster),
    so zeros stay zeros. ``bounds`` is the accepted range of a number (``high_open`` excludes the
    top); ``extra_choices`` are values the flag takes beyond the option's Literal (see VARIANTS).
    """

    flag: str
    dest: str
    pass_name: str
    option: str
    stage: int = 0
    bounds: tuple[float, float] | None = None
    high_open: bool = False
    metavar: str | None = None
    extra_choices: tuple[str, ...] = ()
    extra_help: str = ""

    def spec(self) -> OptionSpec:
        return pass_options(self.pass_name)[self.option]

    def choices(self) -> tuple[Any, ...] | None:
        """The option's Literal values (plus ``extra_choices``), or None for a free value."""
        annotation = self.spec().annotation
        if get_origin(annotation) is not Literal:
            return None
        return (*get_args(annotation), *self.extra_choices)

    def help(self) -> str:
        return f"{self.spec().help} (pass '{self.pass_name}', option {self.option}){self.extra_help}"


@dataclass(frozen=True)
class Variant:
    """When ``pass_name.option`` is set to ``value``, the request is for pass ``becomes`` instead,
    with the options renamed by ``renames`` (the option itself is dropped)."""

    pass_name: str
    option: str
    value: str
    becomes: str
    renames: tuple[tuple[str, str], ...]


SHORTCUTS: tuple[Shortcut, ...] = (
    Shortcut("--quantize", "quantize", "quantize", "weight_type", stage=2),
    Shortcut("--quantize-mode", "quantize_mode", "quantize", "mode"),
    Shortcut("--calibration-method", "calibration_method", "quantize", "calibration_method"),
    Shortcut("--exclude", "exclude", "quantize", "exclude_nodes", metavar="PATTERNS"),
    Shortcut("--prune", "prune", "prune", "sparsity", stage=1, bounds=(0.0, 1.0), high_open=True, metavar="FRACTION"),
    Shortcut(
        "--prune-mode",
        "prune_mode",
        "prune",
        "mode",
        extra_choices=("channels",),
        extra_help="; channels: structured pruning, --prune is then prune-channels.ratio",
    ),
    Shortcut(
        "--prune-structure",
        "prune_structure",
        "prune-channels",
        "structure",
        extra_help="; implies --prune-mode channels",
    ),
    Shortcut(
        "--prune-flops",
        "prune_flops",
        "prune-channels",
        "flops",
        stage=1,
        bounds=(0.0, 1.0),
        high_open=True,
        metavar="FRACTION",
    ),
    Shortcut("--sparse-storage", "sparse_storage", "prune", "storage"),
    Shortcut("--cluster", "cluster_bits", "cluster", "bits", stage=2, bounds=(2, 8), metavar="BITS"),
    Shortcut("--float16", "float16", "float16", "mode", stage=3),
    Shortcut("--bfloat16", "bfloat16", "bfloat16", "mode", stage=3),
)

VARIANTS: tuple[Variant, ...] = (Variant("prune", "mode", "channels", "prune-channels", (("sparsity", "ratio"),)),)

EXCLUSIVE_PASSES: tuple[tuple[str, str, str], ...] = (
    ("quantize", "cluster", "quantize and cluster both rewrite the same weights: choose one"),
    ("float16", "bfloat16", "--float16 and --bfloat16 both set the float type: choose one"),
)


def shortcut_by_dest(dest: str) -> Shortcut:
    for shortcut in SHORTCUTS:
        if shortcut.dest == dest:
            return shortcut
    raise OptionError(f"unknown shortcut '{dest}'; known: {', '.join(s.dest for s in SHORTCUTS)}")


def shortcut_options(values: Mapping[str, Any]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The passes the given shortcut values add (in stage order) and the options they set.

    ``values`` maps a shortcut's ``dest`` to its value; None means the flag was not given.
    """
    given = [(shortcut_by_dest(dest), value) for dest, value in values.items() if value is not None]
    added = [s.pass_name for s, _ in sorted(given, key=lambda item: item[0].stage) if s.stage > 0]
    options: dict[str, dict[str, Any]] = {}
    for shortcut, value in given:
        options.setdefault(shortcut.pass_name, {})[shortcut.option] = value
    for first, second, message in EXCLUSIVE_PASSES:
        if first in added and second in added:
            raise OptionError(message)
    for variant in VARIANTS:
        chosen = options.get(variant.pass_name, {})
        if variant.becomes in options and variant.pass_name in added and variant.option not in chosen:
            chosen[variant.option] = variant.value  # a modifier of the variant's pass implies it
        if chosen.get(variant.option) == variant.value:
            del chosen[variant.option]
            renames = dict(variant.renames)
            renamed = {renames.get(key, key): value for key, value in chosen.items()}
            options[variant.becomes] = {**renamed, **options.get(variant.becomes, {})}
            del options[variant.pass_name]
            added = [variant.becomes if name == variant.pass_name else name for name in added]
    return added, options


@dataclass(frozen=True)
class CalibrationNeed:
    """Pass ``pass_name`` with ``option`` equal to ``value`` runs the model on calibration data;
    ``request`` is how the user asked for it (the flag, or --set)."""

    pass_name: str
    option: str
    value: Any
    request: str
    any_value: bool = False


CALIBRATION_NEEDS: tuple[CalibrationNeed, ...] = (
    CalibrationNeed("quantize", "mode", "static", "--quantize-mode static"),
    CalibrationNeed("quantize", "weight_rounding", "gptq", "--set quantize.weight_rounding=gptq"),
    CalibrationNeed("quantize", "weight_rounding", "awq", "--set quantize.weight_rounding=awq"),
    CalibrationNeed("quantize", "frequent_rows", None, "--set quantize.frequent_rows", any_value=True),
    CalibrationNeed("prune", "mode", "sensitivity", "--prune-mode sensitivity"),
    CalibrationNeed("prune", "mode", "wanda", "--prune-mode wanda"),
    CalibrationNeed("prune", "criterion", "wanda", "--set prune.criterion=wanda"),
    CalibrationNeed("prune", "mode", "sparsegpt", "--prune-mode sparsegpt"),
    CalibrationNeed("prune", "criterion", "sparsegpt", "--set prune.criterion=sparsegpt"),
    CalibrationNeed("prune-channels", "structure", "heads", "--prune-structure heads"),
    CalibrationNeed("prune-channels", "criterion", "activation", "--set prune-channels.criterion=activation"),
    CalibrationNeed("prune-channels", "flops", None, "--prune-flops", any_value=True),
)


def calibration_request(pass_name: str, options: Mapping[str, Any]) -> str | None:
    """How the user asked for calibration data, when pass ``pass_name`` with ``options`` needs it."""
    for need in CALIBRATION_NEEDS:
        value = options.get(need.option)
        if need.pass_name == pass_name and (value == need.value or (need.any_value and value)):
            return need.request
    return None
