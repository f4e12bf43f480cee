"""Which input channels of a layer to remove, and the layer's weights re-fitted without them, from
second moments of its input on calibration data (structured optimal brain surgeon + least squares).

A layer computes ``Y = X @ W`` with ``W`` of C x N (one row per input channel; for a Conv, the row
of channel c is its kernel slice for every output channel and position, and ``X``'s second moments
are taken over every position: spatial cross-terms are ignored). ``G`` is the input's second moment
matrix, augmented with a constant feature (index C) when the layer has a bias: ``G = [X 1]^T [X 1]``.

Removing channel c and moving its contribution onto the remaining channels (and the bias) costs
``||W_c||^2 / [G^-1]_cc`` in ``||Y - Y'||^2``: the optimal brain surgeon saliency of a whole row.
``removal_order`` removes channels in that order, a block at a time, updating ``G^-1`` and the
weights after each block, so correlated channels are not both counted as cheap. ``refit`` then
solves the least-squares problem for the final set exactly: ``W_F' = W_F + G_FF^-1 G_FR W_R``.
Errors are relative: divided by the layer's output energy ``tr(W^T G W)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ORDER_BLOCKS = 32
"""Blocks the removal order is computed in (fewer: faster, less exact)."""


@dataclass(frozen=True)
class ChannelProblem:
    """One layer reading the channels: ``moments`` ((C or C+1) square; the last index is the
    constant feature when ``intercept``) and ``weight`` (C x N, rows = input channels)."""

    moments: np.ndarray
    weight: np.ndarray
    intercept: bool

    @property
    def channels(self) -> int:
        return self.weight.shape[0]

    def augmented_weight(self) -> np.ndarray:
        """The weight with a zero row for the constant feature (the bias change goes there)."""
        if not self.intercept:
            return np.asarray(self.weight, np.float64)
        return np.vstack([self.weight, np.zeros((1, self.weight.shape[1]))]).astype(np.float64)

    def energy(self) -> float:
        """``tr(W^T G W)``: the output's second moment (floored, so that an unused layer is not a 0/0)."""
        weight = self.augmented_weight()[: self.channels]
        moments = self.moments[: self.channels, : self.channels]
        return max(_quadratic(moments, weight), 1e-30)


@dataclass(frozen=True)
class Refit:
    """The re-fitted rows of the kept channels, the bias change (None without intercept), and the
    relative output error with the channels just dropped (``error_before``) and after the refit."""

    kept_weight: np.ndarray
    bias_delta: np.ndarray | None
    error_before: float
    error_after: float


def damped(moments: np.ndarray, damping: float, channels: int) -> np.ndarray:
    """``G`` with ``damping`` x its mean channel diagonal added to the channels' diagonal (never to
    the constant feature), and dead channels (zero diagonal) given a unit diagonal."""
    damped_moments = np.array(moments, np.float64)
    diagonal = np.diag(damped_moments)[:channels]
    dead = np.flatnonzero(diagonal <= 0)
    damped_moments[dead, dead] = 1.0
    mean = float(np.mean(diagonal)) if diagonal.size and np.mean(diagonal) > 0 else 1.0
    index = np.arange(channels)
    damped_moments[index, index] += damping * mean
    return damped_moments


def removal_order(
    problems: list[ChannelProblem], count: int, damping: float, unit: int = 1, first: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` units (``unit`` consecutive channels each: an attention head) to remove,
    in order, and each one's marginal relative error (summed over the layers reading the channels)
    at the moment it was removed; the units in ``first`` go first, whatever they cost."""
    channels = problems[0].channels
    units = channels // unit
    count = min(count, units - 1)
    inverses = [np.linalg.inv(damped(p.moments, damping, channels)) for p in problems]
    weights = [p.augmented_weight() for p in problems]
    for problem, weight in zip(problems, weights, strict=True):
        weight[np.flatnonzero(np.diag(problem.moments)[:channels] <= 0)] = 0.0  # never carries a signal
    energies = [p.energy() for p in problems]
    alive = np.ones(units, bool)
    order: list[int] = []
    costs: list[float] = []
    block = max(1, -(-count // ORDER_BLOCKS))
    while len(order) < count:
        scores = np.zeros(units)
        for inverse, weight, energy in zip(inverses, weights, energies, strict=True):
            scores += _unit_scores(inverse, weight[:channels], unit) / energy
        scores[~alive] = np.inf
        forced = [] if first is None else [u for u in first.tolist() if alive[u]][: count - len(order)]
        chosen = (
            np.asarray(forced, np.int64)
            if forced
            else np.argsort(scores, kind="stable")[: min(block, count - len(order))]
        )
        order.extend(int(c) for c in chosen)
        costs.extend(float(scores[c]) for c in chosen)
        alive[chosen] = False
        rows = (chosen[:, None] * unit + np.arange(unit)).ravel()
        for index, (inverse, weight) in enumerate(zip(inverses, weights, strict=True)):
            inverses[index], weights[index] = _remove(inverse, weight, rows)
    return np.asarray(order, np.int64), np.asarray(costs)


def _unit_scores(inverse: np.ndarray, weight: np.ndarray, unit: int) -> np.ndarray:
    """Optimal brain surgeon saliency of removing each unit: ``tr(W_B^T [G^-1]_BB^-1 W_B)``."""
    channels = weight.shape[0]
    if unit == 1:
        return (weight**2).sum(axis=1) / np.maximum(np.diag(inverse)[:channels], 1e-30)
    units = channels // unit
    square = inverse[:channels, :channels].reshape(units, unit, units, unit)
    blocks = square[np.arange(units), :, np.arange(units), :] + 1e-30 * np.eye(unit)
    rows = weight.reshape(units, unit, -1)
    return np.einsum("uir,uir->u", rows, np.linalg.solve(blocks, rows))


def units_to_channels(units: np.ndarray, unit: int) -> np.ndarray:
    return np.sort((np.asarray(units, np.int64)[:, None] * unit + np.arange(unit)).ravel())


def drop_order(
    problems: list[ChannelProblem], count: int, unit: int = 1, first: np.ndarray | None = None
) -> np.ndarray:
    """The ``count`` units whose plain removal (no compensation) costs the least output error:
    ``||W_c||^2 G_cc`` summed over the unit, relative to each layer's output energy; the units in
    ``first`` before any other."""
    channels = problems[0].channels
    scores = np.zeros(channels)
    for problem in problems:
        weight = np.asarray(problem.weight, np.float64)
        scores += (weight**2).sum(axis=1) * np.diag(problem.moments)[:channels] / problem.energy()
    per_unit = scores.reshape(-1, unit).sum(axis=1)
    if first is not None:
        per_unit[first] = -np.inf
    return np.argsort(per_unit, kind="stable")[: min(count, per_unit.size - 1)]


def _remove(inverse: np.ndarray, weight: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``G^-1`` and the weights after removing ``chosen`` with optimal compensation."""
    pivot = np.linalg.inv(inverse[np.ix_(chosen, chosen)])
    columns = inverse[:, chosen] @ pivot
    weight = weight - columns @ weight[chosen]
    inverse = inverse - columns @ inverse[chosen, :]
    weight[chosen] = 0.0
    inverse[chosen, :] = 0.0
    inverse[:, chosen] = 0.0
    inverse[chosen, chosen] = 1.0
    return inverse, weight


def refit(problem: ChannelProblem, removed: np.ndarray, damping: float) -> Refit:
    """Least-squares weights for the kept channels (and the bias change) once ``removed`` go."""
    channels = problem.channels
    moments = damped(problem.moments, damping, channels)
    size = moments.shape[0]
    mask = np.zeros(size, bool)
    mask[removed] = True
    kept, gone = np.flatnonzero(~mask), np.flatnonzero(mask)
    weight = problem.augmented_weight()
    correction = np.linalg.solve(moments[np.ix_(kept, kept)], moments[np.ix_(kept, gone)]) @ weight[gone]
    new = weight.copy()
    new[kept] += correction
    new[gone] = 0.0
    energy = problem.energy()
    exact = np.array(problem.moments, np.float64)
    dropped = weight.copy()
    dropped[gone] = 0.0
    error_before = _error(exact, weight - dropped) / energy
    error_after = _error(exact, weight - new) / energy
    channel_kept = kept[kept < channels]
    bias = new[channels] if problem.intercept else None
    return Refit(new[channel_kept].astype(np.float32), bias, error_before, error_after)


def _error(moments: np.ndarray, difference: np.ndarray) -> float:
    return max(_quadratic(moments, difference), 0.0)


def _quadratic(moments: np.ndarray, weight: np.ndarray) -> float:
    """``tr(W^T G W)`` by matrix products (a three-operand einsum would loop in Python-speed C)."""
    return float(np.sum((moments @ weight) * weight))


def relative_output_error(moments: np.ndarray, reference: np.ndarray, candidate: np.ndarray) -> float:
    """``||X W' - X W||^2 / ||X W||^2`` from ``G = X^T X`` (``W`` K x N, rows = input features)."""
    reference64 = np.asarray(reference, np.float64)
    moments64 = np.asarray(moments, np.float64)
    energy = max(_error(moments64, reference64), 1e-30)
    return _error(moments64, np.asarray(candidate, np.float64) - reference64) / energy


def allocate(
    costs: list[np.ndarray], macs: list[float], budget: float, steps: list[list[int]] | None = None
) -> list[int]:
    """How many units to remove from each group so that the multiply-adds removed reach ``budget``
    at the least relative error per multiply-add: ``costs[g]`` are group g's marginal errors in
    removal order (made non-decreasing), each unit of it worth ``macs[g]``. ``steps[g]`` are the
    sizes group g loses units in (``removal_steps``; default one at a time), a step's cost the sum
    of its units'."""
    items: list[tuple[float, int, int, int]] = []
    for group, (cost, each) in enumerate(zip(costs, macs, strict=True)):
        if each <= 0 or not cost.size:
            continue
        ordered = np.maximum.accumulate(cost)
        start = 0
        for index, size in enumerate(steps[group] if steps else [1] * cost.size):
            if start + size > cost.size:
                break
            items.append((float(ordered[start : start + size].sum()) / (size * each), group, index, size))
            start += size
    items.sort()
    counts = [0] * len(costs)
    taken = [0] * len(costs)
    removed = 0.0
    for _, group, index, size in items:
        if removed >= budget:
            break
        if index == taken[group]:
            taken[group] += 1
            counts[group] += size
            removed += size * macs[group]
    return counts


def removal_steps(units: int, multiple: int) -> list[int]:
    """Step sizes that keep the count of ``units`` left a multiple of ``multiple``: first down to a
    multiple, then a whole multiple at a time."""
    first = [units % multiple] if units % multiple else []
    return first + [multiple] * ((units - sum(first)) // multiple)
