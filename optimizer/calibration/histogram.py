"""Streaming statistics for calibration: exact running min/max and an adaptive histogram.

The histogram covers ``[-R, R]`` with ``bins`` bins on each side of zero, so zero is always a
bin edge and folding it gives the histogram of ``|x|`` exactly. ``R`` starts at the first
sample's largest magnitude and only grows, by a power of two, so growing merges whole bins and
never splits one: one pass over the data, memory fixed at ``2 * bins`` counts per tensor,
whatever the number of samples. The price is resolution: the data may cover as little as half of
``R`` (``bins / 2`` bins per side).

Clipping searches (entropy, MSE) look for a range inside the unclipped one: ``[-M, M]``
(symmetric, ``M = max |x|``) or ``[min, max]`` with zero included (asymmetric).
"""

from __future__ import annotations

import math

import numpy as np

from optimizer.calibration.clip_search import HistogramView, entropy_range, mse_range

_CHUNK_ELEMENTS = 1 << 16


class StreamingHistogram:
    """Bounded-memory statistics of every value a tensor took over all samples.

    Non-finite values (NaN, +-inf) are counted in ``nonfinite`` and left out of every statistic.
    Exact zeros are counted (``zeros``) only with ``count_zeros``; only the MSE search reads them.
    With ``max_binned``, an array with more values is binned through an evenly strided subset of
    at most that many values, each counting for ``size / subset`` values: binning costs about
    3 ns a value, ten times a min/max pass, and a megapixel feature map holds far more values
    than the histogram's bins can tell apart. Count, zeros, min and max stay exact.
    """

    def __init__(self, bins: int = 2048, *, count_zeros: bool = True, max_binned: int | None = None) -> None:
        if not isinstance(bins, int) or bins < 16:
            raise ValueError(f"bins must be an integer >= 16, got {bins!r}")
        if max_binned is not None and (not isinstance(max_binned, int) or max_binned < 1):
            raise ValueError(f"max_binned must be a positive integer or None, got {max_binned!r}")
        self.bins = bins
        self.max_binned = max_binned
        self.count_zeros = count_zeros
        self.half_range = 0.0
        self.counts: np.ndarray | None = None
        self.count = 0
        self.zeros = 0
        self.nonfinite = 0
        self.min = math.inf
        self.max = -math.inf
        self._pending_zeros = 0

    # ------------------------------------------------------------------ accumulating

    def add(self, array: np.ndarray) -> None:
        """Add every value of ``array`` (any shape; float16/bfloat16 widened to float32)."""
        values = np.asarray(array)
        if values.dtype not in (np.float32, np.float64):
            values = values.astype(np.float32)
        values, nonfinite, low, high = finite_values(values.reshape(-1))
        self.nonfinite += nonfinite
        if values.size == 0:
            return
        self.count += values.size
        if self.count_zeros:
            self.zeros += values.size - int(np.count_nonzero(values))
        self.min, self.max = min(self.min, float(low)), max(self.max, float(high))
        peak = max(-float(low), float(high))
        if peak == 0.0:
            self._add_zeros(values.size)
            return
        self._cover(peak)
        stride = 1 if self.max_binned is None else -(-values.size // self.max_binned)
        if stride > 1:
            binned = values[::stride]
            self._scatter(binned, weight=values.size / binned.size)
        else:
            self._scatter(values)

    def _add_zeros(self, amount: int) -> None:
        if self.counts is None:
            self._pending_zeros += amount
        else:
            self.counts[self.bins] += amount

    def _cover(self, peak: float) -> None:
        """Make sure ``[-peak, peak]`` lies inside the histogram range."""
        if self.counts is None:
            self.half_range = peak
            self.counts = np.zeros(2 * self.bins, dtype=np.float64)
            self.counts[self.bins] += self._pending_zeros
            self._pending_zeros = 0
        elif peak > self.half_range:
            factor = 2.0 ** math.ceil(math.log2(peak / self.half_range))
            while self.half_range * factor < peak:
                factor *= 2.0
            self._grow(factor)

    def _grow(self, factor: float) -> None:
        """Widen the range by ``factor`` (a power of two): old bins merge into new ones exactly."""
        offsets = np.arange(2 * self.bins) - self.bins
        targets = (np.floor(offsets / factor) + self.bins).astype(np.intp)
        self.counts = np.bincount(targets, weights=self.counts, minlength=2 * self.bins)
        self.half_range *= factor

    def _scatter(self, values: np.ndarray, weight: float = 1.0) -> None:
        """Bin ``values`` in cache-sized chunks through reused buffers (about 3 ns a value), each
        counting ``weight`` times (an evenly strided subset stands for the whole array).

        ``x * bins / R + bins`` truncates to the bin index: it is never below 0 since
        ``x >= -R``, and only ``x == R`` (or rounding) lands on index ``2 * bins``, folded back.
        """
        counts = self.counts
        if counts is None:
            raise ValueError("histogram range not set: _cover comes first")
        scale = values.dtype.type(self.bins / self.half_range)
        offset = values.dtype.type(self.bins)
        size = 2 * self.bins
        scaled = np.empty(min(values.size, _CHUNK_ELEMENTS), dtype=values.dtype)
        index = np.empty(scaled.size, dtype=np.intp)
        for start in range(0, values.size, _CHUNK_ELEMENTS):
            chunk = values[start : start + _CHUNK_ELEMENTS]
            part, part_index = scaled[: chunk.size], index[: chunk.size]
            np.multiply(chunk, scale, out=part)
            part += offset
            part_index[...] = part
            found: np.ndarray = np.bincount(part_index, minlength=size)
            if weight != 1.0:
                found = found * weight
            counts += found[:size]
            counts[-1] += found[size:].sum()

    def merge(self, other: StreamingHistogram) -> None:
        """Add ``other``'s values (e.g. from another worker); ranges need not match.

        When the two ranges are not a power of two apart, ``other``'s counts are spread
        linearly over the bins they overlap, which is exact for the CDF at old bin edges only.
        """
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {other.bins} and {self.bins} bins")
        self.count += other.count
        self.zeros += other.zeros
        self.nonfinite += other.nonfinite
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self._add_zeros(other._pending_zeros)
        if other.counts is None:
            return
        self._cover(other.half_range)
        self.counts += _rebin(other.counts, other.half_range, self.half_range, self.bins)

    # ------------------------------------------------------------------ reading

    @property
    def empty(self) -> bool:
        return self.count == 0

    def minmax(self) -> tuple[float, float]:
        """Exact smallest and largest finite value seen."""
        self._require_data()
        return self.min, self.max

    def bin_width(self) -> float:
        return self.half_range / self.bins

    def percentile_range(self, percentile: float, *, symmetric: bool) -> tuple[float, float]:
        """Clip at ``percentile`` of ``|x|`` (symmetric) or of each tail (asymmetric).

        Values are interpolated linearly inside a bin; zero is always included.
        """
        self._require_data()
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        if self.counts is None:
            return 0.0, 0.0
        fraction = percentile / 100.0
        if symmetric:
            magnitude = self.counts[self.bins :] + self.counts[: self.bins][::-1]
            threshold = _quantile(magnitude, 0.0, self.bin_width(), fraction)
            threshold = min(threshold, max(-self.min, self.max))
            return -threshold, threshold
        low = _quantile(self.counts, -self.half_range, self.bin_width(), 1.0 - fraction)
        high = _quantile(self.counts, -self.half_range, self.bin_width(), fraction)
        return min(max(low, self.min), 0.0), max(min(high, self.max), 0.0)

    def base_range(self, *, symmetric: bool) -> tuple[float, float]:
        """The unclipped range: ``[-M, M]`` or ``[min, max]``, zero included."""
        self._require_data()
        if symmetric:
            peak = max(-self.min, self.max, 0.0)
            return -peak, peak
        return min(self.min, 0.0), max(self.max, 0.0)

    def mse_threshold(self, num_bits: int, *, symmetric: bool) -> tuple[float, float]:
        """The clip range minimizing expected squared error: clipping plus rounding (step²/12).

        Exact zeros stay exact on the grid, so they add no rounding error.
        """
        low, high = self.base_range(symmetric=symmetric)
        if self.counts is None or high == low:
            return low, high
        return mse_range(self._view(), low, high, _levels(num_bits, symmetric), symmetric=symmetric)

    def entropy_threshold(self, num_bits: int, *, symmetric: bool) -> tuple[float, float]:
        """The clip range minimizing KL(P||Q) between the histogram and its quantized copy."""
        low, high = self.base_range(symmetric=symmetric)
        if self.counts is None or high == low:
            return low, high
        return entropy_range(self._view(), low, high, _levels(num_bits, symmetric), symmetric=symmetric)

    def _view(self) -> HistogramView:
        if self.counts is None:
            raise ValueError("empty histogram")
        return HistogramView(self.counts, self.half_range, self.zeros)

    def _require_data(self) -> None:
        if self.empty:
            raise ValueError("the histogram holds no finite value")


class RunningMinMax:
    """Exact running min/max for the "minmax" method: no histogram work at all."""

    def __init__(self) -> None:
        self.count = 0
        self.nonfinite = 0
        self.min = math.inf
        self.max = -math.inf

    def add(self, array: np.ndarray) -> None:
        values, nonfinite, low, high = finite_values(np.asarray(array).reshape(-1))
        self.nonfinite += nonfinite
        if values.size == 0:
            return
        self.count += values.size
        self.min, self.max = min(self.min, float(low)), max(self.max, float(high))

    @property
    def empty(self) -> bool:
        return self.count == 0

    def minmax(self) -> tuple[float, float]:
        if self.empty:
            raise ValueError("no finite value seen")
        return self.min, self.max


def finite_values(values: np.ndarray) -> tuple[np.ndarray, int, float, float]:
    """The finite values of a flat array, how many were not finite, and their min and max."""
    if values.size == 0:
        return values, 0, math.nan, math.nan
    low, high = values.min(), values.max()
    if np.isfinite(low) and np.isfinite(high):
        return values, 0, low, high
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return finite, values.size, math.nan, math.nan
    return finite, values.size - finite.size, finite.min(), finite.max()


def _levels(num_bits: int, symmetric: bool) -> int:
    """Grid points: symmetric int8 uses -127..127 (255), asymmetric uint8 0..255 (256)."""
    return 2**num_bits - 1 if symmetric else 2**num_bits


def _quantile(counts: np.ndarray, first_edge: float, width: float, fraction: float) -> float:
    cumulative = np.cumsum(counts)
    total = cumulative[-1]
    target = fraction * total
    index = int(np.searchsorted(cumulative, target, side="left"))
    index = min(index, counts.size - 1)
    before = cumulative[index - 1] if index > 0 else 0.0
    inside = counts[index]
    part = (target - before) / inside if inside > 0 else 1.0
    return first_edge + (index + min(max(part, 0.0), 1.0)) * width


def _rebin(counts: np.ndarray, old_half: float, new_half: float, bins: int) -> np.ndarray:
    old_edges = np.linspace(-old_half, old_half, 2 * bins + 1)
    new_edges = np.linspace(-new_half, new_half, 2 * bins + 1)
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])
    return np.diff(np.interp(new_edges, old_edges, cumulative))
