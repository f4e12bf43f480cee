"""Bits per weight: what a compressed model stores per weight it compressed, and per parameter.

Two counts, both from stored tensors (initializers, Constant nodes, every graph; ``weight_tensors``):
- **bits per weight**: the stored bytes of everything the passes changed (integer weights with their
  scales and zero points, codebooks, float weights that were replaced) over the elements of the
  input's float tensors they replaced. A tensor the passes left as it was (same name, dtype and
  shape in both models: RMSNorm weights, rotary caches, biases left float) counts in neither.
  This is the count llama.cpp's and ModelOpt's "4.5 bits per weight" mean.
- **bits per parameter**: every stored byte of the output over every float element of the input
  (what the file costs per parameter, the left-alone tensors included).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import onnx

from optimizer.graph.inspection import TensorInfo, weight_tensors

FLOAT_TYPES = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE"})


@dataclass(frozen=True)
class BitsMeasure:
    """Stored bytes and the elements they stand for (see the module docstring)."""

    weight_elements: int
    weight_bytes: int
    parameters: int
    stored_bytes: int
    signature: str = ""
    """A digest of the stored tensors' names, types and shapes: two models of one source that store
    the same tensors the same way have the same one."""

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_bytes / self.weight_elements if self.weight_elements else 0.0

    @property
    def bits_per_parameter(self) -> float:
        return 8.0 * self.stored_bytes / self.parameters if self.parameters else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits_per_weight": round(self.bits_per_weight, 4),
            "bits_per_parameter": round(self.bits_per_parameter, 4),
            "weight_elements": self.weight_elements,
            "weight_bytes": self.weight_bytes,
            "parameters": self.parameters,
            "stored_bytes": self.stored_bytes,
        }


def _key(info: TensorInfo) -> tuple[str, str, tuple[int, ...]]:
    return info.name, info.dtype, info.shape


def measure_bits(source: onnx.ModelProto, compressed: onnx.ModelProto) -> BitsMeasure:
    """Bits per weight and per parameter of ``compressed`` against the ``source`` it came from."""
    before, after = weight_tensors(source), weight_tensors(compressed)
    kept = Counter(_key(info) for info in before) & Counter(_key(info) for info in after)
    weight_elements = parameters = 0
    unmatched = Counter(kept)
    for info in before:
        if info.dtype in FLOAT_TYPES:
            parameters += math.prod(info.shape)
            weight_elements += 0 if unmatched[_key(info)] > 0 else math.prod(info.shape)
        unmatched[_key(info)] -= 1 if unmatched[_key(info)] > 0 else 0
    stored = sum(info.size_bytes for info in after)
    unmatched = Counter(kept)
    kept_bytes = 0
    for info in after:
        if unmatched[_key(info)] > 0:
            unmatched[_key(info)] -= 1
            kept_bytes += info.size_bytes
    layout = hashlib.blake2b(digest_size=16)
    for info in sorted(after, key=lambda info: (info.graph, info.name)):
        layout.update(repr((info.graph, info.name, info.dtype, info.shape)).encode())
    return BitsMeasure(weight_elements, stored - kept_bytes, parameters, stored, layout.hexdigest())
