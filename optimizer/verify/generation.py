"""What the user of a decoder language model sees: greedy generation and tokens per second.

For a KV-cache decoder (``optimizer.calibration.decoder_io``), validation also generates from
prompts taken from the samples, greedily, the cache fed back each step as in deployment, with
the reference and the candidate: how many new tokens match before the first difference. A
model's logits can agree closely position by position and still drift apart after a few tokens
of its own output, which only generating shows. The benchmark times a prefill of the prompt and
then one token at a time (decode), each model in the same rounds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.calibration.decoder_io import MASK, DecoderLayout, find_decoder
from optimizer.calibration.feeds import TOKEN_IDS, Feed, session_input_specs
from optimizer.errors import OnnxCompressError, OptionError
from optimizer.verify.runtime import DEFAULT_TIMEOUT_S, run_outputs, session_feed

GENERATE_TOKENS = 32
"""New tokens per prompt, by default: validation's greedy check and the benchmark's decode."""
MAX_TOKENS = 4096
GENERATION_PROMPTS = 4
PROMPT_TOKENS = 32
"""A prompt is the first tokens of a sample, at most this many."""


@dataclass
class GenerationCheck:
    """Greedy generation of ``new_tokens`` tokens after each prompt, candidate against reference.

    ``match``: the mean over prompts of the share of new tokens before the first one that differs
    (1.0: every prompt generated the same text). ``first_difference``: per prompt, the index of the
    first differing new token, None when all match. ``error``: why it could not be measured (a
    prompt and N tokens past the model's context, a run that failed); then ``match`` is None."""

    prompts: int
    prompt_tokens: list[int]
    new_tokens: int
    match: float | None
    identical: int
    first_difference: list[int | None]
    error: str | None = None
    summary: str = ""
    """The sentence the validation summary and the reports print (filled in when built)."""

    def __post_init__(self) -> None:
        head = f"greedy generation, {self.new_tokens} new tokens after {self.prompts} prompt(s) from the samples"
        if self.error is not None or self.match is None:
            self.summary = f"{head}: not measured ({self.error})"
            return
        self.summary = (
            f"{head}: {self.match:.3f} match the reference before the first difference; "
            f"{self.identical} of {self.prompts} prompt(s) generate the same tokens"
        )


def checked_tokens(new_tokens: object) -> int:
    """``new_tokens`` when it is a whole number in [0, MAX_TOKENS], else ``OptionError``."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, (int, np.integer)):
        raise OptionError(f"generate_tokens must be an integer, got {new_tokens!r}")
    if not 0 <= new_tokens <= MAX_TOKENS:
        raise OptionError(f"generate_tokens must be in [0, {MAX_TOKENS}], got {new_tokens}")
    return int(new_tokens)


def prompt_of(feed: Mapping[str, np.ndarray], limit: int | None = PROMPT_TOKENS) -> np.ndarray | None:
    """The first row of a sample's tokens (those its mask keeps), at most ``limit`` (None: all)."""
    ids = np.asarray(feed[TOKEN_IDS])
    if ids.ndim != 2 or ids.shape[1] == 0:
        return None
    row = ids[0]
    if MASK in feed and np.ndim(feed[MASK]) == 2:
        kept = np.asarray(feed[MASK])[0, -ids.shape[1] :] != 0
        row = row[kept] if kept.shape == row.shape else row
    return row[:limit].astype(np.int64) if row.size else None


def session_decoder(session, folder: Path | None = None, feed: Feed | None = None) -> DecoderLayout | None:
    """``find_decoder`` for an open session: its inputs and outputs, the sizes from ``folder`` or ``feed``."""
    outputs = [arg.name for arg in session.get_outputs()]
    return find_decoder(session_input_specs(session), outputs, folder, feed)


def step(
    session, layout: DecoderLayout, ids: np.ndarray, cache: Sequence[np.ndarray] | None, *, label: str, **limits
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits [batch, len(ids), vocabulary] for ``ids`` after ``cache``, and the grown cache."""
    feed = session_feed(session, layout.feed(ids, cache), label=label)
    logits, *present = run_outputs(session, layout.output_names(), feed, label=label, **limits)
    return logits, present


def greedy(session, layout: DecoderLayout, prompt: np.ndarray, new_tokens: int, *, label: str, **limits) -> list[int]:
    """The ``new_tokens`` tokens greedy decoding appends to ``prompt``."""
    logits, cache = step(session, layout, prompt[None, :], None, label=label, **limits)
    produced: list[int] = []
    while len(produced) < new_tokens:
        produced.append(int(np.argmax(logits[0, -1])))
        if len(produced) < new_tokens:
            logits, cache = step(session, layout, np.array([[produced[-1]]]), cache, label=label, **limits)
    return produced


def check_generation(
    sessions: tuple,
    labels: tuple[str, str],
    layout: DecoderLayout,
    prompts: Sequence[np.ndarray],
    new_tokens: int,
    *,
    stage: str,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> GenerationCheck:
    """Greedy generation from each prompt with ``sessions`` (reference, candidate), compared."""
    limits = {"stage": stage, "timeout_s": timeout_s}
    differences: list[int | None] = []
    for prompt in prompts:
        want = greedy(sessions[0], layout, prompt, new_tokens, label=labels[0], **limits)
        have = greedy(sessions[1], layout, prompt, new_tokens, label=labels[1], **limits)
        differences.append(next((i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b), None))
    matched = [new_tokens if first is None else first for first in differences]
    return GenerationCheck(
        prompts=len(prompts),
        prompt_tokens=[int(prompt.size) for prompt in prompts],
        new_tokens=new_tokens,
        match=float(np.mean(matched)) / new_tokens,
        identical=sum(first is None for first in differences),
        first_difference=differences,
    )


def generation_check(
    sessions: tuple, labels: tuple[str, str], samples: list[Feed], new_tokens: int, **limits: Any
) -> GenerationCheck | None:
    """Greedy generation from the samples' prompts when the reference is a KV-cache decoder."""
    if not samples or new_tokens <= 0:
        return None
    layout = session_decoder(sessions[0], feed=samples[0])
    prompts = [prompt for prompt in map(prompt_of, samples) if prompt is not None] if layout else []
    if layout is None or not prompts:
        return None
    try:
        return check_generation(sessions, labels, layout, prompts, new_tokens, **limits)
    except OnnxCompressError as error:  # information next to the verdict: a failure to generate is reported
        sizes = [int(prompt.size) for prompt in prompts]
        return GenerationCheck(len(prompts), sizes, new_tokens, None, 0, [], error=str(error))
