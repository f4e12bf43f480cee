import json
import os

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import optimizer.verify.benchmark as benchmark_module
from optimizer.errors import FeedError, OptionError, RuntimeSessionError
from optimizer.verify.benchmark import benchmark, median_halfwidth, model_size_bytes, round_order
from optimizer.verify.runtime import CPU_PROVIDER, CUDA_PROVIDER


def matmul_model(columns: int = 3) -> onnx.ModelProto:
    weight = np.ones((4, columns), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", columns])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


FEEDS = [{"x": np.full((2, 4), value, dtype=np.float32)} for value in (1.0, 2.0)]


def test_round_order_alternates():
    assert round_order(3, 0) == [0, 1, 2]
    assert round_order(3, 1) == [2, 1, 0]
    assert round_order(3, 2) == [0, 1, 2]
    assert round_order(1, 1) == [0]


def test_benchmark_reports_ratios_sizes_and_rounds(tmp_path):
    path = tmp_path / "small.onnx"
    onnx.save(matmul_model(), path)
    proto = matmul_model(columns=8)
    result = benchmark(
        [path, proto, proto.SerializeToString()],
        FEEDS,
        warmup=1,
        rounds=5,
        threads=1,
        progress=True,
    )
    first, second, third = result.models
    assert [timing.name for timing in result.models] == ["small.onnx", "model1", "model2"]
    assert first.ratio_p50 == 1.0
    assert second.ratio_p50 == pytest.approx(second.p50_ms / first.p50_ms)
    assert first.size_bytes == os.path.getsize(path)
    assert second.size_bytes == proto.ByteSize() == third.size_bytes
    for timing in result.models:
        assert timing.rounds == 5 and timing.provider_used == CPU_PROVIDER
        assert 0 < timing.min_ms <= timing.p50_ms <= timing.p90_ms
        assert timing.session_create_ms > 0
    assert (result.warmup, result.rounds, result.threads, result.provider_note) == (1, 5, 1, None)


def test_size_includes_external_data(tmp_path):
    model = matmul_model(columns=256)
    path = tmp_path / "big.onnx"
    onnx.save(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    data_bytes = os.path.getsize(tmp_path / "weights.bin")
    assert data_bytes >= 4 * 256 * 4
    assert model_size_bytes(path) == os.path.getsize(path) + data_bytes
    result = benchmark([path], FEEDS[:1], warmup=0, rounds=1)
    assert result.models[0].size_bytes == os.path.getsize(path) + data_bytes


def test_runs_are_interleaved_and_counted(monkeypatch):
    calls: list[tuple[str, float]] = []
    timed = benchmark_module._run_timed_ms

    def recording_run(session, session_inputs, name):
        calls.append((name, float(session_inputs["x"][0, 0])))
        return timed(session, session_inputs, name)

    monkeypatch.setattr(benchmark_module, "_run_timed_ms", recording_run)
    result = benchmark(
        [matmul_model(), matmul_model(), matmul_model()],
        FEEDS,
        names=["a", "b", "c"],
        warmup=2,
        rounds=4,
    )
    one_round = [("a", 1.0), ("b", 1.0), ("c", 1.0), ("c", 2.0), ("b", 2.0), ("a", 2.0)]
    assert calls == one_round * 2
    assert [timing.rounds for timing in result.models] == [4, 4, 4]


def test_until_is_asked_after_the_eighth_round_then_every_fourth_and_stops_timing(monkeypatch):
    asked: list[int] = []

    def until(times_ms):
        asked.append(len(times_ms[0]))
        return len(times_ms[0]) >= 12

    result = benchmark([matmul_model(), matmul_model()], FEEDS, warmup=0, rounds=20, until=until)
    assert asked == [8, 12]
    assert result.rounds == 12 and [timing.rounds for timing in result.models] == [12, 12]
    never = benchmark([matmul_model()], FEEDS, warmup=0, rounds=12, until=lambda times_ms: asked.append(-1) or False)
    assert never.rounds == 12 and asked[-1] == -1 and asked.count(-1) == 1  # asked at 8 only: 12 is the last


def test_serialization():
    result = benchmark(
        [matmul_model(), matmul_model()], FEEDS, names=["fp32", "int8"], warmup=0, rounds=2
    )
    data = json.loads(json.dumps(result.to_dict()))
    assert [model["name"] for model in data["models"]] == ["fp32", "int8"]
    assert data["models"][0]["ratio_p50"] == 1.0
    table = result.to_markdown().splitlines()
    assert table[0] == "provider: cpu; warm-up: 0; rounds: 2; threads: onnxruntime default"
    assert table[2].startswith("| model | size MB | p50 ms")
    assert table[4].startswith("| fp32 | ") and table[5].startswith("| int8 | ")
    assert len(table) == 6


def test_duplicate_default_names_get_an_index(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        onnx.save(matmul_model(), tmp_path / folder / "model.onnx")
    result = benchmark(
        [tmp_path / "a" / "model.onnx", tmp_path / "b" / "model.onnx"], FEEDS, warmup=0, rounds=1
    )
    assert [timing.name for timing in result.models] == ["0:model.onnx", "1:model.onnx"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"rounds": 0}, OptionError, "rounds must be an integer >= 1"),
        ({"warmup": -1}, OptionError, "warmup must be an integer >= 0"),
        ({"names": ["only-one"]}, OptionError, "got 1 name\\(s\\) for 2 model\\(s\\)"),
        ({"names": ["same", "same"]}, OptionError, "model names must be unique"),
        ({"provider": "tpu"}, OptionError, "unknown execution provider"),
        ({"threads": 0}, OptionError, "threads must be a positive integer"),
    ],
)
def test_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        benchmark([matmul_model(), matmul_model()], FEEDS, **kwargs)


def test_empty_models_or_feeds():
    with pytest.raises(OptionError, match="at least one model"):
        benchmark([], FEEDS)
    with pytest.raises(FeedError, match="at least one feed"):
        benchmark([matmul_model()], [])


def test_feed_that_does_not_fit_names_the_model():
    with pytest.raises(RuntimeSessionError, match="onnxruntime failed to run m"):
        benchmark(
            [matmul_model()], [{"x": np.ones((1, 5), np.float32)}], names=["m"], warmup=0, rounds=1
        )
    with pytest.raises(RuntimeSessionError, match="m needs input\\(s\\) x"):
        benchmark(
            [matmul_model()], [{"z": np.ones((1, 4), np.float32)}], names=["m"], warmup=1, rounds=1
        )


@pytest.mark.skipif(CUDA_PROVIDER in onnxruntime.get_available_providers(), reason="has CUDA")
def test_cuda_request_reports_the_fallback():
    result = benchmark([matmul_model()], FEEDS, provider="cuda", warmup=0, rounds=1)
    assert result.provider_requested == "cuda"
    assert result.models[0].provider_used == CPU_PROVIDER
    assert "falling back to CPU" in result.provider_note
    assert "note: CUDA requested" in result.to_markdown()


def test_paired_ratio_is_the_median_of_same_round_ratios_and_ignores_a_slow_spell(monkeypatch):
    # the machine turns three times slower after round 3, one run earlier for the candidate
    baseline = [10.0, 10.0, 10.0, 10.0, 30.0, 30.0, 30.0]
    candidate = [9.0, 9.0, 9.0, 27.0, 27.0, 27.0, 27.0]
    clock = {"small": iter(baseline), "model1": iter(candidate)}
    monkeypatch.setattr(benchmark_module, "_run_timed_ms", lambda session, inputs, name: next(clock[name]))
    result = benchmark([matmul_model(), matmul_model(columns=8)], FEEDS, names=["small", "model1"], warmup=1, rounds=7)
    first, second = result.models
    assert first.ratio_paired == 1.0 and second.ratio_paired == pytest.approx(0.9)
    assert second.ratio_p50 == pytest.approx(2.7)  # p50 27 ms over p50 10 ms: the spell, not the model
    assert "| ratio paired (95% ±) |" in result.to_markdown()


def test_median_halfwidth_uses_the_order_statistics_of_a_95_percent_interval():
    # n = 20: the interval of the median runs from the 6th to the 15th smallest value
    values = np.random.default_rng(0).permutation(np.arange(1.0, 21.0))
    assert median_halfwidth(values) == pytest.approx((15 - 6) / 2)
    assert median_halfwidth([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == 0.0
    assert median_halfwidth([0.5, 1.0, 1.5, 2.0, 9.0]) == 0.0  # too few rounds to say


def test_the_paired_halfwidth_widens_with_noisy_rounds(monkeypatch):
    steady = [10.0] * 12
    noisy = [10.0 * factor for factor in (0.8, 1.2) * 6]
    clock = {"base": iter(steady + steady), "steady": iter(steady + steady), "noisy": iter(noisy + noisy)}
    monkeypatch.setattr(benchmark_module, "_run_timed_ms", lambda session, inputs, name: next(clock[name]))
    result = benchmark([matmul_model()] * 3, FEEDS, names=["base", "steady", "noisy"], warmup=0, rounds=12)
    base, steady_timing, noisy_timing = result.models
    assert base.paired_halfwidth == 0.0 and steady_timing.paired_halfwidth == 0.0
    assert noisy_timing.ratio_paired == pytest.approx(1.0) and noisy_timing.paired_halfwidth == pytest.approx(0.2)
    assert "| 1.000 ± 0.200 |" in result.to_markdown() and "| 1.000 |" in result.to_markdown()
