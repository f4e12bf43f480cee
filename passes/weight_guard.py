"""Weights every lossy pass (quantize, prune, prune-channels, cluster) leaves as they are.

One rule, shared, so the passes cannot disagree:

- an initializer a training_info binding names must keep its name and meaning;
- an initializer that is also a graph input is a default a caller may override by feeding the
  name; compressing it would drop or rename what callers feed ("graph input (overridable
  initializer)");
- a weight holding NaN or +-Inf is reported and kept: int8 scales computed over an Inf turn a
  whole row into NaN, and a NaN row into zeros, where validation on generated feeds rarely
  looks ("N non-finite values"). ``allow_non_finite=True`` (quantize, prune, prune-channels)
  lets the pass compress such a tensor anyway, with its usual arithmetic: pruning keeps every
  non-finite value exactly (they rank largest) and prunes the finite ones; prune-channels ranks
  a channel holding them by a NaN or infinite norm; quantization gives the channel or block
  holding them an infinite or NaN scale, so it dequantizes to NaN or zeros: opt in only when those rows
  are never read. ``cluster`` has no opt-in: a k-means codebook cannot hold NaN or Inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.graph.interface import TRAINING_BINDING_REASON, overridable_input_ids, training_bound_ids
from optimizer.graph.walk import iter_graphs

OVERRIDABLE_INPUT_REASON = "graph input (overridable initializer)"
NON_FINITE_OPTION_HELP = "also compress weights holding NaN or Inf (default: leave them as they are, reported)"


def non_finite_count(values: np.ndarray) -> int:
    """NaN and +-Inf entries of a float array (0 for every other dtype)."""
    array = np.asarray(values)
    if array.dtype.kind not in "fc":
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


@dataclass(frozen=True)
class WeightGuard:
    """Why a lossy pass must leave a weight alone, or "" when it may compress it."""

    overridable: frozenset[int]
    bound: frozenset[int] = frozenset()
    allow_non_finite: bool = False
    overridable_names: frozenset[str] = frozenset()
    """Names of the overridable initializers: a subgraph that reads one from the outer scope holds
    its own Constant object of that name (onnx-graphsurgeon's import), so ids alone miss it."""

    @classmethod
    def of(cls, root: gs.Graph, *, allow_non_finite: bool = False) -> WeightGuard:
        names = frozenset(t.name for g in iter_graphs(root) for t in g.inputs if isinstance(t, gs.Constant))
        return cls(overridable_input_ids(root), training_bound_ids(root), allow_non_finite, names)

    def reason(self, tensor: gs.Tensor, values: np.ndarray | None) -> str:
        if id(tensor) in self.overridable or (
            isinstance(tensor, gs.Constant) and tensor.name in self.overridable_names
        ):
            return OVERRIDABLE_INPUT_REASON
        if id(tensor) in self.bound:
            return TRAINING_BINDING_REASON
        if values is not None and not self.allow_non_finite:
            count = non_finite_count(values)
            if count:
                return f"{count} non-finite values"
        return ""
