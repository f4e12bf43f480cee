"""KV-cache decoders: generated feeds start from an empty cache, validation generates greedily with
both models and says where they part, the benchmark times prefill and decode."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from optimizer.api import OptimizeOptions, ValidationOptions, optimize
from optimizer.app_inputs import resolve_feeds
from optimizer.calibration.decoder_io import DecoderLayout, find_decoder
from optimizer.calibration.feeds import model_input_specs
from optimizer.cli import main
from optimizer.errors import FeedError, OptionError
from optimizer.verify.benchmark import benchmark
from optimizer.verify.generation import greedy, prompt_of
from optimizer.verify.runtime import CPU_PROVIDER, create_session, resolve_provider
from optimizer.verify.tolerances import Tolerance
from optimizer.verify.validate import compare
from tests.helpers.decoder import HEAD_SIZE, HEADS, LAYERS, VOCAB, decoder_model, write_decoder

LOOSE = Tolerance(max_abs=1e9)


@pytest.fixture()
def decoder(tmp_path):
    return write_decoder(tmp_path / "fp32")


def session_and_layout(path):
    session, _ = create_session(path, resolve_provider("cpu"))
    model = onnx.load(path)
    layout = find_decoder(model_input_specs(model), [o.name for o in model.graph.output], path.parent)
    return session, layout


def test_generated_feeds_are_a_prefill_with_the_cache_sizes_of_genai_config(decoder):
    feeds = resolve_feeds(onnx.load(decoder), None, samples=2, folder=decoder.parent)
    for feed in feeds:
        assert feed["input_ids"].shape == feed["attention_mask"].shape == (1, 16)
        assert feed["input_ids"].max() < VOCAB
        for layer in range(LAYERS):
            assert feed[f"past_key_values.{layer}.key"].shape == (1, HEADS, 0, HEAD_SIZE)
    shaped = resolve_feeds(onnx.load(decoder), None, shapes={"input_ids": (2, 5)}, folder=decoder.parent)
    assert shaped[0]["attention_mask"].shape == (2, 5)
    assert shaped[0]["past_key_values.1.value"].shape == (2, HEADS, 0, HEAD_SIZE)


def test_a_decoder_without_cache_sizes_is_refused_with_the_ways_to_give_them(tmp_path):
    path = write_decoder(tmp_path / "bare", genai_config=False)
    with pytest.raises(FeedError, match=r"past_key_values\.0\.key.*genai_config\.json.*--shape past_key_values"):
        resolve_feeds(onnx.load(path), None, folder=path.parent)
    numbered = write_decoder(tmp_path / "numbered", symbolic_head=False, genai_config=False)
    feeds = resolve_feeds(onnx.load(numbered), None, folder=numbered.parent)
    assert feeds[0]["past_key_values.0.key"].shape == (1, HEADS, 0, HEAD_SIZE)


def test_a_broken_genai_config_names_the_file(decoder):
    (decoder.parent / "genai_config.json").write_text('{"model": {}}')
    with pytest.raises(FeedError, match=r"genai_config\.json: not a readable onnxruntime-genai config"):
        resolve_feeds(onnx.load(decoder), None, folder=decoder.parent)


def test_the_layout_is_found_only_for_a_drivable_decoder(decoder):
    model = onnx.load(decoder)
    specs, outputs = model_input_specs(model), [o.name for o in model.graph.output]
    layout = find_decoder(specs, outputs, decoder.parent)
    assert isinstance(layout, DecoderLayout)
    assert layout.past[:2] == ("past_key_values.0.key", "past_key_values.0.value")
    assert layout.present[-1] == "present.1.value" and layout.mask and not layout.positions
    assert find_decoder(specs, outputs[:-1], decoder.parent) is None  # a present output missing
    extra = [*specs, specs[0].__class__("token_type_ids", np.dtype(np.int64), ("batch", "sequence"))]
    assert find_decoder(extra, outputs, decoder.parent) is None  # an input nothing here knows how to feed


def test_greedy_with_the_cache_equals_recomputing_the_whole_sequence(decoder):
    session, layout = session_and_layout(decoder)
    prompt = np.array([5, 17, 3, 99, 42], np.int64)
    produced = greedy(session, layout, prompt, 12, label="decoder")
    sequence = list(prompt)
    for _ in range(12):
        logits = session.run(["logits"], layout.feed(np.array([sequence])))[0]
        sequence.append(int(np.argmax(logits[0, -1])))
    assert produced == sequence[len(prompt) :]
    assert len(set(produced)) > 1


def test_prompts_keep_the_tokens_the_mask_keeps_and_at_most_32():
    feed = {"input_ids": np.arange(40)[None, :], "attention_mask": np.r_[np.zeros(3), np.ones(37)][None, :]}
    assert prompt_of(feed).tolist() == list(range(3, 35))
    assert prompt_of({"input_ids": np.zeros((1, 0), np.int64)}) is None


def test_validation_reports_where_generation_parts(tmp_path, decoder):
    same = compare(decoder, decoder, resolve_feeds(onnx.load(decoder), None, folder=decoder.parent))
    assert same.generation is not None and same.generation.match == 1.0
    assert same.generation.identical == same.generation.prompts == 4
    assert same.generation.first_difference == [None] * 4
    other = write_decoder(tmp_path / "other", seed=3)
    feeds = resolve_feeds(onnx.load(decoder), None, folder=decoder.parent)
    parted = compare(decoder, other, feeds, tolerance=LOOSE, generate_tokens=8)
    check = parted.generation
    assert check is not None and check.new_tokens == 8 and check.identical < 4
    session, layout = session_and_layout(decoder)
    other_session, _ = session_and_layout(other)
    for prompt, first in zip([prompt_of(f) for f in feeds], check.first_difference, strict=True):
        want = greedy(session, layout, prompt, 8, label="a")
        have = greedy(other_session, layout, prompt, 8, label="b")
        assert first == next((i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b), None)
    assert check.match == pytest.approx(np.mean([8 if f is None else f for f in check.first_difference]) / 8)
    assert "greedy generation, 8 new tokens" in parted.summary()
    assert compare(decoder, other, feeds, tolerance=LOOSE, generate_tokens=0).generation is None


def test_a_model_without_its_present_outputs_is_validated_without_generation(tmp_path):
    model = decoder_model(symbolic_head=False)
    del model.graph.output[1:]  # the cache is not returned: nothing to feed back
    path = tmp_path / "no_cache.onnx"
    onnx.save(model, path)
    feeds = resolve_feeds(model, None, folder=tmp_path)
    assert feeds[0]["past_key_values.0.key"].shape == (1, HEADS, 0, HEAD_SIZE)
    comparison = compare(path, path, feeds)
    assert comparison.passed and comparison.generation is None
    assert benchmark([path], feeds, rounds=1, warmup=0).decoding is None


@pytest.mark.parametrize("tokens", [-1, 4097, True, 2.0])
def test_generate_tokens_out_of_range_is_refused(decoder, tokens):
    feeds = resolve_feeds(onnx.load(decoder), None, folder=decoder.parent)
    with pytest.raises(OptionError, match="generate_tokens"):
        compare(decoder, decoder, feeds, generate_tokens=tokens)
    with pytest.raises(OptionError, match="generate_tokens"):
        benchmark([decoder], feeds, rounds=1, warmup=0, generate_tokens=tokens)


def test_the_benchmark_times_prefill_and_decode_in_the_same_rounds(decoder):
    feeds = resolve_feeds(onnx.load(decoder), None, folder=decoder.parent)
    result = benchmark([decoder, decoder], feeds, names=["a", "b"], rounds=6, warmup=1, generate_tokens=5)
    assert result.decoding is not None and [t.name for t in result.decoding] == ["a", "b"]
    first, second = result.decoding
    assert (first.prompt_tokens, first.new_tokens) == (16, 5)
    assert first.prefill_ratio == first.decode_ratio == 1.0
    assert second.decode_tokens_per_s > 0 and second.decode_ratio > 0
    assert "generation: prefill of 16 tokens, then 5 tokens one at a time" in result.to_markdown()
    assert json.loads(json.dumps(result.to_dict()))["decoding"][1]["name"] == "b"
    assert benchmark([decoder], feeds, rounds=1, warmup=0, generate_tokens=0).decoding is None


def test_a_slower_decode_is_named(decoder):
    feeds = resolve_feeds(onnx.load(decoder), None, folder=decoder.parent)
    result = benchmark([decoder, decoder], feeds, names=["a", "b"], rounds=2, warmup=0, generate_tokens=2)
    assert result.decoding is not None
    result.decoding[1].decode_ratio = 1.5
    assert any("'b' decodes in 1.50x the time of 'a'" in note for note in result.slower_notes())
    result.decoding[1].decode_ratio, result.models[1].ratio_paired = 0.55, 1.34
    assert result.slower_notes() == [
        f"SLOWER: 'b' takes 1.34x the time of 'a' (median paired ratio over 2 rounds; p50 "
        f"{result.models[1].p50_ms:.3f} ms); that is a prefill of 16 tokens: decoding takes 0.55x"
    ]


def test_optimize_and_the_commands_carry_the_generation(tmp_path, decoder, capsys):
    output = tmp_path / "out" / "model.onnx"
    output.parent.mkdir()
    reports = [tmp_path / "r.md", tmp_path / "r.html"]
    options = OptimizeOptions(
        passes=["share"], validation=ValidationOptions(), generate_tokens=6, bench_rounds=2, reports=reports
    )
    result = optimize(decoder, output, options)
    generation = result.report.to_dict()["validation"]["generation"]
    assert generation["new_tokens"] == 6 and generation["match"] == 1.0
    assert result.report.to_dict()["benchmark"]["decoding"][1]["new_tokens"] == 6
    for report in reports:
        text = report.read_text()
        assert "greedy generation, 6 new tokens after 4 prompt(s)" in text
        assert "Generating (a KV-cache decoder)" in text and "decode_tokens_per_s" in text
    assert main(["validate", str(decoder), str(output), "--generate-tokens", "4"]) == 0
    assert "greedy generation, 4 new tokens after 4 prompt(s)" in capsys.readouterr().out
    assert main(["bench", str(decoder), str(output), "--rounds", "2", "--generate-tokens", "3"]) == 0
    assert "then 3 tokens one at a time" in capsys.readouterr().out
    assert main(["validate", str(decoder), str(output), "--generate-tokens", "0"]) == 0
    assert "greedy generation" not in capsys.readouterr().out
    with pytest.raises(OptionError, match="generate_tokens"):
        optimize(decoder, None, OptimizeOptions(passes=["share"], generate_tokens=-2))


def test_the_cpu_provider_is_what_runs_here(decoder):
    feeds = resolve_feeds(onnx.load(decoder), None, folder=decoder.parent)
    comparison = compare(decoder, decoder, feeds, provider="cuda", generate_tokens=2)
    assert comparison.provider_used == CPU_PROVIDER and comparison.generation is not None


def save_tokens(folder, count=4, length=10, seed=0, **extra):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for index in range(count):
        ids = rng.integers(0, VOCAB, (1, length), dtype=np.int64)
        np.savez(folder / f"{index:03d}.npz", input_ids=ids, **extra)
    return folder


def test_samples_of_tokens_alone_are_completed_as_a_prefill(tmp_path, decoder):
    tokens = save_tokens(tmp_path / "tokens")
    feeds = resolve_feeds(onnx.load(decoder), tokens, folder=decoder.parent)
    assert len(feeds) == 4
    for feed in feeds:
        assert feed["attention_mask"].tolist() == [[1] * 10]
        assert feed["past_key_values.1.value"].shape == (1, HEADS, 0, HEAD_SIZE)
    session, layout = session_and_layout(decoder)
    for given, built in zip(feeds, [layout.feed(f["input_ids"]) for f in feeds], strict=True):
        np.testing.assert_array_equal(session.run(None, given)[0], session.run(None, built)[0])


def test_a_sample_with_its_cache_gets_a_mask_over_past_and_new_tokens(decoder):
    past = {f"past_key_values.{layer}.{part}": np.zeros((1, HEADS, 3, HEAD_SIZE), np.float32)
            for layer in range(LAYERS) for part in ("key", "value")}
    feeds = resolve_feeds(onnx.load(decoder), [{"input_ids": np.array([[4, 5]]), **past}], folder=decoder.parent)
    assert feeds[0]["attention_mask"].shape == (1, 5)


def test_a_sample_with_part_of_the_cache_is_refused_naming_what_is_missing(tmp_path, decoder):
    folder = save_tokens(tmp_path / "partial", count=1, **{"past_key_values.0.key": np.zeros((1, 2, 0, 8), np.float32)})
    with pytest.raises(FeedError, match=r"000\.npz.*missing input\(s\) attention_mask, past_key_values\.0\.value"):
        resolve_feeds(onnx.load(decoder), folder, folder=decoder.parent)


def test_calibration_from_tokens_alone_builds_what_complete_samples_build(tmp_path, decoder):
    tokens = save_tokens(tmp_path / "tokens", count=6, length=12)
    complete = tmp_path / "complete"
    complete.mkdir()
    for file in sorted(tokens.glob("*.npz")):  # written by hand: what a prefill of these tokens feeds
        ids = np.load(file)["input_ids"]
        cache = {f"past_key_values.{layer}.{part}": np.zeros((1, HEADS, 0, HEAD_SIZE), np.float32)
                 for layer in range(LAYERS) for part in ("key", "value")}
        np.savez(complete / file.name, input_ids=ids, attention_mask=np.ones((1, 12), np.int64), **cache)
    outputs = []
    for data in (tokens, complete):
        out = tmp_path / f"int4_{data.name}"
        out.mkdir()
        assert main(["optimize", str(decoder), "-o", str(out / "model.onnx"), "--quantize", "int4",
                     "--quantize-mode", "weights", "--calibration-data", str(data),
                     "--report", str(out / "r.json"), "--quiet"]) == 0
        counts = json.loads((out / "r.json").read_text())["passes"][-1]["report"]["counts"]
        assert counts["weights_gptq"] > 0
        outputs.append((out / "model.onnx").read_bytes())
    assert outputs[0] == outputs[1]
    assert main(["validate", str(decoder), str(tmp_path / "int4_tokens" / "model.onnx"), "--data", str(tokens),
                 "--generate-tokens", "4", "--min-cosine", "0"]) == 0


def test_the_model_s_integer_types_are_fed_and_padded_positions_counted(tmp_path):
    path = write_decoder(tmp_path / "typed", mask_type=onnx.TensorProto.INT32, positions=True)
    padded = {"input_ids": np.array([[0, 0, 7, 8, 9]]), "attention_mask": np.array([[0, 0, 1, 1, 1]], np.int32)}
    feeds = resolve_feeds(onnx.load(path), [padded], folder=path.parent)
    assert feeds[0]["position_ids"].tolist() == [[0, 0, 0, 1, 2]]  # as Hugging Face and onnxruntime-genai count
    assert feeds[0]["attention_mask"].dtype == np.int32
    generated = resolve_feeds(onnx.load(path), None, folder=path.parent)
    comparison = compare(path, path, generated, generate_tokens=3)
    assert comparison.generation is not None and comparison.generation.match == 1.0
    result = benchmark([path], generated, rounds=1, warmup=0, generate_tokens=2)
    assert result.decoding is not None and result.decoding_note is None


def test_a_failed_generation_is_reported_not_raised(decoder, monkeypatch):
    import optimizer.verify.benchmark as benchmark_module
    import optimizer.verify.generation as generation_module
    from optimizer.errors import RuntimeSessionError

    def fails(*args, **kwargs):
        raise RuntimeSessionError("onnxruntime failed to run model.onnx: cos_cache dimension 0 is too small")

    feeds = resolve_feeds(onnx.load(decoder), None, folder=decoder.parent)
    monkeypatch.setattr(generation_module, "check_generation", fails)
    comparison = compare(decoder, decoder, feeds)
    assert comparison.passed and comparison.generation is not None and comparison.generation.match is None
    assert "greedy generation, 32 new tokens after 4 prompt(s) from the samples: not measured (onnxruntime" in (
        comparison.summary()
    )
    monkeypatch.setattr(benchmark_module, "step", fails)
    result = benchmark([decoder], feeds, rounds=1, warmup=0)
    assert result.decoding is None and "cos_cache" in (result.decoding_note or "")
    assert "generation not timed: onnxruntime failed" in result.to_markdown()


def test_one_cache_shape_is_enough_for_every_layer(tmp_path, capsys):
    path = write_decoder(tmp_path / "bare", genai_config=False)
    shape = ["--shape", "past_key_values.0.key=1x2x3x6"]
    feeds = resolve_feeds(onnx.load(path), None, shapes={"past_key_values.0.key": (1, 2, 3, 6)}, folder=path.parent)
    assert {feed["past_key_values.1.value"].shape for feed in feeds} == {(1, 2, 3, 6)}
    assert feeds[0]["attention_mask"].shape == (1, 3 + 16)
    assert main(["validate", str(path), str(path), *shape]) == 0
    assert "greedy generation" in capsys.readouterr().out


def test_a_cache_of_the_wrong_rank_is_named_not_a_crash(tmp_path, decoder):
    folder = save_tokens(tmp_path / "flat", count=1, **{
        f"past_key_values.{layer}.{part}": np.zeros((2, 8), np.float32) for layer in range(LAYERS)
        for part in ("key", "value")})
    with pytest.raises(FeedError, match=r"000\.npz', input 'past_key_values\.0\.key': rank 2 \(2, 8\), model expects "
                       r"rank 4 .*; also missing input\(s\) attention_mask"):
        resolve_feeds(onnx.load(decoder), folder, folder=decoder.parent)


def test_float16_ranges_on_generated_samples_fit_a_decoder_whose_sizes_are_in_its_config(tmp_path, decoder):
    output = tmp_path / "half" / "model.onnx"
    output.parent.mkdir()
    report = tmp_path / "r.json"
    assert main(["optimize", str(decoder), "-o", str(output), "--float16", "compute", "--report", str(report),
                 "--quiet"]) == 0
    ranges = [run["report"].get("details", {}).get("ranges") for run in json.loads(report.read_text())["passes"]]
    assert any(found and found["source"].endswith("generated samples (no calibration data)") for found in ranges)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_budget_trials_find_a_decoders_config_too(tmp_path, decoder, workers):
    """--max-drop builds its trials in their own pass context (and processes): the cache sizes of
    the generated float16-range samples still come from the genai_config.json next to the input."""
    output = tmp_path / "half" / "model.onnx"
    output.parent.mkdir()
    report = tmp_path / "r.json"
    code = main(["optimize", str(decoder), "-o", str(output), "--float16", "compute", "--max-drop", "0.5",
                 "--metric", "kl", "--workers", workers, "--report", str(report), "--quiet"])
    assert code == 0
    assert json.loads(report.read_text())["budget"]["trials"] >= 1
