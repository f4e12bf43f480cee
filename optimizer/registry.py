"""Pass registry: name -> pass class, with options checked against the pass's typed fields."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from optimizer.errors import OptionError
from optimizer.pass_base import Pass, option

PassT = typing.TypeVar("PassT", bound=Pass)

_PASSES: dict[str, type[Pass]] = {}
ENTRY_POINT_GROUP = "onnx_compress.passes"
_plugins_loaded = False


@dataclass(frozen=True)
class OptionSpec:
    name: str
    annotation: Any
    default: Any
    help: str

    @property
    def type_name(self) -> str:
        return _type_name(self.annotation)


@typing.dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(dataclasses.field, option))
def register(cls: type[PassT]) -> type[PassT]:
    """Class decorator: make a pass available by its ``name``, as a frozen keyword-only dataclass
    (applied here unless the class is already one: its fields are the pass's typed options)."""
    if "__dataclass_params__" not in cls.__dict__:
        cls = dataclass(frozen=True, kw_only=True)(cls)
    params = cls.__dict__["__dataclass_params__"]
    if not params.frozen:
        raise TypeError(f"{cls.__name__} must be a frozen keyword-only dataclass")
    existing = _PASSES.get(cls.name)
    if existing is not None and existing is not cls:
        raise TypeError(f"pass name '{cls.name}' is taken by {existing.__name__}")
    _PASSES[cls.name] = cls
    return cls


def load_plugins() -> None:
    """Register the passes other packages declare in the ``onnx_compress.passes`` entry point group.

    An entry point names a module whose import registers its passes, or a Pass class itself. Loaded
    once, the first time the registry is asked; a plugin that fails to load is an OptionError naming it.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            loaded = entry.load()
            if isinstance(loaded, type) and issubclass(loaded, Pass):
                register(loaded)
        except Exception as error:  # a third-party import can raise anything
            raise OptionError(
                f"pass plugin '{entry.name}' ({entry.value}, entry point group "
                f"{ENTRY_POINT_GROUP}) failed to load: {type(error).__name__}: {error}"
            ) from None


def pass_names() -> list[str]:
    load_plugins()
    return sorted(_PASSES)


def get_pass_class(name: str) -> type[Pass]:
    load_plugins()
    try:
        return _PASSES[name]
    except KeyError:
        raise OptionError(f"unknown pass '{name}'; known passes: {', '.join(pass_names()) or '(none)'}") from None


def pass_options(name: str) -> dict[str, OptionSpec]:
    cls = get_pass_class(name)
    hints = typing.get_type_hints(cls)
    specs = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        specs[f.name] = OptionSpec(f.name, hints[f.name], default, f.metadata.get("help", ""))
    return specs


def create_pass(name: str, **options: Any) -> Pass:
    """Build pass ``name``; an unknown option or a value of the wrong type is an OptionError."""
    specs = pass_options(name)
    for key, value in options.items():
        if key not in specs:
            valid = ", ".join(sorted(specs)) or "(this pass takes no options)"
            raise OptionError(f"pass '{name}' has no option '{key}'; valid options: {valid}")
        if not _matches(value, specs[key].annotation):
            raise OptionError(f"pass '{name}' option '{key}' must be {specs[key].type_name}, got {value!r}")
    return get_pass_class(name)(**options)


def parse_option_text(name: str, key: str, text: str) -> Any:
    """Convert a CLI string such as ``"0.5"``, ``"true"`` or ``"a,b"`` to option ``key``'s type."""
    specs = pass_options(name)
    if key not in specs:
        valid = ", ".join(sorted(specs)) or "(this pass takes no options)"
        raise OptionError(f"pass '{name}' has no option '{key}'; valid options: {valid}")
    annotation = specs[key].annotation
    for candidate in _annotation_members(annotation):
        try:
            value = _convert(text, candidate)
        except ValueError:
            continue
        if _matches(value, annotation):
            _check_number(name, key, value, text)
            return value
    raise OptionError(f"pass '{name}' option '{key}' must be {specs[key].type_name}, got '{text}'")


INT_RANGE = (-(2**63), 2**63 - 1)


def _check_number(name: str, key: str, value: Any, text: str) -> None:
    """Numbers from the command line are finite floats and 64-bit integers."""
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, float) and not math.isfinite(item):
            raise OptionError(f"pass '{name}' option '{key}' must be a finite number, got '{text}'")
        if isinstance(item, int) and not isinstance(item, bool) and not INT_RANGE[0] <= item <= INT_RANGE[1]:
            raise OptionError(
                f"pass '{name}' option '{key}' must be an integer from {INT_RANGE[0]} to {INT_RANGE[1]}, got '{text}'"
            )


def _annotation_members(annotation: Any) -> list[Any]:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in get_args(annotation) if a is not type(None)] + [type(None)]
    return [annotation]


def _convert(text: str, annotation: Any) -> Any:
    if annotation is type(None):
        if text.lower() in ("none", "null", ""):
            return None
        raise ValueError(text)
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise ValueError(text)
    if annotation in (int, float, str):
        return annotation(text)
    if get_origin(annotation) is Literal:
        for choice in get_args(annotation):
            if str(choice) == text:
                return choice
        raise ValueError(text)
    if get_origin(annotation) is tuple:
        item_type = get_args(annotation)[0]
        items = [item.strip() for item in text.split(",") if item.strip()]
        return tuple(_convert(item, item_type) for item in items)
    raise ValueError(text)


def _matches(value: Any, annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, member) for member in get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is Literal:
        return value in get_args(annotation)
    if origin is tuple:
        item_type = get_args(annotation)[0]
        return isinstance(value, tuple) and all(_matches(item, item_type) for item in value)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return False


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(member) for member in get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in get_args(annotation))
    if origin is tuple:
        return f"a comma-separated list of {_type_name(get_args(annotation)[0])}"
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))
