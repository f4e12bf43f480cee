"""Clip-range searches over a calibration histogram: MSE-optimal and entropy (KL) thresholds.

Both scan candidate ranges inside the unclipped one and evaluate every candidate at once from prefix
sums of the histogram, so a 2048-bin search costs a few
milliseconds instead of one Python loop per threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_CANDIDATES = 512
ASYMMETRIC_GRID = 256
ENTROPY_ROUNDS = 2
_EMPTY_GROUP_COUNT = 0.5
"""Entropy: a quantized group with no count but some clipped mass gets half a count, so the
divergence stays finite but large (TensorRT smooths zero bins the same way)."""


@dataclass(frozen=True)
class HistogramView:
    """What the searches read from a ``StreamingHistogram``."""

    counts: np.ndarray
    half_range: float
    zeros: int

    @property
    def bins(self) -> int:
        return self.counts.size // 2

    @property
    def width(self) -> float:
        return self.half_range / self.bins


def _plogp(values: np.ndarray) -> np.ndarray:
    positive = values > 0
    return np.where(positive, values * np.log(np.where(positive, values, 1.0)), 0.0)


def _candidate_scales(count: int, smallest: float) -> np.ndarray:
    smallest = min(max(smallest, 1.0 / count), 1.0)
    return np.linspace(smallest, 1.0, count)


def mse_range(view: HistogramView, low: float, high: float, levels: int, *, symmetric: bool) -> tuple[float, float]:
    """The clip range inside ``[low, high]`` minimizing clipping plus rounding error.

    Symmetric: one threshold ``[-t, t]``. Asymmetric: both ends on a grid, because an outlier
    on one side must not widen the other.
    """
    scales = _candidate_scales(MAX_CANDIDATES, 1.0 / view.bins)
    if symmetric:
        errors = mse_errors(view, scales * low, scales * high, levels)
        best = float(scales[int(np.argmin(errors))])
        return low * best, high * best
    side = _candidate_scales(ASYMMETRIC_GRID, 1.0 / view.bins)
    lows = np.repeat(side * low, side.size)
    highs = np.tile(side * high, side.size)
    best = int(np.argmin(mse_errors(view, lows, highs, levels)))
    return float(lows[best]), float(highs[best])


def mse_errors(view: HistogramView, lows: np.ndarray, highs: np.ndarray, levels: int) -> np.ndarray:
    """Expected squared error of each candidate range: clipping plus step²/12 per non-zero
    value inside (exact zeros stay exact on the grid). Values stand at their bin centers."""
    counts = view.counts
    centers = (np.arange(counts.size) - view.bins + 0.5) * view.width
    zero_prefix = np.zeros(1)
    s0 = np.concatenate([zero_prefix, np.cumsum(counts)])
    s1 = np.concatenate([zero_prefix, np.cumsum(counts * centers)])
    s2 = np.concatenate([zero_prefix, np.cumsum(counts * centers * centers)])
    first_inside = np.searchsorted(centers, lows, side="left")
    past_inside = np.searchsorted(centers, highs, side="right")
    left = lows**2 * s0[first_inside] - 2 * lows * s1[first_inside] + s2[first_inside]
    right_s0, right_s1, right_s2 = (s[-1] - s[past_inside] for s in (s0, s1, s2))
    right = right_s2 - 2 * highs * right_s1 + highs**2 * right_s0
    inside = np.maximum(s0[past_inside] - s0[first_inside] - view.zeros, 0.0)
    step = (highs - lows) / (levels - 1)
    return np.maximum(left, 0.0) + np.maximum(right, 0.0) + inside * step**2 / 12.0


def entropy_range(view: HistogramView, low: float, high: float, levels: int, *, symmetric: bool) -> tuple[float, float]:
    """The clip range inside ``[low, high]`` minimizing KL(P||Q), TensorRT-style.

    Symmetric: one threshold. Asymmetric: each end in turn with the other fixed, twice
    (coordinate descent), since a 2-D scan of windows would cost ``levels`` times more.
    """
    groups = levels - 1
    scales = _candidate_scales(MAX_CANDIDATES, groups / max((high - low) / view.width, 1.0))
    if symmetric:
        best = _best_window(view, scales * low, scales * high, groups)
        return (low * scales[best], high * scales[best]) if best is not None else (low, high)
    best_low, best_high = low, high
    for _ in range(ENTROPY_ROUNDS):
        for moving_low in (False, True):
            lows = scales * low if moving_low else np.full_like(scales, best_low)
            highs = np.full_like(scales, best_high) if moving_low else scales * high
            best = _best_window(view, lows, highs, groups)
            if best is not None:
                best_low, best_high = float(lows[best]), float(highs[best])
    return best_low, best_high


def _best_window(view: HistogramView, lows: np.ndarray, highs: np.ndarray, groups: int) -> int | None:
    """Index of the candidate with the smallest divergence; windows under ``groups`` bins
    are not tried (raise ``bins`` to let the search clip further)."""
    last = view.counts.size
    starts = np.clip(view.bins + np.floor(lows / view.width + 1e-9), 0, last).astype(np.intp)
    ends = np.clip(view.bins + np.ceil(highs / view.width - 1e-9), 0, last).astype(np.intp)
    usable = np.flatnonzero(ends - starts >= groups)
    if usable.size == 0:
        return None
    divergence = _window_divergence(view.counts, starts[usable], ends[usable], groups)
    return int(usable[int(np.argmin(divergence))])


def _window_divergence(counts: np.ndarray, starts: np.ndarray, ends: np.ndarray, groups: int) -> np.ndarray:
    """KL(P||Q) for every window ``[starts[i], ends[i])`` at once."""
    zero_prefix = np.zeros(1)
    s0 = np.concatenate([zero_prefix, np.cumsum(counts)])
    nonzero = np.concatenate([zero_prefix, np.cumsum(counts > 0)])
    plogp_prefix = np.concatenate([zero_prefix, np.cumsum(_plogp(counts))])
    total = s0[-1]
    left_out, right_out = s0[starts], total - s0[ends]
    first, last = counts[starts], counts[ends - 1]
    p_log_p = (
        plogp_prefix[ends]
        - plogp_prefix[starts]
        - _plogp(first)
        - _plogp(last)
        + _plogp(first + left_out)
        + _plogp(last + right_out)
    )
    lengths = ends - starts
    edges = starts[:, None] + (np.arange(groups + 1)[None, :] * lengths[:, None]) // groups
    group_sums = s0[edges[:, 1:]] - s0[edges[:, :-1]]
    group_nonzero = nonzero[edges[:, 1:]] - nonzero[edges[:, :-1]]
    group_nonzero[:, 0] += (first == 0) & (left_out > 0)
    group_nonzero[:, -1] += (last == 0) & (right_out > 0)
    group_p = group_sums.copy()
    group_p[:, 0] += left_out
    group_p[:, -1] += right_out
    has_p = group_nonzero > 0
    q_values = np.maximum(group_sums, _EMPTY_GROUP_COUNT) / np.where(has_p, group_nonzero, 1)
    p_log_q = np.where(has_p, group_p * np.log(q_values), 0.0).sum(axis=1)
    q_total = np.maximum(s0[ends] - s0[starts], _EMPTY_GROUP_COUNT)
    return (p_log_p - p_log_q) / total + np.log(q_total / total)
