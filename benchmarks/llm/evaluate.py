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
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

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
    """One onnxruntime session of a decoder with a KV cache (its shape from the genai_config.json
    next to the model)."""

    def __init__(self, path: Path, threads: int = 2):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_order)
        self.present = [n.replace("past_key_values.", "present.") for n in self.past]
        self.has_positions = "position_ids" in inputs
        decoder = json.loads((Path(path).parent / "genai_config.json").read_text())["model"]["decoder"]
        self.kv_heads, self.head_dim = int(decoder["num_key_value_heads"]), int(decoder["head_size"])
        self.kv_type = np.float16 if "float16" in inputs[self.past[0]].type else np.float32

    def forward(self, ids: np.ndarray, cache: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [1, len(ids), vocab] for ``ids`` after ``cache`` (None: an empty cache)."""
        if cache is None:
            cache = [np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_type) for _ in self.past]
        done = cache[0].shape[2]
        total = done + ids.shape[1]
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, total), np.int64)}
        if self.has_positions:
            feed["position_ids"] = np.arange(done, total, dtype=np.int64)[None, :]
        feed.update(zip(self.past, cache, strict=True))
        logits, *present = self.session.run(["logits", *self.present], feed)
        return logits, present

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        logits, cache = self.forward(np.array([prompt]), None)
        produced = []
        for _ in range(new_tokens):
            token = int(np.argmax(logits[0, -1]))
            produced.append(token)
            logits, cache = self.forward(np.array([[token]]), cache)
        return produced


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return int(parts[1]), parts[2]


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
    """Prefill and decode tokens/s per model, timed in the same rounds; ratios to the first model."""
    names = list(decoders)
    prefill: dict[str, list[float]] = {n: [] for n in names}
    decode: dict[str, list[float]] = {n: [] for n in names}
    for turn in range(rounds):
        for name in names if turn % 2 == 0 else reversed(names):
            model = decoders[name]
            started = time.perf_counter()
            logits, cache = model.forward(prompt, None)
            prefill[name].append(time.perf_counter() - started)
            token = np.array([[int(np.argmax(logits[0, -1]))]])
            started = time.perf_counter()
            for _ in range(new):
                logits, cache = model.forward(token, cache)
                token = np.array([[int(np.argmax(logits[0, -1]))]])
            decode[name].append(time.perf_counter() - started)
    base = names[0]
    result = {}
    for name in names:
        result[name] = {
            "prefill_tok_s": prompt.shape[1] / statistics.median(prefill[name]),
            "decode_tok_s": new / statistics.median(decode[name]),
            "prefill_ratio": statistics.median(a / b for a, b in zip(prefill[name], prefill[base], strict=True)),
            "decode_ratio": statistics.median(a / b for a, b in zip(decode[name], decode[base], strict=True)),
        }
    return result
