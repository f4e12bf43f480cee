"""Accuracy budget: the most compression whose task metric stays within ``max_drop``.

Start from the requested compression. If the metric misses the budget, rank the compressed
layers by harm and back the most harmful off first, one format at a time: first to the pass's
next-best format (``Pass.soften_option``; quantize: weight-only int8, float activations), and only
when that cannot meet the budget even for every layer, to no compression (``Pass.backoff_option``)
with the remaining layers kept in the next-best format. Re-measure until the budget holds.

Ranking: every layer's own gain when it alone is backed off to float (leave-one-out), measured
when the trial budget allows; otherwise the per-layer output SQNR of the first trial. Then a k-ary
search finds the fewest top-ranked layers to back off; each round evaluates as many candidates as
``executor`` has workers, in parallel (``optimizer.executor``: local processes or Ray actors).
When even MOSTLY_UNDONE of the layers left uncompressed miss the budget, the search stops there
(nothing worth writing is left: the budget is not met). Trials are bounded by ``max_trials``, and
every onnxruntime run in them by ``timeout_s``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from optimizer.budget_trials import (
    Backoff,
    Feed,
    MetricSpec,
    Runtime,
    backed_off_passes,
    compress,
    init_worker,
    trial,
    worker_trial,
)
from optimizer.errors import OptionError
from optimizer.executor import ExecutorOptions, TrialPool, open_pool
from optimizer.pass_base import Pass
from optimizer.progress import progress_bar
from optimizer.verify.layer_debug import debug_layers
from optimizer.verify.runtime import DEFAULT_TIMEOUT_S, checked_timeout

__all__ = [
    "Backoff",
    "BudgetResult",
    "BudgetStep",
    "MetricSpec",
    "backed_off_passes",
    "budget_layers",
    "final_budget_check",
    "search_budget",
]

MOSTLY_UNDONE = 0.9
"""Backing off this share of the compressed layers or more leaves little compression: say so."""


@dataclass
class BudgetStep:
    """One trial: ``backed_off`` layers uncompressed, ``weight_only`` ones in the next-best format."""

    step: int
    action: str
    backed_off: list[str]
    value: float
    drop: float
    met: bool
    weight_only: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "action": self.action,
            "float_layers": len(self.backed_off),
            "weight_only_layers": len(self.weight_only),
            "backed_off": list(self.backed_off),
            "weight_only": list(self.weight_only),
            "value": self.value,
            "drop": self.drop,
            "met": self.met,
        }


@dataclass
class BudgetResult:
    """The search's answer: ``backed_off`` layers left uncompressed, ``weight_only`` layers in their
    pass's next-best format (quantize: weight-only int8), the rest as requested."""

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
    weight_only: list[str] = field(default_factory=list)
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "baseline": self.baseline,
            "max_drop": self.max_drop,
            "met": self.met,
            "value": self.value,
            "drop": self.drop,
            "backed_off": list(self.backed_off),
            "weight_only": list(self.weight_only),
            "stopped_early": self.stopped_early,
            "ranking": list(self.ranking),
            "ranking_method": self.ranking_method,
            "trials": self.trials,
            "steps": [step.to_dict() for step in self.steps],
        }

    def mostly_undone(self, share: float = MOSTLY_UNDONE) -> bool:
        """True when the budget needed most compressed layers left uncompressed (or the search
        stopped because even that share missed it)."""
        return self.stopped_early or (bool(self.ranking) and len(self.backed_off) >= share * len(self.ranking))

    def mostly_undone_text(self) -> str:
        if self.stopped_early:
            return (
                f"accuracy budget not met: even {len(self.backed_off)} of {len(self.ranking)} compressed layers "
                f"uncompressed miss it (drop {self.drop:.3g} > {self.max_drop:g}), so the search stopped there; "
                "loosen --max-drop, or try another mode (e.g. --quantize-mode weights)"
            )
        return (
            f"accuracy budget: {len(self.backed_off)} of {len(self.ranking)} compressed layers had to be left "
            f"uncompressed ({'met' if self.met else 'not met'}): little compression is left; loosen --max-drop, "
            "or try another mode (e.g. --quantize-mode weights)"
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
    metric, runtime = spec.build(feeds), Runtime(provider, timeout_s)
    value = metric(runtime.outputs(reference, feeds), runtime.outputs(candidate, feeds))
    drop = metric.drop(budget.baseline, value)
    met = drop <= budget.max_drop
    text = f"accuracy budget: {budget.metric} {value:.6g}, drop {drop:.3g} {'<=' if met else '>'} {budget.max_drop:g}"
    return met, text


def search_budget(
    model: onnx.ModelProto,
    passes: Sequence[Pass],
    metric: MetricSpec,
    feeds: Sequence[Feed],
    *,
    max_drop: float,
    max_trials: int = 24,
    executor: ExecutorOptions | None = None,
    provider: str = "cpu",
    calibration: Sequence[Feed] | None = None,
    progress: bool = False,
    worker_imports: Sequence[str] = (),
    model_path: str | None = None,
    return_model: bool = True,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    allow_symlinks_under: Sequence[str] = (),
    model_folder: Path | None = None,
) -> BudgetResult:
    """Compress with ``passes``; back off layers until ``metric`` drops by at most ``max_drop``.

    ``worker_imports`` names modules a worker process imports first (``module`` or
    ``module:function`` to also call a function), e.g. ``("passes",)`` so the pass registry is
    filled there too (the passes are pickled to the workers). ``model_path``, when the model came
    from a file, lets workers load it themselves (lazily loaded weights are only readable by the
    process that checked them), with the same ``allow_symlinks_under`` folders as the caller's load.
    ``return_model=False`` skips the final compression for callers that run the chosen passes
    themselves (BudgetResult.model is then None). Every onnxruntime run (trials, ranking) is bounded
    by ``timeout_s`` (``RunTimeoutError``). ``model_folder``: the folder the model came from, for the
    passes (``PassContext.model_folder``: a decoder's genai_config.json).
    """
    if max_drop < 0 or max_trials < 1:
        raise OptionError("max_drop must be >= 0 and max_trials >= 1")
    if not any(item.backoff_option for item in passes):
        raise OptionError("no pass in the pipeline can back off a layer (quantize or prune)")
    checked_timeout(timeout_s)
    state = _SearchState(
        model,
        list(passes),
        metric,
        list(feeds),
        list(calibration or []),
        Runtime(provider, timeout_s, model_folder),
        max_drop,
        max_trials,
        executor or ExecutorOptions(),
        progress,
        tuple(worker_imports),
        (model_path, tuple(allow_symlinks_under)) if model_path else None,
        return_model,
    )
    try:
        return state.run()
    finally:
        state.close()


class _SearchState:
    def __init__(
        self,
        model,
        passes,
        metric,
        feeds,
        calibration,
        runtime: Runtime,
        max_drop,
        max_trials,
        executor: ExecutorOptions,
        progress,
        worker_imports,
        worker_source,
        return_model,
    ) -> None:
        self.model, self.passes, self.metric_spec = model, passes, metric
        self.feeds, self.calibration, self.runtime = feeds, calibration, runtime
        self.max_drop, self.max_trials, self.workers = max_drop, max_trials, executor.workers
        self.return_model = return_model
        self.softens = any(item.soften_option for item in passes)
        self.stopped_early = False
        self.metric = metric.build(feeds)
        self.reference = runtime.outputs(model, feeds)
        self.baseline = self.metric(self.reference, self.reference)
        self.results: dict[Backoff, float] = {}
        self.steps: list[BudgetStep] = []
        self.bar = progress_bar(total=max_trials, desc="budget trials", unit="trial", enabled=progress)
        self.pool: TrialPool | None = None
        if executor.parallel:
            source = worker_source or model.SerializeToString()
            initargs = (worker_imports, source, passes, metric, feeds, calibration, runtime, self.reference)
            self.pool = open_pool(executor, init_worker, initargs)

    def close(self) -> None:
        self.bar.close()
        if self.pool is not None:
            self.pool.close()

    def run(self) -> BudgetResult:
        first = self.evaluate([Backoff()], "requested compression")[0]
        if self.met(first):
            return self.finish(Backoff(), [], "none needed")
        layers, method = self.rank()
        if not layers:
            return self.finish(Backoff(), [], "no compressed layer found")
        if self.softens:
            softened = self.search_count(layers, lambda k: Backoff(weight_only=frozenset(layers[:k])), "weight-only")
            if softened is not None:
                return self.finish(softened, layers, method)
        rest = (lambda k: frozenset(layers[k:])) if self.softens else (lambda k: frozenset())
        chosen = self.search_count(
            layers, lambda k: Backoff(rest(k), frozenset(layers[:k])), "uncompressed", stop_at=MOSTLY_UNDONE
        )
        assert chosen is not None  # the float level always answers (stopped early at worst)
        return self.finish(chosen, layers, method)

    def met(self, value: float) -> bool:
        return self.metric.drop(self.baseline, value) <= self.max_drop

    def evaluate(self, candidates: Sequence[Backoff], action: str) -> list[float]:
        todo = [c for c in dict.fromkeys(candidates) if c not in self.results]
        todo = todo[: max(0, self.max_trials - len(self.results))]
        if self.pool is not None and len(todo) > 1:
            values = self.pool.map(worker_trial, todo)
        else:
            values = [self.trial(candidate) for candidate in todo]
        for candidate, value in zip(todo, values, strict=True):
            self.results[candidate] = value
            drop = self.metric.drop(self.baseline, value)
            weight_only = sorted(candidate.weight_only - candidate.uncompressed)
            step = BudgetStep(
                len(self.steps), action, sorted(candidate.uncompressed), value, drop, drop <= self.max_drop, weight_only
            )
            self.steps.append(step)
            self.bar.update(1)
        return [self.results.get(c, math.nan) for c in candidates]

    def trial(self, backoff: Backoff) -> float:
        return trial(
            self.model, self.passes, self.metric, self.feeds, self.calibration, self.runtime, self.reference, backoff
        )

    def rank(self) -> tuple[list[str], str]:
        """Layers worst first: leave-one-out gains when affordable, else output SQNR."""
        compressed = compress(self.model, self.passes, Backoff(), self.calibration, self.runtime)
        report = debug_layers(
            self.model,
            compressed,
            self.feeds[: max(1, min(4, len(self.feeds)))],
            provider=self.runtime.provider,
            timeout_s=self.runtime.timeout_s,
        )
        layers = list(dict.fromkeys(layer.reference_node for layer in report.layers))
        levels = 2 if self.softens else 1
        searches = levels * (math.ceil(math.log2(len(layers) + 1)) + 1) if layers else 0
        if len(layers) + searches > self.max_trials - len(self.results):
            return layers, "per-layer output SQNR (trial budget too small for leave-one-out)"
        values = self.evaluate([Backoff(uncompressed=frozenset([layer])) for layer in layers], "leave-one-out")
        first = self.metric.drop(self.baseline, self.results[Backoff()])
        gains = {layer: first - self.metric.drop(self.baseline, v) for layer, v in zip(layers, values, strict=True)}
        order = sorted(layers, key=lambda layer: (-gains[layer], layers.index(layer)))
        return order, "leave-one-out gain"

    def search_count(
        self, layers: list[str], choice: Callable[[int], Backoff], level: str, stop_at: float = 1.0
    ) -> Backoff | None:
        """The fewest top-ranked layers whose back-off (``choice(count)``) meets the budget, by a
        k-ary search; None when ``choice`` of every layer misses it. With ``stop_at`` < 1, the first
        trial backs off that share of the layers; when it misses, the search stops (stopped_early)."""
        low, high = 0, max(1, math.ceil(stop_at * len(layers) - 1e-9))
        widest = choice(high)
        value = self.evaluate([widest], f"{level}: top {high} of {len(layers)} layers")[0]
        if math.isnan(value):  # no trial left: finish() measures it
            return widest
        if not self.met(value):
            self.stopped_early = high < len(layers)
            return widest if stop_at < 1.0 else None
        while high - low > 1 and len(self.results) < self.max_trials:
            count = min(self.workers, high - low - 1)
            points = sorted({low + max(1, round((high - low) * (i + 1) / (count + 1))) for i in range(count)})
            points = [p for p in points if low < p < high]
            values = self.evaluate([choice(p) for p in points], f"{level}: the top-ranked layers")
            passing = [p for p, v in zip(points, values, strict=True) if not math.isnan(v) and self.met(v)]
            failing = [p for p, v in zip(points, values, strict=True) if not math.isnan(v) and not self.met(v)]
            if not passing and not failing:
                break
            high = min(passing, default=high)
            low = max([p for p in failing if p < high], default=low)
        return choice(high)

    def finish(self, chosen: Backoff, ranking: list[str], method: str) -> BudgetResult:
        value = self.results.get(chosen)
        model = None
        if self.return_model or value is None:
            model = compress(self.model, self.passes, chosen, self.calibration, self.runtime)
        if value is None:
            value = self.metric(self.reference, self.runtime.outputs(model, self.feeds))
        return BudgetResult(
            self.metric.name,
            self.baseline,
            self.max_drop,
            self.met(value),
            value,
            sorted(chosen.uncompressed),
            ranking,
            method,
            len(self.results),
            self.steps,
            self.metric.higher_is_better,
            model,
            weight_only=sorted(chosen.weight_only - chosen.uncompressed),
            stopped_early=self.stopped_early and not self.met(value),
        )


def budget_layers(budget: BudgetResult) -> list[dict[str, Any]]:
    """The final per-layer choice: every ranked layer, compressed, in the next-best format or left
    uncompressed, and why."""
    rows = []
    for rank, layer in enumerate(budget.ranking):
        if layer in budget.backed_off:
            status = "backed off (kept uncompressed)"
        elif layer in budget.weight_only:
            status = "backed off to the next-best format (quantize: weight-only int8)"
        else:
            status = "compressed"
        reason = f"rank {rank + 1} by {budget.ranking_method}" if status != "compressed" else ""
        rows.append({"node": layer, "status": status, "reason": reason})
    return rows
