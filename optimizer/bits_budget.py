"""Bits budget: the most accurate mix of formats whose stored bits per weight stay within a budget.

In the spirit of llama.cpp's k-quants and NNCF's mixed precision, but every choice is measured:
1. Base: every layer in the requested low-bit format (quantize: 4-bit). When that alone needs more
   bits per weight than the budget (scales and zero points count), the block length
   (``Pass.block_option``) doubles, up to ``MAX_BLOCK``; a budget below what the widest blocks take
   is an ``OptionError`` that names the least this model can take.
2. Sensitivity: one trial per compressed layer and step up, that layer alone one step up (finer
   blocks; the next-best format, ``Pass.soften_option``: quantize's 8-bit) and the rest as the
   base. Each trial is built with ``Pass.trial_options`` (quantize: nearest rounding, so a trial
   costs one cheap build and one run) and scored by the metric (default: KL divergence of the
   ``logits`` output's distributions) on the calibration data against the uncompressed model: the
   gain is what that layer alone gives back, its cost the bytes it adds.
   A tied embedding and LM head gets steps between the two (``Pass.rows_option``; quantize:
   ``frequent_rows``): its finer blocks with the rows the calibration text looks up most in the
   next-best format, one trial per fraction of rows (``Pass.rows_choices``).
3. Allocation: the step up with the most gain per added byte, again and again, while the budget
   holds; first a finer granularity (``Pass.refine_option``; quantize: 4-bit blocks of 32), then
   the next-best format. Layers whose trials built the same models (one weight read by two nodes,
   such as a tied embedding and LM head) are one choice.
4. Final: the mix built with the requested options (GPTQ rounding included) and measured; when it
   is over the budget (gains and bytes are not exactly additive), the last promotion is dropped.

Bits per weight are ``optimizer.graph.bit_count``'s: stored bytes of what the passes changed over
the elements they replaced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from optimizer.budget_trials import (
    Backoff,
    Feed,
    MetricSpec,
    Runtime,
    backed_off_passes,
    compress,
    compress_with_reports,
    init_worker,
    sized_trial,
    worker_sized_trial,
)
from optimizer.errors import OptionError
from optimizer.executor import ExecutorOptions, open_pool
from optimizer.fileio.model import has_lazy_tensors
from optimizer.graph.bit_count import FLOAT_TYPES, BitsMeasure, measure_bits
from optimizer.graph.inspection import weight_tensors
from optimizer.graph.walk import walk_model
from optimizer.pass_base import Pass
from optimizer.progress import progress_bar
from optimizer.verify.layer_debug import debug_layers
from optimizer.verify.metrics import LOGITS_OUTPUT

MAX_BLOCK = 256
"""The longest block onnxruntime's MatMulNBits takes."""
COARSER_START = True
"""When the requested blocks do not fit the budget everywhere, every layer starts one doubling
coarser than the widest that fits, so the allocation has bits to buy finer blocks, rows and 8-bit
where they gain most. On the benchmark's 15.7M decoder at 4.5 bits/weight (GPTQ act-order): held-out
KL 0.00136 and perplexity +0.049 from blocks of 128, against 0.00158 and +0.061 from blocks of 64
(natural order: 0.00138 and +0.077, against 0.00153 and +0.095)."""
METRIC_SAMPLES = 32
"""Calibration samples the trials score on (all of them are still used to build)."""


LEVELS = ("finer", "next-best")
"""The steps up from the requested format: ``Pass.refine_option`` (quantize: 4-bit blocks of 32),
then ``Pass.soften_option`` (quantize: 8-bit)."""
LEVEL_TEXT = {
    None: "requested format",
    "finer": "finer blocks (quantize: 4-bit, blocks of 32)",
    "next-best": "next-best format (quantize: 8-bit)",
}


def level_text(level: Level | None) -> str:
    if level is not None and level.rows:
        return f"its most-used {level.rows:g} of rows in the next-best format (quantize: 8-bit)"
    return LEVEL_TEXT[None if level is None else level.name]


@dataclass(frozen=True)
class Level:
    """One trial: a layer alone one step up, the rest as the base."""

    name: str
    value: float
    gain: float
    added_bytes: int
    rows: float = 0.0
    """The fraction of a tied table's rows this step puts in the next-best format (``Pass.rows_option``)."""


@dataclass
class LayerChoice:
    """A layer (or the layers that read one weight) and the level the allocation gave it."""

    layers: list[str]
    levels: list[Level]
    chosen: str | None = None

    def level(self, name: str | None) -> Level | None:
        return next((level for level in self.levels if level.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"node": " + ".join(self.layers), "status": level_text(self.level(self.chosen))}
        for level in self.levels:
            row[f"gain {level.name}"] = level.gain
            row[f"bytes {level.name}"] = level.added_bytes
        return row


@dataclass
class BitsResult:
    """What the budget chose and what it measured (``passes`` build the chosen mix)."""

    budget: float
    metric: str
    baseline: float
    block_size: int | None
    requested_block_size: int | None
    base: BitsMeasure
    base_value: float
    final: BitsMeasure
    value: float
    layers: list[LayerChoice]
    trials: int
    passes: list[Pass] = field(repr=False, default_factory=list)
    notes: list[str] = field(default_factory=list)

    def chosen(self, level: str) -> list[str]:
        """Layers whose chosen level is ``level``; for "finer", also those at a rows step (built
        with their finer blocks)."""
        if level == "finer":
            return _finer_layers(self.layers)
        return sorted(name for choice in self.layers if choice.chosen == level for name in choice.layers)

    @property
    def met(self) -> bool:
        return self.final.bits_per_weight <= self.budget + 1e-9

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits_per_weight_budget": self.budget,
            "met": self.met,
            "metric": self.metric,
            "baseline": self.baseline,
            "block_size": self.block_size,
            "requested_block_size": self.requested_block_size,
            "base": {**self.base.to_dict(), "value": self.base_value},
            "final": {**self.final.to_dict(), "value": self.value},
            "finer": self.chosen("finer"),
            "next_best": self.chosen("next-best"),
            "rows": _rows(self.layers),
            "trials": self.trials,
            "layers": [choice.to_dict() for choice in self.layers],
            "notes": list(self.notes),
        }


def metric_output(model: onnx.ModelProto, spec: MetricSpec) -> MetricSpec:
    """The metric on ``logits`` when the model has that output and none was named (KL over the
    KV cache's head dimension would mean nothing); else as given."""
    names = [output.name for output in model.graph.output]
    if spec.output is None and LOGITS_OUTPUT in names and len(names) > 1:
        return dataclasses.replace(spec, output=LOGITS_OUTPUT)
    return spec


def plan_bits(
    model: onnx.ModelProto,
    passes: Sequence[Pass],
    calibration: Sequence[Feed],
    *,
    budget: float,
    metric: MetricSpec,
    runtime: Runtime,
    executor: ExecutorOptions | None = None,
    max_trials: int = 256,
    progress: bool = False,
    worker_imports: Sequence[str] = (),
    model_path: str | None = None,
    allow_symlinks_under: Sequence[str] = (),
) -> BitsResult:
    """Choose, per layer, the requested format or the next-best one so the stored bits per weight
    stay within ``budget`` and ``metric`` on ``calibration`` is as good as measured trials find.

    ``max_trials`` bounds the sensitivity trials (layers with the most output error first); the
    base builds and the final build come on top. ``model_path`` (with ``allow_symlinks_under``), when
    the model came from a file, lets workers load it themselves (a lazily loaded model's weights are
    readable only by the process that checked them)."""
    if budget <= 0 or max_trials < 1:
        raise OptionError("bits per weight must be > 0 and max_trials >= 1")
    if not calibration:
        raise OptionError("a bits budget measures each layer on calibration data: none was given")
    if not any(item.soften_option for item in passes):
        raise OptionError("a bits budget needs a pass with a next-best format (quantize)")
    planner = _Planner(model, list(passes), list(calibration), metric_output(model, metric), runtime, budget)
    planner.source = (model_path, tuple(allow_symlinks_under)) if model_path else None
    return planner.run(executor or ExecutorOptions(), max_trials, progress, tuple(worker_imports))


class _Planner:
    def __init__(self, model, passes, calibration, metric: MetricSpec, runtime: Runtime, budget: float) -> None:
        self.model, self.passes, self.calibration = model, passes, calibration
        self.feeds = calibration[:METRIC_SAMPLES]
        self.spec, self.metric, self.runtime, self.budget = metric, metric.build(self.feeds), runtime, budget
        self.reference = runtime.outputs(model, self.feeds)
        self.baseline = self.metric(self.reference, self.reference)
        self.trials = 0
        self.source: tuple[str, tuple[str, ...]] | None = None

    def trial(self, passes: list[Pass], backoff: Backoff) -> tuple[float, BitsMeasure]:
        self.trials += 1
        args = (self.model, passes, self.metric, self.feeds, self.calibration, self.runtime, self.reference)
        return sized_trial(*args, backoff)

    def run(self, executor: ExecutorOptions, max_trials: int, progress: bool, imports: tuple[str, ...]) -> BitsResult:
        requested = _block_size(self.passes)
        passes, base_value, base, compressed = self.widest_needed()
        fast = _cheap(passes)
        levels = _levels(fast)
        layers = self.layers(compressed)[: max_trials // len(levels)] if levels else []
        choices = self.sensitivities(fast, levels, layers, base_value, base, executor, progress, imports)
        self.row_steps(fast, base_value, base, choices)
        _allocate(choices, base, self.budget)
        final_passes, value, final = self.finish(passes, choices)
        result = BitsResult(
            self.budget,
            self.metric.name,
            self.baseline,
            _block_size(passes),
            requested,
            base,
            base_value,
            final,
            value,
            choices,
            self.trials,
            final_passes,
        )
        if result.block_size != requested:
            result.notes.append(
                f"block_size {requested} needs more than {self.budget:g} bits per weight with every layer in the "
                f"requested format: every layer started at block_size {result.block_size} "
                f"({base.bits_per_weight:.3f}), a doubling past the widest that fits, for the steps to spend the rest"
            )
        return result

    def widest_needed(self) -> tuple[list[Pass], float, BitsMeasure, onnx.ModelProto]:
        """The requested passes, with blocks doubled until every layer in the requested format fits,
        and once more when any doubling was needed (see ``COARSER_START``); their (cheap-trial)
        model, its metric value and its bits."""
        passes, doubled = list(self.passes), False
        while True:
            fast = _cheap(passes)
            self.trials += 1
            compressed = compress(self.model, fast, Backoff(), self.calibration, self.runtime)
            measure = measure_bits(self.model, compressed)
            if measure.bits_per_weight <= self.budget:
                if doubled and COARSER_START and (wider := _wider_blocks(passes)) is not None:
                    passes, doubled = wider, False
                    continue
                value = self.metric(self.reference, self.runtime.outputs(compressed, self.feeds))
                return passes, value, measure, compressed
            wider, doubled = _wider_blocks(passes), True
            if wider is None:
                block = _block_size(passes)
                raise OptionError(
                    f"bits per weight {self.budget:g} is below the least this model takes: "
                    f"{measure.bits_per_weight:.3f} with every layer compressed as requested"
                    + (f" at block_size {block} (4-bit takes about 4.16 at block_size 128)" if block else "")
                )
            passes = wider

    def layers(self, compressed: onnx.ModelProto) -> list[str]:
        """Compressed layers, most output error first (so a trial cap keeps the ones that matter);
        for a model too large to run from memory, the readers of changed weights, largest first."""
        if has_lazy_tensors(self.model):
            return changed_layers(self.model, compressed)
        report = debug_layers(
            self.model,
            compressed,
            self.feeds[:2],
            provider=self.runtime.provider,
            timeout_s=self.runtime.timeout_s,
        )
        return list(dict.fromkeys(layer.reference_node for layer in report.layers))

    def sensitivities(
        self, fast, levels, layers, base_value, base: BitsMeasure, executor, progress, imports
    ) -> list[LayerChoice]:
        """Every layer alone one step up (each level the passes offer), the rest as the base."""
        candidates = [_step(level, layer) for layer in layers for level in levels]
        bar = progress_bar(total=len(candidates), desc="bits budget trials", unit="trial", enabled=progress)
        try:
            if executor.parallel and len(candidates) > 1:
                args = (imports, self.source or self.model.SerializeToString(), fast, self.spec, self.feeds)
                pool = open_pool(executor, init_worker, (*args, self.calibration, self.runtime, self.reference))
                try:
                    results = pool.map(worker_sized_trial, candidates)
                finally:
                    pool.close()
                self.trials += len(candidates)
                bar.update(len(candidates))
            else:
                results = []
                for candidate in candidates:
                    results.append(self.trial(fast, candidate))
                    bar.update(1)
        finally:
            bar.close()
        base_drop = self.metric.drop(self.baseline, base_value)
        by_layer = {layer: results[i * len(levels) : (i + 1) * len(levels)] for i, layer in enumerate(layers)}
        return _choices(by_layer, levels, base_drop, base, lambda value: self.metric.drop(self.baseline, value))

    def row_steps(self, fast: list[Pass], base_value: float, base: BitsMeasure, choices: list[LayerChoice]) -> None:
        """Steps between finer blocks and the next-best format for a tied table's choice: its
        most-used rows in the next-best format (``Pass.rows_option``), one trial per fraction the
        passes offer, each with the table's finer blocks. The pass's report names the table's
        readers (details under the option's name), which finds the table's choice."""
        fractions = sorted({fraction for item in fast if item.rows_option for fraction in item.rows_choices})
        if not fractions:
            return
        self.trials += 1
        _, reports = compress_with_reports(self.model, fast, Backoff(rows=fractions[0]), self.calibration, self.runtime)
        readers = {
            name
            for item, report in zip(fast, reports, strict=True)
            if item.rows_option
            for table in report.get("details", {}).get(item.rows_option, {}).values()
            for name in table["readers"]
        }
        found = [choice for choice in choices if readers & set(choice.layers)]
        if not found:
            return
        # the reader whose own steps change the table (a lookup that reads it through a Transpose
        # names no use of the weight: its steps change nothing)
        table = max(found, key=lambda choice: max(level.added_bytes for level in choice.levels))
        base_drop = self.metric.drop(self.baseline, base_value)
        finer = table.level("finer") is not None
        steps = []
        for fraction in fractions:
            value, measure = self.trial(fast, Backoff(refined=frozenset(table.layers if finer else ()), rows=fraction))
            gain = base_drop - self.metric.drop(self.baseline, value)
            steps.append(Level(f"rows {fraction:g}", value, gain, measure.weight_bytes - base.weight_bytes, fraction))
        table.levels[int(finer) : int(finer)] = steps

    def finish(self, passes: list[Pass], choices: list[LayerChoice]) -> tuple[list[Pass], float, BitsMeasure]:
        """Build the chosen mix as requested (GPTQ included); step the least useful choice down
        while it is over the budget."""
        while True:
            next_best = sorted(n for c in choices if c.chosen == "next-best" for n in c.layers)
            finer = _finer_layers(choices)
            chosen = backed_off_passes(passes, [], next_best, finer, _rows(choices))
            value, measure = self.trial(chosen, Backoff())
            stepped = [c for c in choices if c.chosen is not None]
            if measure.bits_per_weight <= self.budget or not stepped:
                return chosen, value, measure
            least = min(stepped, key=lambda c: _ratio(c.level(c.chosen)))
            least.chosen = _one_down(least)


def changed_layers(source: onnx.ModelProto, compressed: onnx.ModelProto) -> list[str]:
    """Names of the nodes that read a float weight ``compressed`` no longer stores as it was, the
    largest weight first (no run needed: a large model's layers without the per-layer analysis)."""
    kept = {(info.name, info.dtype, info.shape) for info in weight_tensors(compressed)}
    changed = {
        info.name: info.size_bytes
        for info in weight_tensors(source)
        if info.dtype in FLOAT_TYPES and (info.name, info.dtype, info.shape) not in kept
    }
    readers: dict[str, int] = {}
    for site in walk_model(source):
        for node in site.graph.node:
            sizes = [changed[name] for name in node.input if name in changed]
            if sizes and node.name:
                readers[node.name] = max(readers.get(node.name, 0), *sizes)
    return sorted(readers, key=lambda name: (-readers[name], name))


def _cheap(passes: list[Pass]) -> list[Pass]:
    """The passes as a ranking trial builds them (``Pass.trial_options``: quantize rounds to nearest)."""
    return [dataclasses.replace(item, **item.trial_options()) for item in passes]


def _one_down(choice: LayerChoice) -> str | None:
    """The level below the chosen one that still gains (next-best -> finer; a smaller fraction of
    rows), else none."""
    names = [level.name for level in choice.levels]
    below = choice.levels[: names.index(choice.chosen)] if choice.chosen in names else []
    useful = [level.name for level in below if level.gain > 0]
    return useful[-1] if useful else None


def _finer_layers(choices: list[LayerChoice]) -> list[str]:
    """Layers built with finer blocks: chosen "finer", or a rows step (its trials had them)."""
    return sorted(n for c in choices if c.chosen is not None and c.chosen != "next-best" for n in c.layers)


def _rows(choices: list[LayerChoice]) -> float:
    """The fraction of a tied table's rows the allocation put in the next-best format (0: none)."""
    return max((level.rows for c in choices if (level := c.level(c.chosen)) is not None), default=0.0)


def _levels(passes: list[Pass]) -> list[str]:
    """The steps up the passes offer: finer blocks where a pass can refine what it writes (not when
    its blocks are already the finest), the next-best format where it has one."""
    levels = []
    if any(p.refine_option and p.refinable() for p in passes):
        levels.append(LEVELS[0])
    if any(p.soften_option for p in passes):
        levels.append(LEVELS[1])
    return levels


def _step(level: str, layer: str) -> Backoff:
    one = frozenset([layer])
    return Backoff(refined=one) if level == "finer" else Backoff(weight_only=one)


def _ratio(level: Level | None) -> float:
    return 0.0 if level is None else level.gain / max(1, level.added_bytes)


def _choices(by_layer, levels: list[str], base_drop: float, base: BitsMeasure, drop) -> list[LayerChoice]:
    """One choice per distinct set of trial models: layers whose trials stored the same tensors
    (names, types, shapes: ``BitsMeasure.signature``) read the same weight, and stepping one up
    steps the other; equal metric values or bytes alone prove nothing (two same-shape layers)."""
    grouped: dict[tuple, LayerChoice] = {}
    for layer, results in by_layer.items():
        key = tuple(measure.signature for _, measure in results)
        if key in grouped:
            grouped[key].layers.append(layer)
            continue
        steps = [
            Level(level, value, base_drop - drop(value), measure.weight_bytes - base.weight_bytes)
            for level, (value, measure) in zip(levels, results, strict=True)
        ]
        grouped[key] = LayerChoice([layer], steps)
    return list(grouped.values())


def _allocate(choices: list[LayerChoice], base: BitsMeasure, budget: float) -> None:
    """Greedy by gain per added byte over every step up (a layer may go from finer to next-best
    later): take the best step that fits the budget, again, until none does."""
    limit = budget * base.weight_elements / 8.0
    spent = float(base.weight_bytes)
    while True:
        best: tuple[float, LayerChoice, Level, int] | None = None
        for choice in choices:
            now = choice.level(choice.chosen)
            gain_now, bytes_now = (now.gain, now.added_bytes) if now else (0.0, 0)
            for level in choice.levels:
                gain, extra = level.gain - gain_now, level.added_bytes - bytes_now
                if gain > 0 and extra > 0 and spent + extra <= limit and (best is None or gain / extra > best[0]):
                    best = (gain / extra, choice, level, extra)
        if best is None:
            return
        _, picked, step, added = best
        picked.chosen, spent = step.name, spent + added


def _block_size(passes: Sequence[Pass]) -> int | None:
    """The block length of the first pass that writes blocked weights (quantize: 4-bit), or None."""
    for item in passes:
        if item.block_option and item.blocked():
            return int(getattr(item, item.block_option))
    return None


def _wider_blocks(passes: list[Pass]) -> list[Pass] | None:
    """The passes with every block option doubled, or None when none can double."""
    block = _block_size(passes)
    if block is None or block * 2 > MAX_BLOCK:
        return None
    return [
        dataclasses.replace(item, **{item.block_option: block * 2}) if item.block_option and item.blocked() else item
        for item in passes
    ]
