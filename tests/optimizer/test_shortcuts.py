"""The shortcut table is the one source of the CLI's compression flags and of plan_passes' mapping."""

from __future__ import annotations

import argparse
from typing import Literal, get_args, get_origin

import pytest

import passes  # noqa: F401  (registers every pass)
from optimizer.api import build_passes, plan_passes
from optimizer.cli import build_parser
from optimizer.errors import OptionError
from optimizer.registry import pass_options
from optimizer.shortcuts import SHORTCUTS, shortcut_options


def _optimize_actions() -> dict[str, argparse.Action]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {flag: action for action in commands.choices["optimize"]._actions for flag in action.option_strings}


def test_every_shortcut_names_a_registered_option():
    for shortcut in SHORTCUTS:
        assert shortcut.option in pass_options(shortcut.pass_name), shortcut


@pytest.mark.parametrize("shortcut", SHORTCUTS, ids=lambda s: s.flag)
def test_cli_flag_comes_from_the_table_and_the_registry(shortcut):
    action = _optimize_actions()[shortcut.flag]
    assert action.dest == shortcut.dest
    spec = pass_options(shortcut.pass_name)[shortcut.option]
    assert spec.help in action.help
    if get_origin(spec.annotation) is Literal:
        assert tuple(action.choices) == (*get_args(spec.annotation), *shortcut.extra_choices)
    else:
        assert action.choices is None


def test_compression_flags_are_exactly_the_table():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    group = next(g for g in commands.choices["optimize"]._action_groups if g.title.startswith("compression"))
    assert [a.option_strings[0] for a in group._group_actions] == [s.flag for s in SHORTCUTS]


def test_help_lists_every_shortcut_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["optimize", "--help"])
    text = capsys.readouterr().out
    for shortcut in SHORTCUTS:
        assert shortcut.flag in text


def test_cli_values_reach_the_passes_through_the_table():
    args = build_parser().parse_args(["optimize", "in.onnx", "-o", "out.onnx", "--quantize", "int4",
                                      "--quantize-mode", "weights", "--exclude", "a*,re:^b$",
                                      "--prune", "0.5", "--sparse-storage", "auto"])
    values = {s.dest: getattr(args, s.dest) for s in SHORTCUTS}
    names, options = plan_passes(["cleanup"], **values)
    assert names == ["cleanup", "prune", "quantize"]
    assert options == {"quantize": {"weight_type": "int4", "mode": "weights", "exclude_nodes": ("a*", "re:^b$")},
                       "prune": {"sparsity": 0.5, "storage": "auto"}}
    built = build_passes(names, options)
    assert built[2].exclude_nodes == ("a*", "re:^b$") and built[1].storage == "auto"


def test_channels_mode_becomes_prune_channels():
    assert shortcut_options({"prune": 0.25, "prune_mode": "channels"}) == (["prune-channels"],
                                                                          {"prune-channels": {"ratio": 0.25}})


def test_modifier_without_its_pass_is_refused():
    """--quantize-mode without quantize in the pipeline was silently ignored; now it is an OptionError."""
    names, options = plan_passes(["cleanup"], quantize_mode="static")
    with pytest.raises(OptionError, match="'quantize', which is not in the pipeline"):
        build_passes(names, options)
    names, options = plan_passes(["cleanup", "quantize"], quantize_mode="static")
    assert build_passes(names, options)[1].mode == "static"


def test_unknown_shortcut_is_refused():
    with pytest.raises(OptionError, match="unknown shortcut 'quantise'"):
        plan_passes(quantise="int8")
