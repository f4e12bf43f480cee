"""The one duplicate finder: weights that could share one stored copy, as exact copies (hash, then
bytes), near copies, and copies that equal another weight transposed, reshaped or cast to a narrower
float type.

The share pass merges what it finds (its ``Weight`` is a ``Candidate``); inspect reports it through
``duplicate_groups`` over ``StoredTensor`` candidates, replaying share's order of merging so the
bytes it reports are the bytes share saves: copies in sibling subgraphs (the branches of one If,
which share leaves apart) are split by ``scope_components``; what inspect cannot see is share's
protected tensors, which share leaves alone.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np

CASTABLE = {  # wide dtype -> narrower float dtypes an exact Cast can produce
    np.dtype(np.float64): (np.dtype(np.float32), np.dtype(np.float16)),
    np.dtype(np.float32): (np.dtype(np.float16),),
}
MAX_TRANSPOSE_RANK = 6
SAMPLE_RUNS = 8
SAMPLE_VALUES = 1024


class Candidate(Protocol):
    """What the finder needs of a weight: its values, its position in the caller's walk (results
    come in that order) and a hash of its bytes (cached by the caller across rounds)."""

    @property
    def values(self) -> np.ndarray: ...

    @property
    def order(self) -> int: ...

    def digest(self) -> bytes: ...


C = TypeVar("C", bound=Candidate)


@dataclass(eq=False)
class StoredTensor:
    """A stored weight read from a model proto (inspect's candidate): display name, dense values,
    walk position and the bytes it takes in the file."""

    name: str
    values: np.ndarray
    order: int
    stored_bytes: int
    graph: str = ""
    """Path of the graph storing it ("main", "main/if_node.then_branch", ...)."""
    _digest: bytes | None = field(default=None, repr=False)

    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = hashlib.blake2b(_raw(self.values).data, digest_size=16).digest()
        return self._digest


@dataclass(frozen=True)
class Relation(Generic[C]):
    """``derived`` equals ``source`` after one cheap op: Transpose(perm), Reshape(shape) or Cast(dtype)."""

    kind: str
    source: C
    derived: C
    perm: tuple[int, ...] = ()


@dataclass(frozen=True)
class DuplicateGroup:
    """Weights that could share one stored copy (inspect's summary): the kind of the first transform
    that joins them ("exact" when none), their names, and the bytes merging them saves."""

    kind: str
    tensors: tuple[str, ...]
    wasted_bytes: int


def exact_classes(weights: Sequence[C]) -> list[list[C]]:
    """Cs grouped by dtype, shape and bytes (hash first, bytes confirmed), in walk order.

    Only weights that share dtype and shape with another are hashed: a tensor alone in its
    shape (an embedding table, most often the largest) has no copy to find.
    """
    by_shape: dict[tuple, list[C]] = {}
    for weight in weights:
        by_shape.setdefault((weight.values.dtype.str, weight.values.shape), []).append(weight)
    buckets: dict[tuple, list[C]] = {}
    for key, members in by_shape.items():
        if len(members) == 1:
            buckets[key] = members
            continue
        sampled: dict[bytes, list[C]] = {}
        for weight in members:  # a strided sample splits most same-shape tensors before hashing
            sampled.setdefault(_sample_bytes(weight.values), []).append(weight)
        for sample, group in sampled.items():
            for weight in group:
                buckets.setdefault((*key, sample, weight.digest() if len(group) > 1 else b""), []).append(weight)
    classes: list[list[C]] = []
    for members in buckets.values():
        confirmed: list[list[C]] = []
        for weight in members:
            match = next((group for group in confirmed if _same_bytes(group[0], weight)), None)
            if match is None:
                confirmed.append([weight])
            else:
                match.append(weight)
        classes.extend(confirmed)
    return sorted(classes, key=lambda group: group[0].order)


def near_pairs(weights: Sequence[C], rtol: float) -> list[tuple[C, C, float, float]]:
    """(kept, merged, max abs error, max error relative to the kept's largest magnitude).

    Same dtype (float) and shape; each weight is merged into the first earlier weight within
    ``rtol`` and never serves as a kept copy afterwards.
    """
    groups: dict[tuple, list[C]] = {}
    for weight in weights:
        if weight.values.dtype.kind == "f" and weight.values.size > 0:
            groups.setdefault((weight.values.dtype.str, weight.values.shape), []).append(weight)
    pairs = []
    for members in groups.values():
        merged: set[int] = set()
        for index, kept in enumerate(members):
            if id(kept) in merged:
                continue
            reference = kept.values.astype(np.float64)
            scale = float(np.abs(reference).max()) or 1.0
            for other in members[index + 1 :]:
                if id(other) in merged:
                    continue
                error = float(np.abs(other.values.astype(np.float64) - reference).max())
                if error / scale <= rtol:
                    merged.add(id(other))
                    pairs.append((kept, other, error, error / scale))
    return sorted(pairs, key=lambda pair: (pair[1].order, pair[0].order))


def transform_relations(weights: Sequence[C]) -> list[Relation[C]]:
    """Reshaped, transposed and cast copies among weights that are no exact copies of each other."""
    relations = _reshaped(weights)
    related = {(id(r.source), id(r.derived)) for r in relations}
    for relation in _transposed(weights) + _cast(weights):
        pair = (id(relation.source), id(relation.derived))
        if pair not in related and pair[::-1] not in related:
            related.add(pair)
            relations.append(relation)
    return relations


def duplicate_groups(candidates: Sequence[StoredTensor], *, min_bytes: int = 0) -> list[DuplicateGroup]:
    """inspect's view of what share would merge: exact classes, then the transformed copies among
    one copy per class, applied in share's order (a copy already replaced serves no further relation).

    Each group is one set of tensors joined by those merges; ``wasted_bytes`` sums the stored bytes of
    every copy but the kept ones. Candidates under ``min_bytes`` are left out.
    """
    classes = [
        part
        for group in exact_classes([c for c in candidates if c.stored_bytes >= min_bytes])
        for part in scope_components(group)
    ]
    parent = {id(group[0]): id(group[0]) for group in classes}
    members = {id(group[0]): list(group) for group in classes}
    wasted = {id(group[0]): (len(group) - 1) * group[0].stored_bytes for group in classes}
    kinds: dict[int, str] = {}
    replaced: set[int] = set()

    def root(key: int) -> int:
        while parent[key] != key:
            key = parent[key]
        return key

    relations = transform_relations([group[0] for group in classes])
    for relation in sorted(relations, key=lambda r: (r.derived.order, r.source.order)):
        source, derived = id(relation.source), id(relation.derived)
        if source in replaced or derived in replaced or len(scope_components([relation.source, relation.derived])) > 1:
            continue
        replaced.add(derived)
        kept, joined = root(source), root(derived)
        kinds[kept] = kinds.get(kept) or kinds.get(joined) or relation.kind
        wasted[kept] += relation.derived.stored_bytes
        if joined != kept:
            parent[joined] = kept
            members[kept] += members.pop(joined)
            wasted[kept] += wasted.pop(joined)
    groups = [
        DuplicateGroup(kinds.get(key, "exact"), tuple(sorted(c.name for c in group)), wasted[key])
        for key, group in members.items()
        if len(group) > 1
    ]
    return sorted(groups, key=lambda g: (-g.wasted_bytes, g.tensors, g.kind))


def scope_components(group: Sequence[StoredTensor]) -> list[list[StoredTensor]]:
    """``group`` split by the outermost graph each member is stored under: copies in sibling
    subgraphs have no graph both are read from, so share keeps one copy in each."""
    paths = [c.graph for c in group]
    anchors = [p for p in paths if not any(_within(p, other) and p != other for other in paths)]
    parts: dict[str, list[StoredTensor]] = {}
    for member in group:
        anchor = next(a for a in anchors if _within(member.graph, a))
        parts.setdefault(anchor, []).append(member)
    return list(parts.values())


def _within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + "/")


def _reshaped(weights: Sequence[C]) -> list[Relation[C]]:
    by_size: dict[tuple, list[C]] = {}
    for weight in weights:
        if weight.values.size > 1:
            by_size.setdefault((weight.values.dtype.str, weight.values.size), []).append(weight)
    buckets: dict[tuple, list[C]] = {}
    for key, members in by_size.items():
        shapes = {weight.values.shape for weight in members}
        if len(shapes) < 2:
            continue  # same-shape copies are exact copies, found before
        sampled: dict[bytes, list[C]] = {}
        for weight in members:
            sampled.setdefault(_sample_bytes(weight.values), []).append(weight)
        for group in sampled.values():
            for weight in group if len(group) > 1 else ():
                buckets.setdefault((*key, weight.digest()), []).append(weight)
    relations: list[Relation[C]] = []
    for members in buckets.values():
        first = members[0]
        for other in members[1:]:
            same = _byte_view(first).tobytes() == _byte_view(other).tobytes()
            if other.values.shape != first.values.shape and same:
                relations.append(Relation("reshaped", first, other))
    return relations


def _transposed(weights: Sequence[C]) -> list[Relation[C]]:
    groups: dict[tuple, list[C]] = {}
    for weight in weights:
        shape = weight.values.shape
        if 2 <= len(shape) <= MAX_TRANSPOSE_RANK and weight.values.size > 1:
            groups.setdefault((weight.values.dtype.str, tuple(sorted(shape))), []).append(weight)
    relations: list[Relation[C]] = []
    for members in groups.values():
        extremes = {id(w): _extremes(w.values) for w in members}
        stats: dict[int, np.ndarray] = {}
        for first, second in itertools.combinations(members, 2):
            if extremes[id(first)] != extremes[id(second)]:  # a permutation keeps min and max exactly
                continue
            for weight in (first, second):
                if id(weight) not in stats:
                    stats[id(weight)] = _stats(weight.values)
            if not np.allclose(stats[id(first)], stats[id(second)], rtol=1e-6, atol=1e-30):
                continue
            perm = _find_permutation(first.values, second.values)
            if perm is not None:
                relations.append(Relation("transposed", first, second, perm))
    return relations


def _find_permutation(source: np.ndarray, derived: np.ndarray) -> tuple[int, ...] | None:
    """A non-identity ``perm`` with ``source.transpose(perm)`` bit-identical to ``derived``."""
    target = _raw(derived).tobytes()
    for perm in itertools.permutations(range(source.ndim)):
        if perm == tuple(range(source.ndim)):
            continue
        if tuple(source.shape[axis] for axis in perm) != derived.shape:
            continue
        if _raw(np.ascontiguousarray(source.transpose(perm))).tobytes() == target:
            return perm
    return None


def _cast(weights: Sequence[C]) -> list[Relation[C]]:
    groups: dict[tuple, list[C]] = {}
    for weight in weights:
        if weight.values.dtype.kind == "f" and weight.values.size > 0:
            groups.setdefault(weight.values.shape, []).append(weight)
    relations: list[Relation[C]] = []
    for members in groups.values():
        for wide, narrow in itertools.permutations(members, 2):
            if narrow.values.dtype not in CASTABLE.get(wide.values.dtype, ()):
                continue
            with np.errstate(over="ignore", invalid="ignore"):
                cast = wide.values.astype(narrow.values.dtype)
            if _raw(cast).tobytes() == _raw(narrow.values).tobytes():
                relations.append(Relation("cast", wide, narrow))
    return sorted(relations, key=lambda r: (r.derived.order, r.source.order))


def _sample_bytes(values: np.ndarray) -> bytes:
    """Up to ``SAMPLE_VALUES`` values (bit patterns) in a few contiguous runs spread over the tensor:
    equal tensors have equal samples. Runs, not a stride: a stride touches a page per value, and on a
    memory-mapped model that makes every same-shape tensor resident at once (a 4 GB decoder: 2.8 GB)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    run = max(1, SAMPLE_VALUES // SAMPLE_RUNS)
    if flat.size <= SAMPLE_VALUES:
        return flat.tobytes()
    starts = np.linspace(0, flat.size - run, SAMPLE_RUNS).astype(np.int64)
    return b"".join(flat[start : start + run].tobytes() for start in starts)


def _stats(values: np.ndarray) -> np.ndarray:
    """Permutation-invariant fingerprint (sum, sum of squares, min, max) used as a pre-filter."""
    data = values.astype(np.float64).reshape(-1)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(4)
    return np.array([finite.sum(), (finite * finite).sum(), finite.min(), finite.max()])


def _extremes(values: np.ndarray) -> bytes:
    """min and max as bit patterns (NaN-safe: a NaN anywhere shows in both)."""
    flat = values.reshape(-1)
    return np.array([flat.min(), flat.max()], dtype=values.dtype).tobytes()


def _raw(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values).reshape(-1).view(np.uint8)


def _byte_view(weight: C) -> np.ndarray:
    return _raw(weight.values)


def _same_bytes(first: Candidate, second: Candidate) -> bool:
    if first.values.dtype != second.values.dtype or first.values.shape != second.values.shape:
        return False
    return _raw(first.values).tobytes() == _raw(second.values).tobytes()
