"""The typed options of optimize() and what it returns: the plan, the feeds, validation, the
accuracy budget, and the files it reads and writes."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from optimizer.executor import ExecutorOptions
from optimizer.fileio.publish import ExternalData
from optimizer.pass_base import Pass
from optimizer.report.report import Report
from optimizer.verify.benchmark import BenchResult
from optimizer.verify.generation import GENERATE_TOKENS
from optimizer.verify.isolation import DEFAULT_TIMEOUT_S
from optimizer.verify.validate import Comparison, Tolerance

ModelInput = str | os.PathLike | bytes | onnx.ModelProto
FeedSource = str | os.PathLike | Iterable[Mapping[str, Any]] | None


@dataclass
class OptimizeResult:
    model: onnx.ModelProto
    output_path: Path | None
    modified: bool
    report: Report
    comparison: Comparison | None
    bench: BenchResult | None

    @property
    def passed(self) -> bool:
        """False only when validation ran and failed."""
        return self.comparison is None or self.comparison.passed


@dataclass(frozen=True, kw_only=True)
class FeedOptions:
    """The inputs validation, the benchmark, bisect and the accuracy budget run the models on: an .npz
    folder, an iterable of {input name: array}, or (``source`` None) ``samples`` seeded random feeds."""

    source: FeedSource = None
    shapes: Mapping[str, tuple[int, ...]] | None = None
    samples: int = 4
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class ValidationOptions:
    """Compare the saved output with the input (default tolerance: exact for lossless passes).

    ``isolate`` runs onnxruntime in a child process (limited to ``max_memory_bytes``) so a crash
    becomes an error that says so; a failed comparison leaves the output unwritten unless ``keep_failed``.
    ``output_kinds`` sets an output's kind (classes, sequence, detector, embedding, dense) where the
    inferred one is wrong (see ``optimizer.verify.output_kinds``).
    """

    tolerance: Tolerance | Mapping[str, Tolerance] | None = None
    isolate: bool = True
    max_memory_bytes: int | None = None
    keep_failed: bool = False
    output_kinds: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class BudgetOptions:
    """Back layers off, most harmful first, until ``metric`` (a built-in name or package.module:function,
    on ``output`` only when given) drops by at most ``max_drop`` (see optimizer.budget): first to the
    next-best format (quantize: weight-only int8), then uncompressed. A budget implies validation
    (default ``ValidationOptions()`` when none is given): the metric re-measured on the staged
    output is the verdict, so a budget not met writes nothing (unless ``keep_failed``)."""

    max_drop: float
    metric: str = "cosine"
    higher_is_better: bool | None = None
    output: str | None = None
    max_trials: int = 24


@dataclass(frozen=True, kw_only=True)
class BitsOptions:
    """Spend at most ``bits_per_weight`` stored bits per compressed weight (scales and zero points
    count; see optimizer.bits_budget): every layer in the requested format (quantize: 4-bit, blocks
    widened when the budget needs it), then, by measured gain per byte on the calibration data,
    layers stepped up to finer blocks or the next-best format (8-bit). ``metric`` scores the trials
    (default kl: of the ``logits`` output when the model has one), on ``output`` when given."""

    bits_per_weight: float
    metric: str = "kl"
    higher_is_better: bool | None = None
    output: str | None = None
    max_trials: int = 256


@dataclass(frozen=True, kw_only=True)
class OptimizeOptions:
    """Everything optimize() can be asked; the defaults run DEFAULT_PASSES and save the result.

    ``passes`` are names or Pass objects, ``pass_options`` options by pass name (see plan_passes).
    ``calibration`` (an .npz folder or an iterable of feed dicts) is what passes that need data run
    on, with ``provider``; ``timeout_s`` bounds every onnxruntime run (``RunTimeoutError``).
    ``validation``/``bench_rounds`` (None: off) check the staged output before it is published; a
    KV-cache decoder also generates ``generate_tokens`` tokens in both (0: off, see
    ``optimizer.verify.generation``);
    ``fusion_check`` (default: when the output is quantized) reports what onnxruntime really runs;
    ``bisect`` searches for the first bad pass when a pass or the validation fails. ``executor`` says
    where auto mode's builds and checks and the budgets' trials run (``optimizer.executor``);
    ``budget`` (accuracy) and ``bits`` (bits per weight) are the two budgets, one at a time.
    External data may be a symlink into ``allow_symlinks_under`` folders (see ``load_model``).
    ``genai_files``: a decoder's onnxruntime-genai config and tokenizer files are copied next to an
    output in another folder (``optimizer.fileio.genai_files``).
    ``reports`` (.json, .md or .html) are written last; every file the run writes is checked against
    every file it reads before any work (a collision is a ``ModelSaveError``).
    """

    passes: Sequence[str | Pass] | None = None
    pass_options: Mapping[str, Mapping[str, Any]] | None = None
    calibration: FeedSource = None
    provider: str = "cpu"
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    progress: bool = False
    check_each_pass: bool = False
    feeds: FeedOptions = field(default_factory=FeedOptions)
    validation: ValidationOptions | None = None
    bench_rounds: int | None = None
    generate_tokens: int = GENERATE_TOKENS
    fusion_check: bool | None = None
    budget: BudgetOptions | None = None
    bits: BitsOptions | None = None
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)
    bisect: bool = False
    external_data: ExternalData = "auto"
    genai_files: bool = True
    max_input_bytes: int | None = None
    allow_symlinks_under: Sequence[str | os.PathLike] = ()
    reports: Sequence[str | os.PathLike] = ()
