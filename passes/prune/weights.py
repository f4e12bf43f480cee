"""Weights the pruning passes may touch: where they live, who reads them, how to write them back.

A weight is read through one tensor whether it is an initializer (``gs.Constant``) or the output
of a Constant node (paddle2onnx, PP-OCR); ``WeightRef.write`` puts new values back in the same
place, so a weight shared by several nodes is changed once and stays shared.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.calibration.sensitivity import magnitude_order, zero_count  # noqa: F401  (one magnitude rule)
from optimizer.graph.core import DEFAULT_DOMAINS, TensorUse, is_constant_node, weight_values

WEIGHT_SLOTS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}
"""Input index that holds the weight, per prunable op type."""

NORMALIZATION_OPS = frozenset(
    {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
     "SimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization"}
)
BIAS_SLOTS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}


@dataclass
class WeightRef:
    """One constant tensor and every node input that reads it, in any graph."""

    name: str
    tensor: gs.Tensor
    uses: list[TensorUse]

    @property
    def values(self) -> np.ndarray:
        return weight_values(self.tensor)

    def write(self, values: np.ndarray) -> None:
        """Store ``values`` where the weight lives (initializer or Constant node)."""
        if isinstance(self.tensor, gs.Constant):
            self.tensor.values = values
            return
        producer = self.tensor.inputs[0]
        producer.attrs = {"value": gs.Constant(self.tensor.name, values)}
        self.tensor.shape = list(values.shape)


def as_weight(tensor: gs.Tensor, uses: list[TensorUse]) -> WeightRef | None:
    """A WeightRef when ``tensor`` holds a dense constant, else None."""
    if isinstance(tensor, gs.Constant):
        return WeightRef(tensor.name, tensor, uses)
    producers = tensor.inputs
    if len(producers) == 1 and is_constant_node(producers[0]):
        if isinstance(producers[0].attrs.get("value"), gs.Constant):
            return WeightRef(tensor.name, tensor, uses)
    return None


def is_default_domain(node: gs.Node) -> bool:
    return node.domain in DEFAULT_DOMAINS


def name_matches(patterns: tuple[str, ...], names: list[str]) -> bool:
    """True when a pattern matches one of ``names``: a glob, or a regex after a ``re:`` prefix."""
    for pattern in patterns:
        for name in names:
            if pattern.startswith("re:"):
                if re.search(pattern[3:], name):
                    return True
            elif fnmatch.fnmatchcase(name, pattern):
                return True
    return False


def check_patterns(patterns: tuple[str, ...]) -> str | None:
    """The first invalid regex pattern with the error, or None."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as error:
                return f"{pattern!r}: {error}"
    return None


def role_of(use: TensorUse, values: np.ndarray) -> str:
    """Why a constant read at ``use`` is not a prunable weight, for the skip report."""
    node = use.node
    label = f"{node.op} '{node.name}'"
    if values.dtype.kind not in "f":
        return f"{values.dtype} tensor (shape or index data) read by {label}; never pruned"
    if node.op in NORMALIZATION_OPS:
        return f"normalization parameter of {label}; never pruned"
    if BIAS_SLOTS.get(node.op) == use.index or (values.ndim <= 1 and node.op in ("Add", "Sub")):
        return f"bias of {label}; never pruned"
    if node.op == "Gather" and use.index == 0:
        return f"embedding table of {label}; add Gather to op_types to prune it"
    return f"read by {label} at input {use.index}, which is not a prunable weight slot"


def zero_flat(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    flat = values.ravel().copy()
    flat[indices] = 0
    return flat.reshape(values.shape)


def sparsity_of(values: np.ndarray) -> float:
    return float(np.count_nonzero(values == 0)) / max(1, values.size)
