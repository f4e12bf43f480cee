"""Structured pruning from calibration data: channels chosen by the next layers' output error and the
next layers re-fitted by least squares (optimizer.calibration.channel_obs, passes.prune.reconstruct),
and a multiply-add budget spread across groups (prune-channels flops)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes  # noqa: F401
from optimizer.calibration.channel_obs import ChannelProblem, allocate, refit, removal_order, removal_steps
from optimizer.errors import OptionError, PassError
from optimizer.fileio.checker import check_model_full
from optimizer.pass_base import PassContext
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass
from tests.helpers.runtime import run_model

RNG = np.random.default_rng(0)


def correlated(rows: int, channels: int, seed: int = 0) -> np.ndarray:
    """Inputs whose channels share a few factors (what real activations look like), with a mean."""
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((rows, 4))
    return (factors @ rng.standard_normal((4, channels)) + 0.1 * rng.standard_normal((rows, channels)) + 0.5).astype(
        np.float32
    )


def moments(x: np.ndarray) -> np.ndarray:
    augmented = np.hstack([x, np.ones((x.shape[0], 1), x.dtype)]).astype(np.float64)
    return augmented.T @ augmented / x.shape[0]


def test_refit_is_the_least_squares_solution_with_intercept():
    x = correlated(400, 12)
    weight = RNG.standard_normal((12, 5))
    removed = np.array([1, 4, 7])
    result = refit(ChannelProblem(moments(x), weight, True), removed, damping=0.0)
    kept = np.setdiff1d(np.arange(12), removed)
    design = np.hstack([x[:, kept], np.ones((400, 1), np.float32)]).astype(np.float64)
    solution, *_ = np.linalg.lstsq(design, x.astype(np.float64) @ weight, rcond=None)
    np.testing.assert_allclose(result.kept_weight, solution[:-1], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(result.bias_delta, solution[-1], rtol=1e-3, atol=1e-3)
    residual = x.astype(np.float64) @ weight - design @ solution
    energy = ((x.astype(np.float64) @ weight) ** 2).sum() / 400
    assert result.error_after == pytest.approx((residual**2).sum() / 400 / energy, rel=1e-3)
    assert result.error_after < 0.1 * result.error_before


def test_removal_order_takes_a_duplicated_channel_and_a_dead_one_first():
    x = correlated(300, 8)
    x[:, 5] = x[:, 2]
    x[:, 6] = 0.0
    weight = RNG.standard_normal((8, 3)) + 3.0
    order, costs = removal_order([ChannelProblem(moments(x), weight, True)], 2, damping=1e-6)
    assert set(order.tolist()) == {6, 2} or set(order.tolist()) == {6, 5}
    assert costs[0] == 0.0 and costs[1] < 1e-4


def test_allocate_spends_the_budget_where_error_per_multiply_add_is_least():
    costs = [np.array([0.1, 0.2, 0.9]), np.array([0.05, 0.5, 0.6])]
    counts = allocate(costs, [10.0, 1.0], budget=20.0)
    assert counts == [2, 0]
    assert allocate(costs, [10.0, 10.0], budget=25.0) == [2, 1]
    assert allocate(costs, [10.0, 10.0], budget=1000.0) == [3, 3]


def test_allocate_in_steps_keeps_each_group_a_multiple_of_its_width_step():
    assert removal_steps(20, 8) == [4, 8, 8] and removal_steps(16, 8) == [8, 8] and removal_steps(5, 1) == [1] * 5
    costs = [np.full(12, 0.01), np.full(16, 0.02)]
    counts = allocate(costs, [1.0, 1.0], budget=10.0, steps=[removal_steps(20, 8), removal_steps(16, 8)])
    assert counts == [12, 0]  # 4 (to reach 16) then 8; 12 of the 20 go, the last step would exceed the 12 ordered
    assert allocate(costs, [1.0, 1.0], budget=13.0, steps=[removal_steps(20, 8), removal_steps(16, 8)]) == [12, 8]


def mlp_model(bias_after_second: bool = True) -> onnx.ModelProto:
    """x[N,16] -> MatMul -> Add -> Relu -> MatMul (-> Add) -> y: the hidden units are the group."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="up"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="up_bias"),
        helper.make_node("Relu", ["h1"], ["h"], name="act"),
        helper.make_node("MatMul", ["h", "w2"], ["y0" if bias_after_second else "y"], name="down"),
    ]
    if bias_after_second:
        nodes.append(helper.make_node("Add", ["y0", "b2"], ["y"], name="down_bias"))
    else:
        inits.pop()
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv_model() -> onnx.ModelProto:
    """Conv(3->12, 3x3) -> Relu -> Conv(12->4, 3x3, no bias): the second Conv gains a bias."""
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(rng.standard_normal((12, 3, 3, 3)).astype(np.float32), "c1"),
        numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "c1b"),
        numpy_helper.from_array(rng.standard_normal((4, 12, 3, 3)).astype(np.float32), "c2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1", "c1b"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "c2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 10, 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mlp_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    data = correlated(count * 8, 16, seed)
    return [{"x": data[i * 8 : (i + 1) * 8]} for i in range(count)]


def conv_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((count, 1, 3, 10, 10)).astype(np.float32)
    return [{"x": sample + 0.5} for sample in base]


def prune(model: onnx.ModelProto, feeds, **options):
    context = PassContext(calibration=(lambda: iter(feeds)) if feeds is not None else None)
    result = Pipeline([create_pass("prune-channels", **options)], context=context, check_each_pass=True).run(model)
    check_model_full(result.model)
    return result.model, result.runs[0].report, result.modified


def relative_error(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds) -> float:
    want = np.concatenate([out[0].ravel() for out in run_model(reference, feeds)])
    got = np.concatenate([out[0].ravel() for out in run_model(candidate, feeds)])
    return float(((got - want) ** 2).sum() / (want**2).sum())


@pytest.mark.parametrize(("make", "feeds"), [(mlp_model, mlp_feeds), (conv_model, conv_feeds)], ids=["mlp", "conv"])
def test_reconstruction_beats_dropping_and_weight_norm_on_held_out_data(make, feeds):
    model, calibration, held_out = make(), feeds(32, 0), feeds(8, 99)
    by_norm, _, _ = prune(model, None, ratio=0.25, channel_multiple=1)
    dropped, _, _ = prune(model, calibration, ratio=0.25, reconstruct=False, channel_multiple=1)
    refitted, report, modified = prune(model, calibration, ratio=0.25, channel_multiple=1)
    errors = [relative_error(model, candidate, held_out) for candidate in (by_norm, dropped, refitted)]
    assert modified and errors[2] < 0.9 * errors[1] and errors[1] < 0.9 * errors[0], errors
    (group,) = report["details"]["groups"]
    (layer,) = group["reconstruction"]
    assert layer["output_error_after"] < layer["output_error_before"]
    assert report["counts"]["macs_removed"] == group["macs_removed"] > 0
    assert report["details"]["criterion"].startswith("activation: next layers' output error over 32 calibration")


def test_conv_without_bias_gains_one_and_matmul_without_add_refits_without_intercept():
    model = conv_model()
    pruned, _, _ = prune(model, conv_feeds(16, 0), ratio=0.25, channel_multiple=1)
    conv2 = next(node for node in pruned.graph.node if node.name == "conv2")
    assert len(conv2.input) == 3 and conv2.input[2]
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert shapes["c1"] == [9, 3, 3, 3] and shapes["c2"] == [4, 9, 3, 3] and shapes[conv2.input[2]] == [4]
    plain = mlp_model(bias_after_second=False)
    pruned, report, _ = prune(plain, mlp_feeds(16, 0), ratio=0.25)
    assert len(pruned.graph.node) == len(plain.graph.node)
    assert report["details"]["groups"][0]["reconstruction"][0]["output_error_after"] < 1


def test_flops_budget_is_met_and_rerun_is_byte_identical():
    model, calibration = conv_model(), conv_feeds(16, 0)
    first, report, _ = prune(model, calibration, flops=0.2)
    second, _, _ = prune(model, calibration, flops=0.2)
    assert first.SerializeToString() == second.SerializeToString()
    assert report["counts"]["macs_removed"] >= 0.2 * report["details"]["macs_total"]


def test_default_ratio_with_calibration_changes_nothing_on_a_live_model_and_is_idempotent():
    model = mlp_model()
    _, _, modified = prune(model, mlp_feeds(8, 0))
    assert not modified


def test_options_and_missing_calibration_are_clear_errors():
    with pytest.raises(OptionError, match="'flops' or 'ratio', not both"):
        create_pass("prune-channels", flops=0.1, ratio=0.1)
    with pytest.raises(OptionError, match="criterion activation"):
        create_pass("prune-channels", flops=0.1, criterion="l2")
    with pytest.raises(PassError, match="criterion 'activation' needs calibration data"):
        prune(mlp_model(), None, ratio=0.25, criterion="activation")


def as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    constants = [
        helper.make_node("Constant", [], [tensor.name], name=f"const_{tensor.name}", value=tensor)
        for tensor in converted.graph.initializer
    ]
    del converted.graph.initializer[:]
    nodes = constants + list(converted.graph.node)
    del converted.graph.node[:]
    converted.graph.node.extend(nodes)
    return converted


def test_constant_node_weights_are_pruned_and_refitted_like_initializers():
    model, calibration, held_out = mlp_model(), mlp_feeds(16, 0), mlp_feeds(4, 7)
    from_initializers, _, _ = prune(model, calibration, ratio=0.25)
    from_nodes, report, _ = prune(as_constant_nodes(model), calibration, ratio=0.25)
    assert not from_nodes.graph.initializer or all(t.name.endswith("_bias") for t in from_nodes.graph.initializer)
    for want, got in zip(run_model(from_initializers, held_out), run_model(from_nodes, held_out), strict=True):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert report["details"]["groups"][0]["channels_after"] == 24


def test_a_group_inside_an_if_branch_is_ranked_by_weight_norm_and_says_so():
    body = mlp_model().graph
    then_branch = helper.make_graph(list(body.node), "then", [], list(body.output), list(body.initializer))
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y_else"])], "else", [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, ["N", 16])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch)],
        "with_if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [dict(feed, flag=np.array(True)) for feed in mlp_feeds(8, 0)]
    pruned, report, modified = prune(model, feeds, ratio=0.25)
    (group,) = report["details"]["groups"]
    assert modified and group["ranked_by"] == "l2 weight norm: no calibration statistics in a subgraph"
    run_model(pruned, feeds[:1])


def transformer_feeds(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 100, (1, 12), dtype=np.int64)} for _ in range(count)]


def transformer() -> onnx.ModelProto:
    from tests.helpers.samples import MODELS_DIR

    return onnx.load(MODELS_DIR / "transformer_tied.onnx")


def test_attention_heads_are_removed_whole_with_the_shared_reshape_shapes_rewritten():
    model, calibration, held_out = transformer(), transformer_feeds(16, 0), transformer_feeds(4, 5)
    dropped, _, _ = prune(model, calibration, ratio=0.5, structure="heads", reconstruct=False)
    pruned, report, modified = prune(model, calibration, ratio=0.5, structure="heads")
    (group,) = report["details"]["groups"]
    assert modified and group["heads_before"] == 2 and group["heads_after"] == 1
    assert group["producer"] == "attn.q.matmul" and report["counts"]["heads_removed"] == 1
    shapes = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert shapes["attn.split_heads_shape"].tolist() == [0, 0, 1, 32]
    assert shapes["attn.merge_heads_shape"].tolist() == [0, 0, 32]
    assert shapes["attn.q.weight"].shape == shapes["attn.v.weight"].shape == (64, 32)
    assert shapes["attn.o.weight"].shape == (32, 64) and shapes["ffn.up.weight"].shape == (64, 256)
    assert relative_error(model, pruned, held_out) < relative_error(model, dropped, held_out)
    _, _, modified_again = prune(pruned, calibration, structure="heads")
    assert not modified_again


def test_a_mask_that_differs_per_head_keeps_the_heads():
    model = transformer()
    mask = numpy_helper.from_array(np.zeros((1, 2, 1, 1), np.float32), "per_head_bias")
    model.graph.initializer.append(mask)
    softmax = next(node for node in model.graph.node if node.op_type == "Softmax")
    softmax.input[0] = "biased_scores"
    model.graph.node.insert(
        list(model.graph.node).index(softmax),
        helper.make_node("Add", ["attn.scores_scaled", "per_head_bias"], ["biased_scores"], name="bias_add"),
    )
    _, report, modified = prune(model, transformer_feeds(8, 0), ratio=0.5, structure="heads")
    reasons = {entry["node"]: entry["reason"] for entry in report["skipped"]}
    assert not modified and reasons["attn.softmax"] == "mask 'per_head_bias' of shape [1, 2, 1, 1] differs per head"


def test_cli_prune_structure_implies_channels_mode_and_validates(tmp_path):
    import json

    from optimizer.cli import main
    from tests.helpers.samples import MODELS_DIR

    folder = tmp_path / "cal"
    folder.mkdir()
    for index, feed in enumerate(transformer_feeds(12, 0)):
        np.savez(folder / f"{index:03d}.npz", **feed)
    output, report = tmp_path / "heads.onnx", tmp_path / "r.json"
    args = ["optimize", str(MODELS_DIR / "transformer_tied.onnx"), "-o", str(output), "--prune", "0.5"]
    args += ["--prune-structure", "heads", "--calibration-data", str(folder), "--report", str(report), "--quiet"]
    assert main(args) == 0
    (run,) = [p for p in json.loads(report.read_text())["passes"] if p["name"] == "prune-channels"]
    assert run["report"]["details"]["groups"][0]["heads_after"] == 1
    assert onnx.load(output).graph.initializer  # written, and onnxruntime runs it
    run_model(onnx.load(output), transformer_feeds(1, 3))


def test_a_refit_on_fewer_rows_than_channels_says_it_can_overfit():
    _, report, _ = prune(mlp_model(), mlp_feeds(2, 0), ratio=0.25)
    (layer,) = report["details"]["groups"][0]["reconstruction"]
    assert layer["note"].startswith("fitted on 16 calibration rows for 32 channels: the refit can overfit")
    _, report, _ = prune(mlp_model(), mlp_feeds(8, 0), ratio=0.25)
    assert "note" not in report["details"]["groups"][0]["reconstruction"][0]


def test_cutting_by_ratio_keeps_conv_widths_a_multiple_of_eight_unless_told():
    model, calibration = conv_model(), conv_feeds(8, 0)
    rounded, _, _ = prune(model, calibration, ratio=0.5)
    exact, _, _ = prune(model, calibration, ratio=0.5, channel_multiple=1)
    assert {t.name: list(t.dims) for t in rounded.graph.initializer}["c1"] == [8, 3, 3, 3]
    assert {t.name: list(t.dims) for t in exact.graph.initializer}["c1"] == [6, 3, 3, 3]


def test_a_cut_that_rounding_to_eight_undoes_says_so():
    _, report, modified = prune(conv_model(), conv_feeds(8, 0), ratio=0.25)
    reasons = {entry["node"]: entry["reason"] for entry in report["skipped"]}
    assert not modified and reasons["conv1"].startswith("kept at 12 channels: removing 3 would leave a width")
