"""The pass contract: a pass takes a graph and returns a PassResult with a report.

A pass is a frozen, keyword-only dataclass whose fields are its typed options; the registry
reads those fields to check options and build the CLI's help. ``__call__`` checks the contract
around ``run`` so a pass cannot return a half-filled result.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.errors import PassError
from optimizer.verify.run_limit import DEFAULT_TIMEOUT_S, checked_timeout


def option(default: Any, help: str) -> Any:
    """A pass option with its default and the help text shown by the CLI."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("pass options must be immutable: use a tuple")
    return field(default=default, metadata={"help": help})


@dataclass
class PassReport:
    """What a pass did: counts, bytes saved, and every skip with its reason."""

    counts: dict[str, int] = field(default_factory=dict)
    saved_bytes: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def count(self, key: str, amount: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + amount

    def skip(self, what: str, name: str, reason: str) -> None:
        """Record that ``what`` ("node", "tensor", ...) named ``name`` was left alone, and why."""
        self.skipped.append({what: name, "reason": reason})

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "saved_bytes": self.saved_bytes,
            "skipped": list(self.skipped),
            **({"details": self.details} if self.details else {}),
        }


CalibrationFactory = Callable[[], Iterator[Mapping[str, np.ndarray]]]


@dataclass(frozen=True)
class PassContext:
    """What a pass may need besides the graph: data to run the model on, and where to run it.

    ``calibration`` is a factory: each call yields the calibration feeds anew (a pass may need
    several passes over the data, e.g. ranges first, then histograms). ``timeout_s`` bounds each
    onnxruntime run a pass makes (None: no limit); a run past it raises ``RunTimeoutError``.
    ``memo`` holds what a pass measured on this context's data, for a later run of a pass on the
    same context to reuse (auto mode builds static int8 several times on one model and data:
    calibration ranges are measured once); keys name the pass and what the value depends on.
    """

    calibration: CalibrationFactory | None = None
    provider: str = "cpu"
    progress: bool = False
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    model_folder: Path | None = None
    """Where the model file is, when it has one (a decoder's genai_config.json lives there)."""
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        checked_timeout(self.timeout_s)

    def calibration_feeds(self, pass_name: str) -> Iterator[Mapping[str, np.ndarray]]:
        if self.calibration is None:
            raise PassError(f"pass '{pass_name}' needs calibration data (--calibration-data DIR or calibration=...)")
        return self.calibration()


@dataclass
class PassResult:
    graph: gs.Graph
    modified: bool
    report: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Pass(abc.ABC):
    """Base of every pass. ``optimizer.registry.register`` makes a subclass a frozen keyword-only
    dataclass; an unregistered one (a test's) is decorated ``@dataclass(frozen=True, kw_only=True)``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    lossless: ClassVar[bool] = False
    required_provider: ClassVar[str | None] = None
    """An execution provider the pass's output needs ("cuda" for bfloat16 compute): the pass refuses
    (OptionError) when the context's provider does not resolve to it."""
    backoff_option: ClassVar[str | None] = None
    """A tuple-of-patterns option that leaves matching node names uncompressed (``re:`` regex or
    glob), so the accuracy budget search can back a layer off; None if the pass has none."""
    soften_option: ClassVar[str | None] = None
    """A tuple-of-patterns option that compresses matching node names less, in the pass's next-best
    format (quantize: weight-only int8): the budget's first back-off step before ``backoff_option``."""
    measured_option: ClassVar[str | None] = None
    """An option whose value 'auto' optimize() resolves by measurement (``optimizer.auto_mode``):
    each of ``measured_choices`` (most accurate first) is built, checked and timed."""
    measured_choices: ClassVar[tuple[str, ...]] = ()
    softened_choices: ClassVar[tuple[str, ...]] = ()
    """Values of ``measured_option`` that auto mode, when one fails its check, tries again with
    ``unclipped_options`` and then with its first groups backed off to ``soften_option`` (quantize:
    static, whose 8-bit activations can be backed off one group at a time to weight-only int8)."""
    unmeasured_choice: ClassVar[str | None] = None
    """The value 'auto' takes when nothing can be measured (no calibration data, or the pass alone)."""
    refine_option: ClassVar[str | None] = None
    """A tuple-of-patterns option that keeps matching node names in the requested format with finer
    granularity (quantize: 4-bit blocks of 32): the bits budget's step before ``soften_option``."""
    rows_option: ClassVar[str | None] = None
    """A float option: the fraction of a tied table's rows (an embedding also read as the LM head)
    kept in the next-best format because the calibration data uses them most (quantize:
    frequent_rows); the bits budget tries each of ``rows_choices`` as one more step up."""
    rows_choices: ClassVar[tuple[float, ...]] = ()
    block_option: ClassVar[str | None] = None
    """An int option that sets the block length of blocked low-bit weights (quantize: block_size):
    the bits budget (``optimizer.bits_budget``) doubles it when the budget needs fewer scale bytes."""

    def unclipped_options(self) -> dict[str, Any]:
        """Option changes that make a value of ``softened_choices`` keep more of each calibrated
        range (quantize static: percentile 100 instead of 99.999), tried by auto mode when that
        value fails its check, before groups are backed off; {} when there are none."""
        return {}

    def blocked(self) -> bool:
        """Whether ``block_option`` applies to what this pass writes (quantize: 4-bit weights)."""
        return self.block_option is not None

    def refinable(self) -> bool:
        """Whether ``refine_option`` would make what this pass writes finer (quantize: blocks longer
        than the finest, 32)."""
        return self.refine_option is not None

    def only_choice(self) -> tuple[str, str] | None:
        """The one value of ``measured_option`` the other options leave, and why (quantize 4-bit:
        weights, since dynamic and static are 8-bit), or None: 'auto' then measures the choices."""
        return None

    def trial_options(self) -> dict[str, Any]:
        """Option changes that make a ranking trial cheap while it still ranks layers the same way
        (quantize: nearest rounding instead of GPTQ); {} when there are none."""
        return {}

    def __call__(self, graph: gs.Graph, context: PassContext | None = None) -> PassResult:
        if not isinstance(graph, gs.Graph):
            raise PassError(f"pass '{self.name}' expects an onnx_graphsurgeon Graph, got {type(graph).__name__}")
        result = self.run(graph, context or PassContext())
        self._check_result(result)
        return result

    @abc.abstractmethod
    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        """Rewrite ``graph`` (in place or not) and say what was done."""

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _check_result(self, result: object) -> None:
        if not isinstance(result, PassResult) or not isinstance(result.graph, gs.Graph):
            raise PassError(f"pass '{self.name}' returned {type(result).__name__}, not a PassResult")
        if not isinstance(result.modified, bool) or not isinstance(result.report, dict):
            raise PassError(f"pass '{self.name}' returned a result without a bool 'modified' and a dict 'report'")
        for entry in result.report.get("skipped", []):
            if not entry.get("reason"):
                raise PassError(f"pass '{self.name}' skipped {entry} without a reason")
        try:
            json.dumps(result.report)
        except (TypeError, ValueError) as error:
            raise PassError(f"pass '{self.name}' report is not JSON-serializable: {error}") from error
