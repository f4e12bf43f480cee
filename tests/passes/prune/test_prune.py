from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes
import passes.prune.prune_pass  # noqa: F401  (registers the pass until passes/__init__ imports it)
from optimizer.errors import OptionError
from optimizer.fileio.checker import check_model_full
from optimizer.fileio.model import load_model
from optimizer.pass_base import PassContext
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass
from tests.helpers.runtime import run_model
from tests.helpers.samples import MODELS_DIR, seeded_feeds


def prune(model: onnx.ModelProto, context: PassContext | None = None, **options):
    result = Pipeline([create_pass("prune", **options)], check_each_pass=True, context=context).run(model)
    check_model_full(result.model)
    return result.model, result.runs[0].report, result.modified


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def matmul_model(weights: dict[str, np.ndarray], gemm_trans_b: np.ndarray | None = None) -> onnx.ModelProto:
    """x -> MatMul(w0) -> Relu -> MatMul(w1) ... ; optional Gemm(transB=1) at the end."""
    nodes, inits, current = [], [], "x"
    for index, (name, value) in enumerate(weights.items()):
        nodes.append(helper.make_node("MatMul", [current, name], [f"mm{index}"], name=f"mm{index}"))
        nodes.append(helper.make_node("Relu", [f"mm{index}"], [f"act{index}"], name=f"relu{index}"))
        inits.append(numpy_helper.from_array(value, name))
        current = f"act{index}"
    width = list(weights.values())[-1].shape[1]
    if gemm_trans_b is not None:
        inits.append(numpy_helper.from_array(gemm_trans_b, "gemm.weight"))
        nodes.append(helper.make_node("Gemm", [current, "gemm.weight"], ["gemm.out"], name="gemm", transB=1))
        current, width = "gemm.out", gemm_trans_b.shape[0]
    nodes.append(helper.make_node("Identity", [current], ["y"], name="out"))
    first = next(iter(weights.values())).shape[0]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", first])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def expected_uniform(values: np.ndarray, sparsity: float) -> np.ndarray:
    count = int(np.floor(sparsity * values.size + 0.5))
    zeros = np.argsort(np.abs(values.ravel()), kind="stable")[:count]
    mask = np.zeros(values.size, bool)
    mask[zeros] = True
    return mask.reshape(values.shape)


def test_uniform_zeros_exactly_the_smallest_magnitudes_per_tensor():
    rng = np.random.default_rng(0)
    weights = {"a": rng.standard_normal((32, 48)).astype(np.float32),
               "b": (0.01 * rng.standard_normal((48, 40))).astype(np.float32)}
    pruned, report, modified = prune(matmul_model(weights), sparsity=0.37, min_elements=0)
    assert modified
    for name, original in weights.items():
        got = weights_of(pruned)[name]
        mask = expected_uniform(original, 0.37)
        np.testing.assert_array_equal(got == 0, mask)
        np.testing.assert_array_equal(got[~mask], original[~mask])
        assert int((got == 0).sum()) == int(np.floor(0.37 * original.size + 0.5))
    assert report["counts"]["tensors_pruned"] == 2
    assert report["details"]["tensors"]["a"]["sparsity_after"] == pytest.approx(568 / 1536, abs=1e-6)


def test_ties_are_broken_by_index_so_the_count_is_exact():
    weights = {"w": np.ones((32, 32), np.float32)}
    weights["w"][0, :4] = 0.5
    pruned, _, _ = prune(matmul_model(weights), sparsity=0.5, min_elements=0)
    got = weights_of(pruned)["w"].ravel()
    assert (got == 0).sum() == 512
    np.testing.assert_array_equal(np.flatnonzero(got == 0), np.arange(512))


def test_global_threshold_uses_rms_normalized_scores():
    rng = np.random.default_rng(1)
    weights = {"big": (10.0 * rng.standard_normal((64, 64))).astype(np.float32),
               "small": (0.001 * rng.laplace(size=(64, 64))).astype(np.float32)}
    pruned, report, _ = prune(matmul_model(weights), mode="global", sparsity=0.5, min_elements=0)
    scores = [np.abs(w.astype(np.float64).ravel()) / np.sqrt(np.mean(w.astype(np.float64) ** 2))
              for w in weights.values()]
    flat = np.concatenate(scores)
    chosen = np.zeros(flat.size, bool)
    chosen[np.argsort(flat, kind="stable")[:4096]] = True
    got = weights_of(pruned)
    np.testing.assert_array_equal(got["big"].ravel() == 0, chosen[:4096])
    np.testing.assert_array_equal(got["small"].ravel() == 0, chosen[4096:])
    for name in weights:  # neither layer is wiped out although their scales differ 10^4 times
        assert 0.3 < report["details"]["tensors"][name]["sparsity_after"] < 0.7
    assert report["details"]["achieved_sparsity"] == 0.5


def test_second_run_changes_nothing_and_is_byte_identical():
    rng = np.random.default_rng(2)
    model = matmul_model({"w": rng.standard_normal((40, 40)).astype(np.float32)})
    for options in ({"mode": "uniform"}, {"mode": "global"}, {"mode": "nm"}):
        first, _, modified = prune(model, min_elements=0, **options)
        second, report, again = prune(first, min_elements=0, **options)
        assert modified and not again, options
        assert second.SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)
        assert "tensors_pruned" not in report["counts"]


def test_nm_keeps_the_two_largest_of_every_four_along_the_reduction_axis():
    rng = np.random.default_rng(3)
    weights = {"w0": rng.standard_normal((32, 24)).astype(np.float32),
               "w1": rng.standard_normal((24, 6)).astype(np.float32)}
    gemm = rng.standard_normal((10, 6)).astype(np.float32)  # transB=1: [N, K], K=6 not divisible by 4
    pruned, report, _ = prune(matmul_model(weights, gemm), mode="nm", min_elements=0)
    got = weights_of(pruned)
    for name, axis in (("w0", 0), ("w1", 0)):
        groups = np.moveaxis(got[name], axis, -1).reshape(-1, 4)
        original = np.moveaxis(weights[name], axis, -1).reshape(-1, 4)
        assert (np.count_nonzero(groups, axis=1) == 2).all()
        kept = np.sort(np.argsort(-np.abs(original), axis=1, kind="stable")[:, :2], axis=1)
        np.testing.assert_array_equal(np.sort(np.argwhere(groups != 0)[:, 1].reshape(-1, 2), axis=1), kept)
    np.testing.assert_array_equal(got["gemm.weight"], gemm)
    assert report["details"]["nm_eligible"] == ["w0", "w1"]
    assert {"tensor": "gemm.weight",
            "reason": "not N:M eligible: reduction length 6 (axis 1) is not divisible by M=4"} in report["skipped"]


def test_nm_on_conv_groups_input_channels_at_each_kernel_position():
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    pruned, _, _ = prune(model, mode="nm", nm=(1, 4), min_elements=0)
    got = weights_of(pruned)["w"]
    assert (np.count_nonzero(np.moveaxis(got, 1, -1).reshape(-1, 4), axis=1) == 1).all()


def test_filters_and_skip_reasons():
    model = load_model(MODELS_DIR / "mlp.onnx")
    _, report, _ = prune(model, min_elements=2000, exclude=("re:^fc2\\.",))
    skipped = {entry["tensor"]: entry["reason"] for entry in report["skipped"]}
    assert skipped["fc3.weight"] == "1280 elements < min_elements=2000"
    assert skipped["fc2.weight"] == "matches an 'exclude' pattern"
    assert list(report["details"]["tensors"]) == ["fc1.weight"]
    _, report, _ = prune(model, min_elements=0, include=("fc3.*",))
    skipped = {entry["tensor"]: entry["reason"] for entry in report["skipped"]}
    assert skipped["fc1.weight"] == "matches no 'include' pattern"
    assert skipped["fc1.bias"] == "bias of Gemm 'fc1.gemm'; never pruned"
    assert list(report["details"]["tensors"]) == ["fc3.weight"]


def test_normalization_index_and_shared_non_weight_reads_are_skipped_with_reason():
    model = load_model(MODELS_DIR / "transformer_tied.onnx")
    pruned, report, _ = prune(model, min_elements=0)
    skipped = {entry["tensor"]: entry["reason"] for entry in report["skipped"]}
    assert skipped["ln_attn.weight"] == "normalization parameter of LayerNormalization 'ln_attn'; never pruned"
    assert skipped["embed.weight"] == "embedding table of Gather 'embed.gather'; add Gather to op_types to prune it"
    assert skipped["attn.split_heads_shape"].startswith("int64 tensor (shape or index data)")
    assert "ffn.up.weight" in report["details"]["tensors"]
    untouched = weights_of(pruned)["embed.weight"]
    np.testing.assert_array_equal(untouched, weights_of(model)["embed.weight"])
    pruned, report, _ = prune(model, op_types=("MatMul", "Gather"))
    assert report["details"]["tensors"]["embed.weight"]["sparsity_after"] == round(9830 / 32768, 6)


def test_constant_node_weights_and_a_weight_shared_by_two_convs_are_pruned_once():
    model = load_model(MODELS_DIR / "constant_weights.onnx")
    pruned, report, _ = prune(model, sparsity=0.5, min_elements=0)
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in pruned.graph.node
                 if n.op_type == "Constant"}
    assert len(pruned.graph.initializer) == 0
    assert (constants["conv2d_1.w_0"] == 0).sum() == 288
    assert report["details"]["tensors"]["conv2d_1.w_0"]["sparsity_after"] == 0.5
    assert [n.op_type for n in pruned.graph.node].count("Constant") == 6
    run_model(pruned, seeded_feeds(pruned))


def test_outer_scope_weight_read_in_if_branches_is_pruned_in_place():
    model = load_model(MODELS_DIR / "if_subgraph.onnx")
    pruned, _report, _ = prune(model, sparsity=0.5, min_elements=0)
    names = [t.name for t in pruned.graph.initializer]
    assert names.count("shared.weight") == 1
    assert (weights_of(pruned)["shared.weight"] == 0).sum() == 512
    for node in pruned.graph.node:
        for attribute in node.attribute:
            assert "shared.weight" not in [t.name for t in attribute.g.initializer]
    outputs = run_model(pruned, seeded_feeds(pruned))
    assert all(np.isfinite(o).all() for sample in outputs for o in sample)


def test_sensitivity_mode_reaches_the_target_and_is_idempotent():
    model = load_model(MODELS_DIR / "mlp.onnx")
    feeds = seeded_feeds(model, count=4)
    context = PassContext(calibration=lambda: iter(feeds))
    pruned, report, modified = prune(model, context, mode="sensitivity", sparsity=0.5, min_elements=0)
    allocation = report["details"]["allocation"]
    assert set(allocation) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert modified and report["details"]["achieved_sparsity"] >= 0.5
    _, again, modified_again = prune(pruned, context, mode="sensitivity", sparsity=0.5, min_elements=0)
    assert not modified_again and "nothing to do" in again["details"]["allocation"]


def test_storage_auto_picks_sparse_only_past_two_thirds():
    rng = np.random.default_rng(5)
    model = matmul_model({"w": rng.standard_normal((64, 64)).astype(np.float32)})
    _, report, _ = prune(model, sparsity=0.6, storage="auto", min_elements=0)
    assert report["details"]["storage"]["w"] == {"dense_bytes": 16384, "sparse_bytes": 19656, "stored_as": "dense"}
    _, report, _ = prune(model, sparsity=0.7, storage="auto", min_elements=0)
    assert report["details"]["storage"]["w"]["stored_as"] == "sparse"
    assert report["details"]["sparse_tensors"] == ["w"]


def test_zeros_stay_exactly_zero_through_int8_symmetric_per_channel_fake_quantization():
    """What the quantizer must guarantee: 0.0 maps to the integer 0 (symmetric, or a zero point
    that is itself an integer) and dequantizes to exactly 0.0."""
    rng = np.random.default_rng(6)
    model = matmul_model({"w": rng.standard_normal((64, 32)).astype(np.float32)})
    pruned, _, _ = prune(model, sparsity=0.5, min_elements=0)
    weight = weights_of(pruned)["w"]
    scale = np.abs(weight).max(axis=0, keepdims=True) / 127.0
    quantized = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    dequantized = quantized.astype(np.float32) * scale
    np.testing.assert_array_equal(dequantized[weight == 0], 0.0)
    assert (quantized[weight == 0] == 0).all()


@pytest.mark.parametrize("options", [{"sparsity": 1.0}, {"mode": "blocks"}, {"nm": (4, 2)},
                                     {"op_types": ("Add",)}, {"include": ("re:(",)}])
def test_bad_options_are_option_errors(options):
    with pytest.raises(OptionError):
        create_pass("prune", **options)


def test_weight_also_read_by_a_non_weight_slot_is_skipped_with_reason():
    rng = np.random.default_rng(7)
    model = matmul_model({"w": rng.standard_normal((32, 32)).astype(np.float32)})
    model.graph.node.insert(0, helper.make_node("Add", ["x", "w"], ["x_plus_w"], name="also_add"))
    model.graph.output.append(helper.make_tensor_value_info("x_plus_w", TensorProto.FLOAT, [32, 32]))
    _pruned, report, modified = prune(model, min_elements=0)
    assert not modified
    assert report["skipped"] == [
        {"tensor": "w", "reason": "also read by Add 'also_add' at input 1, not a prunable weight slot"}
    ]
