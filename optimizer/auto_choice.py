"""Auto mode's timing and choice: every candidate timed against the input in the same rounds, the
fastest passing one kept, the most accurate among those within the noise floor of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optimizer.auto_trials import AutoSettings, Candidate
from optimizer.optimize_options import ModelInput
from optimizer.verify.benchmark import Until, benchmark, median_halfwidth


def choice_settled(keys: dict[int, tuple[int, int]]) -> Until:
    """Whether more timing rounds could change ``choose``'s pick among the passing candidates:
    ``keys`` maps each one's position in the timed list (after "input" and "input again") to its
    preference (``preference_key``). Settled when the pick stays the pick with every ratio anywhere
    in its 95% interval and the noise floor anywhere in its own (the second session's distance from
    1.0 give or take its half-width): the pick is within the floor of the fastest even at its
    slowest, their fastest and the floor's lowest, and every candidate preferred to it is outside
    even at its fastest, their slowest and the floor's highest. One passing candidate (or none) is
    settled at once: timing then only reports the ratios."""

    def settled(times_ms: list[list[float]]) -> bool:
        if len(keys) < 2:
            return True
        ratios = {index: np.asarray(times_ms[index]) / np.asarray(times_ms[0]) for index in (1, *keys)}
        median, spread = float(np.median(ratios[1])), median_halfwidth(ratios[1])
        distance, noise = abs(median - 1.0), noise_floor(median, spread)
        lowest, highest = max(distance - spread, 0.0), distance + spread
        middle = {index: float(np.median(ratios[index])) for index in keys}
        width = {index: median_halfwidth(ratios[index]) for index in keys}
        close = [index for index in keys if middle[index] <= min(middle.values()) + noise]
        pick = min(close, key=keys.__getitem__)
        others_low = min(middle[index] - width[index] for index in keys if index != pick)
        if middle[pick] + width[pick] > others_low + lowest:
            return False
        for index in (index for index in keys if keys[index] < keys[pick]):
            others_high = min(middle[other] + width[other] for other in keys if other != index)
            if middle[index] - width[index] <= others_high + highest:
                return False
        return True

    return settled


def noise_floor(again_ratio: float, again_halfwidth: float) -> float:
    """How far a second session of the input lands from 1.0, or the half-width of that ratio's 95%
    interval if wider (one median of identical models can land near 1.0 by chance)."""
    return max(abs(again_ratio - 1.0), again_halfwidth)


def preference_key(candidate: Candidate, preference: list[str]) -> tuple[int, int]:
    """``choose``'s order among candidates within the noise floor: the most accurate value first
    (its place in ``preference``), then the fewest groups backed off."""
    return preference.index(candidate.value), len(candidate.softened)


def copy_twin_timings(candidates: list[Candidate]) -> None:
    by_name = {c.name: c for c in candidates}
    for candidate in candidates:
        if candidate.same_as is not None:
            candidate.latency_ratio = by_name[candidate.same_as].latency_ratio


def time_candidates(
    candidates: list[Candidate],
    reference: ModelInput,
    paths: dict[str, Path],
    settings: AutoSettings,
    preference: list[str],
) -> tuple[float | None, int]:
    """Paired latency ratios against the input; returns the noise floor and the rounds timed.

    The noise floor is ``noise_floor`` of the input's second session. A retry that failed (wider
    ranges, groups backed off) is not timed: it cannot be chosen. Timing stops before
    ``settings.rounds`` once more rounds cannot change the choice (``choice_settled``)."""
    timed = [c for c in candidates if c.name in paths and (c.passed or not (c.variant or c.softened))]
    if not timed:
        return None, 0
    models = [reference, reference, *(paths[c.name] for c in timed)]
    names = ["input", "input again", *(c.name for c in timed)]
    result = benchmark(
        models,
        settings.feeds[:1],
        names=names,
        provider=settings.provider,
        rounds=settings.rounds,
        timeout_s=settings.timeout_s,
        until=choice_settled(_passing_keys(timed, preference)),
    )
    for candidate, timing in zip(timed, result.models[2:], strict=True):
        candidate.latency_ratio = round(timing.ratio_paired, 4)
    again = result.models[1]
    return round(noise_floor(again.ratio_paired, again.paired_halfwidth), 4), result.rounds


def _passing_keys(timed: list[Candidate], preference: list[str]) -> dict[int, tuple[int, int]]:
    """Each passing timed candidate's position in the benchmark (after the input's two sessions)
    and its preference."""
    return {2 + i: preference_key(c, preference) for i, c in enumerate(timed) if c.passed}


def choose(candidates: list[Candidate], noise: float | None, preference: list[str]) -> Candidate:
    """The fastest passing candidate; within the noise floor of it, the most accurate (first in
    ``preference``, fewest groups backed off); with none passing, the most accurate built one."""
    passing = [c for c in candidates if c.passed and c.latency_ratio is not None]
    if not passing:
        built = [c for c in candidates if c.error is None]
        return built[0] if built else candidates[0]
    fastest = min(c.latency_ratio for c in passing if c.latency_ratio is not None)
    close = [c for c in passing if c.latency_ratio is not None and c.latency_ratio <= fastest + (noise or 0.0)]
    return min(close, key=lambda c: preference_key(c, preference))


def why(chosen: Candidate, candidates: list[Candidate], noise: float | None) -> str:
    floor = noise or 0.0
    if not chosen.passed or chosen.latency_ratio is None:
        return f"no candidate passed the check: {chosen.name}, the most accurate form, is kept"
    fastest = min(c.latency_ratio for c in candidates if c.passed and c.latency_ratio is not None)
    text = (
        f"{chosen.name}: passes the check at {chosen.latency_ratio:.2f}x the input's time "
        f"(fastest passing {fastest:.2f}x, noise floor {floor:.2f})"
    )
    if chosen.softened:
        text += f"; backed off to weight-only int8: {', '.join(chosen.softened)}"
    if chosen.latency_ratio > 1.0 + floor:
        text += "; every passing candidate is slower than the input"
    return text
