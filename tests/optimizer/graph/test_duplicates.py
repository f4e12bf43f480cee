"""Tests for optimizer.graph.duplicates, the one duplicate finder (share merges what it finds, inspect
reports it): exact, transposed, reshaped and cast copies, and inspect's summary groups."""

from __future__ import annotations

import numpy as np

from optimizer.graph.duplicates import (
    DuplicateGroup,
    StoredTensor,
    duplicate_groups,
    exact_classes,
    near_pairs,
    transform_relations,
)


def _candidates(**arrays: np.ndarray) -> list[StoredTensor]:
    return [StoredTensor(name, values, order, int(values.nbytes))
            for order, (name, values) in enumerate(arrays.items())]


def _names(groups: list[list[StoredTensor]]) -> list[list[str]]:
    return [[c.name for c in group] for group in groups]


RNG = np.random.default_rng(7)
W = RNG.standard_normal((4, 6)).astype(np.float32)


def test_exact_classes_need_equal_bytes_dtype_and_shape() -> None:
    cands = _candidates(a=W, b=W.copy(), c=W + 1, d=W.astype(np.float64), e=W.reshape(6, 4).copy(), f=W.copy())
    assert _names(exact_classes(cands)) == [["a", "b", "f"], ["c"], ["d"], ["e"]]


def test_exact_classes_split_tensors_that_differ_beyond_the_sample() -> None:
    """Two tensors equal on the strided sample (every 4th value) but not everywhere stay apart."""
    big = RNG.standard_normal(4096).astype(np.float32)
    other = big.copy()
    other[1] += 1.0
    assert _names(exact_classes(_candidates(a=big, b=other, c=big.copy()))) == [["a", "c"], ["b"]]


def test_transposed_copies_any_rank_with_their_permutation() -> None:
    cube = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    cube_p = np.ascontiguousarray(cube.transpose(2, 0, 1))
    cands = _candidates(w=W, w_t=np.ascontiguousarray(W.T), cube=cube, cube_p=cube_p)
    found = [(r.kind, r.source.name, r.derived.name, r.perm) for r in transform_relations(cands)]
    assert found == [("transposed", "w", "w_t", (1, 0)), ("transposed", "cube", "cube_p", (2, 0, 1))]


def test_a_symmetric_matrix_is_not_its_own_transposed_copy_of_another() -> None:
    cands = _candidates(w=W, x=np.ascontiguousarray(W.T) + 1)
    assert transform_relations(cands) == []


def test_reshaped_copies_same_dtype_and_bytes_other_shape() -> None:
    cands = _candidates(r=W, flat=W.reshape(-1).copy(), cube=W.reshape(2, 3, 4).copy(), other=(W + 1).reshape(-1))
    found = sorted((r.kind, r.source.name, r.derived.name) for r in transform_relations(cands))
    assert found == [("reshaped", "r", "cube"), ("reshaped", "r", "flat")]


def test_cast_copies_only_to_a_narrower_float_and_exact() -> None:
    wide = W.astype(np.float64)
    cands = _candidates(d=wide, f=W.copy(), h=W.astype(np.float16), near=(W + 1e-3).astype(np.float16))
    found = sorted((r.kind, r.source.name, r.derived.name) for r in transform_relations(cands))
    assert found == [("cast", "d", "f"), ("cast", "d", "h"), ("cast", "f", "h")]


def test_near_pairs_within_rtol_only() -> None:
    cands = _candidates(a=W, b=W + 1e-6, c=W + 0.5)
    assert [(k.name, m.name) for k, m, _, _ in near_pairs(cands, 1e-4)] == [("a", "b")]
    assert near_pairs(cands, 0.0) == []


def test_duplicate_groups_join_exact_and_transformed_copies() -> None:
    """W has an exact copy and a transposed one (one group, 2 x 96 B); B has an exact copy (32 B);
    D16 = D cast (one group, 32 B saved: the narrow copy goes, as in share)."""
    bias = RNG.standard_normal(8).astype(np.float32)
    wide = RNG.standard_normal(16).astype(np.float32)
    cands = _candidates(W=W, W_copy=W.copy(), W_t=np.ascontiguousarray(W.T), B1=bias, B2=bias.copy(),
                        D=wide, D16=wide.astype(np.float16), alone=wide + 1)
    assert duplicate_groups(cands) == [
        DuplicateGroup("transposed", ("W", "W_copy", "W_t"), 2 * 96),
        DuplicateGroup("exact", ("B1", "B2"), 32),
        DuplicateGroup("cast", ("D", "D16"), 32),
    ]


def test_duplicate_groups_replaced_copy_serves_no_further_relation() -> None:
    """b = a transposed, c = b flattened: once b is replaced by Transpose(a), share cannot derive c
    from it (c is no reshape of a), so only b's 96 B count; c = a copy joins a's exact class."""
    b = np.ascontiguousarray(W.T)
    cands = _candidates(a=W, b=b, c=b.reshape(-1).copy(), d=W.copy())
    assert duplicate_groups(cands) == [DuplicateGroup("transposed", ("a", "b", "d"), 2 * 96)]


def test_duplicate_groups_minimum_size_and_stored_bytes() -> None:
    """Wasted bytes are the callers' stored bytes (packed 4-bit: half of numpy's), and small tensors can be left out."""
    small = np.arange(4, dtype=np.int8)
    cands = [StoredTensor("p", small, 0, 2), StoredTensor("q", small.copy(), 1, 2)]
    assert duplicate_groups(cands) == [DuplicateGroup("exact", ("p", "q"), 2)]
    assert duplicate_groups(cands, min_bytes=3) == []


class _Colliding(StoredTensor):
    """Every candidate hashes alike: only the byte comparison can tell them apart."""

    def digest(self) -> bytes:
        return b"same"


def test_a_hash_collision_never_merges_different_tensors() -> None:
    big = RNG.standard_normal(4096).astype(np.float32)
    other = big.copy()
    other[1] += 1.0  # off the strided sample: equal samples, equal (colliding) hashes, different bytes
    cands = [_Colliding("a", big, 0, 96), _Colliding("b", other, 1, 96), _Colliding("c", big.copy(), 2, 96)]
    assert _names(exact_classes(cands)) == [["a", "c"], ["b"]]


def test_exact_copies_are_not_transformed_copies() -> None:
    """transform_relations runs on one copy per class; two equal tensors are no identity 'transpose'."""
    assert transform_relations(_candidates(a=W, b=W.copy())) == []
