"""optimize()'s two budget stages over the Pass objects themselves: the accuracy budget
(``optimizer.budget``, --max-drop) and the bits budget (``optimizer.bits_budget``, --bits-per-weight)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx

from optimizer.bits_budget import BitsResult, plan_bits
from optimizer.budget import BudgetResult, MetricSpec, search_budget
from optimizer.budget_trials import Runtime
from optimizer.calibration.feeds import Feed
from optimizer.errors import OptionError
from optimizer.optimize_options import OptimizeOptions
from optimizer.pass_base import Pass, PassContext


def check_bits_request(options: OptimizeOptions, chosen: Sequence[Pass]) -> None:
    """Before any work: a bits budget needs calibration data and a pass that can step layers up,
    and is not combined with an accuracy budget."""
    if options.budget is not None:
        raise OptionError("a bits budget and an accuracy budget (--bits-per-weight, --max-drop): give one of them")
    if options.calibration is None:
        raise OptionError(
            "a bits budget measures each layer on calibration data: --calibration-data DIR (calibration=...)"
        )
    if not any(item.soften_option for item in chosen):
        raise OptionError("a bits budget chooses formats per layer: add --quantize int4 (the quantize pass)")


def budget_stage(
    source: onnx.ModelProto,
    chosen: list[Pass],
    feeds: list[Feed],
    context: PassContext,
    options: OptimizeOptions,
    reference: Path | None,
) -> BudgetResult:
    """The accuracy budget search (layers backed off by dataclasses.replace), on ``feeds``."""
    budget, factory = options.budget, context.calibration
    assert budget is not None
    return search_budget(
        source,
        chosen,
        MetricSpec(budget.metric, budget.higher_is_better, budget.output),
        feeds,
        max_drop=budget.max_drop,
        max_trials=budget.max_trials,
        executor=options.executor,
        provider=options.provider,
        progress=options.progress,
        worker_imports=("passes",),
        calibration=[dict(feed) for feed in factory()] if factory else None,
        model_path=str(reference) if reference is not None else None,
        return_model=False,
        timeout_s=options.timeout_s,
        allow_symlinks_under=tuple(str(path) for path in options.allow_symlinks_under),
        model_folder=context.model_folder,
    )


def bits_stage(
    source: onnx.ModelProto, chosen: list[Pass], context: PassContext, options: OptimizeOptions, reference: Path | None
) -> BitsResult:
    """The bits budget, measured on the calibration data (``check_bits_request`` passed)."""
    bits, factory = options.bits, context.calibration
    assert bits is not None and factory is not None
    return plan_bits(
        source,
        chosen,
        [dict(feed) for feed in factory()],
        budget=bits.bits_per_weight,
        metric=MetricSpec(bits.metric, bits.higher_is_better, bits.output),
        runtime=Runtime(options.provider, options.timeout_s, context.model_folder),
        executor=options.executor,
        max_trials=bits.max_trials,
        progress=options.progress,
        worker_imports=("passes",),
        model_path=str(reference) if reference is not None else None,
        allow_symlinks_under=tuple(str(path) for path in options.allow_symlinks_under),
    )
