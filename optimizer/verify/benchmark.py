"""Interleaved latency of several models on one provider: percentiles and ratios to the first.

Models are timed in turns within each round, in an order that reverses every other round, so
thermal throttling, turbo and background load drift affect every model alike.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from optimizer.calibration.feeds import Feed
from optimizer.errors import FeedError, ModelLoadError, OnnxCompressError, OptionError
from optimizer.progress import StageLine, progress_bar
from optimizer.verify.generation import GENERATE_TOKENS, checked_tokens, greedy, prompt_of, session_decoder, step
from optimizer.verify.runtime import (
    DEFAULT_TIMEOUT_S,
    ModelSource,
    ProviderChoice,
    as_provider_choice,
    bounded_run,
    checked_timeout,
    create_session,
    external_data_locations,
    fallback_note,
    run_session,
    session_feed,
)

NANOSECONDS_PER_MS = 1_000_000
STAGE = "benchmark"
UNTIL_FIRST_ROUND = 8
"""``benchmark(until=...)`` is first asked after this many rounds, then every ``UNTIL_EVERY``: few
looks, so that stopping at the first one that happens to look settled stays rare."""
UNTIL_EVERY = 4
Until = Callable[[list[list[float]]], bool]
"""Given every model's latencies (ms) per round so far, whether timing may stop."""


@dataclass
class ModelTiming:
    """Latency of one model; ``ratio_p50`` is its p50 over the first model's p50."""

    name: str
    size_bytes: int
    session_create_ms: float
    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    rounds: int
    ratio_p50: float
    provider_used: str
    ratio_paired: float = 1.0
    """Median over rounds of this model's time over the first model's in the same round: a slow
    spell of the machine hits both sides of a pair, so this moves less than ``ratio_p50``."""
    paired_halfwidth: float = 0.0
    """Half the width of a 95% confidence interval of ``ratio_paired`` (order statistics of the
    rounds' ratios; 0 for the first model or with fewer than 6 rounds)."""


@dataclass
class DecodeTiming:
    """A KV-cache decoder generating: the prompt's prefill, then ``new_tokens`` steps of one token.

    Ratios are medians over rounds of this model's time over the first model's in the same round."""

    name: str
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_ratio: float
    decode_ratio: float
    decode_halfwidth: float


SLOWER_MARGIN = 0.05
"""A model counts as slower only past 5% over the first, paired round by round (noise is smaller)."""


@dataclass
class BenchResult:
    """All timings of one ``benchmark`` call, plus the settings needed to reproduce it."""

    models: list[ModelTiming]
    provider_requested: str
    provider_note: str | None
    warmup: int
    rounds: int
    threads: int | None
    decoding: list[DecodeTiming] | None = None
    """Set for KV-cache decoders (``generate_tokens`` > 0): prefill and decode tokens per second."""
    decoding_note: str | None = None
    """Why a decoder's generation was not timed (a prompt and N tokens past its context, ...)."""

    def to_dict(self) -> dict:
        return asdict(self)

    def slower_notes(self, margin: float = SLOWER_MARGIN) -> list[str]:
        """One line for each model slower than the first by more than ``margin`` (paired ratio)."""
        first = self.models[0].name if self.models else ""
        decodes = {timing.name: timing for timing in self.decoding or []}
        notes = [
            f"SLOWER: '{timing.name}' takes {timing.ratio_paired:.2f}x the time of '{first}' "
            f"(median paired ratio over {self.rounds} rounds; p50 {timing.p50_ms:.3f} ms)"
            + _decode_aside(decodes, timing)
            for timing in self.models[1:]
            if timing.ratio_paired > 1.0 + margin
        ]
        return notes + [
            f"SLOWER: '{timing.name}' decodes in {timing.decode_ratio:.2f}x the time of '{first}' "
            f"(median paired ratio over {self.rounds} rounds of {timing.new_tokens} tokens)"
            for timing in (self.decoding or [])[1:]
            if timing.decode_ratio > 1.0 + margin
        ]

    def to_markdown(self) -> str:
        """A Markdown table, one row per model, with the settings above it."""
        threads = "onnxruntime default" if self.threads is None else str(self.threads)
        lines = [
            f"provider: {self.provider_requested}; warm-up: {self.warmup}; rounds: {self.rounds}; threads: {threads}",
        ]
        if self.provider_note:
            lines.append(f"note: {self.provider_note}")
        lines += [
            "",
            "| model | size MB | p50 ms | p90 ms | mean ms | min ms | ratio p50 | ratio paired (95% ±) "
            "| create ms | provider |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for timing in self.models:
            lines.append(
                f"| {timing.name} | {timing.size_bytes / 1e6:.2f} | {timing.p50_ms:.3f} | "
                f"{timing.p90_ms:.3f} | {timing.mean_ms:.3f} | {timing.min_ms:.3f} | "
                f"{timing.ratio_p50:.3f} | {_paired(timing)} | {timing.session_create_ms:.1f} | "
                f"{timing.provider_used} |"
            )
        note = [f"generation not timed: {self.decoding_note}"] if self.decoding_note else []
        return "\n".join(lines + _decoding_lines(self.decoding or []) + note)


def _decode_aside(decodes: dict[str, DecodeTiming], timing: ModelTiming) -> str:
    """For a decoder, that the latency above is a prefill, and what its decode takes."""
    found = decodes.get(timing.name)
    if found is None:
        return ""
    return f"; that is a prefill of {found.prompt_tokens} tokens: decoding takes {found.decode_ratio:.2f}x"


def _decoding_lines(decoding: list[DecodeTiming]) -> list[str]:
    if not decoding:
        return []
    first = decoding[0]
    lines = [
        "",
        f"generation: prefill of {first.prompt_tokens} tokens, then {first.new_tokens} tokens one at a time",
        "",
        "| model | prefill tokens/s | decode tokens/s | prefill ratio | decode ratio paired (95% ±) |",
        "|---|---:|---:|---:|---:|",
    ]
    for timing in decoding:
        width = f" ± {timing.decode_halfwidth:.3f}" if timing.decode_halfwidth > 0 else ""
        lines.append(
            f"| {timing.name} | {timing.prefill_tokens_per_s:.1f} | {timing.decode_tokens_per_s:.1f} | "
            f"{timing.prefill_ratio:.3f} | {timing.decode_ratio:.3f}{width} |"
        )
    return lines


def round_order(model_count: int, round_index: int) -> list[int]:
    """Model indices in the order round ``round_index`` runs them: forward, then reversed."""
    order = list(range(model_count))
    return order[::-1] if round_index % 2 else order


def model_size_bytes(model: ModelSource) -> int:
    """Bytes on disk including external data files for a path, else the serialized size."""
    if isinstance(model, bytes):
        return len(model)
    if isinstance(model, onnx.ModelProto):
        return model.ByteSize()
    path = os.fspath(model)
    try:
        header = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf and onnx raise several unrelated types
        raise ModelLoadError(f"cannot read model {path!r} to measure its size: {exc}") from exc
    folder = os.path.dirname(os.path.abspath(path))
    data_files = {os.path.normpath(os.path.join(folder, location)) for location in external_data_locations(header)}
    return os.path.getsize(path) + sum(os.path.getsize(file) for file in sorted(data_files) if os.path.isfile(file))


def _default_names(models: Sequence[ModelSource]) -> list[str]:
    names = [
        (f"model{index}" if isinstance(model, (bytes, onnx.ModelProto)) else os.path.basename(os.fspath(model)))
        for index, model in enumerate(models)
    ]
    if len(set(names)) == len(names):
        return names
    return [f"{index}:{name}" for index, name in enumerate(names)]


def _check_arguments(
    models: Sequence[ModelSource],
    feeds: Sequence,
    names: Sequence[str] | None,
    warmup: int,
    rounds: int,
) -> list[str]:
    if not models:
        raise OptionError("benchmark needs at least one model")
    if not isinstance(rounds, int) or rounds < 1:
        raise OptionError(f"rounds must be an integer >= 1, got {rounds!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise OptionError(f"warmup must be an integer >= 0, got {warmup!r}")
    if not feeds:
        raise FeedError("benchmark needs at least one feed")
    if names is None:
        return _default_names(models)
    if len(names) != len(models):
        raise OptionError(f"got {len(names)} name(s) for {len(models)} model(s)")
    if len(set(names)) != len(names):
        raise OptionError(f"model names must be unique, got {list(names)}")
    return list(names)


def benchmark(
    models: Sequence[ModelSource],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    names: Sequence[str] | None = None,
    provider: str | ProviderChoice = "cpu",
    warmup: int = 3,
    rounds: int = 20,
    threads: int | None = None,
    progress: bool = False,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    until: Until | None = None,
    generate_tokens: int = GENERATE_TOKENS,
) -> BenchResult:
    """Time every model on the same feeds, interleaved (see ``round_order``).

    Every model is warmed up before any timing starts. Round ``r`` uses feed ``r % len(feeds)``
    for all models, so each model sees the same inputs. A run longer than ``timeout_s`` raises
    ``RunTimeoutError``. ``until``, asked after round ``UNTIL_FIRST_ROUND`` and every
    ``UNTIL_EVERY`` rounds after it, stops timing before ``rounds`` when it returns True
    (``BenchResult.rounds`` says how many ran). KV-cache decoders are also timed generating
    ``generate_tokens`` tokens after a prefill of the first feed's tokens (its first row), in as
    many rounds (``BenchResult.decoding``; 0 skips it).
    """
    model_names = _check_arguments(models, feeds, names, warmup, rounds)
    checked_timeout(timeout_s)
    generate_tokens = checked_tokens(generate_tokens)
    choice = as_provider_choice(provider)
    sessions, providers_used, create_ms = _open_sessions(models, choice, threads)
    total_runs = (warmup + rounds) * len(models)
    with progress_bar(total=total_runs, desc="benchmark", unit="run", enabled=progress) as bar:
        for index in range(warmup):
            for session, name in zip(sessions, model_names, strict=False):
                run_session(session, feeds[index % len(feeds)], label=name, stage=STAGE, timeout_s=timeout_s)
                bar.update(1)
        times_ms = _timed_rounds(sessions, model_names, feeds, (rounds, until), bar, timeout_s)
    timings = [
        _timing(name, model, times, created, used)
        for name, model, times, created, used in zip(
            model_names, models, times_ms, create_ms, providers_used, strict=False
        )
    ]
    _set_ratios(timings, times_ms)
    try:
        decoding, decoding_note = (
            _decoding(sessions, model_names, feeds[0], (len(times_ms[0]), generate_tokens), timeout_s),
            None,
        )
    except OnnxCompressError as error:  # the latency above stands; say why generation has no numbers
        decoding, decoding_note = None, str(error)
    return BenchResult(
        models=timings,
        provider_requested=choice.requested,
        provider_note=fallback_note(choice, providers_used[0]),
        warmup=warmup,
        rounds=len(times_ms[0]),
        threads=threads,
        decoding=decoding,
        decoding_note=decoding_note,
    )


def _open_sessions(
    models: Sequence[ModelSource], choice: ProviderChoice, threads: int | None
) -> tuple[list, list[str], list[float]]:
    """A session per model (no spinning threads), the provider each runs on, and its creation time."""
    sessions, providers_used, create_ms = [], [], []
    for model in models:
        start_ns = time.perf_counter_ns()
        session, provider_used = create_session(model, choice, threads=threads, spinning=False)
        create_ms.append((time.perf_counter_ns() - start_ns) / NANOSECONDS_PER_MS)
        sessions.append(session)
        providers_used.append(provider_used)
    return sessions, providers_used, create_ms


def _set_ratios(timings: list[ModelTiming], times_ms: list[list[float]]) -> None:
    """Each model's p50 and paired ratios (with the paired one's 95% half-width) to the first model."""
    baseline_p50_ms = timings[0].p50_ms
    for position, timing in enumerate(timings):
        timing.ratio_p50 = 1.0 if position == 0 else _ratio(timing.p50_ms, baseline_p50_ms)
        paired = [_ratio(mine, first) for mine, first in zip(times_ms[position], times_ms[0], strict=False)]
        timing.ratio_paired = 1.0 if position == 0 else float(np.median(paired))
        timing.paired_halfwidth = 0.0 if position == 0 else median_halfwidth(paired)


def _decoding(
    sessions: list, names: list[str], feed: Feed, counts: tuple[int, int], timeout_s: float | None
) -> list[DecodeTiming] | None:
    """Prefill and decode timings when every model is the same KV-cache decoder; ``counts``:
    rounds and new tokens per round."""
    rounds, new_tokens = counts
    layout = session_decoder(sessions[0], feed=feed)
    prompt = prompt_of(feed, limit=None) if layout is not None and new_tokens > 0 else None
    if layout is None or prompt is None:
        return None
    if any(not set(layout.output_names()) <= {arg.name for arg in s.get_outputs()} for s in sessions[1:]):
        return None
    limits = {"stage": STAGE, "timeout_s": timeout_s}
    for session, name in zip(sessions, names, strict=True):
        greedy(session, layout, prompt, 2, label=name, **limits)
    prefill: list[list[float]] = [[] for _ in sessions]
    decode: list[list[float]] = [[] for _ in sessions]
    for round_index in range(rounds):
        for index in round_order(len(sessions), round_index):
            start_ns = time.perf_counter_ns()
            logits, cache = step(sessions[index], layout, prompt[None, :], None, label=names[index], **limits)
            middle_ns = time.perf_counter_ns()
            for _ in range(new_tokens):
                token = np.array([[int(np.argmax(logits[0, -1]))]])
                logits, cache = step(sessions[index], layout, token, cache, label=names[index], **limits)
            prefill[index].append((middle_ns - start_ns) / NANOSECONDS_PER_MS)
            decode[index].append((time.perf_counter_ns() - middle_ns) / NANOSECONDS_PER_MS)
    return [
        _decode_timing(name, (prefill[i], decode[i]), (prefill[0], decode[0]), (int(prompt.size), new_tokens))
        for i, name in enumerate(names)
    ]


def _decode_timing(
    name: str, mine: tuple[list[float], list[float]], first: tuple[list[float], list[float]], tokens: tuple[int, int]
) -> DecodeTiming:
    """Tokens per second from the median times; ratios paired round by round with the first model."""
    prefill_ratios = [_ratio(a, b) for a, b in zip(mine[0], first[0], strict=True)]
    decode_ratios = [_ratio(a, b) for a, b in zip(mine[1], first[1], strict=True)]
    return DecodeTiming(
        name=name,
        prompt_tokens=tokens[0],
        new_tokens=tokens[1],
        prefill_tokens_per_s=tokens[0] * 1000.0 / float(np.median(mine[0])),
        decode_tokens_per_s=tokens[1] * 1000.0 / float(np.median(mine[1])),
        prefill_ratio=float(np.median(prefill_ratios)),
        decode_ratio=float(np.median(decode_ratios)),
        decode_halfwidth=median_halfwidth(decode_ratios),
    )


def _paired(timing: ModelTiming) -> str:
    """The paired ratio with its 95% interval's half-width when there is one: "0.951 ± 0.012"."""
    width = f" ± {timing.paired_halfwidth:.3f}" if timing.paired_halfwidth > 0 else ""
    return f"{timing.ratio_paired:.3f}{width}"


def median_halfwidth(values: Sequence[float]) -> float:
    """Half the width of a distribution-free 95% confidence interval of the median: the order
    statistics n/2 -+ 0.98 sqrt(n) (binomial(n, 1/2), normal approximation); 0 below 6 values."""
    ordered = np.sort(np.asarray(values, np.float64))
    count = ordered.size
    if count < 6:
        return 0.0
    spread = 0.98 * math.sqrt(count)
    low = max(0, math.floor(count / 2 - spread))
    high = min(count - 1, math.ceil(count / 2 + spread) - 1)
    return float(ordered[high] - ordered[low]) / 2


def _timed_rounds(
    sessions: list,
    names: list[str],
    feeds: Sequence,
    limits: tuple[int, Until | None],
    bar: tqdm | StageLine,
    timeout_s: float | None,
) -> list[list[float]]:
    """Per model, the latency of each round; feeds are sliced per session before timing.
    ``limits``: at most this many rounds, fewer when ``until`` says so (see ``benchmark``)."""
    rounds, until = limits
    prepared = [
        [session_feed(session, feed, label=name) for feed in feeds]
        for session, name in zip(sessions, names, strict=False)
    ]
    bounded = [_BoundedSession(session, timeout_s) for session in sessions]
    times_ms: list[list[float]] = [[] for _ in sessions]
    for round_index in range(rounds):
        feed_index = round_index % len(feeds)
        for model_index in round_order(len(sessions), round_index):
            session_inputs = prepared[model_index][feed_index]
            times_ms[model_index].append(_run_timed_ms(bounded[model_index], session_inputs, names[model_index]))
            bar.update(1)
        done = round_index + 1
        asked = done >= UNTIL_FIRST_ROUND and (done - UNTIL_FIRST_ROUND) % UNTIL_EVERY == 0
        if until is not None and done < rounds and asked and until(times_ms):
            break
    return times_ms


@dataclass(frozen=True)
class _BoundedSession:
    """A session and the time one of its runs may take."""

    session: Any
    timeout_s: float | None


def _run_timed_ms(bounded: _BoundedSession, session_inputs: dict[str, np.ndarray], name: str) -> float:
    """One run's latency; the watchdog is armed and disarmed outside the timed span."""
    with bounded_run(name, stage=STAGE, timeout_s=bounded.timeout_s) as run_options:
        start_ns = time.perf_counter_ns()
        bounded.session.run(None, session_inputs, run_options)
        elapsed_ns = time.perf_counter_ns() - start_ns
    return elapsed_ns / NANOSECONDS_PER_MS


def _timing(name: str, model: ModelSource, times_ms: list[float], create_ms: float, provider_used: str) -> ModelTiming:
    samples = np.asarray(times_ms, dtype=np.float64)
    return ModelTiming(
        name=name,
        size_bytes=model_size_bytes(model),
        session_create_ms=create_ms,
        p50_ms=float(np.percentile(samples, 50)),
        p90_ms=float(np.percentile(samples, 90)),
        mean_ms=float(samples.mean()),
        min_ms=float(samples.min()),
        rounds=len(times_ms),
        ratio_p50=1.0,
        provider_used=provider_used,
    )


def _ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline > 0 else float("inf")
