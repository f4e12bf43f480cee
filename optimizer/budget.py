"""Accuracy budget: the most compression whose task metric stays within ``max_drop``.

Start from the requested compression. If the metric misses the budget, rank the compressed
layers by harm and back off the most harmful first (a backed-off layer is excluded from the
passes that compress it), re-measuring until the budget holds or nothing is left to back off.

Ranking: every layer's own gain when it alone is backed off (leave-one-out), measured when the
trial budget allows; otherwise the per-layer output SQNR of the first trial. Then a k-ary search
finds the fewest top-ranked layers to back off; each round evaluates ``workers`` candidates in
parallel processes, which die with the process that started them. Trials are bounded by
``max_trials``, and every onnxruntime run in them by ``timeout_s``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from optimizer.errors import OptionError
from optimizer.fileio.model import LAZY_LOAD_ABOVE_BYTES, load_model_with_files
from optimizer.graph.patterns import exact_name_pattern
from optimizer.pass_base import Pass, PassContext
from optimizer.pipeline import Pipeline
from optimizer.progress import progress_bar
from optimizer.verify.isolation import die_with_parent, spawn_without_main_script
from optimizer.verify.layer_debug import debug_layers
from optimizer.verify.metrics import Metric, Outputs, collect_outputs, load_metric
from optimizer.verify.runtime import DEFAULT_TIMEOUT_S, checked_timeout

Feed = dict[str, np.ndarray]
STAGE = "accuracy budget"


MOSTLY_UNDONE = 0.9
"""Backing off this share of the compressed layers or more leaves little compression: say so."""


@dataclass(frozen=True)
class MetricSpec:
    """A metric that can be rebuilt in a worker process: a built-in name or package.module:function."""

    spec: str
    higher_is_better: bool | None = None
    output: str | None = None

    def build(self) -> Metric:
        return load_metric(self.spec, higher_is_better=self.higher_is_better, output=self.output)


@dataclass
class BudgetStep:
    step: int
    action: str
    backed_off: list[str]
    value: float
    drop: float
    met: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "action": self.action,
            "backed_off": list(self.backed_off),
            "value": self.value,
            "drop": self.drop,
            "met": self.met,
        }


@dataclass
class BudgetResult:
    metric: str
    baseline: float
    max_drop: float
    met: bool
    value: float
    backed_off: list[str]
    ranking: list[str]
    ranking_method: str
    trials: int
    steps: list[BudgetStep]
    higher_is_better: bool
    model: onnx.ModelProto | None = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "baseline": self.baseline,
            "max_drop": self.max_drop,
            "met": self.met,
            "value": self.value,
            "drop": self.drop,
            "backed_off": list(self.backed_off),
            "ranking": list(self.ranking),
            "ranking_method": self.ranking_method,
            "trials": self.trials,
            "steps": [step.to_dict() for step in self.steps],
        }

    def mostly_undone(self, share: float = MOSTLY_UNDONE) -> bool:
        """True when the budget held only with most compressed layers backed off to float."""
        return bool(self.ranking) and len(self.backed_off) >= share * len(self.ranking)

    def mostly_undone_text(self) -> str:
        return (
            f"accuracy budget: {len(self.backed_off)} of {len(self.ranking)} compressed layers had to be backed off "
            f"({'met' if self.met else 'not met'}): little compression is left; loosen --max-drop, or try another "
            "mode (e.g. --quantize-mode weights)"
        )

    @property
    def drop(self) -> float:
        return self.baseline - self.value if self.higher_is_better else self.value - self.baseline


def final_budget_check(
    reference: Any,
    candidate: Any,
    feeds: Sequence[Feed],
    budget: BudgetResult,
    spec: MetricSpec,
    *,
    provider: str,
    timeout_s: float | None,
) -> tuple[bool, str]:
    """The budget's own metric, on the same feeds, for the file that will be written: the final
    verdict of a run with --max-drop (the search and the final check can then never disagree)."""
    metric, runtime = spec.build(), _Runtime(provider, timeout_s)
    value = metric(runtime.outputs(reference, feeds), runtime.outputs(candidate, feeds))
    drop = metric.drop(budget.baseline, value)
    met = drop <= budget.max_drop
    text = f"accuracy budget: {budget.metric} {value:.6g}, drop {drop:.3g} {'<=' if met else '>'} {budget.max_drop:g}"
    return met, text


def backed_off_passes(passes: Sequence[Pass], layers: Sequence[str]) -> list[Pass]:
    """``passes`` with an exact-name pattern for every layer in ``layers`` added to the exclusion
    option (``Pass.backoff_option``) of each pass that has one; the Pass objects are kept, not rebuilt."""
    patterns = tuple(exact_name_pattern(layer) for layer in sorted(layers))
    if not patterns:
        return list(passes)
    return [
        dataclasses.replace(item, **{item.backoff_option: (*getattr(item, item.backoff_option), *patterns)})
        if item.backoff_option
        else item
        for item in passes
    ]


def search_budget(
    model: onnx.ModelProto,
    passes: Sequence[Pass],
    metric: MetricSpec,
    feeds: Sequence[Feed],
    *,
    max_drop: float,
    max_trials: int = 24,
    workers: int = 1,
    provider: str = "cpu",
    calibration: Sequence[Feed] | None = None,
    progress: bool = False,
    worker_imports: Sequence[str] = (),
    model_path: str | None = None,
    return_model: bool = True,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    allow_symlinks_under: Sequence[str] = (),
) -> BudgetResult:
    """Compress with ``passes``; back off layers until ``metric`` drops by at most ``max_drop``.

    ``worker_imports`` names modules a worker process imports first (``module`` or
    ``module:function`` to also call a function), e.g. ``("passes",)`` so the pass registry is
    filled there too (the passes are pickled to the workers). ``model_path``, when the model came
    from a file, lets workers load it themselves (lazily loaded weights are only readable by the
    process that checked them), with the same ``allow_symlinks_under`` folders as the caller's load.
    ``return_model=False`` skips the final compression for callers that run the chosen passes
    themselves (BudgetResult.model is then None). Every onnxruntime run (trials, ranking) is bounded
    by ``timeout_s`` (``RunTimeoutError``).
    """
    if max_drop < 0 or max_trials < 1 or workers < 1:
        raise OptionError("max_drop must be >= 0, max_trials >= 1 and workers >= 1")
    if not any(item.backoff_option for item in passes):
        raise OptionError("no pass in the pipeline can back off a layer (quantize or prune)")
    checked_timeout(timeout_s)
    state = _SearchState(
        model,
        list(passes),
        metric,
        list(feeds),
        list(calibration or []),
        _Runtime(provider, timeout_s),
        max_drop,
        max_trials,
        workers,
        progress,
        tuple(worker_imports),
        (model_path, tuple(allow_symlinks_under)) if model_path else None,
        return_model,
    )
    try:
        return state.run()
    finally:
        state.close()


@dataclass(frozen=True)
class _Runtime:
    """Where trials run the model, and how long one onnxruntime run may take."""

    provider: str
    timeout_s: float | None

    def outputs(self, model, feeds) -> Outputs:
        return collect_outputs(model, feeds, provider=self.provider, timeout_s=self.timeout_s, stage=STAGE)


class _SearchState:
    def __init__(
        self,
        model,
        passes,
        metric,
        feeds,
        calibration,
        runtime: _Runtime,
        max_drop,
        max_trials,
        workers,
        progress,
        worker_imports,
        worker_source,
        return_model,
    ) -> None:
        self.model, self.passes, self.metric_spec = model, passes, metric
        self.feeds, self.calibration, self.runtime = feeds, calibration, runtime
        self.max_drop, self.max_trials, self.workers = max_drop, max_trials, workers
        self.return_model = return_model
        self.metric = metric.build()
        self.reference = runtime.outputs(model, feeds)
        self.baseline = self.metric(self.reference, self.reference)
        self.results: dict[frozenset[str], float] = {}
        self.steps: list[BudgetStep] = []
        self.bar = progress_bar(total=max_trials, desc="budget trials", unit="trial", enabled=progress)
        self.pool = self.lifeline = None
        if workers > 1:
            context = multiprocessing.get_context("spawn")
            self.lifeline = context.Pipe(duplex=False)
            self.pool = ProcessPoolExecutor(
                workers,
                mp_context=context,
                initializer=_init_worker,
                initargs=(
                    (self.lifeline[0], os.getpid()),
                    worker_imports,
                    worker_source or model.SerializeToString(),
                    passes,
                    metric,
                    feeds,
                    calibration,
                    runtime,
                    self.reference,
                ),
            )

    def close(self) -> None:
        self.bar.close()
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        for end in self.lifeline or ():
            end.close()

    def run(self) -> BudgetResult:
        first = self.evaluate([frozenset()], "requested compression")[0]
        if self.met(first):
            return self.finish(frozenset(), [], "none needed")
        layers, method = self.rank()
        if not layers:
            return self.finish(frozenset(), [], "no compressed layer found")
        chosen = self.search_count(layers)
        return self.finish(chosen, layers, method)

    def met(self, value: float) -> bool:
        return self.metric.drop(self.baseline, value) <= self.max_drop

    def evaluate(self, candidates: Sequence[frozenset[str]], action: str) -> list[float]:
        todo = [c for c in dict.fromkeys(candidates) if c not in self.results]
        todo = todo[: max(0, self.max_trials - len(self.results))]
        if self.pool is not None and len(todo) > 1:
            with spawn_without_main_script():
                values = list(self.pool.map(_worker_trial, [sorted(c) for c in todo]))
        else:
            values = [
                _trial(
                    self.model,
                    self.passes,
                    self.metric,
                    self.feeds,
                    self.calibration,
                    self.runtime,
                    self.reference,
                    sorted(c),
                )
                for c in todo
            ]
        for candidate, value in zip(todo, values, strict=True):
            self.results[candidate] = value
            drop = self.metric.drop(self.baseline, value)
            met = drop <= self.max_drop
            self.steps.append(BudgetStep(len(self.steps), action, sorted(candidate), value, drop, met))
            self.bar.update(1)
        return [self.results.get(c, math.nan) for c in candidates]

    def rank(self) -> tuple[list[str], str]:
        """Layers worst first: leave-one-out gains when affordable, else output SQNR."""
        compressed = _compress(self.model, self.passes, [], self.calibration, self.runtime)
        report = debug_layers(
            self.model,
            compressed,
            self.feeds[: max(1, min(4, len(self.feeds)))],
            provider=self.runtime.provider,
            timeout_s=self.runtime.timeout_s,
        )
        layers = list(dict.fromkeys(layer.reference_node for layer in report.layers))
        searches = math.ceil(math.log2(len(layers) + 1)) + 1 if layers else 0
        if len(layers) + searches > self.max_trials - len(self.results):
            return layers, "per-layer output SQNR (trial budget too small for leave-one-out)"
        values = self.evaluate([frozenset([layer]) for layer in layers], "leave-one-out")
        gains = {
            layer: self.metric.drop(self.baseline, self.results[frozenset()]) - self.metric.drop(self.baseline, v)
            for layer, v in zip(layers, values, strict=True)
        }
        order = sorted(layers, key=lambda layer: (-gains[layer], layers.index(layer)))
        return order, "leave-one-out gain"

    def search_count(self, layers: list[str]) -> frozenset[str]:
        """Fewest top-ranked layers whose back-off meets the budget (k-ary search)."""
        low, high = 0, len(layers)
        everything = frozenset(layers)
        if not self.met(self.evaluate([everything], "back off all ranked layers")[0]):
            return everything
        while high - low > 1 and len(self.results) < self.max_trials:
            count = min(self.workers, high - low - 1)
            points = sorted({low + max(1, round((high - low) * (i + 1) / (count + 1))) for i in range(count)})
            points = [p for p in points if low < p < high]
            values = self.evaluate([frozenset(layers[:p]) for p in points], "back off the top-ranked layers")
            passing = [p for p, v in zip(points, values, strict=True) if not math.isnan(v) and self.met(v)]
            failing = [p for p, v in zip(points, values, strict=True) if not math.isnan(v) and not self.met(v)]
            if not passing and not failing:
                break
            high = min(passing, default=high)
            low = max([p for p in failing if p < high], default=low)
        return frozenset(layers[:high])

    def finish(self, chosen: frozenset[str], ranking: list[str], method: str) -> BudgetResult:
        value = self.results.get(chosen)
        model = None
        if self.return_model or value is None:
            model = _compress(self.model, self.passes, sorted(chosen), self.calibration, self.runtime)
        if value is None:
            value = self.metric(self.reference, self.runtime.outputs(model, self.feeds))
        return BudgetResult(
            self.metric.name,
            self.baseline,
            self.max_drop,
            self.met(value),
            value,
            sorted(chosen),
            ranking,
            method,
            len(self.results),
            self.steps,
            self.metric.higher_is_better,
            model,
        )


def _compress(model, passes, layers, calibration, runtime: _Runtime) -> onnx.ModelProto:
    context = PassContext(
        calibration=(lambda: iter(calibration)) if calibration else None,
        provider=runtime.provider,
        timeout_s=runtime.timeout_s,
    )
    return Pipeline(backed_off_passes(passes, layers), context=context).run(model).model


def _trial(
    model, passes, metric: Metric, feeds, calibration, runtime: _Runtime, reference: Outputs, layers: list[str]
) -> float:
    compressed = _compress(model, passes, layers, calibration, runtime)
    return metric(reference, runtime.outputs(compressed, feeds))


_WORKER: dict[str, Any] = {}


def _init_worker(
    parent: tuple,
    imports,
    model_source: tuple[str, tuple[str, ...]] | bytes,
    passes,
    metric_spec: MetricSpec,
    feeds,
    calibration,
    runtime: _Runtime,
    reference,
) -> None:
    die_with_parent(*parent)
    for name in imports:
        module_name, _, function = name.partition(":")
        module = importlib.import_module(module_name)
        if function:
            getattr(module, function)()
    if isinstance(model_source, tuple):
        path, roots = model_source
        model = load_model_with_files(path, lazy_above_bytes=LAZY_LOAD_ABOVE_BYTES, allow_symlinks_under=roots)[0]
    else:
        model = onnx.load_from_string(model_source)
    _WORKER.update(
        model=model,
        passes=passes,
        metric=metric_spec.build(),
        feeds=feeds,
        calibration=calibration,
        runtime=runtime,
        reference=reference,
    )


def _worker_trial(layers: list[str]) -> float:
    w = _WORKER
    return _trial(
        w["model"], w["passes"], w["metric"], w["feeds"], w["calibration"], w["runtime"], w["reference"], layers
    )


def budget_layers(budget: BudgetResult) -> list[dict[str, Any]]:
    """The final per-layer choice: every ranked layer, compressed or backed off, and why."""
    rows = []
    for rank, layer in enumerate(budget.ranking):
        backed_off = layer in budget.backed_off
        rows.append(
            {
                "node": layer,
                "status": "backed off (kept uncompressed)" if backed_off else "compressed",
                "reason": f"rank {rank + 1} by {budget.ranking_method}" if backed_off else "",
            }
        )
    return rows
