"""Find the first pass of a pipeline that broke a model.

Passes are applied once, cumulatively, and the model after each one is saved to a temporary
folder (so memory does not grow with the number of passes). Then a binary search over those
snapshots checks as few of them as it can: ``onnx.checker`` (full), onnxruntime loads and runs
it, and its outputs stay within the tolerance of the original's. Binary search assumes that
once a prefix is broken every longer prefix is too, which holds for the failures it looks for
(a later pass rarely repairs an invalid graph); a pass that raises is bad by definition and
bounds the search. Checks run in a child process by default (see ``optimizer.verify.isolation``),
so a crash in onnxruntime is a verdict, not the end of the search.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx

from optimizer.calibration.feeds import Feed
from optimizer.errors import OnnxCompressError, PassError
from optimizer.fileio.model import load_model
from optimizer.fileio.save import save_model
from optimizer.graph.convert import export_model, import_graph
from optimizer.graph.export_scopes import value_info_names
from optimizer.pass_base import Pass, PassContext
from optimizer.verify.isolation import DEFAULT_TIMEOUT_S, run_isolated
from optimizer.verify.runtime import ProviderChoice
from optimizer.verify.validate import Tolerance, compare

__all__ = ["BisectResult", "BisectStep", "bisect_passes", "check_candidate"]


@dataclass
class BisectStep:
    """One pass: whether it ran, whether the model after it was checked, and the verdict."""

    index: int
    pass_name: str
    applied: bool
    checked: bool
    passed: bool | None
    reason: str | None


@dataclass
class BisectResult:
    first_bad_pass: str | None
    index: int | None
    reason: str | None
    per_step: list[BisectStep]

    @property
    def checks(self) -> int:
        return sum(step.checked for step in self.per_step)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_candidate(
    reference_path: str,
    candidate_path: str,
    feeds: list[Feed],
    *,
    tolerance: Tolerance | Mapping[str, Tolerance],
    provider: str | ProviderChoice,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> str | None:
    """Why the candidate is broken (checker, onnxruntime or tolerance), or None if it is fine."""
    try:
        onnx.checker.check_model(candidate_path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        lines = str(error).strip().splitlines()
        return f"onnx.checker rejects it: {lines[0] if lines else type(error).__name__}"
    try:
        comparison = compare(
            reference_path, candidate_path, feeds, tolerance=tolerance, provider=provider, timeout_s=timeout_s
        )
    except OnnxCompressError as error:
        return str(error)
    if comparison.passed:
        return None
    worst = next(item for item in comparison.outputs if item.name == comparison.worst_output)
    return f"outside tolerance: output '{worst.name}' ({'; '.join(worst.failures)})"


def bisect_passes(
    model: onnx.ModelProto,
    passes: Sequence[Pass],
    feeds: Iterable[Feed],
    *,
    tolerance: Tolerance | Mapping[str, Tolerance],
    provider: str | ProviderChoice = "cpu",
    context: PassContext | None = None,
    isolate: bool = True,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> BisectResult:
    """The first pass after which the model fails ``check_candidate``, by binary search.

    Makes at most 2 + ceil(log2(len(passes))) checks (the original, the full pipeline, then
    halving). Raises ``PassError`` when the original itself fails the check, since no pass
    could then be blamed. ``model`` is not changed.
    """
    feed_list = list(feeds)
    context = context or PassContext(provider=provider if isinstance(provider, str) else provider.requested)
    steps = [BisectStep(i, item.name, False, False, None, None) for i, item in enumerate(passes)]
    with tempfile.TemporaryDirectory(prefix="onnx-compress-bisect-") as folder:
        reference = str(save_model(load_model(model), Path(folder) / "reference.onnx"))

        def check(path: str) -> str | None:
            if not isolate:
                return check_candidate(
                    reference, path, feed_list, tolerance=tolerance, provider=provider, timeout_s=timeout_s
                )
            try:
                return run_isolated(
                    check_candidate,
                    reference,
                    path,
                    feed_list,
                    tolerance=tolerance,
                    provider=provider,
                    timeout_s=timeout_s,
                    label=f"checking {Path(path).name}",
                )
            except OnnxCompressError as error:
                return str(error)

        baseline = check(reference)
        if baseline is not None:
            raise PassError(f"cannot bisect: the original model already fails the check: {baseline}")
        snapshots, raised = _apply_cumulatively(model, passes, context, Path(folder), steps)
        return _search(snapshots, raised, steps, check)


def _apply_cumulatively(
    model: onnx.ModelProto,
    passes: Sequence[Pass],
    context: PassContext,
    folder: Path,
    steps: list[BisectStep],
) -> tuple[list[str], str | None]:
    """Snapshot paths after each pass, and why the pass after the last snapshot failed, if so."""
    template = onnx.ModelProto()
    template.CopyFrom(model)
    snapshots: list[str] = []
    try:
        graph = import_graph(template)
        declared = value_info_names(template.graph)
        for index, item in enumerate(passes):
            graph = item(graph, context).graph
            snapshot = export_model(graph, template, declared_value_info=declared)
            snapshots.append(str(save_model(snapshot, folder / f"after-{index:03d}.onnx")))
            steps[index].applied = True
    except Exception as error:  # any failure of pass number len(snapshots) is its verdict
        return snapshots, f"pass raised {type(error).__name__}: {' '.join(str(error).split())}"
    return snapshots, None


def _search(snapshots: list[str], raised: str | None, steps: list[BisectStep], check) -> BisectResult:
    """Smallest bad index; index -1 (the original) is known good."""
    verdicts: dict[int, str | None] = {}

    def is_bad(index: int) -> bool:
        if index not in verdicts:
            verdicts[index] = check(snapshots[index])
            step = steps[index]
            step.checked, step.passed, step.reason = True, verdicts[index] is None, verdicts[index]
        return verdicts[index] is not None

    good, bad = -1, len(snapshots)
    if raised is not None:
        steps[bad].reason, steps[bad].passed = raised, False
        verdicts[bad] = raised
    elif not snapshots or not is_bad(bad - 1):
        return BisectResult(None, None, None, steps)
    else:
        bad -= 1
    while bad - good > 1:
        middle = (good + bad) // 2
        if is_bad(middle):
            bad = middle
        else:
            good = middle
    return BisectResult(steps[bad].pass_name, bad, verdicts[bad], steps)
