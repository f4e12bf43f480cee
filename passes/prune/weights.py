"""Weights the pruning passes may touch: where they live, who reads them, how to write them back.

A weight is read through one tensor whether it is an initializer (``gs.Constant``) or the output
of a Constant node (paddle2onnx, PP-OCR); ``optimizer.graph.weights.Weight.write`` puts new values back
in the same place, so a weight shared by several nodes is changed once and stays shared.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.calibration.sensitivity import magnitude_order, zero_count  # noqa: F401  (one magnitude rule)
from optimizer.errors import OptionError
from optimizer.graph.opsets import DEFAULT_DOMAINS
from optimizer.graph.patterns import invalid_pattern
from optimizer.graph.walk import TensorUse

WEIGHT_SLOTS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}
"""Input index that holds the weight, per prunable op type."""

NORMALIZATION_OPS = frozenset(
    {
        "BatchNormalization",
        "LayerNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "RMSNormalization",
    }
)
BIAS_SLOTS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}


def is_default_domain(node: gs.Node) -> bool:
    return node.domain in DEFAULT_DOMAINS


def check_selection(pass_name: str, op_types: tuple[str, ...], valid: Iterable[str], patterns: tuple[str, ...]) -> None:
    """The op types and name patterns a pruning pass selects by: known ops, valid regexes."""
    unknown = sorted(set(op_types) - set(valid))
    if unknown or not op_types:
        raise OptionError(
            f"pass '{pass_name}' option 'op_types' has {unknown or 'no ops'}; "
            f"valid op types: {', '.join(sorted(valid))}"
        )
    bad = invalid_pattern(patterns)
    if bad:
        raise OptionError(f"pass '{pass_name}' option 'include'/'exclude' has an invalid regex {bad}")


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
