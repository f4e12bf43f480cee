"""Calibration: activation ranges for static quantization, in bounded memory.

The model runs one sample at a time with the requested tensors exposed as outputs, and every
output updates a per-tensor streaming statistic (``calibration_histogram``) before the next
run, so memory depends on one sample's activations and the histogram size, never on the number
of samples. When one sample's exposed tensors would exceed ``memory_budget_bytes``, the tensors
are split into groups, each run by its own pruned model: every extra group costs one more
(partial) model run per sample, traded for a bounded peak.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import onnx

from optimizer.calibration.expose import (
    FLOAT_TYPES,
    SUBGRAPH_ONLY,
    UNKNOWN_TENSOR,
    TensorCatalog,
    build_catalog,
    expose_outputs,
    group_by_budget,
    is_float_array,
)
from optimizer.calibration.histogram import RunningMinMax, StreamingHistogram
from optimizer.errors import FeedError, OptionError
from optimizer.fileio.external_data import memory_available_bytes
from optimizer.fileio.model import fits_one_message
from optimizer.fileio.save import save_model
from optimizer.progress import progress_bar
from optimizer.verify.runtime import (
    DEFAULT_TIMEOUT_S,
    ProviderChoice,
    Session,
    checked_timeout,
    create_session,
    resolve_provider,
    run_session,
)

__all__ = [
    "CalibrationResult",
    "Method",
    "RunningMinMax",
    "StreamingHistogram",
    "TensorRange",
    "collect_ranges",
    "expose_outputs",
    "statistic_family",
    "statistic_range",
]

Method = Literal["minmax", "percentile", "entropy", "mse"]
METHODS: tuple[str, ...] = get_args(Method)
Feed = Mapping[str, np.ndarray]
FeedSource = Iterable[Feed] | Callable[[], Iterable[Feed]]

DEFAULT_MEMORY_BUDGET_BYTES = 2 * 2**30
"""The exposed outputs of one sample's run, at most, unless memory is short: every group past the
first costs a (partial) model run per sample. PP-OCRv4 det at 736x736 exposes 0.9 GB a sample;
at 512 MB it ran in 3 groups (23 runs for 9 samples) and calibrated in 6.1 s, in one group in 4.3 s."""
AVAILABLE_SHARE = 8
"""The budget is at most this share of the memory available now (``memory_available_bytes``:
MemAvailable, the cgroup's limit left, RLIMIT_AS), so parallel workers and other processes fit."""
UNKNOWN_MEMORY_BUDGET_BYTES = 512 * 2**20
"""The budget when the available memory cannot be read."""
MIN_MEMORY_BUDGET_BYTES = 64 * 2**20

REGROUP_SLACK = 1.25
"""Groups are rebuilt when a sample's outputs exceed the budget by this factor (or when the
observed sizes allow fewer groups than the first estimate)."""


@dataclass(frozen=True)
class TensorRange:
    """The float range to map onto the integer grid; always ``low <= 0 <= high``."""

    low: float
    high: float
    samples: int


Statistic = RunningMinMax | StreamingHistogram


@dataclass
class CalibrationResult:
    ranges: dict[str, TensorRange]
    skipped: dict[str, str]
    samples: int
    seconds: float
    method: str
    notes: list[str] = field(default_factory=list)
    statistics: dict[str, tuple[Statistic, int]] = field(default_factory=dict)
    """With ``keep_statistics``: each ranged tensor's statistic and sample count, from which
    ``statistic_range`` gives the range of another method of the same family (any percentile)."""


def statistic_family(method: str) -> str:
    """Methods whose statistics are interchangeable: ranges of one can be read off another's."""
    return "minmax" if method == "minmax" else f"histogram, zeros {'counted' if method == 'mse' else 'skipped'}"


def statistic_range(
    statistic: Statistic, *, method: Method, percentile: float = 99.999, num_bits: int = 8, symmetric: bool = False
) -> tuple[float, float]:
    """The range ``method`` reads off ``statistic`` (collected for a method of the same family)."""
    options = _Options(method, percentile, num_bits, symmetric, 2048, None, 1)
    return options.range_of(statistic)


@dataclass(frozen=True)
class _Options:
    method: str
    percentile: float
    num_bits: int
    symmetric: bool
    bins: int
    max_outputs_per_run: int | None
    memory_budget_bytes: int
    max_binned: int | None = 1 << 16
    max_samples: int | None = None
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    stage: str = "calibration"

    def __post_init__(self) -> None:
        checked_timeout(self.timeout_s)
        if self.method not in METHODS:
            raise OptionError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not isinstance(self.percentile, (int, float)) or not 0.0 < self.percentile <= 100.0:
            raise OptionError(f"percentile must be a number in (0, 100]; got {self.percentile!r}")
        if not isinstance(self.num_bits, int) or not 2 <= self.num_bits <= 16:
            raise OptionError(f"num_bits must be an integer from 2 to 16; got {self.num_bits!r}")
        if not isinstance(self.bins, int) or self.bins < 16:
            raise OptionError(f"bins must be an integer >= 16; got {self.bins!r}")
        if self.max_outputs_per_run is not None and (
            not isinstance(self.max_outputs_per_run, int) or self.max_outputs_per_run < 1
        ):
            raise OptionError(
                f"max_outputs_per_run must be a positive integer or None; got {self.max_outputs_per_run!r}"
            )
        if not isinstance(self.memory_budget_bytes, int) or self.memory_budget_bytes < 1:
            raise OptionError(f"memory_budget_bytes must be a positive integer; got {self.memory_budget_bytes!r}")
        for key in ("max_binned", "max_samples"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise OptionError(f"{key} must be a positive integer or None; got {value!r}")

    def new_statistic(self) -> RunningMinMax | StreamingHistogram:
        if self.method == "minmax":
            return RunningMinMax()
        return StreamingHistogram(self.bins, count_zeros=self.method == "mse", max_binned=self.max_binned)

    def range_of(self, statistic: RunningMinMax | StreamingHistogram) -> tuple[float, float]:
        if self.method == "minmax":
            low, high = statistic.minmax()
            if self.symmetric:
                peak = max(-low, high)
                return -peak, peak
        elif not isinstance(statistic, StreamingHistogram):
            raise TypeError(f"calibration method {self.method!r} needs a histogram, got {type(statistic).__name__}")
        elif self.method == "percentile":
            low, high = statistic.percentile_range(self.percentile, symmetric=self.symmetric)
        elif self.method == "entropy":
            low, high = statistic.entropy_threshold(self.num_bits, symmetric=self.symmetric)
        else:
            low, high = statistic.mse_threshold(self.num_bits, symmetric=self.symmetric)
        return min(float(low), 0.0), max(float(high), 0.0)


def collect_ranges(
    model: onnx.ModelProto,
    tensor_names: Sequence[str],
    feeds: FeedSource,
    *,
    method: Method = "minmax",
    percentile: float = 99.999,
    num_bits: int = 8,
    symmetric: bool = False,
    bins: int = 2048,
    provider: str = "cpu",
    progress: bool = False,
    max_outputs_per_run: int | None = None,
    memory_budget_bytes: int | None = None,
    max_binned: int | None = 1 << 16,
    max_samples: int | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    stage: str = "calibration",
    keep_statistics: bool = False,
) -> CalibrationResult:
    """Range of every tensor in ``tensor_names`` over the samples of ``feeds`` (an iterable of
    ``{input name: array}``, read once, one sample at a time, or a callable returning one).

    Initializers are ranged from their values, graph inputs from the feeds, every other main-graph
    tensor by running the model; one that cannot be ranged is in ``skipped`` with the reason.
    ``memory_budget_bytes`` (default ``default_memory_budget()``) bounds the exposed outputs of one
    run. ``bins`` is per side of zero; ``max_binned`` caps the values of one array that are binned. At
    most ``max_samples`` samples are read (``notes`` say when that cut the feeds short). A run longer
    than ``timeout_s`` raises ``RunTimeoutError`` naming ``stage`` (e.g. "static calibration").
    """
    budget = default_memory_budget() if memory_budget_bytes is None else memory_budget_bytes
    settings = (bins, max_outputs_per_run, budget, max_binned, max_samples, timeout_s, stage)
    options = _Options(method, percentile, num_bits, symmetric, *settings)
    choice = resolve_provider(provider)
    started = time.perf_counter()
    samples, first = _first_sample(feeds)
    catalog = build_catalog(model, {name: np.shape(value) for name, value in first.items()})
    plan = _Plan.make(catalog, tensor_names)
    statistics = {name: options.new_statistic() for name in (*plan.run, *plan.inputs)}
    seen = dict.fromkeys(statistics, 0)
    input_bytes = sum(int(np.asarray(value).nbytes) for value in first.values())
    runner = _GroupRunner(model, plan.run, catalog, options, choice, input_bytes)
    pending = [first]
    del first
    with progress_bar(total=_total(feeds, max_samples), desc="calibrating", unit="sample", enabled=progress) as bar:
        count, stopped = _observe_all(pending, samples, runner, plan, statistics, seen, max_samples, bar)
    ranges = _ordered(_finish(plan, statistics, seen, options, catalog, count), tensor_names)
    notes = [note for note in (choice.note, stopped) if note]
    notes += [f"{runner.rebuilds} regrouping(s); final groups: {len(runner.groups)}"]
    elapsed = time.perf_counter() - started
    kept = {name: (statistics[name], seen[name]) for name in ranges} if keep_statistics else {}
    return CalibrationResult(ranges, _ordered(plan.skipped, tensor_names), count, elapsed, method, notes, kept)


def default_memory_budget() -> int:
    """``DEFAULT_MEMORY_BUDGET_BYTES``, or an eighth of the memory available now when that is less
    (``UNKNOWN_MEMORY_BUDGET_BYTES`` when it cannot be read)."""
    available = memory_available_bytes()
    if available is None:
        return UNKNOWN_MEMORY_BUDGET_BYTES
    return max(MIN_MEMORY_BUDGET_BYTES, min(DEFAULT_MEMORY_BUDGET_BYTES, available // AVAILABLE_SHARE))


def _first_sample(feeds: FeedSource) -> tuple[Iterator[Feed], Feed]:
    """The samples of ``feeds`` and the first of them (its shapes plan the runs); empty feeds are refused."""
    samples = _samples(feeds)
    first = next(samples, None)
    if first is None:
        raise FeedError("no calibration samples: the feeds are empty")
    return samples, first


def _total(feeds: FeedSource, max_samples: int | None) -> int | None:
    """How many samples calibration will read, when the feeds know their length."""
    total = len(feeds) if isinstance(feeds, Sequence) else None
    return min(total, max_samples) if total is not None and max_samples is not None else total


def _observe_all(
    pending: list[Feed],
    samples: Iterator[Feed],
    runner: _GroupRunner,
    plan: _Plan,
    statistics: dict,
    seen: dict,
    max_samples: int | None,
    bar: Any,
) -> tuple[int, str | None]:
    """Feed every sample to the statistics, one at a time; return (samples read, why reading stopped early).

    ``pending`` holds the already-read first sample in a list the iterator empties, so the caller
    keeps no reference to it and no more than one sample is alive at a time.
    """
    count = 0
    for feed in _prepend(pending, samples):
        runner.observe(feed, statistics, seen, plan.skipped)
        for name in plan.inputs:
            _add_input(name, feed, statistics, seen, plan.skipped)
        count += 1
        runner.regroup_if_needed()
        bar.update(1)
        if max_samples is not None and count >= max_samples:
            if next(samples, None) is not None:
                return count, f"read the first {count} samples (max_samples); the feeds hold more"
            break
    return count, None


def _samples(feeds: FeedSource) -> Iterator[Feed]:
    source = feeds() if callable(feeds) and not isinstance(feeds, Iterable) else feeds
    if not isinstance(source, Iterable):
        raise FeedError(f"feeds must be an iterable of dicts or a callable returning one; got {type(source).__name__}")
    return iter(source)


def _prepend(pending: list[Feed], rest: Iterator[Feed]) -> Iterator[Feed]:
    """The peeked sample, then the rest; the list is emptied so nothing keeps the sample alive."""
    yield pending.pop()
    yield from rest


@dataclass
class _Plan:
    """Requested tensors sorted by how they are ranged; ``run`` is in graph order."""

    run: list[str]
    inputs: list[str]
    constants: list[str]
    skipped: dict[str, str]

    @classmethod
    def make(cls, catalog: TensorCatalog, tensor_names: Sequence[str]) -> _Plan:
        plan = cls([], [], [], {})
        for name in dict.fromkeys(tensor_names):
            elem_type = catalog.elem_types.get(name)
            if elem_type is not None and elem_type not in FLOAT_TYPES:
                type_name = onnx.TensorProto.DataType.Name(elem_type).lower()
                plan.skipped[name] = f"not a float tensor ({type_name})"
            elif name in catalog.initializers:
                plan.constants.append(name)
            elif name in catalog.inputs:
                plan.inputs.append(name)
            elif name in catalog.produced:
                plan.run.append(name)
            else:
                plan.skipped[name] = SUBGRAPH_ONLY if name in catalog.subgraph_names else UNKNOWN_TENSOR
        plan.run.sort(key=lambda name: catalog.produced[name])
        return plan


def _add_input(name: str, feed: Feed, statistics: dict, seen: dict, skipped: dict[str, str]) -> None:
    if name in skipped:
        return
    if name not in feed:
        raise FeedError(f"calibration sample has no input {name!r}")
    value = np.asarray(feed[name])
    if not is_float_array(value):
        skipped[name] = f"not a float tensor ({value.dtype})"
        return
    statistics[name].add(value)
    seen[name] += 1


class _GroupRunner:
    """Runs the sample through one pruned model per group of tensors and feeds the statistics."""

    def __init__(
        self,
        model: onnx.ModelProto,
        names: list[str],
        catalog: TensorCatalog,
        options: _Options,
        choice: ProviderChoice,
        input_bytes: int,
    ) -> None:
        self.model, self.names, self.options, self.choice = model, names, options, choice
        self.elem_types = catalog.elem_types
        # A size shape inference could not tell is guessed as the largest known one, or (none
        # known: a torch export whose Slice ends come from Shape ops, say) one sample's inputs.
        # Guessing the whole budget gave all-MiniLM-L6-v2 one session per tensor: 48 copies of
        # the weights, 5 GB and 30 s. The first sample's real sizes regroup either guess.
        known = [catalog.nbytes[name] for name in names if name in catalog.nbytes]
        fallback = max(known, default=max(input_bytes, 1))
        self.estimates = {name: catalog.nbytes.get(name, fallback) for name in names}
        self.observed: dict[str, int] = {}
        self.rebuilds = 0
        self._settled = False
        self.groups: list[list[str]] = []
        self.sessions: list = []
        self._build(self._grouping(self.estimates))

    def _grouping(self, sizes: Mapping[str, int]) -> list[list[str]]:
        return group_by_budget(
            self.names,
            sizes,
            budget_bytes=self.options.memory_budget_bytes,
            max_per_group=self.options.max_outputs_per_run,
        )

    def _build(self, groups: list[list[str]]) -> None:
        self.sessions = []
        self.groups = groups
        for group in groups:
            self.sessions.append(_group_session(self.model, group, self.choice, self.elem_types))

    def observe(self, feed: Feed, statistics: dict, seen: dict, skipped: dict[str, str]) -> None:
        for index, session in enumerate(self.sessions):
            outputs = run_session(
                session,
                feed,
                label=f"calibration model (group {index + 1} of {len(self.sessions)})",
                stage=self.options.stage,
                timeout_s=self.options.timeout_s,
            )
            for name in self.groups[index]:
                value = outputs.pop(name)
                self.observed[name] = max(self.observed.get(name, 0), value.nbytes)
                if name in skipped:
                    continue
                if not is_float_array(value):
                    skipped[name] = f"not a float tensor ({value.dtype})"
                    continue
                statistics[name].add(value)
                seen[name] += 1
                del value
            del outputs

    def regroup_if_needed(self) -> None:
        """Rebuild the groups from observed sizes when the estimates were off."""
        sizes = {name: self.observed.get(name, self.estimates[name]) for name in self.names}
        budget = self.options.memory_budget_bytes
        over = any(len(group) > 1 and sum(sizes[n] for n in group) > budget * REGROUP_SLACK for group in self.groups)
        first_check, self._settled = not self._settled, True
        if not (over or first_check):
            return
        groups = self._grouping(sizes)
        if groups != self.groups and (over or len(groups) < len(self.groups)):
            self.sessions = []
            self._build(groups)
            self.rebuilds += 1


def _group_session(
    model: onnx.ModelProto, group: list[str], choice: ProviderChoice, elem_types: Mapping[str, int]
) -> Session:
    exposed = expose_outputs(model, group, prune=True, elem_types=elem_types)
    if fits_one_message(exposed):
        return create_session(exposed.SerializeToString(), choice, memory_arena=False)[0]
    with tempfile.TemporaryDirectory(prefix="onnx-compress-calibration-") as folder:
        path = save_model(exposed, os.path.join(folder, "calibration.onnx"), external_data=True)
        del exposed
        return create_session(os.fspath(path), choice, memory_arena=False)[0]


def _finish(
    plan: _Plan, statistics: dict, seen: dict, options: _Options, catalog: TensorCatalog, count: int
) -> dict[str, TensorRange]:
    ranges: dict[str, TensorRange] = {}
    for name in plan.constants:
        statistic = options.new_statistic()
        statistic.add(onnx.numpy_helper.to_array(catalog.initializers[name]))
        seen[name] = count
        statistics[name] = statistic
    for name in (*plan.run, *plan.inputs, *plan.constants):
        if name in plan.skipped:
            continue
        statistic = statistics[name]
        if statistic.empty:
            plan.skipped[name] = "no finite value in any sample (empty, NaN or infinite)"
            continue
        low, high = options.range_of(statistic)
        ranges[name] = TensorRange(low, high, seen[name])
    return ranges


def _ordered(by_name: dict, tensor_names: Sequence[str]) -> dict:
    """Entries in the order the caller asked for them."""
    order = {name: index for index, name in enumerate(dict.fromkeys(tensor_names))}
    return dict(sorted(by_name.items(), key=lambda item: order[item[0]]))
