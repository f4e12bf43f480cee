"""Static mode keeps CNN blocks in integer kernels: BatchNormalization folded, HardSwish and
HardSigmoid rewritten into ops onnxruntime has QLinear kernels for, positive scalar Mul/Div folded
into a DequantizeLinear scale, small Conv weights quantized so the chain does not break."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.graph.convert import export_model, import_graph
from optimizer.pass_base import PassReport
from passes.quantize.integer_forms import fold_batch_norms, prepare_integer_forms, rescale_factor
from tests.helpers.quantize_checks import quantize
from tests.helpers.runtime import max_abs_error, ort_runs, run_model
from tests.helpers.samples import seeded_feeds

FLOAT_ISLAND_OPS = ("Div", "Clip", "HardSigmoid", "HardSwish", "BatchNormalization", "Mul", "Add")


def _conv(rng, name: str, source: str, out: str, cin: int, cout: int, group: int = 1) -> tuple[list, list]:
    weight = (rng.standard_normal((cout, cin // group, 3, 3)) * 0.3).astype(np.float32)
    bias = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    inputs = [source, f"{name}_w", f"{name}_b"]
    node = helper.make_node("Conv", inputs, [out], name=name, pads=[1, 1, 1, 1], group=group)
    return [node], [numpy_helper.from_array(weight, f"{name}_w"), numpy_helper.from_array(bias, f"{name}_b")]


def _scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def mobile_block(opset: int = 13, hardswish_op: bool = False) -> onnx.ModelProto:
    """Conv -> BatchNorm -> HardSwish (x * Clip(x+3, 0, 6) / 6, or the op) -> depthwise Conv with
    144 weights -> squeeze-excitation gate (GlobalAveragePool, Conv, HardSigmoid, Mul) -> Conv."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for args in (("c1", "x", "c1o", 3, 16), ("dw", "hs", "dwo", 16, 16, 16), ("se", "pool", "seo", 16, 16)):
        made = _conv(rng, *args)
        nodes += made[0]
        inits += made[1]
    inits += [
        numpy_helper.from_array((rng.random(16) + 0.5).astype(np.float32), "bn_scale"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "bn_bias"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "bn_mean"),
        numpy_helper.from_array((rng.random(16) + 0.5).astype(np.float32), "bn_var"),
        _scalar("three", 3.0),
        _scalar("zero", 0.0),
        _scalar("six", 6.0),
    ]
    nodes.append(helper.make_node("BatchNormalization", ["c1o", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"]))
    if hardswish_op:
        nodes.append(helper.make_node("HardSwish", ["bn"], ["hs"], name="hardswish"))
    else:
        nodes += [
            helper.make_node("Add", ["bn", "three"], ["hs_add"]),
            helper.make_node("Clip", ["hs_add", "zero", "six"], ["hs_clip"]),
            helper.make_node("Mul", ["bn", "hs_clip"], ["hs_mul"]),
            helper.make_node("Div", ["hs_mul", "six"], ["hs"]),
        ]
    nodes += [
        helper.make_node("GlobalAveragePool", ["dwo"], ["pool"]),
        helper.make_node("HardSigmoid", ["seo"], ["gate"], alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["dwo", "gate"], ["gated"]),
    ]
    made = _conv(rng, "out", "gated", "y", 16, 8)
    nodes += made[0]
    inits += made[1]
    graph = helper.make_graph(
        nodes,
        "mobile_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return gs.export_onnx(gs.import_onnx(model).toposort())


def test_rewrites_before_quantization_keep_the_float_function():
    for model in (mobile_block(), mobile_block(opset=14, hardswish_op=True)):
        graph = import_graph(model)
        report = PassReport()
        fold_batch_norms(graph, report)
        prepare_integer_forms(graph, report)
        graph.cleanup().toposort()
        rewritten = export_model(graph, model)
        ops = {n.op_type for n in rewritten.graph.node}
        assert not ops & {"BatchNormalization", "HardSigmoid", "HardSwish"}, ops
        counts = report.to_dict()["counts"]
        assert counts["batchnorms_folded"] == 1 and counts["hardsigmoid_rewritten"] == 1
        feeds = seeded_feeds(model, count=3)
        reference = np.concatenate([r[0] for r in run_model(model, feeds)])
        assert max_abs_error(model, rewritten, feeds) <= 1e-5 * max(1.0, float(np.abs(reference).max()))


@pytest.mark.parametrize("hardswish_op", [False, True])
def test_mobile_block_runs_in_integer_kernels_only(tmp_path, hardswish_op):
    model = mobile_block(opset=14, hardswish_op=hardswish_op)
    calibration = seeded_feeds(model, count=8, seed=1)
    result, report = quantize(model, calibration=calibration, mode="static")
    ran = ort_runs(result.model, tmp_path)
    # the 144-element depthwise weight is quantized too; the last Conv writes the float graph output
    assert ran["QLinearConv"] == 3 and ran["Conv"] == 1, ran
    assert not {op: n for op, n in ran.items() if op in FLOAT_ISLAND_OPS}, ran
    assert ran["QuantizeLinear"] == 1, ran  # the model input: no float island inside needs another
    assert report["counts"]["rescales_folded_into_scale"] >= 2  # the /6 of HardSwish, HardSigmoid's alpha
    feeds = seeded_feeds(model, count=4, seed=2)
    reference = np.concatenate([r[0] for r in run_model(model, feeds)])
    assert max_abs_error(model, result.model, feeds) <= 0.05 * np.abs(reference).max()
    again, _ = quantize(result.model, calibration=calibration, mode="static")
    assert again.modified is False
    rerun, _ = quantize(model, calibration=calibration, mode="static")
    assert rerun.model.SerializeToString() == result.model.SerializeToString()


def test_explicit_min_weight_elements_still_leaves_small_weights_float():
    model = mobile_block()
    _, report = quantize(model, calibration=seeded_feeds(model, count=4), mode="static", min_weight_elements=256)
    skipped = [s for s in report["skipped"] if "dw_w" in s.get("node", "")]
    assert skipped and "min_weight_elements=256" in skipped[0]["reason"]
    _, default = quantize(model, calibration=seeded_feeds(model, count=4), mode="static")
    assert default["counts"]["static_Conv"] == 4
    _, weights = quantize(model, mode="weights")
    assert any("dw_w" in s.get("node", "") for s in weights["skipped"])  # weight-only keeps the 256 default


def _binary(op: str, constant: np.ndarray, constant_first: bool = False) -> gs.Node:
    x = gs.Variable("x", dtype=np.float32)
    c = gs.Constant("c", constant.astype(np.float32))
    inputs = [c, x] if constant_first else [x, c]
    return gs.Node(op, "n", {}, inputs, [gs.Variable("y", dtype=np.float32)])


def test_only_positive_scalar_mul_and_div_fold_into_a_scale():
    assert rescale_factor(_binary("Div", np.asarray(6.0))) == pytest.approx(1 / 6)
    assert rescale_factor(_binary("Mul", np.asarray(0.5), constant_first=True)) == 0.5
    assert rescale_factor(_binary("Div", np.asarray(-6.0))) is None  # a negative scale flips the order
    assert rescale_factor(_binary("Div", np.asarray(0.0))) is None
    assert rescale_factor(_binary("Mul", np.ones(4))) is None  # per-element: not one scale
    assert rescale_factor(_binary("Div", np.asarray(6.0), constant_first=True)) is None  # 6 / x


def test_batchnorm_after_a_conv_read_twice_is_left_alone():
    model = mobile_block()
    model.graph.output.append(helper.make_tensor_value_info("c1o", TensorProto.FLOAT, None))
    graph = import_graph(model)
    report = PassReport()
    fold_batch_norms(graph, report)
    assert "batchnorms_folded" not in report.to_dict()["counts"]
    alone = PassReport()
    fold_batch_norms(import_graph(mobile_block()), alone)
    assert alone.to_dict()["counts"]["batchnorms_folded"] == 1


def affine_block(mul_shape: tuple[int, ...] = (1, 16, 1, 1), sub_first: bool = False) -> onnx.ModelProto:
    """Conv -> Mul (per channel) -> Add (one value) -> Sub (per channel, [16, 1, 1]) -> Relu -> Conv:
    PP-LCNetV3's learnable affine after a Conv, spelled three ways."""
    rng = np.random.default_rng(3)
    nodes, inits = [], []
    for args in (("c1", "x", "c1o", 3, 16), ("out", "r", "y", 16, 8)):
        made = _conv(rng, *args)
        nodes += made[0]
        inits += made[1]
    inits += [
        numpy_helper.from_array((rng.standard_normal(mul_shape) + 0.2).astype(np.float32), "a"),
        numpy_helper.from_array(np.asarray([0.3], np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((16, 1, 1)).astype(np.float32), "d"),
    ]
    nodes += [
        helper.make_node("Mul", ["a", "c1o"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "b"], ["s"], name="add"),
        helper.make_node("Sub", ["d", "s"] if sub_first else ["s", "d"], ["t"], name="sub"),
        helper.make_node("Relu", ["t"], ["r"]),
    ]
    nodes.sort(key=lambda n: ["c1", "mul", "add", "sub", "", "out"].index(n.name))
    graph = helper.make_graph(
        nodes,
        "affine_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _folded(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    graph = import_graph(model)
    report = PassReport()
    fold_batch_norms(graph, report)
    graph.cleanup().toposort()
    return export_model(graph, model), report.to_dict()["counts"]


def test_per_channel_mul_add_sub_after_a_conv_fold_into_it():
    model = affine_block()
    folded, counts = _folded(model)
    assert counts["channel_constants_folded"] == 3
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv"]
    feeds = seeded_feeds(model, count=3)
    reference = np.concatenate([r[0] for r in run_model(model, feeds)])
    assert max_abs_error(model, folded, feeds) <= 1e-5 * max(1.0, float(np.abs(reference).max()))


def test_constants_that_are_not_one_per_channel_or_come_first_in_a_sub_stay():
    spatial, counts = _folded(affine_block(mul_shape=(1, 16, 8, 8)))  # one value per pixel: not an affine
    assert "channel_constants_folded" not in counts  # the Mul stays, so the Add after it has no Conv before it
    assert [n.op_type for n in spatial.graph.node].count("Mul") == 1
    _, counts = _folded(affine_block(sub_first=True))  # d - s negates the Conv: not folded
    assert counts["channel_constants_folded"] == 2
    shared = affine_block()
    shared.graph.output.append(helper.make_tensor_value_info("c1o", TensorProto.FLOAT, None))
    _, counts = _folded(shared)
    assert "channel_constants_folded" not in counts


def test_static_mode_runs_the_folded_affine_in_one_integer_conv(tmp_path):
    model = affine_block()
    calibration = seeded_feeds(model, count=8, seed=1)
    result, report = quantize(model, calibration=calibration, mode="static", min_weight_elements=16)
    assert report["counts"]["channel_constants_folded"] == 3
    ran = ort_runs(result.model, tmp_path)
    assert ran["QLinearConv"] == 1, ran
    assert not {op for op in ran if op in ("QLinearMul", "QLinearAdd", "Mul", "Add", "Sub")}, ran
    reference = np.concatenate([r[0] for r in run_model(model, calibration)])
    error = max_abs_error(model, result.model, calibration)  # on the calibrated ranges: rounding error only
    assert error <= 0.02 * np.abs(reference).max()
    unfolded, _ = quantize(model, calibration=calibration, mode="static", min_weight_elements=16, integer_forms=False)
    assert error < max_abs_error(model, unfolded.model, calibration)  # two requantizations fewer


def test_integer_forms_off_leaves_the_float_islands(tmp_path):
    model = mobile_block(opset=14)
    calibration = seeded_feeds(model, count=8, seed=1)
    result, report = quantize(model, calibration=calibration, mode="static", integer_forms=False)
    ran = ort_runs(result.model, tmp_path)
    assert ran["BatchNormalization"] + ran["Div"] + ran["HardSigmoid"] >= 3, ran
    assert "rescales_folded_into_scale" not in report["counts"] and "batchnorms_folded" not in report["counts"]


@pytest.mark.parametrize("mode", ["weights", "dynamic"])
def test_every_mode_folds_batchnorm_into_the_conv_before_it(mode):
    """Its four float vectors leave the file; onnxruntime folded it at load anyway."""
    model = mobile_block()
    folded, report = quantize(model, mode=mode, min_weight_elements=16)
    assert report["counts"]["batchnorms_folded"] == 1
    assert not any(n.op_type == "BatchNormalization" for n in folded.model.graph.node)
    kept, kept_report = quantize(model, mode=mode, min_weight_elements=16, integer_forms=False)
    assert "batchnorms_folded" not in kept_report["counts"]
    assert any(n.op_type == "BatchNormalization" for n in kept.model.graph.node)
    assert folded.model.ByteSize() < kept.model.ByteSize()
    feeds = seeded_feeds(model, count=3)
    reference = np.concatenate([r[0] for r in run_model(model, feeds)])
    scale = float(np.abs(reference).max())
    assert max_abs_error(model, folded.model, feeds) <= max_abs_error(model, kept.model, feeds) + 1e-3 * scale
    again, _ = quantize(folded.model, mode=mode, min_weight_elements=16)
    assert again.modified is False
