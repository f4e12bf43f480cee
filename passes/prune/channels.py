"""prune-channels: remove whole output channels (Conv) or hidden units (Gemm/MatMul chains).

Each producer's channels are ranked by the L1 or L2 norm of its weight; the lowest go, and
every tensor that spans those channels shrinks with them (bias, BatchNormalization
parameters, constants of elementwise ops, depthwise Convs, the next layer's input channels,
Reshape constants), so the graph stays consistent and smaller layers run faster. Groups that
cannot be cut legally are skipped with the reason (see ``passes.prune.channel_groups``).

With calibration data (criterion ``auto`` or ``activation``) the channels are chosen by what the
next layers' outputs lose (the structured optimal brain surgeon saliency from their inputs' second
moments), the next layers are re-fitted by least squares so their outputs match the unpruned ones
(``reconstruct``), and ``flops`` removes a fraction of the model's multiply-adds with the channels
chosen across all groups by the least output error per multiply-add (see
``passes.prune.reconstruct``).

``ratio`` (and ``flops``) is relative to the current width, so running the pass twice with
``ratio`` > 0 cuts twice. The default (``ratio`` 0) only removes near-dead channels, whose norm is under
``min_norm_ratio`` of the group's largest: the largest channel always stays, so a second run
finds nothing more to remove.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.calibration.channel_obs import allocate, drop_order, removal_order, removal_steps, units_to_channels
from optimizer.calibration.observe import Sampling
from optimizer.errors import OptionError, PassError
from optimizer.graph.names import NameAllocator
from optimizer.graph.patterns import NamePatterns
from optimizer.graph.walk import graph_output_names, iter_nodes, tensor_uses
from optimizer.graph.weights import constant_weight
from optimizer.internal_errors import working_on
from optimizer.pass_base import Pass, PassContext, PassReport, PassResult, option
from optimizer.registry import register
from passes.prune.channel_groups import ChannelGroup, Illegal, channel_scores, find_group
from passes.prune.heads import broadcast_problem, find_heads
from passes.prune.reconstruct import (
    GroupStatistics,
    channel_macs,
    observe_groups,
    observed_problems,
    reconstruct,
    total_macs,
)
from passes.prune.weights import check_selection, is_default_domain, zero_count
from passes.weight_guard import NON_FINITE_OPTION_HELP, WeightGuard

PRODUCER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@register
class PruneChannelsPass(Pass):
    name = "prune-channels"
    summary = "remove the lowest-norm output channels / hidden units and shrink every dependent tensor"
    backoff_option = "exclude"

    ratio: float = option(
        0.0, "fraction of each group's channels to remove, lowest norm first (0: only near-dead ones)"
    )
    min_norm_ratio: float = option(
        0.01, "also remove channels whose norm is below this fraction of the group's largest"
    )
    criterion: Literal["auto", "l1", "l2", "activation"] = option(
        "auto",
        "ranking: activation (output error of the next layers on calibration data), l1 or l2 (weight"
        " norm); auto: activation when calibration data is given, else l2",
    )
    flops: float = option(
        0.0,
        "remove this fraction of the model's Conv/Gemm/MatMul multiply-adds, channels chosen across"
        " groups by the least output error per multiply-add (needs calibration data; replaces ratio)",
    )
    max_ratio: float = option(0.5, "with flops: never remove more than this fraction of one group's channels")
    reconstruct: bool = option(True, "with calibration data: re-fit the next layers' weights and bias by least squares")
    structure: Literal["all", "channels", "heads"] = option(
        "all",
        "what is removed: channels (Conv output channels, feed-forward units), heads (whole attention heads:"
        " Q/K/V columns and output-projection rows; needs calibration data), or all of them",
    )
    damping: float = option(0.01, "least-squares damping, as a fraction of the mean input second moment")
    calibration_samples: int = option(
        256, "calibration samples the statistics are taken over (the refit fits them: fewer rows than channels overfit)"
    )
    op_types: tuple[str, ...] = option(PRODUCER_OPS, "producer ops whose output channels may be removed")
    include: tuple[str, ...] = option(
        (), "only producers (for heads: Softmax nodes) whose node or weight name matches (glob, or re:REGEX)"
    )
    exclude: tuple[str, ...] = option(
        (), "leave producers (for heads: Softmax nodes) whose node or weight name matches (glob, or re:REGEX)"
    )
    min_channels: int = option(1, "never keep fewer channels than this in a group")
    channel_multiple: int = option(
        0,
        "keep channel counts a multiple of this (onnxruntime's CPU Conv kernels work in blocks of 8: odd widths"
        " run slower); 0: 8 when removing by ratio or flops, 1 for the near-dead-only default",
    )
    allow_non_finite: bool = option(False, NON_FINITE_OPTION_HELP)

    def __post_init__(self) -> None:
        for key in ("ratio", "min_norm_ratio", "flops", "damping"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise OptionError(f"pass 'prune-channels' option '{key}' must be in [0, 1), got {getattr(self, key)}")
        check_selection(self.name, self.op_types, PRODUCER_OPS, self.include + self.exclude)
        if not 0.0 < self.max_ratio < 1.0:
            raise OptionError(f"pass 'prune-channels' option 'max_ratio' must be in (0, 1), got {self.max_ratio}")
        if self.flops and self.ratio:
            raise OptionError("pass 'prune-channels': give 'flops' or 'ratio', not both")
        if self.flops and self.criterion in ("l1", "l2"):
            raise OptionError("pass 'prune-channels' option 'flops' chooses by calibration data: criterion activation")
        if self.calibration_samples < 1:
            raise OptionError("pass 'prune-channels' option 'calibration_samples' must be >= 1")
        if self.min_channels < 1 or self.channel_multiple < 0:
            raise OptionError("pass 'prune-channels' options 'min_channels' must be >= 1 and 'channel_multiple' >= 0")

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        report = PassReport()
        uses = tensor_uses(graph)
        outputs = graph_output_names(graph)
        guard = WeightGuard.of(graph, allow_non_finite=self.allow_non_finite)
        data_aware = self.criterion == "activation" or (self.criterion == "auto" and context.calibration is not None)
        if self.structure == "heads" and not data_aware:
            raise PassError(f"pass '{self.name}' structure 'heads' chooses heads from calibration data: give some")
        plan = self._plan(graph, context, (uses, outputs, guard, graph), report) if data_aware else None
        if plan is None and self.structure == "all":
            report.details["heads"] = "not considered: attention heads are chosen from calibration data"
        names = NameAllocator(graph, reserve_node_names=False)
        groups: list[dict[str, object]] = []
        for owner, node in list(iter_nodes(graph)):
            group = self._group(node, owner, (uses, outputs, guard, graph if plan else None), report)
            if group is None or (group.unit > 1 and id(group.producer) not in plan.planned):  # type: ignore[union-attr]
                continue
            with working_on("node", _label(node)):
                entry = self._prune(group, plan, uses, names, report)
            if entry is None:
                report.count("groups_unchanged")
                continue
            groups.append(entry)
            uses = tensor_uses(graph)
        report.details["groups"] = groups
        if plan is not None:
            report.details["macs_total"] = plan.macs
        return PassResult(graph, bool(groups), report.to_dict())

    def _group(self, node: gs.Node, owner: gs.Graph, scope: Scope, report: PassReport) -> ChannelGroup | None:
        """The node's channel group (or, for a Softmax, its attention heads) when it can be cut;
        else None, with the reason in the report."""
        uses, outputs, guard, main = scope
        heads = node.op == "Softmax" and self.structure != "channels" and owner is main and is_default_domain(node)
        if heads and not self._selected([node.name]):
            return None
        if not heads and (self.structure == "heads" or not self._is_candidate(node, uses)):
            return None
        try:
            group = find_heads(node, owner, uses, outputs) if heads else find_group(node, owner, uses, outputs)
        except Illegal as reason:
            report.skip("node", _label(node), str(reason))
            return None
        guarded = _guarded_tensor(group, guard)
        if guarded is not None:
            report.skip("tensor", *guarded)
            return None
        return group

    def _plan(self, graph: gs.Graph, context: PassContext, scope: Scope, report: PassReport) -> ChannelPlan:
        """Statistics of every main-graph group from calibration data, and with ``flops`` the
        units to remove from each."""
        if context.calibration is None:
            raise PassError(f"pass '{self.name}' criterion 'activation' needs calibration data")
        scratch = PassReport()
        groups = [g for o, n in iter_nodes(graph) if o is graph and (g := self._group(n, o, scope, scratch))]
        sampling = Sampling(self.calibration_samples, context.provider, context.timeout_s)
        statistics = observe_groups(graph, groups, lambda: context.calibration_feeds(self.name), sampling)
        report.details["criterion"] = (
            f"activation: next layers' output error over {statistics.samples} calibration samples"
            + (", re-fitted by least squares" if self.reconstruct else "")
        )
        for group in [g for g in groups if broadcast_problem(g, statistics.shapes)]:
            report.skip("node", _label(group.producer), broadcast_problem(group, statistics.shapes))
            groups.remove(group)
        macs = total_macs(graph, statistics.shapes)
        counts = self._allocate(groups, statistics, scope[0], macs, report) if self.flops else None
        return ChannelPlan(statistics, {id(g.producer) for g in groups}, counts, macs)

    def _allocate(
        self, groups: list[ChannelGroup], statistics: GroupStatistics, uses, macs: int, report: PassReport
    ) -> dict[int, int]:
        """Units to remove per producer so that ``flops`` of ``macs`` go at the least error."""
        costs, each, steps = [], [], []
        for group in groups:
            problems = [problem for _, problem in observed_problems(group, statistics, uses)]
            units = group.channels // group.unit
            cap = min(int(self.max_ratio * units), units - self._min_units(group))
            order = removal_order(problems, cap, self.damping, group.unit) if problems and cap > 0 else None
            costs.append(order[1] if order is not None else np.zeros(0))
            each.append(channel_macs(group, statistics.shapes) * group.unit)
            steps.append(removal_steps(units, self._multiple(group)))
        counts = allocate(costs, each, self.flops * macs, steps)
        reachable = sum(count * share for count, share in zip(counts, each, strict=True))
        if reachable < self.flops * macs:
            report.details["flops_note"] = (
                f"only {reachable / max(macs, 1):.3f} of the multiply-adds can go within max_ratio"
                f" {self.max_ratio} of the prunable groups"
            )
        return {id(group.producer): count for group, count in zip(groups, counts, strict=True)}

    def _prune(
        self, group: ChannelGroup, plan: ChannelPlan | None, uses, names: NameAllocator, report: PassReport
    ) -> dict[str, object] | None:
        """Cut the group (re-fitting its consumers when planned); the report entry, or None."""
        remove = self._remove_count(group, plan)
        if remove == 0:
            wanted = zero_count(self.ratio, group.channels // group.unit) if plan is None or plan.counts is None else 0
            if wanted and self._multiple(group) > 1:
                report.skip(
                    "node",
                    _label(group.producer),
                    f"kept at {group.channels} channels: removing {wanted} would leave a width that is not a"
                    f" multiple of {self._multiple(group)} (channel_multiple; odd widths run slower on CPU)",
                )
            return None
        pairs = observed_problems(group, plan.statistics, uses) if plan and id(group.producer) in plan.planned else []
        errors: list[dict[str, object]] = []
        dead = self._near_dead(group) if plan is None or plan.counts is None else None
        if pairs and self.reconstruct:
            units = removal_order([problem for _, problem in pairs], remove, self.damping, group.unit, dead)[0]
            removed = units_to_channels(units, group.unit)
            errors = reconstruct(group, removed, plan.statistics, uses, self.damping, names)  # type: ignore[union-attr]
        elif pairs:
            order = drop_order([problem for _, problem in pairs], remove, group.unit, dead)
            removed = units_to_channels(order, group.unit)
        else:
            removed = units_to_channels(np.argsort(self._unit_norms(group), kind="stable")[:remove], group.unit)
        keep = np.setdiff1d(np.arange(group.channels), removed)
        entry = _entry(group, len(keep))
        if plan is not None:
            entry["macs_removed"] = macs = round(len(removed) * channel_macs(group, plan.statistics.shapes))
            report.count("macs_removed", macs)
        if errors:
            entry["reconstruction"] = errors
        if plan is not None and not pairs:
            where = "in a subgraph" if id(group.producer) not in plan.planned else "of its consumers' inputs"
            entry["ranked_by"] = f"{self._norm()} weight norm: no calibration statistics {where}"
        report.saved_bytes += _apply(group, keep)
        report.count("heads_removed" if group.unit > 1 else "channels_removed", len(removed) // group.unit)
        report.count("groups_pruned")
        return entry

    def _norm(self) -> str:
        return "l1" if self.criterion == "l1" else "l2"

    def _unit_norms(self, group: ChannelGroup) -> np.ndarray:
        scores = channel_scores(group, self._norm())
        if group.unit == 1:
            return scores
        power = 1 if self._norm() == "l1" else 2
        return (scores**power).reshape(-1, group.unit).sum(axis=1) ** (1 / power)

    def _near_dead(self, group: ChannelGroup) -> np.ndarray:
        """Units whose weight norm is under ``min_norm_ratio`` of the largest: they always go."""
        scores = self._unit_norms(group)
        return np.flatnonzero(scores < self.min_norm_ratio * scores.max())

    def _multiple(self, group: ChannelGroup) -> int:
        """The kept count's multiple: heads are whole units already."""
        if group.unit > 1:
            return 1
        return self.channel_multiple or (8 if self.ratio or self.flops else 1)

    def _min_units(self, group: ChannelGroup) -> int:
        units = group.channels // group.unit
        return min(units, max(1, -(-self.min_channels // group.unit)))

    def _is_candidate(self, node: gs.Node, uses) -> bool:
        if node.op not in self.op_types or not is_default_domain(node) or len(node.inputs) < 2:
            return False
        if constant_weight(node.inputs[1], uses.get(node.inputs[1].name, [])) is None:
            return False
        return self._selected([node.name, node.inputs[1].name])

    def _selected(self, names: list[str]) -> bool:
        if self.include and not NamePatterns(self.include).matches(*names):
            return False
        return not (self.exclude and NamePatterns(self.exclude).matches(*names))

    def _remove_count(self, group: ChannelGroup, plan: ChannelPlan | None) -> int:
        """How many units go: the planned count (flops), else the near-dead ones or ``ratio``,
        whichever is more; never below ``min_channels``, kept count rounded up to ``channel_multiple``
        (channels; heads are whole)."""
        units = group.channels // group.unit
        if plan is not None and plan.counts is not None:
            wanted = plan.counts.get(id(group.producer), 0)
        else:
            wanted = max(len(self._near_dead(group)), zero_count(self.ratio, units))
        keep_count = max(units - wanted, self._min_units(group))
        if group.unit == 1:
            multiple = self._multiple(group)
            keep_count = min(units, -(-keep_count // multiple) * multiple)
        return units - keep_count


@dataclass
class ChannelPlan:
    """What calibration data says: the statistics, the producers observed, with ``flops`` the
    channels to remove per producer (by ``id``), and the model's multiply-adds."""

    statistics: GroupStatistics
    planned: set[int]
    counts: dict[int, int] | None
    macs: int


Scope = tuple[dict, frozenset, WeightGuard, gs.Graph | None]


def _label(node: gs.Node) -> str:
    return node.name or node.outputs[0].name


def _entry(group: ChannelGroup, kept: int) -> dict[str, object]:
    entry: dict[str, object] = {"producer": _label(group.producer), "channels_before": group.channels}
    entry["channels_after"] = kept
    if group.unit > 1:
        entry["heads_before"], entry["heads_after"] = group.channels // group.unit, kept // group.unit
    return entry


def _guarded_tensor(group: ChannelGroup, guard: WeightGuard) -> tuple[str, str] | None:
    """(tensor, reason) for the first tensor of the group a lossy pass must leave alone."""
    weights = [group.slices[name][0] for name in sorted(group.slices)] + [w for w, _, _ in group.reshapes]
    for weight in weights:
        reason = guard.reason(weight.tensor, weight.values)
        if reason:
            return weight.name, reason
    return None


def _apply(group: ChannelGroup, keep: np.ndarray) -> int:
    """Cut every tensor of the group to ``keep``; returns the bytes saved."""
    saved = 0
    for name in sorted(group.slices):
        weight, axis = group.slices[name]
        values = weight.values
        cut = np.ascontiguousarray(np.take(values, keep, axis=axis))
        saved += values.nbytes - cut.nbytes
        weight.write(cut)
    for tensor, axis, divisor in group.variables:
        shape = list(tensor.shape) if tensor.shape is not None else None
        if shape is not None and len(shape) >= -axis and isinstance(shape[axis], int):
            shape[axis] = len(keep) // divisor
            tensor.shape = shape
    for node in group.depthwise:
        node.attrs["group"] = len(keep)
    for shape_weight, position, divisor in group.reshapes:
        target = shape_weight.values.copy()
        target[position] = len(keep) // divisor
        shape_weight.write(target)
    return saved
