"""Passes must not change a model's interface, corrupt odd tensors or leave dangling names
(issue 11: items 6, 7, 11, 12 and 18).

- an initializer listed in ``graph.input`` stays an overridable input (same name, type and
  shape) through every pass; lossy passes skip it with "graph input (overridable initializer)";
- weights holding NaN/Inf are listed by ``inspect`` and left as they are by every lossy pass
  ("N non-finite values") unless ``allow_non_finite`` is set;
- STRING tensors pass through every command untouched;
- 4-bit and sparse tensors a pass reads are written back in their own format;
- training_info bindings keep naming initializers of the main graph.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.calibration.feeds import generate_feeds, model_input_specs
from optimizer.cli import main
from optimizer.fileio.tensor_checks import check_inline_tensor
from optimizer.graph.convert import export_model, import_graph
from optimizer.graph.inspect_values import NonFiniteTensor
from optimizer.graph.inspection import inspect_model
from passes.weight_guard import OVERRIDABLE_INPUT_REASON, WeightGuard, non_finite_count
from tests.helpers.runtime import open_session

RNG_SEED = 0
LOSSY_REQUESTS = {
    "int8-dynamic": ["--quantize", "int8"],
    "int8-weights": ["--quantize", "int8", "--quantize-mode", "weights"],
    "int8-static": ["--quantize", "int8", "--quantize-mode", "static"],
    "int4-weights": ["--quantize", "int4", "--quantize-mode", "weights"],
    "uint8-weights": ["--quantize", "uint8", "--quantize-mode", "weights"],
    "prune": ["--prune", "0.5", "--set", "prune.min_elements=16", "--set", "prune.op_types=Gather,MatMul,Gemm"],
    "prune-nm": ["--prune", "0.5", "--prune-mode", "nm", "--set", "prune.min_elements=16"],
    "prune-channels": ["--prune", "0.25", "--prune-mode", "channels"],
    "cluster": ["--cluster", "4", "--set", "cluster.min_elements=16"],
}
REQUESTS = {"default": [], **LOSSY_REQUESTS}
QUANTIZE_SETTINGS = ["--set", "quantize.min_weight_elements=16"]


# --------------------------------------------------------------------------- helpers


def run_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def optimize(source: Path, output: Path, request: str) -> dict:
    """Run one request through the CLI in-process; returns the JSON report."""
    args = ["optimize", str(source), "-o", str(output), "--json", *REQUESTS[request]]
    if "--quantize" in args:
        args += QUANTIZE_SETTINGS
    if request == "int8-static":
        folder = output.with_name(output.stem + ".cal")
        folder.mkdir(exist_ok=True)
        for index, feed in enumerate(generate_feeds(model_input_specs(onnx.load(str(source))), count=3, seed=1)):
            np.savez(folder / f"{index}.npz", **feed)
        args += ["--calibration-data", str(folder)]
    code, stdout, stderr = run_cli(args)
    assert code == 0, f"{request}: exit {code}: {stderr}"
    return json.loads(stdout)


def skipped(report: dict) -> list[dict]:
    return [entry for run in report["passes"] for entry in run["report"]["skipped"]]


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    return next((t for t in model.graph.initializer if t.name == name), None)


def random(shape: tuple[int, ...], seed: int = RNG_SEED) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- item 6: overridable inputs


def overridable_model() -> onnx.ModelProto:
    """y = relu(x @ W) @ W2; W is also a graph input (declared with a symbolic first dim);
    W2 and a Constant node are graph outputs too."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
         helper.make_node("Constant", [], ["c"], name="const",
                          value=numpy_helper.from_array(np.arange(4, dtype=np.float32), "c_value"))],
        "overridable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, ["rows", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("W2", TensorProto.FLOAT, [64, 64])],
        [numpy_helper.from_array(random((64, 64)), "W"), numpy_helper.from_array(random((64, 64), 1), "W2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("request_name", list(REQUESTS))
def test_initializer_listed_as_graph_input_stays_overridable(request_name, tmp_path):
    original = overridable_model()
    source = save(original, tmp_path / "in.onnx")
    report = optimize(source, tmp_path / "out.onnx", request_name)
    result = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(result, full_check=True)
    assert [v.SerializeToString() for v in result.graph.input] == [v.SerializeToString() for v in original.graph.input]
    assert initializer(result, "W").SerializeToString() == initializer(original, "W").SerializeToString()
    assert [(v.name, v.type.tensor_type.elem_type) for v in result.graph.output] == [
        (v.name, v.type.tensor_type.elem_type) for v in original.graph.output]
    if request_name in LOSSY_REQUESTS:
        assert {"tensor": "W", "reason": OVERRIDABLE_INPUT_REASON} in skipped(report) or any(
            entry.get("reason") == OVERRIDABLE_INPUT_REASON and "(W)" in entry.get("node", "")
            for entry in skipped(report))
    x = random((2, 64), 5)
    override = random((64, 64), 7)
    expected = open_session(source).run(["y"], {"x": x, "W": override})[0]
    actual = open_session(tmp_path / "out.onnx").run(["y"], {"x": x, "W": override})[0]
    if request_name == "default":
        np.testing.assert_array_equal(actual, expected)
    assert actual.shape == expected.shape


def test_graph_layer_keeps_initializer_inputs_in_place():
    model = overridable_model()
    graph = import_graph(model)
    assert [t.name for t in graph.inputs] == ["x", "W"]
    assert isinstance(graph.inputs[1], gs.Constant)
    exported = export_model(graph, model)
    assert exported.graph.input[1].SerializeToString() == model.graph.input[1].SerializeToString()


# --------------------------------------------------------------------------- item 7: non-finite weights


def non_finite_model() -> onnx.ModelProto:
    """ids -> Gather(E) -> MatMul(W1) -> Relu -> MatMul(W2); E and W1 hold NaN/Inf."""
    table = random((100, 64))
    table[3, 5] = np.inf
    table[7, :] = np.nan
    table[9, 1] = -np.inf
    first = random((64, 32), 1)
    first[0, 0] = np.inf
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["e"], name="embedding"),
         helper.make_node("MatMul", ["e", "W1"], ["h"], name="mm1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")],
        "non_finite",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 16])],
        [numpy_helper.from_array(table, "E"), numpy_helper.from_array(first, "W1"),
         numpy_helper.from_array(random((32, 16), 2), "W2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_inspect_lists_non_finite_weights(tmp_path):
    model = non_finite_model()
    inspection = inspect_model(model)
    assert inspection.non_finite == [NonFiniteTensor("E", 66, 64, 1, 1), NonFiniteTensor("W1", 1, 0, 1, 0)]
    assert inspection.to_dict()["non_finite"][0] == {"tensor": "E", "count": 66, "nan": 64, "pos_inf": 1,
                                                     "neg_inf": 1}
    code, stdout, _ = run_cli(["inspect", str(save(model, tmp_path / "m.onnx"))])
    assert code == 0
    assert "Non-finite weights (NaN/Inf)" in stdout and "E" in stdout.split("Non-finite weights")[1]


@pytest.mark.parametrize("request_name", [r for r in LOSSY_REQUESTS if r != "int8-static"])
def test_lossy_passes_leave_non_finite_weights_as_they_are(request_name, tmp_path):
    model = non_finite_model()
    report = optimize(save(model, tmp_path / "in.onnx"), tmp_path / "out.onnx", request_name)
    result = onnx.load(str(tmp_path / "out.onnx"))
    reasons = {entry.get("tensor") or entry.get("node"): entry["reason"] for entry in skipped(report)}
    for name, _count in (("E", 66), ("W1", 1)):
        kept = initializer(result, name)
        assert kept is not None and kept.SerializeToString() == initializer(model, name).SerializeToString()
    mentioned = [key for key, reason in reasons.items() if reason in ("66 non-finite values", "1 non-finite values")]
    assert mentioned, f"no non-finite skip reported: {reasons}"


def test_prune_opt_in_keeps_non_finite_values_exactly(tmp_path):
    model = non_finite_model()
    source = save(model, tmp_path / "in.onnx")
    code, _, stderr = run_cli(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--quiet",
                               "--prune", "0.5", "--set", "prune.op_types=Gather,MatMul",
                               "--set", "prune.min_elements=16", "--set", "prune.allow_non_finite=true"])
    assert code == 0, stderr
    before = numpy_helper.to_array(initializer(model, "E"))
    after = numpy_helper.to_array(initializer(onnx.load(str(tmp_path / "out.onnx")), "E"))
    non_finite = ~np.isfinite(before)
    np.testing.assert_array_equal(after[non_finite], before[non_finite])  # NaN compares equal here
    assert np.count_nonzero(after[~non_finite] == 0) > 0.4 * np.count_nonzero(~non_finite)


def test_weight_guard_rules():
    graph = import_graph(overridable_model())
    guard = WeightGuard.of(graph)
    assert guard.reason(graph.inputs[1], None) == OVERRIDABLE_INPUT_REASON
    other = gs.Constant("v", np.array([1.0, np.nan, np.inf], np.float32))
    assert guard.reason(other, other.values) == "2 non-finite values"
    assert WeightGuard.of(graph, allow_non_finite=True).reason(other, other.values) == ""
    assert non_finite_count(np.arange(4)) == 0


# --------------------------------------------------------------------------- item 11: STRING tensors


def string_model() -> onnx.ModelProto:
    """Class labels in a STRING Constant node, looked up by ArgMax; a STRING initializer output."""
    labels = np.array([b"cat", b"dog", b"bird", b""], dtype=object)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"], name="mm"),
         helper.make_node("ArgMax", ["logits"], ["index"], axis=1, keepdims=0, name="argmax"),
         helper.make_node("Constant", [], ["labels"], name="labels_node",
                          value=numpy_helper.from_array(labels, "labels_value")),
         helper.make_node("Gather", ["labels", "index"], ["label"], name="lookup"),
         helper.make_node("Identity", ["names"], ["names_out"], name="copy")],
        "strings",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("label", TensorProto.STRING, [2]),
         helper.make_tensor_value_info("names_out", TensorProto.STRING, [3])],
        [numpy_helper.from_array(random((64, 4)), "W"),
         numpy_helper.from_array(np.array([b"a", b"b", b"\xff\x00c"], dtype=object), "names")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_inspect_handles_string_tensors(tmp_path):
    code, stdout, stderr = run_cli(["inspect", str(save(string_model(), tmp_path / "m.onnx")), "--json"])
    assert code == 0, stderr
    assert json.loads(stdout)["weight_bytes_by_dtype"]["STRING"] == len(b"catdogbird") + len(b"ab\xff\x00c")


@pytest.mark.parametrize("request_name", list(REQUESTS))
def test_string_tensors_pass_through_untouched(request_name, tmp_path):
    model = string_model()
    source = save(model, tmp_path / "in.onnx")
    optimize(source, tmp_path / "out.onnx", request_name)
    result = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(result, full_check=True)
    strings = {t.name: list(t.string_data) for t in result.graph.initializer if t.data_type == TensorProto.STRING}
    assert strings["names"] == [b"a", b"b", b"\xff\x00c"]
    assert strings.get("labels", [b"cat", b"dog", b"bird", b""]) == [b"cat", b"dog", b"bird", b""]
    x = random((2, 64), 3)
    expected = open_session(source).run(["label"], {"x": x})  # names_out is not UTF-8
    actual = open_session(tmp_path / "out.onnx").run(["label"], {"x": x})
    np.testing.assert_array_equal(actual[0], expected[0])


# --------------------------------------------------------------------------- item 12: 4-bit and sparse tensors


def test_read_int4_weight_is_exported_packed():
    values = np.array([[1, -2, 3], [-8, 7, 0], [5, 5, -1]], dtype=np.int8)
    proto = helper.make_tensor("q", TensorProto.INT4, [3, 3], values.ravel().tolist())
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], name="dq"),
         helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "int4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [proto, numpy_helper.from_array(np.float32(0.5), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    imported = import_graph(model)
    constant = imported.tensors()["q"]
    np.testing.assert_array_equal(np.asarray(constant.values, dtype=np.int8), values)  # a pass reads it
    exported = export_model(imported, model)
    onnx.checker.check_model(exported, full_check=True)
    stored = initializer(exported, "q")
    assert stored.data_type == TensorProto.INT4
    np.testing.assert_array_equal(numpy_helper.to_array(stored).astype(np.int8), values)


def sparse_model() -> onnx.ModelProto:
    dense = random((32, 32))
    dense[np.abs(dense) < 1.2] = 0
    flat = dense.ravel()
    positions = np.flatnonzero(flat).astype(np.int64)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(flat[positions], "W"),
                                       numpy_helper.from_array(positions, "W.indices"), [32, 32])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "sparse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], sparse_initializer=[sparse])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sparse_initializer_reads_in_its_dtype_and_stays_sparse_when_unchanged():
    model = sparse_model()
    imported = import_graph(model)
    values = imported.tensors()["W"].values
    assert values.dtype == np.float32
    expected = np.zeros(32 * 32, np.float32)
    expected[numpy_helper.to_array(model.graph.sparse_initializer[0].indices)] = numpy_helper.to_array(
        model.graph.sparse_initializer[0].values)
    np.testing.assert_array_equal(values.ravel(), expected)
    exported = export_model(imported, model)
    assert [s.SerializeToString() for s in exported.graph.sparse_initializer] == [
        s.SerializeToString() for s in model.graph.sparse_initializer]


@pytest.mark.parametrize("request_name", list(REQUESTS))
def test_every_request_reads_a_sparse_initializer(request_name, tmp_path):
    model = sparse_model()
    source = tmp_path / "in.onnx"
    onnx.checker.check_model(model)
    onnx.save(model, str(source))
    optimize(source, tmp_path / "out.onnx", request_name)
    result = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(result, full_check=not len(result.graph.sparse_initializer))
    x = random((1, 32), 4)
    expected = open_session(source).run(None, {"x": x})[0]
    actual = open_session(tmp_path / "out.onnx").run(None, {"x": x})[0]
    assert actual.dtype == np.float32 and np.isfinite(actual).all()
    if request_name == "default":
        np.testing.assert_array_equal(actual, expected)
    else:
        cosine = float(np.dot(actual.ravel(), expected.ravel()) / np.linalg.norm(actual) / np.linalg.norm(expected))
        assert cosine > 0.5


# --------------------------------------------------------------------------- item 18: training_info bindings


def training_model() -> onnx.ModelProto:
    """W is read by the main graph; Wt only by the training algorithm; both are bound."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "trainable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(random((64, 64)), "W"), numpy_helper.from_array(random((4,), 1), "Wt")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    info = model.training_info.add()
    info.algorithm.CopyFrom(helper.make_graph(
        [helper.make_node("Sub", ["W", "step"], ["W_new"], name="update"),
         helper.make_node("Sub", ["Wt", "step"], ["Wt_new"], name="update_t")], "train", [],
        [helper.make_tensor_value_info("W_new", TensorProto.FLOAT, [64, 64]),
         helper.make_tensor_value_info("Wt_new", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.float32(0.1), "step")]))
    info.initialization.CopyFrom(helper.make_graph(
        [helper.make_node("RandomNormal", [], ["W_init"], shape=[64, 64], name="init")], "init", [],
        [helper.make_tensor_value_info("W_init", TensorProto.FLOAT, [64, 64])]))
    info.update_binding.add(key="W", value="W_new")
    info.update_binding.add(key="Wt", value="Wt_new")
    info.initialization_binding.add(key="W", value="W_init")
    return model


@pytest.mark.parametrize("request_name", list(REQUESTS))
def test_training_bindings_never_dangle(request_name, tmp_path):
    model = training_model()
    report = optimize(save(model, tmp_path / "in.onnx"), tmp_path / "out.onnx", request_name)
    result = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(result, full_check=True)
    names = {t.name for t in result.graph.initializer}
    bindings = [b.key for info in result.training_info
                for b in list(info.initialization_binding) + list(info.update_binding)]
    assert bindings == ["W", "W", "Wt"] or sorted(bindings) == ["W", "W", "Wt"]
    assert set(bindings) <= names
    for name in ("W", "Wt"):
        assert initializer(result, name).SerializeToString() == initializer(model, name).SerializeToString()
    if request_name in LOSSY_REQUESTS and request_name not in ("prune-channels", "prune-nm"):
        assert any("training_info" in entry["reason"] for entry in skipped(report)), skipped(report)


def test_loader_size_rule_for_packed_4bit_and_string_tensors():
    values = [1, -2, 3, 4, -5]
    for data_type in (TensorProto.INT4, TensorProto.UINT4):
        typed = helper.make_tensor("q", data_type, [5], [abs(v) for v in values])
        raw = numpy_helper.from_array(numpy_helper.to_array(typed), "q")
        assert len(typed.int32_data) == 3 and len(raw.raw_data) == 3  # two per byte, rounded up
        check_inline_tensor(typed, "m.onnx", "q")
        check_inline_tensor(raw, "m.onnx", "q")
    floats = numpy_helper.from_array(np.array([0.5, -1, 6], dtype=ml_dtypes.float4_e2m1fn), "f")
    check_inline_tensor(floats, "m.onnx", "f")
    check_inline_tensor(numpy_helper.from_array(np.array([b"a", b"\xff"], dtype=object), "s"), "m.onnx", "s")
