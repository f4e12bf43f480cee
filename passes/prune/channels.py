"""prune-channels: remove whole output channels (Conv) or hidden units (Gemm/MatMul chains).

Each producer's channels are ranked by the L1 or L2 norm of its weight; the lowest go, and
every tensor that spans those channels shrinks with them (bias, BatchNormalization
parameters, constants of elementwise ops, depthwise Convs, the next layer's input channels,
Reshape constants), so the graph stays consistent and smaller layers run faster. Groups that
cannot be cut legally are skipped with the reason (see ``passes.prune.channel_groups``).

``ratio`` is relative to the current width, so running the pass twice with ``ratio`` > 0 cuts
twice. The default (``ratio`` 0) only removes near-dead channels, whose norm is under
``min_norm_ratio`` of the group's largest: the largest channel always stays, so a second run
finds nothing more to remove.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.errors import OptionError
from optimizer.graph.patterns import NamePatterns
from optimizer.graph.walk import graph_output_names, iter_nodes, tensor_uses
from optimizer.graph.weights import constant_weight
from optimizer.internal_errors import working_on
from optimizer.pass_base import Pass, PassContext, PassReport, PassResult, option
from optimizer.registry import register
from passes.prune.channel_groups import ChannelGroup, Illegal, channel_scores, find_group
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
    criterion: Literal["l1", "l2"] = option("l2", "channel norm used for ranking")
    op_types: tuple[str, ...] = option(PRODUCER_OPS, "producer ops whose output channels may be removed")
    include: tuple[str, ...] = option((), "only producers whose node or weight name matches (glob, or re:REGEX)")
    exclude: tuple[str, ...] = option((), "leave producers whose node or weight name matches (glob, or re:REGEX)")
    min_channels: int = option(1, "never keep fewer channels than this in a group")
    channel_multiple: int = option(1, "round the kept channel count up to a multiple of this (SIMD-friendly widths)")
    allow_non_finite: bool = option(False, NON_FINITE_OPTION_HELP)

    def __post_init__(self) -> None:
        for key in ("ratio", "min_norm_ratio"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise OptionError(f"pass 'prune-channels' option '{key}' must be in [0, 1), got {getattr(self, key)}")
        check_selection(self.name, self.op_types, PRODUCER_OPS, self.include + self.exclude)
        if self.min_channels < 1 or self.channel_multiple < 1:
            raise OptionError("pass 'prune-channels' options 'min_channels' and 'channel_multiple' must be >= 1")

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        report = PassReport()
        uses = tensor_uses(graph)
        outputs = graph_output_names(graph)
        groups: list[dict[str, object]] = []
        guard = WeightGuard.of(graph, allow_non_finite=self.allow_non_finite)
        for owner, node in list(iter_nodes(graph)):
            if not self._is_candidate(node, uses):
                continue
            label = node.name or node.outputs[0].name
            try:
                group = find_group(node, owner, uses, outputs)
            except Illegal as reason:
                report.skip("node", label, str(reason))
                continue
            guarded = _guarded_tensor(group, guard)
            if guarded is not None:
                report.skip("tensor", *guarded)
                continue
            with working_on("node", label):
                keep = self._kept_channels(group)
                if len(keep) == group.channels:
                    report.count("groups_unchanged")
                    continue
                report.saved_bytes += _apply(group, keep)
            report.count("groups_pruned")
            report.count("channels_removed", group.channels - len(keep))
            groups.append({"producer": label, "channels_before": group.channels, "channels_after": len(keep)})
        report.details["groups"] = groups
        return PassResult(graph, bool(groups), report.to_dict())

    def _is_candidate(self, node: gs.Node, uses) -> bool:
        if node.op not in self.op_types or not is_default_domain(node) or len(node.inputs) < 2:
            return False
        if constant_weight(node.inputs[1], uses.get(node.inputs[1].name, [])) is None:
            return False
        names = [node.name, node.inputs[1].name]
        if self.include and not NamePatterns(self.include).matches(*names):
            return False
        return not (self.exclude and NamePatterns(self.exclude).matches(*names))

    def _kept_channels(self, group: ChannelGroup) -> np.ndarray:
        """Indices of the channels to keep, in their original order."""
        scores = channel_scores(group, self.criterion)
        below = int(np.count_nonzero(scores < self.min_norm_ratio * scores.max()))
        remove = max(below, zero_count(self.ratio, group.channels))
        keep_count = max(group.channels - remove, min(self.min_channels, group.channels))
        keep_count = min(group.channels, -(-keep_count // self.channel_multiple) * self.channel_multiple)
        order = np.argsort(-scores, kind="stable")
        return np.sort(order[:keep_count])


def _guarded_tensor(group: ChannelGroup, guard: WeightGuard) -> tuple[str, str] | None:
    """(tensor, reason) for the first tensor of the group a lossy pass must leave alone."""
    weights = [group.slices[name][0] for name in sorted(group.slices)] + [w for w, _ in group.reshapes]
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
    for tensor, axis in group.variables:
        shape = list(tensor.shape) if tensor.shape is not None else None
        if shape is not None and len(shape) >= -axis and isinstance(shape[axis], int):
            shape[axis] = len(keep)
            tensor.shape = shape
    for node in group.depthwise:
        node.attrs["group"] = len(keep)
    for shape_weight, position in group.reshapes:
        target = shape_weight.values.copy()
        target[position] = len(keep)
        shape_weight.write(target)
    return saved
