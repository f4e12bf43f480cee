"""Find weights that could share one stored copy: exact, transposed, reshaped and cast copies.

Candidates are compared by (dtype, shape, sha256) and then byte for byte, so a hash collision
can never merge two different tensors. Output is deterministic: groups are sorted.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper


@dataclass(frozen=True)
class DuplicateGroup:
    """Weights that could share one stored copy; each tensor is in at most one group."""

    kind: str
    tensors: tuple[str, ...]
    wasted_bytes: int


@dataclass(frozen=True, eq=False)
class DuplicateCandidate:
    """A stored weight as the caller names and sizes it (``size_bytes`` as saved)."""

    name: str
    tensor: onnx.TensorProto | onnx.SparseTensorProto
    size_bytes: int


_Class = list[DuplicateCandidate]

_NARROWER_FLOATS = {
    onnx.TensorProto.DOUBLE: (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16),
    onnx.TensorProto.FLOAT: (onnx.TensorProto.FLOAT16,),
}


def _payload(tensor: onnx.TensorProto) -> tuple[bytes, np.ndarray | None]:
    """Comparable bytes of a tensor, independent of raw_data vs typed-field storage."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return b"".join(len(s).to_bytes(8, "little") + s for s in tensor.string_data), None
    try:
        array = numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError, NotImplementedError, OSError):
        return tensor.raw_data, None
    return np.ascontiguousarray(array).tobytes(), array


def _transposed_bytes(array: np.ndarray | None) -> bytes | None:
    if array is None or array.ndim != 2 or array.dtype == object:
        return None
    return np.ascontiguousarray(array.T).tobytes()


def _exact_classes(candidates: list[DuplicateCandidate]) -> dict[tuple, list[_Class]]:
    """Group by (dtype, shape, sha256), then split each bucket by a byte comparison."""
    buckets: dict[tuple, list[DuplicateCandidate]] = {}
    for candidate in candidates:
        data, _ = _payload(candidate.tensor)
        tensor = candidate.tensor
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).digest())
        buckets.setdefault(key, []).append(candidate)
    classes: dict[tuple, list[_Class]] = {}
    for key, members in buckets.items():
        confirmed: list[tuple[bytes, _Class]] = []
        for candidate in members:
            data = _payload(candidate.tensor)[0] if len(members) > 1 else b""
            match = next((group for ref, group in confirmed if ref == data), None)
            if match is None:
                confirmed.append((data, [candidate]))
            else:
                match.append(candidate)
        classes[key] = [group for _, group in confirmed]
    return classes


def _transposed_pairs(classes: dict[tuple, list[_Class]]) -> list[tuple[_Class, _Class]]:
    """Pairs of classes where one is the other's transpose: one transpose per 2-D class."""
    pairs: dict[tuple[int, int], tuple[_Class, _Class]] = {}
    order = {id(group): n for n, group in enumerate(g for gs in classes.values() for g in gs)}
    for (dtype, shape, _), groups in classes.items():
        if len(shape) != 2:
            continue
        for group in groups:
            data_t = _transposed_bytes(_payload(group[0].tensor)[1])
            if data_t is None:
                continue
            key_t = (dtype, shape[::-1], hashlib.sha256(data_t).digest())
            for other in classes.get(key_t, []):
                if other is group or _payload(other[0].tensor)[0] != data_t:
                    continue
                pair_key = tuple(sorted((order[id(group)], order[id(other)])))
                pairs.setdefault(pair_key, (group, other))
    return [pairs[key] for key in sorted(pairs)]


def _reshaped_sets(classes: dict[tuple, list[_Class]], paired: set[int]) -> list[list[_Class]]:
    """Classes with the same dtype and bytes but different shapes (one is a reshape of the other)."""
    buckets: dict[tuple, list[_Class]] = {}
    for (dtype, shape, digest), groups in classes.items():
        if math.prod(shape) > 1:
            buckets.setdefault((dtype, digest), []).extend(g for g in groups if id(g) not in paired)
    sets = []
    for groups in buckets.values():
        if len({tuple(g[0].tensor.dims) for g in groups}) < 2:
            continue
        reference = _payload(groups[0][0].tensor)[0]
        same = [g for g in groups if _payload(g[0].tensor)[0] == reference]
        if len({tuple(g[0].tensor.dims) for g in same}) > 1:
            sets.append(same)
    return sets


def _cast_pairs(
    classes: dict[tuple, list[_Class]], paired: set[int]
) -> list[tuple[_Class, _Class]]:
    """(wide, narrow) classes of one shape where narrow == wide cast to the narrower float type."""
    narrow = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    narrow_keys = {(dtype, shape) for dtype, shape, _ in classes if dtype in narrow}
    pairs = []
    for (dtype, shape, _), groups in classes.items():
        targets = [t for t in _NARROWER_FLOATS.get(dtype, ()) if (t, shape) in narrow_keys]
        for group in (g for g in groups if targets and id(g) not in paired):
            array = _payload(group[0].tensor)[1]
            for target in targets if array is not None else ():
                with np.errstate(over="ignore", invalid="ignore"):
                    data = array.astype(helper.tensor_dtype_to_np_dtype(target)).tobytes()
                for other in classes.get((target, shape, hashlib.sha256(data).digest()), []):
                    if id(other) not in paired and _payload(other[0].tensor)[0] == data:
                        pairs.append((group, other))
                        paired.update((id(group), id(other)))
    return pairs


def find_duplicates(
    candidates: list[DuplicateCandidate], min_duplicate_bytes: int
) -> list[DuplicateGroup]:
    """Exact, transposed (2-D), reshaped and cast (narrower float) copies; a transformed group
    also holds the exact copies of each side. Wasted bytes: everything but one widest copy.

    Sparse tensors and external data not loaded into memory are not compared.
    """
    compared = [
        c for c in candidates
        if isinstance(c.tensor, onnx.TensorProto)
        and not (c.tensor.data_location == onnx.TensorProto.EXTERNAL and not c.tensor.raw_data)
        and c.size_bytes >= min_duplicate_bytes
    ]
    classes = _exact_classes(compared)
    groups: list[DuplicateGroup] = []
    paired: set[int] = set()
    for first, second in _transposed_pairs(classes):
        if id(first) in paired or id(second) in paired:
            continue
        paired.update((id(first), id(second)))
        groups.append(_group("transposed", first + second))
    for sets in _reshaped_sets(classes, paired):
        paired.update(id(g) for g in sets)
        groups.append(_group("reshaped", [c for g in sets for c in g]))
    for wide, narrow in _cast_pairs(classes, paired):
        members = wide + narrow
        names = tuple(sorted(c.name for c in members))
        wasted = sum(c.size_bytes for c in members) - wide[0].size_bytes
        groups.append(DuplicateGroup("cast", names, wasted))
    for members in (g for gs in classes.values() for g in gs):
        if len(members) > 1 and id(members) not in paired:
            groups.append(_group("exact", members))
    return sorted(groups, key=lambda g: (-g.wasted_bytes, g.tensors, g.kind))


def _group(kind: str, members: _Class) -> DuplicateGroup:
    names = tuple(sorted(c.name for c in members))
    return DuplicateGroup(kind, names, (len(members) - 1) * members[0].size_bytes)
