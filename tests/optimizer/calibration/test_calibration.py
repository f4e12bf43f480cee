"""Calibration: streaming statistics with known answers, and ranges through onnxruntime."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import optimizer.calibration.ranges as ranges_module
from optimizer.calibration.expose import SUBGRAPH_ONLY, UNKNOWN_TENSOR, build_catalog
from optimizer.calibration.ranges import (
    CalibrationResult,
    StreamingHistogram,
    TensorRange,
    collect_ranges,
    expose_outputs,
)  # fmt: skip
from optimizer.errors import FeedError, OptionError
from optimizer.graph.shapes import STUB_ABOVE_BYTES
from tests.helpers.runtime import open_session
from tests.helpers.samples import MODELS_DIR, seeded_feeds

METHODS = ("minmax", "percentile", "entropy", "mse")


def _histogram(data: np.ndarray, parts: int = 7, bins: int = 2048) -> StreamingHistogram:
    histogram = StreamingHistogram(bins)
    for part in np.array_split(data, parts):
        histogram.add(part)
    return histogram


def _laplace_with_outlier(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.append(rng.laplace(0.0, 1.0, 1_000_000), [80.0]).astype(np.float32)


# ---------------------------------------------------------------- streaming histogram


def test_minmax_is_exact_over_chunks():
    data = np.random.default_rng(1).normal(3.0, 2.0, 50_000).astype(np.float32)
    assert _histogram(data).minmax() == (float(data.min()), float(data.max()))


@pytest.mark.parametrize("symmetric", [True, False])
def test_adaptive_histogram_percentile_matches_numpy_within_one_bin(symmetric):
    rng = np.random.default_rng(2)
    # growing magnitudes force several range doublings (bin merges) along the way
    data = np.concatenate([rng.normal(0, scale, 40_000) for scale in (0.01, 0.1, 1.0, 3.0)])
    data = data.astype(np.float32)
    histogram = _histogram(data, parts=4)
    assert histogram.half_range >= np.abs(data).max() > histogram.half_range / 2
    low, high = histogram.percentile_range(99.9, symmetric=symmetric)
    width = histogram.bin_width()
    if symmetric:
        expected = np.percentile(np.abs(data), 99.9)
        assert abs(high - expected) <= width and low == -high
    else:
        expected_low, expected_high = np.percentile(data, [0.1, 99.9])
        assert abs(low - expected_low) <= width and abs(high - expected_high) <= width


def test_binning_a_strided_subset_keeps_exact_counts_and_close_percentiles():
    data = _laplace_with_outlier(3)
    full, sampled = StreamingHistogram(2048), StreamingHistogram(2048, max_binned=1 << 14)
    for part in np.array_split(data, 5):
        full.add(part)
        sampled.add(part)
    assert sampled.count == full.count == data.size and sampled.minmax() == full.minmax()
    assert sampled.counts.sum() == pytest.approx(data.size)  # each binned value stands for its stride
    for percentile in (99.0, 99.9):
        want = np.percentile(np.abs(data), percentile)
        assert sampled.percentile_range(percentile, symmetric=True)[1] == pytest.approx(want, rel=0.05)
    small = StreamingHistogram(2048, max_binned=1 << 14)
    small.add(data[:1000])
    reference = StreamingHistogram(2048)
    reference.add(data[:1000])
    np.testing.assert_array_equal(small.counts, reference.counts)  # arrays under the cap are binned whole
    with pytest.raises(ValueError, match="max_binned"):
        StreamingHistogram(64, max_binned=0)


def test_percentile_of_uniform_distribution_within_a_bin():
    data = np.random.default_rng(3).uniform(0.0, 10.0, 400_000).astype(np.float32)
    histogram = _histogram(data)
    low, high = histogram.percentile_range(90.0, symmetric=False)
    assert low == 0.0  # zero is always included
    assert abs(high - 9.0) <= histogram.bin_width() + 0.02  # + sampling noise


def test_grow_merges_bins_exactly():
    histogram = StreamingHistogram(16)
    histogram.add(np.array([0.5, -0.5, -1.0, 0.0], np.float32))
    histogram.add(np.array([3.9], np.float32))
    assert histogram.half_range == 4.0
    assert histogram.counts.sum() == 5
    edges = np.linspace(-4.0, 4.0, 33)
    expected, _ = np.histogram([0.5, -0.5, -1.0, 0.0, 3.9], bins=edges)
    np.testing.assert_array_equal(histogram.counts, expected)


@pytest.mark.parametrize("search", ["entropy_threshold", "mse_threshold"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_clipping_searches_clip_heavy_tails_and_keep_uniform(search, symmetric):
    heavy = _histogram(_laplace_with_outlier())
    low, high = getattr(heavy, search)(8, symmetric=symmetric)
    assert low <= 0.0 <= high and high < 0.6 * 80.0
    uniform = _histogram(np.random.default_rng(4).uniform(-1.0, 1.0, 200_000).astype(np.float32))
    low, high = getattr(uniform, search)(8, symmetric=symmetric)
    assert 0.97 <= high <= 1.0 and -1.0 <= low <= -0.97


def test_nonfinite_values_are_left_out():
    histogram = StreamingHistogram(64)
    histogram.add(np.array([np.nan, np.inf, -np.inf, 2.0, -1.0], np.float32))
    assert histogram.nonfinite == 3 and histogram.minmax() == (-1.0, 2.0)


def test_merge_equals_one_histogram_when_ranges_match():
    data = np.random.default_rng(5).normal(0, 1, 20_000).astype(np.float32)
    whole, first, second = StreamingHistogram(64), StreamingHistogram(64), StreamingHistogram(64)
    whole.add(data)
    first.add(data[:10_000])
    second.add(data[10_000:])
    first.merge(second)
    assert first.minmax() == whole.minmax() and first.count == whole.count
    assert first.counts.sum() == whole.counts.sum() == data.size


# ---------------------------------------------------------------- collect_ranges on models


def _cnn():
    return onnx.load(MODELS_DIR / "cnn.onnx")


def _node_outputs(model):
    return [name for node in model.graph.node for name in node.output if name]


def _reference_minmax(model, names, feeds):
    session = open_session(expose_outputs(model, names))
    runs = [session.run(names, feed) for feed in feeds]
    return {
        name: (min(run[i].min() for run in runs), max(run[i].max() for run in runs)) for i, name in enumerate(names)
    }


def test_minmax_ranges_equal_numpy_through_onnxruntime():
    model = _cnn()
    names = _node_outputs(model)
    feeds = seeded_feeds(model, count=4)
    result = collect_ranges(model, names, feeds)
    assert isinstance(result, CalibrationResult) and result.samples == 4 and result.skipped == {}
    assert list(result.ranges) == names
    for name, (low, high) in _reference_minmax(model, names, feeds).items():
        assert result.ranges[name] == TensorRange(min(float(low), 0.0), max(float(high), 0.0), 4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_method_gives_ranges_holding_zero_inside_minmax(method, symmetric):
    model = _cnn()
    names = _node_outputs(model)
    feeds = seeded_feeds(model, count=3)
    exact = collect_ranges(model, names, feeds).ranges
    result = collect_ranges(model, names, feeds, method=method, symmetric=symmetric, bins=512)
    assert result.method == method and list(result.ranges) == names
    for name, tensor_range in result.ranges.items():
        assert tensor_range.low <= 0.0 <= tensor_range.high
        peak = max(-exact[name].low, exact[name].high)
        assert -peak - 1e-6 <= tensor_range.low and tensor_range.high <= peak + 1e-6
        if symmetric:
            assert tensor_range.low == -tensor_range.high
    relu = result.ranges["relu1.out"]
    assert symmetric or relu.low == 0.0


def test_grouping_under_a_tiny_budget_matches_one_group():
    model = _cnn()
    names = _node_outputs(model)
    feeds = seeded_feeds(model, count=3)
    one_group = collect_ranges(model, names, feeds, method="percentile")
    per_tensor = collect_ranges(model, names, feeds, method="percentile", memory_budget_bytes=1)
    two_each = collect_ranges(model, names, feeds, method="percentile", max_outputs_per_run=2)
    assert one_group.notes[-1].endswith("final groups: 1")
    assert per_tensor.notes[-1].endswith(f"final groups: {len(names)}")
    for result in (per_tensor, two_each):
        assert list(result.ranges) == names
        # a group that does not expose an intermediate lets onnxruntime fuse (Conv+BatchNorm),
        # which changes float rounding only
        for name in names:
            np.testing.assert_allclose(
                [result.ranges[name].low, result.ranges[name].high],
                [one_group.ranges[name].low, one_group.ranges[name].high], rtol=1e-5, atol=1e-6,
            )


@pytest.mark.parametrize("kind", ["list", "iterator", "factory", "generator"])
def test_feeds_as_list_iterator_or_factory(kind):
    model = _cnn()
    names = ["conv1.out", "logits"]
    feeds = seeded_feeds(model, count=3)
    source = {
        "list": feeds,
        "iterator": iter(feeds),
        "factory": lambda: iter(feeds),
        "generator": (feed for feed in feeds),
    }[kind]
    result = collect_ranges(model, names, source, method="percentile", progress=True)
    assert result.samples == 3
    assert result.ranges == collect_ranges(model, names, feeds, method="percentile").ranges


def test_max_samples_reads_only_that_many_and_says_so():
    model = _cnn()
    feeds = seeded_feeds(model, count=6)
    read = []

    def source():
        for feed in feeds:
            read.append(1)
            yield feed

    result = collect_ranges(model, ["conv1.out"], source, method="minmax", max_samples=3)
    assert result.samples == 3 and len(read) == 4  # one more is read to tell whether the cap cut anything
    assert any("first 3 samples" in note for note in result.notes)
    assert result.ranges == collect_ranges(model, ["conv1.out"], feeds[:3], method="minmax").ranges
    everything = collect_ranges(model, ["conv1.out"], feeds, method="minmax", max_samples=6)
    assert everything.samples == 6 and not any("first" in note for note in everything.notes)
    with pytest.raises(OptionError, match="max_samples"):
        collect_ranges(model, ["conv1.out"], feeds, max_samples=0)


def test_inputs_initializers_unknown_and_non_float_tensors():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x, int64[2] idx) => (float[2, 3] y, int64[2] idx2) <float[3] w = {-2.0, 0.5, 4.0}> {
            y = Add(x, w)
            idx2 = Identity(idx)
        }
    """)
    feeds = [{"x": np.full((2, 3), value, np.float32), "idx": np.zeros(2, np.int64)} for value in (1.0, 3.0)]
    result = collect_ranges(model, ["x", "w", "y", "idx2", "ghost", "y"], feeds)
    assert result.ranges == {
        "x": TensorRange(0.0, 3.0, 2),
        "w": TensorRange(-2.0, 4.0, 2),
        "y": TensorRange(-1.0, 7.0, 2),
    }
    assert result.skipped == {"idx2": "not a float tensor (int64)", "ghost": UNKNOWN_TENSOR}


def test_subgraph_only_tensors_are_skipped():
    model = onnx.load(MODELS_DIR / "if_subgraph.onnx")
    inner = [name for node in model.graph.node for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH
             for sub in attr.g.node for name in sub.output]  # fmt: skip
    outer = _node_outputs(model)
    result = collect_ranges(model, inner + outer, seeded_feeds(model, count=2))
    assert inner and all(result.skipped[name] == SUBGRAPH_ONLY for name in inner)
    assert set(result.ranges) == set(outer)


def test_all_nan_tensor_is_skipped_with_reason():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] y) { y = Sqrt(x) }
    """)
    result = collect_ranges(model, ["y"], [{"x": np.full(4, -1.0, np.float32)}])
    assert result.ranges == {} and "no finite value" in result.skipped["y"]


def test_bad_options_and_empty_feeds():
    model = _cnn()
    with pytest.raises(OptionError, match="method must be one of minmax, percentile, entropy, mse"):
        collect_ranges(model, ["logits"], [], method="kl")
    with pytest.raises(OptionError, match="percentile"):
        collect_ranges(model, ["logits"], [], percentile=0)
    with pytest.raises(FeedError, match="no calibration samples"):
        collect_ranges(model, ["logits"], [])


def test_expose_outputs_keeps_original_and_prunes_on_request():
    model = _cnn()
    exposed = expose_outputs(model, ["conv1.out", "logits"])
    assert [o.name for o in exposed.graph.output] == [o.name for o in model.graph.output] + ["conv1.out"]
    onnx.checker.check_model(exposed, full_check=True)
    pruned = expose_outputs(model, ["relu1.out"], prune=True)
    assert [o.name for o in pruned.graph.output] == ["relu1.out"]
    assert [node.op_type for node in pruned.graph.node] == ["Conv", "BatchNormalization", "Relu"]
    assert model.graph.output[0].name == "logits" and len(model.graph.output) == 1


# ---------------------------------------------------------------- bounded memory


def _wide_model(channels: int = 32, size: int = 64, layers: int = 12) -> onnx.ModelProto:
    """Elementwise chain with large activations: each tensor is channels*size*size floats."""
    lines = ["t0 = Sin(x)"] + [f"t{i} = Sin(t{i - 1})" for i in range(1, layers)]
    return onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, {channels}, {size}, {size}] x) => (float[1, {channels}, {size}, {size}] t{layers - 1}) {{
            {chr(10).join(lines)}
        }}
    """)


def _peak_traced_bytes(model, names, count: int, method: str) -> int:
    rng = np.random.default_rng(6)
    shape = tuple(dim.dim_value for dim in model.graph.input[0].type.tensor_type.shape.dim)
    feeds = ({"x": rng.standard_normal(shape, dtype=np.float32)} for _ in range(count))
    tracemalloc.start()
    try:
        collect_ranges(model, names, feeds, method=method, memory_budget_bytes=2**20)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_peak_memory_does_not_grow_with_samples(method):
    model = _wide_model()
    names = _node_outputs(model)
    one_sample_bytes = len(names) * 32 * 64 * 64 * 4
    few = _peak_traced_bytes(model, names, 5, method)
    many = _peak_traced_bytes(model, names, 20, method)
    assert many < 1.1 * few + 2**18
    # 1 MB budget: 2 tensors per group, far less than one sample's 6 MB of activations
    assert many < 0.5 * one_sample_bytes


def _reshape_from_input_model() -> onnx.ModelProto:
    """Sizes shape inference cannot tell: the Reshape target is a graph input."""
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "W"], ["h"]),
             helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
                                           helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_unknown_sizes_are_guessed_small_so_one_session_serves_every_tensor():
    model = _reshape_from_input_model()
    catalog = build_catalog(model, {"x": (256,), "shape": (2,)})
    assert not {"r", "h", "y"} & set(catalog.nbytes), "the test needs sizes shape inference cannot tell"
    feeds = [{"x": np.random.default_rng(i).standard_normal(256).astype(np.float32),
              "shape": np.array([4, 64], np.int64)} for i in range(3)]
    result = collect_ranges(model, ["r", "h", "y"], feeds, method="minmax")
    assert result.notes[-1] == "0 regrouping(s); final groups: 1"
    assert set(result.ranges) == {"r", "h", "y"}


def test_catalog_infers_through_small_constants_while_large_weights_reach_inference_as_stubs():
    model = _reshape_from_input_model()
    model.graph.input.pop()  # the Reshape target becomes a small initializer, the weight stays large
    model.graph.initializer.append(numpy_helper.from_array(np.array([4, 64], np.int64), "shape"))
    weight = model.graph.initializer[0].raw_data
    assert len(weight) > STUB_ABOVE_BYTES
    catalog = build_catalog(model, {"x": (256,)})
    assert {name: catalog.nbytes.get(name) for name in ("r", "h", "y")} == {"r": 1024, "h": 1024, "y": 1024}
    assert model.graph.initializer[0].raw_data == weight, "the caller's model is not touched"


@pytest.mark.parametrize(
    ("available", "expected"),
    [(None, 512 * 2**20), (64 * 2**30, 2 * 2**30), (2**30, 2**27), (2**20, 64 * 2**20)],
)
def test_default_memory_budget_is_two_gib_unless_memory_is_short(monkeypatch, available, expected):
    monkeypatch.setattr(ranges_module, "memory_available_bytes", lambda: available)
    assert ranges_module.default_memory_budget() == expected


@pytest.mark.parametrize(
    ("meminfo", "cgroup", "headroom", "expected"),
    [(8, 2, 16, 2), (8, None, 16, 8), (None, None, 16, 16), (None, None, None, None), (8, -1, 16, 0)],
)
def test_available_memory_is_the_least_of_meminfo_the_cgroup_and_the_rlimit(
    monkeypatch, meminfo, cgroup, headroom, expected
):
    import optimizer.fileio.external_data as external

    monkeypatch.setattr(external, "_meminfo_available", lambda: meminfo)
    monkeypatch.setattr(external, "_cgroup_left", lambda: cgroup)
    monkeypatch.setattr(external, "memory_headroom_bytes", lambda: headroom)
    assert external.memory_available_bytes() == expected


def test_the_default_budget_decides_the_groups(monkeypatch):
    model = _cnn()
    names = _node_outputs(model)
    feeds = seeded_feeds(model, count=2)
    assert collect_ranges(model, names, feeds).notes[-1].endswith("final groups: 1")
    monkeypatch.setattr(ranges_module, "default_memory_budget", lambda: 1)
    assert collect_ranges(model, names, feeds).notes[-1].endswith(f"final groups: {len(names)}")
