from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes
import passes.prune.channels  # noqa: F401  (registers the pass until passes/__init__ imports it)
from optimizer.errors import OptionError
from optimizer.fileio.checker import check_model_full
from optimizer.fileio.model import load_model
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass
from tests.helpers.runtime import assert_same_outputs
from tests.helpers.samples import MODELS_DIR, seeded_feeds


def prune_channels(model: onnx.ModelProto, **options):
    result = Pipeline([create_pass("prune-channels", **options)], check_each_pass=True).run(model)
    check_model_full(result.model)
    return result.model, result.runs[0].report, result.modified


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def set_initializer(model: onnx.ModelProto, name: str, values: np.ndarray) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(values, name))


def test_cnn_conv1_channels_that_were_zero_are_removed_without_changing_outputs():
    model = load_model(MODELS_DIR / "cnn.onnx")
    dead = [1, 5, 9, 13]
    weights = initializers(model)
    conv1, conv2 = weights["conv1.weight"].copy(), weights["conv2.weight"].copy()
    conv1[dead] = 0
    conv2[:, dead] = 0
    set_initializer(model, "conv1.weight", conv1)
    set_initializer(model, "conv2.weight", conv2)
    pruned, report, modified = prune_channels(model, ratio=0.25, channel_multiple=1)
    got = initializers(pruned)
    keep = [c for c in range(16) if c not in dead]
    assert modified and report["details"]["groups"] == [
        {"producer": "conv1", "channels_before": 16, "channels_after": 12}]
    np.testing.assert_array_equal(got["conv1.weight"], conv1[keep])
    np.testing.assert_array_equal(got["conv2.weight"], conv2[:, keep])
    for name in ("bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"):
        np.testing.assert_array_equal(got[name], weights[name][keep])
    assert report["saved_bytes"] == 4 * (4 * 27 + 4 * 4 + 32 * 4 * 9)
    assert_same_outputs(model, pruned, seeded_feeds(model), atol=1e-5)
    reasons = {entry["node"]: entry["reason"] for entry in report["skipped"]}
    assert reasons["conv2"] == ("Add 'res.add' combines the channels with another branch ('res.conv.out'), "
                                "e.g. a residual connection")
    assert reasons["dw.conv"] == "grouped Conv (group=32): its output channels follow its input channels"
    assert reasons["fc.gemm"] == "channel tensor 'logits' is a graph output"


def test_transformer_feed_forward_units_that_were_zero_are_removed_without_changing_outputs():
    model = load_model(MODELS_DIR / "transformer_tied.onnx")
    weights = initializers(model)
    dead = np.arange(0, 256, 4)
    up, bias = weights["ffn.up.weight"].copy(), weights["ffn.up.bias"].copy()
    up[:, dead], bias[dead] = 0, 0
    set_initializer(model, "ffn.up.weight", up)
    set_initializer(model, "ffn.up.bias", bias)
    pruned, report, _ = prune_channels(model, ratio=0.25)
    got = initializers(pruned)
    keep = np.setdiff1d(np.arange(256), dead)
    assert got["ffn.up.weight"].shape == (64, 192) and got["ffn.down.weight"].shape == (192, 64)
    np.testing.assert_array_equal(got["ffn.up.bias"], bias[keep])
    np.testing.assert_array_equal(got["ffn.down.weight"], weights["ffn.down.weight"][keep])
    assert report["details"]["groups"] == [{"producer": "ffn.up.matmul", "channels_before": 256, "channels_after": 192}]
    assert_same_outputs(model, pruned, seeded_feeds(model), atol=1e-5)
    reasons = {entry["node"]: entry["reason"] for entry in report["skipped"]}
    assert reasons["attn.q.matmul"] == (
        "Reshape 'attn.q.reshape' reads the channels (input 0); its layout cannot be followed"
    )


def test_default_removes_only_near_dead_units_and_a_second_run_changes_nothing():
    model = load_model(MODELS_DIR / "mlp.onnx")
    pruned, report, modified = prune_channels(model)
    got = initializers(pruned)
    keep = [row for row in range(128) if row % 8]
    assert modified and got["fc1.weight"].shape == (112, 64)
    np.testing.assert_array_equal(got["fc1.weight"], initializers(model)["fc1.weight"][keep])
    np.testing.assert_array_equal(got["fc2.weight"], initializers(model)["fc2.weight"][keep])
    assert report["counts"] == {"channels_removed": 16, "groups_pruned": 1, "groups_unchanged": 1}
    again, report, modified = prune_channels(pruned)
    assert not modified and report["counts"] == {"groups_unchanged": 2}
    assert again.SerializeToString(deterministic=True) == pruned.SerializeToString(deterministic=True)


def head_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv -> depthwise Conv -> HardSwish -> GAP -> Reshape([-1, 8]) -> MatMul, weights in
    Constant nodes, and value_info for every intermediate tensor."""
    def const(name, array):
        return helper.make_node(
            "Constant", [], [name], name=f"{name}.const", value=numpy_helper.from_array(array, name)
        )
    nodes = [
        const("c.w", rng.standard_normal((8, 3, 3, 3)).astype(np.float32)),
        const("c.b", rng.standard_normal(8).astype(np.float32)),
        const("dw.w", rng.standard_normal((8, 1, 3, 3)).astype(np.float32)),
        const("shape", np.array([-1, 8], np.int64)),
        const("fc.w", rng.standard_normal((8, 5)).astype(np.float32)),
        helper.make_node("Conv", ["x", "c.w", "c.b"], ["c.out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c.out", "dw.w"], ["dw.out"], name="dw", pads=[1, 1, 1, 1], group=8),
        helper.make_node("HardSwish", ["dw.out"], ["act"], name="act"),
        helper.make_node("GlobalAveragePool", ["act"], ["gap"], name="gap"),
        helper.make_node("Reshape", ["gap", "shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "fc.w"], ["y"], name="fc"),
    ]
    info = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in
            (("c.out", [1, 8, 6, 6]), ("dw.out", [1, 8, 6, 6]), ("act", [1, 8, 6, 6]), ("gap", [1, 8, 1, 1]),
             ("flat", [1, 8]))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], value_info=info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_depthwise_conv_reshape_constant_and_value_info_follow_the_cut():
    rng = np.random.default_rng(0)
    model = head_model(rng)
    for node in model.graph.node:
        if node.output[0] in ("c.w", "c.b"):
            values = numpy_helper.to_array(node.attribute[0].t).copy()
            values[[2, 6]] = 0
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(values, node.output[0]))
    pruned, report, _ = prune_channels(model, ratio=0.25, channel_multiple=1)
    assert report["details"]["groups"][0] == {"producer": "conv", "channels_before": 8, "channels_after": 6}
    constants = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in pruned.graph.node if n.op_type == "Constant"
    }
    assert constants["shape"].tolist() == [-1, 6]
    assert constants["dw.w"].shape == (6, 1, 3, 3) and constants["fc.w"].shape == (6, 5)
    depthwise = next(n for n in pruned.graph.node if n.name == "dw")
    assert helper.get_attribute_value(next(a for a in depthwise.attribute if a.name == "group")) == 6
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in pruned.graph.value_info}
    assert shapes["act"] == [1, 6, 6, 6] and shapes["flat"] == [1, 6]
    assert_same_outputs(model, pruned, seeded_feeds(model), atol=1e-5)


def test_include_exclude_select_producers():
    model = load_model(MODELS_DIR / "mlp.onnx")
    _, report, _modified = prune_channels(model, ratio=0.5, exclude=("fc1.*",))
    assert [g["producer"] for g in report["details"]["groups"]] == ["fc2.matmul"]
    _, report, _ = prune_channels(model, ratio=0.5, include=("re:^fc1\\.",), channel_multiple=48)
    assert report["details"]["groups"] == [{"producer": "fc1.gemm", "channels_before": 128, "channels_after": 96}]


@pytest.mark.parametrize("options", [{"ratio": 1.0}, {"criterion": "l3"}, {"op_types": ("Relu",)},
                                     {"min_channels": 0}, {"exclude": ("re:[",)}])
def test_bad_options_are_option_errors(options):
    with pytest.raises(OptionError):
        create_pass("prune-channels", **options)
