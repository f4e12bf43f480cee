"""One accuracy-budget trial: compress with some layers backed off, run, measure; in this process
or in the workers of ``optimizer.executor`` (see optimizer.budget)."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from optimizer.fileio.model import LAZY_LOAD_ABOVE_BYTES, load_model_with_files
from optimizer.graph.bit_count import BitsMeasure, measure_bits
from optimizer.graph.patterns import exact_name_pattern
from optimizer.pass_base import Pass, PassContext
from optimizer.pipeline import Pipeline
from optimizer.verify.metrics import Metric, Outputs, collect_outputs, load_metric

Feed = dict[str, np.ndarray]
STAGE = "accuracy budget"


@dataclass(frozen=True)
class MetricSpec:
    """A metric that can be rebuilt in a worker process: a built-in name or package.module:function."""

    spec: str
    higher_is_better: bool | None = None
    output: str | None = None

    def build(self, feeds=None) -> Metric:
        """The metric; ``feeds`` are the samples it will judge outputs of (perplexity reads their tokens)."""
        return load_metric(self.spec, higher_is_better=self.higher_is_better, output=self.output, feeds=feeds)


@dataclass(frozen=True)
class Backoff:
    """One trial's choice: layers compressed in their pass's next-best format (``Pass.soften_option``:
    quantize's weight-only int8) and layers left uncompressed (``Pass.backoff_option``)."""

    weight_only: frozenset[str] = field(default_factory=frozenset)
    uncompressed: frozenset[str] = field(default_factory=frozenset)
    refined: frozenset[str] = field(default_factory=frozenset)
    """Layers kept in the requested format with finer granularity (``Pass.refine_option``; bits budget)."""
    rows: float = 0.0
    """The fraction of a tied table's rows in the next-best format (``Pass.rows_option``; bits budget)."""


@dataclass(frozen=True)
class Runtime:
    """Where trials run the model, and how long one onnxruntime run may take."""

    provider: str
    timeout_s: float | None
    model_folder: Path | None = None
    """The folder the model came from (``PassContext.model_folder``: a decoder's genai_config.json)."""

    def outputs(self, model, feeds) -> Outputs:
        return collect_outputs(model, feeds, provider=self.provider, timeout_s=self.timeout_s, stage=STAGE)


def backed_off_passes(
    passes: Sequence[Pass],
    layers: Sequence[str],
    weight_only: Sequence[str] = (),
    refined: Sequence[str] = (),
    rows: float = 0.0,
) -> list[Pass]:
    """``passes`` with an exact-name pattern for every layer in ``layers`` added to the exclusion
    option (``Pass.backoff_option``) of each pass that has one, for every other layer in
    ``weight_only`` to the option of its next-best format (``Pass.soften_option``), and for every
    layer in ``refined`` to its finer-granularity option (``Pass.refine_option``), where a pass has
    one (elsewhere those layers stay as requested); ``rows`` (when > 0) sets ``Pass.rows_option``.
    The Pass objects are kept, not rebuilt."""
    excluded = _patterns(layers)
    softened = _patterns(set(weight_only) - set(layers))
    finer = _patterns(set(refined) - set(layers) - set(weight_only))
    chosen = []
    for item in passes:
        added: dict[str, Any] = {}
        for option, patterns in (
            (item.backoff_option, excluded),
            (item.soften_option, softened),
            (item.refine_option, finer),
        ):
            if option and patterns:
                added[option] = (*getattr(item, option), *patterns)
        if item.rows_option and rows > 0:
            added[item.rows_option] = rows
        chosen.append(dataclasses.replace(item, **added) if added else item)
    return chosen


def _patterns(layers) -> tuple[str, ...]:
    return tuple(exact_name_pattern(layer) for layer in sorted(layers))


def compress(model, passes, backoff: Backoff, calibration, runtime: Runtime) -> onnx.ModelProto:
    return compress_with_reports(model, passes, backoff, calibration, runtime)[0]


def compress_with_reports(
    model, passes, backoff: Backoff, calibration, runtime: Runtime
) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """The passes, backed off as ``backoff`` says, run on ``model``: the result and each pass's report."""
    context = PassContext(
        calibration=(lambda: iter(calibration)) if calibration else None,
        provider=runtime.provider,
        timeout_s=runtime.timeout_s,
        model_folder=runtime.model_folder,
    )
    chosen = backed_off_passes(
        passes, sorted(backoff.uncompressed), sorted(backoff.weight_only), sorted(backoff.refined), backoff.rows
    )
    result = Pipeline(chosen, context=context).run(model)
    return result.model, [run.report for run in result.runs]


def trial(
    model, passes, metric: Metric, feeds, calibration, runtime: Runtime, reference: Outputs, backoff: Backoff
) -> float:
    compressed = compress(model, passes, backoff, calibration, runtime)
    return metric(reference, runtime.outputs(compressed, feeds))


def sized_trial(
    model, passes, metric: Metric, feeds, calibration, runtime: Runtime, reference: Outputs, backoff: Backoff
) -> tuple[float, BitsMeasure]:
    """A trial that also measures the bits the compressed model stores (the bits budget's trials)."""
    compressed = compress(model, passes, backoff, calibration, runtime)
    return metric(reference, runtime.outputs(compressed, feeds)), measure_bits(model, compressed)


_WORKER: dict[str, Any] = {}


def init_worker(
    imports,
    model_source: tuple[str, tuple[str, ...]] | bytes,
    passes,
    metric_spec: MetricSpec,
    feeds,
    calibration,
    runtime: Runtime,
    reference,
) -> None:
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
        metric=metric_spec.build(feeds),
        feeds=feeds,
        calibration=calibration,
        runtime=runtime,
        reference=reference,
    )


def worker_trial(backoff: Backoff) -> float:
    w = _WORKER
    return trial(
        w["model"], w["passes"], w["metric"], w["feeds"], w["calibration"], w["runtime"], w["reference"], backoff
    )


def worker_sized_trial(backoff: Backoff) -> tuple[float, BitsMeasure]:
    w = _WORKER
    return sized_trial(
        w["model"], w["passes"], w["metric"], w["feeds"], w["calibration"], w["runtime"], w["reference"], backoff
    )
