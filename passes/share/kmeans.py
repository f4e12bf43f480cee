"""Numerics of codebook clustering: deterministic 1-D k-means per row, the uniform baseline it is
compared with, error metrics, and index packing.

Weights are scalars, so k-means is 1-D: on sorted values, every cluster is a contiguous run cut at
the midpoints between neighbouring centroids, and its sum comes from prefix sums. One Lloyd
iteration is then a batched binary search plus a few gathers (no pass over all values), which
makes a 30522x384 embedding take seconds. Every occurrence of a value counts, so clusters are
weighted by value frequency. Accumulation is float64; initialisation is deterministic
(quantiles and an even grid; the one with the lower error wins per row).
"""

from __future__ import annotations

import math

import numpy as np


def batched_searchsorted(sorted_rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Per row ``r``: how many of ``sorted_rows[r]`` are < each of ``queries[r]`` (side='left')."""
    rows, length = sorted_rows.shape
    low = np.zeros(queries.shape, dtype=np.int64)
    high = np.full(queries.shape, length, dtype=np.int64)
    row_index = np.arange(rows)[:, None]
    for _ in range(max(1, length).bit_length() + 1):
        active = low < high
        if not active.any():
            break
        middle = (low + high) // 2
        below = sorted_rows[row_index, np.minimum(middle, length - 1)] < queries
        low = np.where(active & below, middle + 1, low)
        high = np.where(active & ~below, middle, high)
    return low


def _cluster_sums(sorted_rows, prefix, prefix_sq, centroids):
    boundaries = (centroids[:, :-1] + centroids[:, 1:]) / 2.0
    cuts = batched_searchsorted(sorted_rows, boundaries)
    rows, length = sorted_rows.shape
    edges = np.concatenate([np.zeros((rows, 1), np.int64), cuts, np.full((rows, 1), length, np.int64)], axis=1)
    counts = np.diff(edges, axis=1)
    sums = np.diff(np.take_along_axis(prefix, edges, axis=1), axis=1)
    squares = np.diff(np.take_along_axis(prefix_sq, edges, axis=1), axis=1)
    return edges, counts, sums, squares


def _lloyd(sorted_rows, prefix, prefix_sq, centroids, iterations):
    previous = None
    for _ in range(iterations):
        edges, counts, sums, _ = _cluster_sums(sorted_rows, prefix, prefix_sq, centroids)
        if previous is not None and np.array_equal(edges, previous):
            break
        previous = edges
        centroids = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centroids), axis=1)
    _, counts, sums, squares = _cluster_sums(sorted_rows, prefix, prefix_sq, centroids)
    error = (squares - np.where(counts > 0, sums * sums / np.maximum(counts, 1), 0.0)).sum(axis=1)
    return centroids, error


def kmeans_rows(rows: np.ndarray, k: int, *, iterations: int = 50) -> np.ndarray:
    """Centroids ``[rows, k]`` (sorted, float64) of each row's values."""
    sorted_rows = np.sort(rows.astype(np.float64), axis=1)
    count, length = sorted_rows.shape
    zeros = np.zeros((count, 1))
    prefix = np.concatenate([zeros, np.cumsum(sorted_rows, axis=1)], axis=1)
    prefix_sq = np.concatenate([zeros, np.cumsum(sorted_rows * sorted_rows, axis=1)], axis=1)
    fractions = (np.arange(k) + 0.5) / k
    positions = np.minimum((fractions * length).astype(np.int64), length - 1)
    quantile = sorted_rows[:, positions]
    low, high = sorted_rows[:, :1], sorted_rows[:, -1:]
    grid = low + (high - low) * fractions[None, :]
    best, best_error = _lloyd(sorted_rows, prefix, prefix_sq, quantile, iterations)
    other, other_error = _lloyd(sorted_rows, prefix, prefix_sq, grid, iterations)
    centroids = np.where((other_error < best_error)[:, None], other, best)
    return _exact_when_few_values(sorted_rows, centroids)


def _exact_when_few_values(sorted_rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Rows with at most k distinct values get exactly those values as centroids (zero error)."""
    k = centroids.shape[1]
    starts = np.concatenate([np.ones((sorted_rows.shape[0], 1), bool), np.diff(sorted_rows, axis=1) != 0], axis=1)
    for row in np.flatnonzero(starts.sum(axis=1) <= k):
        distinct = sorted_rows[row][starts[row]]
        centroids[row] = np.concatenate([distinct, np.full(k - distinct.size, distinct[-1])])
    return centroids


def assign(rows: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook entry for every value (codebook rows sorted), as uint8."""
    book = codebook.astype(np.float64)
    boundaries = (book[:, :-1] + book[:, 1:]) / 2.0
    return batched_searchsorted(boundaries, rows.astype(np.float64)).astype(np.uint8)


def uniform_fake_quantize(rows: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric uniform quantization per row (scale = max |x| / (2^(bits-1) - 1)), dequantized."""
    data = rows.astype(np.float64)
    levels = 2 ** (bits - 1) - 1
    scale = np.abs(data).max(axis=1, keepdims=True) / levels
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(data / scale), -levels - 1, levels) * scale


def error_metrics(reference: np.ndarray, approximation: np.ndarray) -> tuple[float, float | None]:
    """(mean squared error, SQNR in dB; None when the error is zero)."""
    reference = reference.astype(np.float64)
    error = reference - approximation.astype(np.float64)
    noise = float((error * error).sum())
    signal = float((reference * reference).sum())
    mse = noise / max(1, reference.size)
    if noise == 0.0:
        return mse, None
    return mse, (10.0 * math.log10(signal / noise) if signal > 0 else -math.inf)


def slots_per_byte(bits: int, count: int) -> int:
    """Indices per stored byte: 4 for 2-bit, 2 for 3-4-bit, else 1 (1 also when ``count`` does not divide)."""
    slots = 4 if bits <= 2 else 2 if bits <= 4 else 1
    return slots if count % slots == 0 else 1


def pack(codes: np.ndarray, slots: int) -> np.ndarray:
    """Flat codes packed ``slots`` per byte: byte ``i`` holds codes ``i, i+q, i+2q ...`` (q = n/slots)."""
    flat = codes.reshape(-1).astype(np.uint8)
    if slots == 1:
        return flat
    width = 8 // slots
    parts = flat.reshape(slots, -1)
    packed = np.zeros(parts.shape[1], dtype=np.uint8)
    for slot in range(slots):
        packed |= (parts[slot] << np.uint8(slot * width)).astype(np.uint8)
    return packed


def unpack(packed: np.ndarray, slots: int) -> np.ndarray:
    """Inverse of ``pack`` (what the decoding nodes compute), for tests."""
    if slots == 1:
        return packed
    width = 8 // slots
    mask = np.uint8((1 << width) - 1)
    return np.concatenate([(packed >> np.uint8(slot * width)) & mask for slot in range(slots)])
