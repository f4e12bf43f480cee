"""What a user of a decoder LLM cares about, measured with onnxruntime on the CPU (issue 17).

For a candidate ONNX decoder (onnxruntime-genai's builder layout: ``input_ids``, ``attention_mask``,
optional ``position_ids``, ``past_key_values.N.key/value`` in, ``logits`` and ``present.N.key/value``
out) against the fp32 model, on held-out text:
- perplexity over fixed windows of held-out tokens (each window a fresh prefill);
- KL(fp32 || candidate) of the next-token distributions and top-1 agreement, per position;
- greedy generation: how many of N new tokens match fp32's, prompt by prompt (prefix until the
  first difference), with the KV cache fed back as in deployment;
- prefill and decode tokens/s, every model in the same rounds (order reversed every other round),
  reported as the median of same-round ratios to fp32, next to a second fp32 session's (noise).
Sessions, the cache and the timing are the library's (what ``validate`` and ``bench`` run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optimizer.verify.benchmark import benchmark
from optimizer.verify.generation import greedy, session_decoder, step
from optimizer.verify.runtime import create_session, resolve_provider

WINDOW = 256
PROMPT = 32


@dataclass
class Quality:
    perplexity: float
    kl: float
    top1: float
    greedy_match: float
    greedy_exact: float
    perplexity_delta: float = 0.0
    perplexity_2se: float = 0.0
    """Perplexity minus fp32's, and twice its standard error from the spread of the paired
    per-window differences of mean log-likelihood (differences within it are noise of the text)."""


class Decoder:
    """One onnxruntime session of a KV-cache decoder, driven by the library's decoder code
    (``optimizer.calibration.decoder_io``, ``optimizer.verify.generation``): the cache sizes come
    from the genai_config.json next to the model."""

    def __init__(self, path: Path, threads: int = 2):
        self.path = Path(path)
        self.session, _ = create_session(self.path, resolve_provider("cpu"), threads=threads, spinning=False)
        layout = session_decoder(self.session, self.path.parent)
        if layout is None:
            raise ValueError(f"{path}: not a KV-cache decoder")
        self.layout = layout

    def forward(self, ids: np.ndarray, cache: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [1, len(ids), vocab] for ``ids`` after ``cache`` (None: an empty cache)."""
        return step(self.session, self.layout, ids, cache, label=str(self.path), timeout_s=None)

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        return greedy(self.session, self.layout, np.array(prompt, np.int64), new_tokens, label=str(self.path), timeout_s=None)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def windows(tokens: list[int], count: int) -> list[np.ndarray]:
    return [np.array([tokens[i * WINDOW : (i + 1) * WINDOW]]) for i in range(min(count, len(tokens) // WINDOW))]


def quality(reference: Decoder, candidate: Decoder, chunks: list[np.ndarray], prompts: list[list[int]], new: int) -> Quality:
    nll, ref_nll, kl, agree, positions = 0.0, 0.0, 0.0, 0, 0
    differences = []
    for ids in chunks:
        ref = log_softmax(reference.forward(ids, None)[0][0, :-1])
        got = log_softmax(candidate.forward(ids, None)[0][0, :-1])
        targets = ids[0, 1:]
        window_nll = -float(got[np.arange(len(targets)), targets].sum())
        window_ref = -float(ref[np.arange(len(targets)), targets].sum())
        nll, ref_nll = nll + window_nll, ref_nll + window_ref
        differences.append((window_nll - window_ref) / len(targets))
        kl += float((np.exp(ref) * (ref - got)).sum())
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        positions += len(targets)
    matches, exact = [], 0
    for prompt in prompts:
        want, have = reference.greedy(prompt, new), candidate.greedy(prompt, new)
        same = next((i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b), new)
        matches.append(same / new)
        exact += same == new
    perplexity, ref_perplexity = float(np.exp(nll / positions)), float(np.exp(ref_nll / positions))
    spread = float(np.std(differences, ddof=1) / np.sqrt(len(differences))) if len(differences) > 1 else 0.0
    return Quality(
        perplexity,
        kl / positions,
        agree / positions,
        float(np.mean(matches)),
        exact / len(prompts),
        perplexity - ref_perplexity,
        2.0 * ref_perplexity * spread,
    )


def speed(decoders: dict[str, Decoder], prompt: np.ndarray, new: int, rounds: int) -> dict[str, dict[str, float]]:
    """Prefill and decode tokens/s per model, timed in the same rounds by the library's benchmark
    (``optimizer.verify.benchmark``: order reversed every other round); ratios to the first model."""
    names = list(decoders)
    first = decoders[names[0]]
    result = benchmark(
        [decoders[name].path for name in names],
        [first.layout.feed(prompt)],
        names=names,
        warmup=1,
        rounds=rounds,
        threads=2,
        timeout_s=None,
        generate_tokens=new,
    )
    assert result.decoding is not None
    return {
        timing.name: {
            "prefill_tok_s": timing.prefill_tokens_per_s,
            "decode_tok_s": timing.decode_tokens_per_s,
            "prefill_ratio": timing.prefill_ratio,
            "decode_ratio": timing.decode_ratio,
        }
        for timing in result.decoding
    }
