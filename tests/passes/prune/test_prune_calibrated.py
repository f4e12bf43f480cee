"""Pruning from calibration data: mode wanda (and nm ranked by Wanda's score: |w| x the input
feature's L2 norm, compared within each output) and mode sparsegpt (and nm with criterion
sparsegpt: prune and update the weights left to keep X @ W, from X^T X)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes  # noqa: F401
from optimizer.calibration.gptq import InverseFactor
from optimizer.calibration.sparsegpt import BLOCK_ROWS, sparsegpt_prune
from optimizer.errors import OptionError, PassError
from optimizer.fileio.model import load_model
from optimizer.pass_base import PassContext
from tests.helpers.runtime import run_model
from tests.helpers.samples import SAMPLE_MODELS, sample_ids, seeded_feeds
from tests.passes.prune.test_prune import matmul_model, prune, weights_of

K, N = 32, 24


def skewed_feeds(count: int, seed: int, dead: int = 3, loud: int = 4) -> list[dict[str, np.ndarray]]:
    """x[:, :dead] is always 0; x[:, dead:dead+loud] is 30x the rest (transformers' outlier features)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        x = rng.standard_normal((16, K)).astype(np.float32)
        x[:, :dead] = 0.0
        x[:, dead : dead + loud] *= 30.0
        feeds.append({"x": x})
    return feeds


def linear_model() -> onnx.ModelProto:
    weight = np.random.default_rng(1).standard_normal((K, N)).astype(np.float32)
    weight[:3] *= 5.0  # large weights on the dead features: magnitude keeps them, Wanda drops them first
    weight[3:7] *= 0.2  # small weights on the loud features: magnitude drops them, Wanda keeps them
    return matmul_model({"w": weight})


def context(feeds) -> PassContext:
    return PassContext(calibration=lambda: iter(feeds))


def output_error(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds) -> float:
    expected = np.concatenate([r[0] for r in run_model(reference, feeds)])
    actual = np.concatenate([r[0] for r in run_model(candidate, feeds)])
    return float(np.linalg.norm(expected - actual) / np.linalg.norm(expected))


def test_wanda_keeps_weights_on_loud_features_and_drops_weights_on_dead_ones():
    model, calibration, evaluation = linear_model(), skewed_feeds(8, 0), skewed_feeds(4, 9)
    wanda, report, modified = prune(model, context(calibration), mode="wanda", sparsity=0.5, min_elements=16)
    magnitude, _, _ = prune(model, mode="uniform", sparsity=0.5, min_elements=16)
    pruned = weights_of(wanda)["w"]
    assert modified and "8 calibration samples" in report["details"]["criterion"]
    assert (pruned[:3] == 0).all()  # dead features: every output drops them first
    kept = np.count_nonzero(pruned[3:7]) / pruned[3:7].size  # loud features' weights, the smallest ones
    assert kept > 0.85 and np.count_nonzero(weights_of(magnitude)["w"][3:7]) / pruned[3:7].size < 0.2
    assert ((pruned == 0).sum(axis=0) == 16).all()  # half of each output's 32 inputs
    assert output_error(model, wanda, evaluation) < 0.5 * output_error(model, magnitude, evaluation)


def test_nm_ranks_by_wanda_with_calibration_data_and_by_magnitude_without():
    model, calibration = linear_model(), skewed_feeds(8, 0)
    ranked, report, _ = prune(model, context(calibration), mode="nm", criterion="wanda", min_elements=16)
    plain, plain_report, _ = prune(model, mode="nm", min_elements=16)
    groups = weights_of(ranked)["w"].T.reshape(N, K // 4, 4)
    assert ((groups != 0).sum(axis=2) <= 2).all()
    first = weights_of(ranked)["w"][:4]  # every output's first group: 3 dead features and a loud one
    assert (first[3] != 0).all() and ((first[:3] == 0).sum(axis=0) >= 2).all()
    assert (weights_of(plain)["w"][3] == 0).sum() > N // 2  # by magnitude, the loud feature's small weights go
    assert "criterion" in report["details"] and "criterion" not in plain_report["details"]
    assert not np.array_equal(weights_of(ranked)["w"], weights_of(plain)["w"])
    forced, _, _ = prune(model, context(calibration), mode="nm", criterion="magnitude", min_elements=16)
    assert np.array_equal(weights_of(forced)["w"], weights_of(plain)["w"])


def grouped_conv_model(channels: int = 8, group: int = 2) -> onnx.ModelProto:
    weight = np.random.default_rng(2).standard_normal((channels, channels // group, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=group, pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 6, 6])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_grouped_conv_norms_follow_each_output_channels_group():
    """Input channel 1 is dead: in group 0 (outputs 0-3) its weights go first; group 1 never reads it."""
    model = grouped_conv_model()
    rng = np.random.default_rng(3)
    feeds = []
    for _ in range(4):
        x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
        x[:, 1] = 0.0
        feeds.append({"x": x})
    pruned = weights_of(prune(model, context(feeds), mode="wanda", sparsity=0.25, min_elements=16)[0])["w"]
    assert (pruned[:4, 1] == 0).all()  # 9 of each output's 36 weights: exactly its dead channel's 3x3
    assert ((pruned[4:] == 0).sum(axis=(1, 2, 3)) == 9).all() and (pruned[4:, 1] != 0).any()


@pytest.mark.parametrize(
    "options", [{"mode": "wanda"}, {"mode": "sparsegpt"}, {"mode": "nm", "criterion": "sparsegpt"}]
)
def test_without_calibration_data_says_what_is_missing(options):
    with pytest.raises(PassError, match="calibration data"):
        prune(linear_model(), sparsity=0.5, min_elements=16, **options)


def correlated_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Features that are mixtures of a few sources: where X^T X is far from diagonal, updating the
    weights left can absorb what pruning removes."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(5).standard_normal((6, K))
    return [{"x": (rng.standard_normal((16, 6)) @ mixing + 0.1 * rng.standard_normal((16, K))).astype(np.float32)}
            for _ in range(count)]


def gemm_model() -> onnx.ModelProto:
    rng = np.random.default_rng(6)
    return matmul_model({"w": rng.standard_normal((K, N)).astype(np.float32)},
                        gemm_trans_b=rng.standard_normal((12, N)).astype(np.float32))


@pytest.mark.parametrize("nm", [False, True])
def test_sparsegpt_beats_wanda_and_magnitude_on_its_calibration_data(nm):
    """Both layers (MatMul [K, N] and Gemm transB [12, N]) pruned at 50% (or 2:4), then updated;
    Wanda's zeros without its bias correction (the Gemm has a bias it could move the means into)."""
    model, feeds, mask_only = gemm_model(), correlated_feeds(8, 0), {"bias_correction": "off"}
    if nm:
        sparse_gpt, report, _ = prune(model, context(feeds), mode="nm", criterion="sparsegpt", min_elements=16)
        wanda, _, _ = prune(model, context(feeds), mode="nm", criterion="wanda", min_elements=16, **mask_only)
        magnitude, _, _ = prune(model, mode="nm", min_elements=16)
    else:
        sparse_gpt, report, _ = prune(model, context(feeds), mode="sparsegpt", sparsity=0.5, min_elements=16)
        wanda, _, _ = prune(model, context(feeds), mode="wanda", sparsity=0.5, min_elements=16, **mask_only)
        magnitude, _, _ = prune(model, mode="uniform", sparsity=0.5, min_elements=16)
    details = report["details"]["sparsegpt"]
    assert (details["samples"], details["weights"]) == (8, 2)
    for name, pruned in weights_of(sparse_gpt).items():
        assert np.count_nonzero(pruned == 0) == pruned.size // 2, name
        if nm:
            along_k = pruned if name == "w" else pruned.T  # Gemm transB stores [N, K]
            assert ((along_k.reshape(-1, 4, along_k.shape[1]) != 0).sum(axis=1) <= 2).all(), name
    errors = [output_error(model, candidate, feeds) for candidate in (sparse_gpt, wanda, magnitude)]
    assert errors[0] < 0.7 * errors[1] and errors[1] <= errors[2] * 1.05, errors


def test_sparsegpt_with_uncorrelated_inputs_is_magnitude_pruning_per_block():
    """X^T X = I: no saliency differs from |w|, and no update moves any weight."""
    weight = np.random.default_rng(7).standard_normal((2 * BLOCK_ROWS, 8)).astype(np.float32)
    pruned = sparsegpt_prune(weight, InverseFactor(np.eye(weight.shape[0])), 0.25)
    for start in (0, BLOCK_ROWS):
        block, result = weight[start : start + BLOCK_ROWS], pruned[start : start + BLOCK_ROWS]
        threshold = np.sort(np.abs(block).ravel())[block.size // 4 - 1]
        assert np.array_equal(result == 0, np.abs(block) <= threshold)
        assert np.allclose(result[result != 0], block[result != 0])
    with pytest.raises(ValueError, match="without act_order"):
        sparsegpt_prune(weight, InverseFactor(np.eye(weight.shape[0]), act_order=True), 0.25)


def test_sparsegpt_leaves_conv_weights_to_magnitude_and_says_why():
    model = grouped_conv_model()
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 8, 6, 6)).astype(np.float32)} for i in range(2)]
    pruned, report, _ = prune(model, context(feeds), mode="sparsegpt", sparsity=0.5, min_elements=16)
    assert any("4-D weight" in s["reason"] for s in report["skipped"] if s.get("tensor") == "w")
    assert np.count_nonzero(weights_of(pruned)["w"] == 0) == weights_of(pruned)["w"].size // 2


@pytest.mark.parametrize("mode", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=sample_ids())
def test_on_every_sample_valid_idempotent_and_deterministic(path, mode):
    """Checker, the caller's model untouched, a second run changes nothing, reruns byte-identical;
    subgraph weights (If/Loop samples) are ranked by magnitude and say so; Constant-node and
    shared (tied) weights are pruned in place, once."""
    model = load_model(path)
    before = model.SerializeToString()
    feeds = seeded_feeds(model, count=4, seed=1)
    pruned, report, modified = prune(model, context(feeds), mode=mode, sparsity=0.5, min_elements=16)
    assert model.SerializeToString() == before
    again, _, changed = prune(pruned, context(feeds), mode=mode, sparsity=0.5, min_elements=16)
    assert not changed and again.SerializeToString() == pruned.SerializeToString()
    rerun, _, _ = prune(model, context(feeds), mode=mode, sparsity=0.5, min_elements=16)
    assert rerun.SerializeToString() == pruned.SerializeToString()
    subgraph = [s for s in report["skipped"] if "inside a subgraph" in s.get("reason", "")]
    assert bool(subgraph) == (path.stem in ("if_subgraph", "loop_subgraph", "voice_activity"))
    if modified:
        assert report["details"]["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)
        for outputs in zip(run_model(model, feeds), run_model(pruned, feeds), strict=True):
            assert all(np.isfinite(actual).all() for actual in outputs[1])


@pytest.mark.parametrize("damping", [0.0, -1.0, 11.0])
def test_damping_out_of_range_is_refused(damping):
    with pytest.raises(OptionError, match="damping"):
        prune(linear_model(), mode="sparsegpt", damping=damping)


def test_nm_criterion_auto_is_sparsegpt_with_calibration_data_and_magnitude_without():
    model, calibration = linear_model(), skewed_feeds(8, 0)
    auto, report, _ = prune(model, context(calibration), mode="nm", min_elements=16)
    explicit, _, _ = prune(model, context(calibration), mode="nm", criterion="sparsegpt", min_elements=16)
    assert auto.SerializeToString() == explicit.SerializeToString() and "sparsegpt" in report["details"]
    plain, _, _ = prune(model, mode="nm", min_elements=16)
    magnitude, _, _ = prune(model, context(calibration), mode="nm", criterion="magnitude", min_elements=16)
    assert plain.SerializeToString() == magnitude.SerializeToString() != auto.SerializeToString()


def test_weights_sparsegpt_does_not_cover_are_ranked_by_wanda_in_modes_auto_and_sparsegpt():
    """A grouped Conv: SparseGPT covers MatMul/Gemm only; with calibration data, Wanda ranks it."""
    model = grouped_conv_model()
    feeds = [{"x": (1.0 + np.random.default_rng(i).standard_normal((1, 8, 6, 6))).astype(np.float32)} for i in range(4)]
    wanda, _, _ = prune(model, context(feeds), mode="wanda", sparsity=0.5, min_elements=16)
    for mode in ("auto", "sparsegpt"):
        pruned, report, _ = prune(model, context(feeds), mode=mode, sparsity=0.5, min_elements=16)
        assert pruned.SerializeToString() == wanda.SerializeToString(), mode
        assert "wanda" in report["details"]["criterion"] and report["counts"]["biases_corrected"] == 0
    uniform, _, _ = prune(model, mode="uniform", sparsity=0.5, min_elements=16)
    assert uniform.SerializeToString() != wanda.SerializeToString()


def test_mode_auto_is_sparsegpt_with_calibration_data_and_uniform_without():
    model, feeds = gemm_model(), correlated_feeds(16, 0)
    auto, report, modified = prune(model, context(feeds), sparsity=0.5, min_elements=16)
    explicit, _, _ = prune(model, context(feeds), sparsity=0.5, mode="sparsegpt", min_elements=16)
    assert modified and auto.SerializeToString() == explicit.SerializeToString()
    assert report["details"]["mode"].startswith("auto: sparsegpt where it applies")
    plain, report, _ = prune(model, None, sparsity=0.5, min_elements=16)
    uniform, _, _ = prune(model, None, sparsity=0.5, mode="uniform", min_elements=16)
    assert plain.SerializeToString() == uniform.SerializeToString()
    assert plain.SerializeToString() != auto.SerializeToString()
    assert report["details"]["mode"] == "auto: uniform magnitude (no calibration data)"


def test_sparsegpt_reports_each_layers_output_error_before_and_after_its_update():
    model, feeds = gemm_model(), correlated_feeds(16, 0)
    _, report, _ = prune(model, context(feeds), sparsity=0.5, mode="sparsegpt", min_elements=16)
    layers = report["details"]["sparsegpt"]["layers"]
    assert len(layers) == 2 and all(layer["sparsity"] == 0.5 for layer in layers)
    assert all(0 < layer["output_error_after"] < layer["output_error_before"] for layer in layers), layers
