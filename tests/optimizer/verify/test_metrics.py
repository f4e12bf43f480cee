from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from optimizer.errors import OptionError
from optimizer.fileio.model import load_model
from optimizer.verify.metrics import builtin_metric, collect_outputs, load_metric
from tests.helpers.samples import MODELS_DIR, seeded_feeds


def outputs(*arrays, name="y"):
    return [{name: np.asarray(a, np.float32)} for a in arrays]


def test_cosine_is_mean_over_samples_and_worst_over_outputs():
    ref = [{"a": np.array([1.0, 0.0]), "b": np.array([1.0, 1.0])}] * 2
    cand = [
        {"a": np.array([1.0, 0.0]), "b": np.array([1.0, 0.0])},
        {"a": np.array([0.0, 1.0]), "b": np.array([1.0, 1.0])},
    ]
    assert builtin_metric("cosine", output="a")(ref, cand) == pytest.approx(0.5)
    assert builtin_metric("cosine", output="b")(ref, cand) == pytest.approx((np.sqrt(0.5) + 1) / 2)
    assert builtin_metric("cosine")(ref, cand) == pytest.approx(0.5)


def test_sqnr_and_max_abs_directions_and_drop():
    ref, cand = outputs([1.0, 2.0, 3.0]), outputs([1.0, 2.0, 3.1])
    sqnr, max_abs = builtin_metric("sqnr"), builtin_metric("max_abs")
    assert sqnr(ref, cand) == pytest.approx(10 * np.log10(14 / 0.01), rel=1e-4)
    assert sqnr(ref, ref) == float("inf")
    assert max_abs(ref, cand) == pytest.approx(0.1, rel=1e-5) and not max_abs.higher_is_better
    assert max_abs.drop(0.0, 0.1) == pytest.approx(0.1)
    assert builtin_metric("cosine").drop(1.0, 0.99) == pytest.approx(0.01)


def test_top1_and_topk_agreement():
    ref = outputs([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    cand = outputs([[0.5, 0.4, 0.1], [0.9, 0.0, 0.1]])
    assert builtin_metric("top1")(ref, cand) == 0.5
    assert builtin_metric("topk", k=2)(ref, cand) == 1.0


def test_user_metric_from_module_path_needs_a_direction(monkeypatch):
    module = types.ModuleType("user_metrics_for_test")
    module.error_rate = lambda ref, cand: float(
        np.mean([np.argmax(c["y"]) != np.argmax(r["y"]) for r, c in zip(ref, cand, strict=True)])
    )
    monkeypatch.setitem(sys.modules, "user_metrics_for_test", module)
    with pytest.raises(OptionError, match="higher or lower"):
        load_metric("user_metrics_for_test:error_rate")
    metric = load_metric("user_metrics_for_test:error_rate", higher_is_better=False)
    ref, cand = outputs([0.0, 1.0], [1.0, 0.0]), outputs([0.0, 1.0], [0.0, 1.0])
    assert metric(ref, cand) == 0.5 and metric.drop(metric(ref, ref), 0.5) == 0.5
    with pytest.raises(OptionError, match="cannot import"):
        load_metric("user_metrics_for_test:nope", higher_is_better=True)
    with pytest.raises(OptionError, match="built-in metrics"):
        load_metric("cosinus")
    with pytest.raises(OptionError, match="higher-is-better"):
        load_metric("cosine", higher_is_better=False)


def test_unknown_output_is_named():
    with pytest.raises(OptionError, match="'z' not found; outputs: y"):
        builtin_metric("cosine", output="z")(outputs([1.0]), outputs([1.0]))


def test_collect_outputs_runs_the_model_per_sample():
    model = load_model(MODELS_DIR / "transformer_tied.onnx")
    feeds = seeded_feeds(model, count=2)
    collected = collect_outputs(model, feeds)
    assert len(collected) == 2 and sorted(collected[0]) == ["hidden", "logits"]
    assert builtin_metric("cosine")(collected, collected) == pytest.approx(1.0)


def test_kl_divergence_of_softmax_over_the_last_axis():
    ref = [{"logits": np.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])}]
    cand = [{"logits": np.array([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])}]
    kl = builtin_metric("kl")
    p = np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum()
    q = np.exp([1.0, 0.0, -1.0]) / np.exp([1.0, 0.0, -1.0]).sum()
    expected = float((p * np.log(p / q)).sum()) / 2  # the second row is identical: KL 0
    assert kl(ref, cand) == pytest.approx(expected, rel=1e-9) and expected > 0
    assert kl(ref, ref) == 0.0 and not kl.higher_is_better
    shifted = [{"logits": ref[0]["logits"] + 7.0}]  # softmax ignores a constant shift
    assert kl(ref, shifted) == pytest.approx(0.0, abs=1e-12)
    assert load_metric("kl").name == "kl" and kl.drop(0.0, 0.25) == pytest.approx(0.25)
    with pytest.raises(OptionError, match="last axis"):
        kl([{"y": np.array([[1.0]])}], [{"y": np.array([[1.0]])}])


def test_perplexity_of_next_token_logits_on_the_feeds_tokens_skipping_padding():
    ids = np.array([[0, 2, 1, 2]], np.int64)
    logits = np.log(np.array([[[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]))
    feeds = [{"input_ids": ids, "attention_mask": np.ones_like(ids)}]
    perplexity = builtin_metric("perplexity", feeds=feeds)
    outputs = [{"logits": logits, "present.0.key": np.zeros((1, 1, 4, 2))}]
    want = float(np.exp(-(np.log(0.5) + np.log(0.3) + np.log(0.8)) / 3))  # tokens 2, 1, 2 after 0, 2, 1
    assert perplexity(outputs, outputs) == pytest.approx(want, rel=1e-12)
    assert not perplexity.higher_is_better and perplexity.drop(want, want + 0.5) == pytest.approx(0.5)
    padded = [{"input_ids": ids, "attention_mask": np.array([[1, 1, 1, 0]])}]  # the last token is padding
    without_last = float(np.exp(-(np.log(0.5) + np.log(0.3)) / 2))
    assert builtin_metric("perplexity", feeds=padded)(outputs, outputs) == pytest.approx(without_last, rel=1e-12)
    uniform = [{"logits": np.zeros((1, 4, 3))}]
    assert perplexity(outputs, uniform) == pytest.approx(3.0)
    assert load_metric("perplexity", feeds=feeds, output="logits").name == "perplexity"


def test_perplexity_refuses_what_it_cannot_measure():
    logits = [{"logits": np.zeros((1, 1, 5))}]
    with pytest.raises(OptionError, match="tokens of the samples"):
        builtin_metric("perplexity")
    with pytest.raises(OptionError, match="input 'input_ids'"):
        builtin_metric("perplexity", feeds=[{"tokens": np.zeros((1, 3), np.int64)}])
    one_step = builtin_metric("perplexity", feeds=[{"input_ids": np.zeros((1, 1), np.int64)}])
    with pytest.raises(OptionError, match="2 tokens or more"):
        one_step(logits, logits)
    two = builtin_metric("perplexity", feeds=[{"input_ids": np.zeros((1, 2), np.int64)}])
    with pytest.raises(OptionError, match=r"every token of 'input_ids' \(1, 2\); got \(1, 1, 5\)"):
        two(logits, logits)
    mismatched = [{"input_ids": np.zeros((2, 2), np.int64), "attention_mask": np.ones((1, 2), np.int64)}]
    with pytest.raises(OptionError, match=r"attention_mask \(1, 2\) does not cover input_ids \(2, 2\)"):
        builtin_metric("perplexity", feeds=mismatched)
    beyond = builtin_metric("perplexity", feeds=[{"input_ids": np.array([[0, 7]], np.int64)}])
    with pytest.raises(OptionError, match="outside the logits' vocabulary of 5"):
        beyond([{"logits": np.zeros((1, 2, 5))}], [{"logits": np.zeros((1, 2, 5))}])
    padded = [{"input_ids": np.array([[0, 1, 99]], np.int64), "attention_mask": np.array([[1, 1, 0]])}]
    assert builtin_metric("perplexity", feeds=padded)([], [{"logits": np.zeros((1, 3, 5))}]) == pytest.approx(5.0)
    with pytest.raises(OptionError, match="say which output"):
        unnamed = [{"a": np.zeros((1, 2, 5)), "b": np.zeros((1, 2, 5))}]
        two(unnamed, unnamed)
