"""One auto-mode trial: build a candidate with some passes, save it, check it with the verdict; in
this process or in the workers of ``optimizer.executor`` (see optimizer.auto_mode)."""

from __future__ import annotations

import importlib
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from optimizer.errors import OptionError, PassError
from optimizer.fileio.save import save_model
from optimizer.optimize_options import ModelInput
from optimizer.pass_base import Pass, PassContext
from optimizer.pipeline import Pipeline, PipelineResult
from optimizer.verify.isolation import run_comparison
from optimizer.verify.tolerances import Tolerance


@dataclass(frozen=True)
class AutoSettings:
    """What the candidates are checked on: feeds (``feeds_label`` says which), the verdict's
    tolerance and output kinds, where onnxruntime runs, and how many latency rounds."""

    feeds: list[dict[str, Any]]
    feeds_label: str
    tolerance: Tolerance | Mapping[str, Tolerance]
    output_kinds: Mapping[str, str]
    provider: str
    timeout_s: float | None
    rounds: int = 20
    """At most: timing stops earlier once more rounds cannot change the choice."""
    reference_outputs: list[dict[str, Any]] = field(default_factory=list, compare=False, repr=False)
    """The input's outputs on ``feeds``, filled by the first check and read by the others."""


@dataclass
class Candidate:
    value: str
    size_bytes: int | None = None
    tool_seconds: float | None = None
    passed: bool | None = None
    verdict: str = ""
    latency_ratio: float | None = None
    error: str | None = None
    same_as: str | None = None
    """Another candidate whose file came out byte-identical (a CNN has no MatMul for dynamic mode
    to change): its check and timing stand for this one, measured once."""
    variant: str = ""
    """Other options than the value's defaults, e.g. "percentile 100" (``Pass.unclipped_options``)."""
    softened: list[str] = field(default_factory=list)
    """The groups (compute nodes) backed off to the pass's next-best format, first layers first."""
    violation: float | None = None
    """How far the check missed: the worst output's violation ratio (> 1 failed)."""

    @property
    def name(self) -> str:
        parts = [self.value, self.variant] if self.variant else [self.value]
        if self.softened:
            parts.append(f"{len(self.softened)} group{'s' if len(self.softened) > 1 else ''} weight-only")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


def build(
    candidate: Candidate, source: onnx.ModelProto, chosen: list[Pass], context: PassContext
) -> PipelineResult | None:
    try:
        start = time.perf_counter()
        built = Pipeline(chosen, context=context).run(source)
        candidate.tool_seconds = round(time.perf_counter() - start, 3)
    except (OptionError, PassError) as error:
        candidate.error = str(error)
        return None
    return built


def check(candidate: Candidate, reference: ModelInput, path: Path, settings: AutoSettings) -> None:
    comparison = run_comparison(
        reference,
        path,
        settings.feeds,
        isolate=False,
        tolerance=settings.tolerance,
        provider=settings.provider,
        output_kinds=settings.output_kinds,
        timeout_s=settings.timeout_s,
        stage=f"auto mode, checking the {candidate.name} candidate,",
        reference_cache=settings.reference_outputs,
    )
    candidate.passed = comparison.passed
    candidate.violation = round(max((output.violation_ratio for output in comparison.outputs), default=0.0), 4)
    candidate.verdict = comparison.summary().splitlines()[-1]


def build_and_check(
    candidate: Candidate,
    source: onnx.ModelProto,
    chosen: list[Pass],
    context: PassContext,
    reference: ModelInput,
    settings: AutoSettings,
    path: Path,
) -> PipelineResult | None:
    """``build`` then, when it built, save to ``path`` and ``check``."""
    built = build(candidate, source, chosen, context)
    if built is None:
        return None
    save_model(built.model, path)
    candidate.size_bytes = path.stat().st_size
    check(candidate, reference, path, settings)
    return built


_WORKER: dict[str, Any] = {}


def init_worker(
    imports: Sequence[str],
    source: bytes,
    calibration: list[dict[str, Any]],
    provider: str,
    timeout_s: float | None,
    reference: str | bytes,
    settings: AutoSettings,
    model_folder: Path | None = None,
) -> None:
    """A worker's shared state: the input, its calibration data, the reference and the check."""
    for name in imports:
        importlib.import_module(name)
    folder = tempfile.TemporaryDirectory(prefix="onnx-compress-auto-worker-")
    context = PassContext(
        calibration=lambda: iter(calibration), provider=provider, timeout_s=timeout_s, model_folder=model_folder
    )
    model_reference = onnx.load_from_string(reference) if isinstance(reference, bytes) else reference
    _WORKER.update(
        source=onnx.load_from_string(source),
        context=context,
        reference=model_reference,
        settings=settings,
        folder=folder,
        count=0,
    )


def worker_trial(item: tuple[Candidate, list[Pass]]) -> tuple[Candidate, PipelineResult | None]:
    candidate, chosen = item
    w = _WORKER
    w["count"] += 1
    path = Path(w["folder"].name) / f"candidate-{w['count']}.onnx"
    built = build_and_check(candidate, w["source"], chosen, w["context"], w["reference"], w["settings"], path)
    path.unlink(missing_ok=True)
    return candidate, built
