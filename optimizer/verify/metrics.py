"""Task metrics for accuracy budgets: built-in output metrics and user callables.

A metric sees every sample's outputs of the reference and of the candidate, so it can be a
real task metric (a user's character error rate closes over the ground truth and decodes the
outputs itself). Its baseline is the metric of the reference against itself, and the *drop* is
how much worse a candidate is than that, whatever the metric's direction.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from optimizer.calibration.feeds import TOKEN_IDS
from optimizer.errors import OptionError
from optimizer.verify.runtime import (
    DEFAULT_TIMEOUT_S,
    ModelSource,
    as_provider_choice,
    create_session,
    model_label,
    run_session,
)

Outputs = list[dict[str, np.ndarray]]
MetricFunction = Callable[[Outputs, Outputs], float]
BUILTIN_METRICS = ("cosine", "sqnr", "max_abs", "top1", "topk", "kl", "perplexity")
LOGITS_OUTPUT = "logits"


@dataclass(frozen=True)
class Metric:
    name: str
    function: MetricFunction
    higher_is_better: bool

    def __call__(self, reference: Outputs, candidate: Outputs) -> float:
        value = float(self.function(reference, candidate))
        if not np.isfinite(value) and not (self.name.startswith("sqnr") and value == np.inf):
            raise OptionError(f"metric '{self.name}' returned {value}")
        return value

    def drop(self, baseline: float, value: float) -> float:
        """How much worse ``value`` is than ``baseline`` (positive = worse)."""
        return baseline - value if self.higher_is_better else value - baseline


def builtin_metric(
    name: str, *, output: str | None = None, k: int = 5, feeds: Sequence[Mapping[str, np.ndarray]] | None = None
) -> Metric:
    """cosine, sqnr (dB), max_abs, top1 or topk agreement, kl (of the softmax over the last axis, e.g. a
    language model's next-token distributions); over one named output or the worst one. perplexity:
    of a language model's next-token logits on the tokens of ``feeds`` (the samples the outputs come
    from), lower is better; the reference's own is the baseline."""
    if name == "perplexity":
        if feeds is None:
            raise OptionError("metric 'perplexity' is measured on the tokens of the samples: none were given")
        return Metric("perplexity", _perplexity(list(feeds), output), False)
    makers = {
        "cosine": (_cosine, True),
        "sqnr": (_sqnr_db, True),
        "max_abs": (_max_abs, False),
        "top1": (lambda r, c: _topk_agreement(r, c, 1), True),
        "topk": (lambda r, c: _topk_agreement(r, c, k), True),
        "kl": (_kl_divergence, False),
    }
    if name not in makers:
        raise OptionError(
            f"unknown metric '{name}'; built-in metrics: {', '.join(BUILTIN_METRICS)}, or package.module:function"
        )
    per_output, higher = makers[name]
    label = name if output is None else f"{name}[{output}]"
    return Metric(label, _over_outputs(per_output, output, higher), higher)


def load_metric(
    spec: str,
    *,
    higher_is_better: bool | None = None,
    output: str | None = None,
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> Metric:
    """A built-in name, or ``package.module:function`` taking (reference_outputs, candidate_outputs);
    ``feeds``: the samples the outputs will come from (perplexity reads their tokens)."""
    if ":" not in spec:
        metric = builtin_metric(spec, output=output, feeds=feeds)
        if higher_is_better is not None and higher_is_better != metric.higher_is_better:
            raise OptionError(f"metric '{spec}' is {'higher' if metric.higher_is_better else 'lower'}-is-better")
        return metric
    if higher_is_better is None:
        raise OptionError(f"metric '{spec}': say whether higher or lower is better (--metric-direction)")
    return Metric(spec, resolve_user_metric(spec), higher_is_better)


def check_metric_spec(spec: str) -> None:
    """Refuse (OptionError) a metric that is neither built in nor spelled ``package.module:function``.

    Importing and checking the function is ``resolve_user_metric``'s job, when the metric is used.
    """
    if ":" not in spec:
        builtin_metric(spec, feeds=[])
        return
    module_name, _, attribute = spec.partition(":")
    if not all(part.isidentifier() for part in [*module_name.split("."), attribute]):
        raise OptionError(f"metric '{spec}': expected a built-in name or package.module:function")


def resolve_user_metric(spec: str) -> MetricFunction:
    """``package.module:function``: importable, a plain Python function of exactly two positional arguments."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise OptionError(f"metric '{spec}': expected package.module:function")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise OptionError(f"metric '{spec}': cannot import: {error}") from error
    if not inspect.isfunction(function):
        raise OptionError(
            f"metric '{spec}' is a {type(function).__name__}, not a Python function "
            "(reference_outputs, candidate_outputs)"
        )
    parameters = inspect.signature(function).parameters.values()
    required = [p for p in parameters if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    positional = [p for p in required if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != 2 or len(required) != 2:
        raise OptionError(
            f"metric '{spec}' must take exactly two positional arguments (reference_outputs, "
            f"candidate_outputs), its signature is {inspect.signature(function)}"
        )
    return function


def collect_outputs(
    model: ModelSource,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    provider: str = "cpu",
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    stage: str = "metric",
) -> Outputs:
    """Every output of every sample, by output name, in feed order; runs bounded by ``timeout_s``."""
    session, _ = create_session(model, as_provider_choice(provider))
    label = model_label(model)
    return [run_session(session, dict(feed), label=label, stage=stage, timeout_s=timeout_s) for feed in feeds]


def _over_outputs(
    per_output: Callable[[list[np.ndarray], list[np.ndarray]], float], output: str | None, higher_is_better: bool
) -> MetricFunction:
    def metric(reference: Outputs, candidate: Outputs) -> float:
        if not reference:
            raise OptionError("metric needs at least one sample")
        names = [output] if output is not None else sorted(reference[0])
        missing = [name for name in names if name not in reference[0]]
        if missing:
            raise OptionError(f"metric output '{missing[0]}' not found; outputs: {', '.join(sorted(reference[0]))}")
        values = [per_output([s[name] for s in reference], [s[name] for s in candidate]) for name in names]
        return min(values) if higher_is_better else max(values)

    return metric


def _float_pairs(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]):
    for ref, cand in zip(reference, candidate, strict=True):
        yield np.asarray(ref, np.float64).ravel(), np.asarray(cand, np.float64).ravel()


def _cosine(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Mean over samples of the cosine similarity of each sample's flattened output."""
    values = []
    for ref, cand in _float_pairs(reference, candidate):
        norm = np.linalg.norm(ref) * np.linalg.norm(cand)
        if norm > 0:
            values.append(float(ref @ cand / norm))
        else:
            values.append(1.0 if not ref.any() and not cand.any() else 0.0)
    return float(np.mean(values))


def _sqnr_db(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    signal = noise = 0.0
    for ref, cand in _float_pairs(reference, candidate):
        signal += float(ref @ ref)
        noise += float((ref - cand) @ (ref - cand))
    return float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-300) / noise)


def _max_abs(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    return max(float(np.max(np.abs(ref - cand), initial=0.0)) for ref, cand in _float_pairs(reference, candidate))


def _topk_agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], k: int) -> float:
    """Fraction of rows (last axis = classes) whose reference top-1 is in the candidate's top-k."""
    hits = rows = 0
    for ref, cand in zip(reference, candidate, strict=True):
        if ref.ndim < 1 or ref.shape[-1] < 2:
            raise OptionError("top-k agreement needs class scores on the last axis")
        ref2, cand2 = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])
        best = ref2.argmax(-1)
        top = np.argsort(-cand2, axis=-1, kind="stable")[:, :k]
        hits += int((top == best[:, None]).any(-1).sum())
        rows += ref2.shape[0]
    return hits / rows


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _kl_divergence(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Mean over rows (last axis = classes or vocabulary) of KL(softmax(reference) || softmax(candidate)),
    in nats: how far the candidate's distributions are from the reference's (0 when equal)."""
    total = 0.0
    rows = 0
    for ref, cand in zip(reference, candidate, strict=True):
        if ref.ndim < 1 or ref.shape[-1] < 2:
            raise OptionError("KL divergence needs scores on the last axis (logits)")
        summed, count = kl_sum(ref, cand)
        total, rows = total + summed, rows + count
    return max(0.0, total / rows) if rows else 0.0


def kl_sum(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, int]:
    """Sum over the rows of the last axis of KL(softmax(reference) || softmax(candidate)) in nats, and
    the number of rows."""
    ref = _log_softmax(np.asarray(reference, np.float64).reshape(-1, reference.shape[-1]))
    cand = _log_softmax(np.asarray(candidate, np.float64).reshape(-1, candidate.shape[-1]))
    return float((np.exp(ref) * (ref - cand)).sum()), ref.shape[0]


def _perplexity(feeds: list[Mapping[str, np.ndarray]], output: str | None) -> MetricFunction:
    """exp(mean negative log-likelihood) of each sample's next token, from the logits at the position
    before it; positions an ``attention_mask`` marks as padding are left out."""
    tokens = [_token_positions(feed) for feed in feeds]

    def metric(reference: Outputs, candidate: Outputs) -> float:
        if len(candidate) != len(tokens):
            raise OptionError(f"perplexity: {len(candidate)} samples of outputs for {len(tokens)} samples of tokens")
        total, count = 0.0, 0
        for sample, (ids, keep) in zip(candidate, tokens, strict=True):
            logits = _logits(sample, output, ids.shape)
            if ids.shape[1] < 2:
                continue
            targets = np.where(keep, ids[:, 1:], 0)  # padding may hold any id
            if targets.min() < 0 or targets.max() >= logits.shape[-1]:
                raise OptionError(f"perplexity: token ids outside the logits' vocabulary of {logits.shape[-1]}")
            scores = _log_softmax(np.asarray(logits[:, :-1], np.float64))
            picked = np.take_along_axis(scores, targets[..., None], axis=-1)[..., 0]
            total -= float(picked[keep].sum())
            count += int(keep.sum())
        if not count:
            raise OptionError("perplexity needs samples of 2 tokens or more (a prefill, not one decode step)")
        return float(np.exp(total / count))

    return metric


def _token_positions(feed: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The sample's token ids ([batch, sequence]) and which next-token positions count."""
    if TOKEN_IDS not in feed:
        raise OptionError(
            f"perplexity reads the tokens from the input '{TOKEN_IDS}'; inputs: {', '.join(sorted(feed))}"
        )
    ids = np.asarray(feed[TOKEN_IDS])
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise OptionError(
            f"perplexity: input '{TOKEN_IDS}' must be integer [batch, sequence], got {ids.dtype} {ids.shape}"
        )
    keep = np.ones((ids.shape[0], max(ids.shape[1] - 1, 0)), bool)
    mask = feed.get("attention_mask")
    if mask is not None:
        if np.ndim(mask) != 2 or np.shape(mask)[0] != ids.shape[0] or np.shape(mask)[1] < ids.shape[1]:
            raise OptionError(
                f"perplexity: attention_mask {np.shape(mask)} does not cover input_ids {ids.shape} "
                "([batch, past + sequence] expected)"
            )
        mask = np.asarray(mask)[:, -ids.shape[1] :] != 0  # with a KV cache the mask also covers the past
        keep = mask[:, :-1] & mask[:, 1:]
    return ids.astype(np.int64), keep


def _logits(sample: Mapping[str, np.ndarray], output: str | None, shape: tuple[int, ...]) -> np.ndarray:
    name = output or (LOGITS_OUTPUT if LOGITS_OUTPUT in sample else None)
    if name is None:
        ranked = [key for key, value in sample.items() if np.ndim(value) == 3 and np.shape(value)[:2] == shape]
        if len(ranked) != 1:
            raise OptionError(
                f"perplexity: say which output holds the logits (--metric-output); outputs: {', '.join(sorted(sample))}"
            )
        name = ranked[0]
    if name not in sample:
        raise OptionError(f"metric output '{name}' not found; outputs: {', '.join(sorted(sample))}")
    logits = np.asarray(sample[name])
    if logits.ndim != 3 or logits.shape[:2] != shape:
        raise OptionError(
            f"perplexity needs output '{name}' as [batch, sequence, vocabulary] logits for every token of "
            f"'{TOKEN_IDS}' {shape}; got {logits.shape}"
        )
    return logits
