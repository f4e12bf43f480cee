"""Lazy loading: external tensors are checked but stay on disk, passes see read-only maps,
export references them (or spills new arrays), and saving streams them into the same bytes an
eager load would write."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import passes  # noqa: F401  (registers the passes)
from optimizer.errors import ModelLoadError, ModelSaveError
from optimizer.fileio import lazy_io
from optimizer.fileio.model import has_lazy_tensors, load_model, load_model_with_files
from optimizer.fileio.output_files import previous_data_files
from optimizer.fileio.save import save_model
from optimizer.fileio.tensor_checks import iter_tensors
from optimizer.graph.convert import export_model, import_graph
from optimizer.graph.sparse_storage import to_sparse_initializers
from optimizer.graph.walk import iter_graphs
from optimizer.graph.weights import weight_values
from optimizer.pipeline import Pipeline, model_shell
from optimizer.registry import create_pass
from tests.helpers.runtime import assert_same_outputs

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
SIDE = 128  # 128 x 128 float32 = 64 KB per weight: lazy, and spilled when a pass changes it


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((SIDE, SIDE)).astype(np.float32) for name in ("A", "B", "C")}


def _model() -> onnx.ModelProto:
    """Initializers, a duplicate (share merges it), a Constant-node weight, an If branch reading an
    outer weight, a tiny tensor that stays inline, metadata."""
    weights = _weights()
    text = f"""
    <ir_version: 8, opset_import: ["" : 17], producer_name: "lazy-test">
    g (float[2, {SIDE}] x, bool c) => (float[2, {SIDE}] y) {{
        a = MatMul(x, A)
        b = MatMul(a, A_copy)
        k = Constant <value = float[1] {{0}}> ()
        m = MatMul(b, k)
        s = Add(m, tiny)
        y = If(c) <then_branch = t () => (float[2, {SIDE}] o1) {{ o1 = MatMul(s, B) }},
                   else_branch = e () => (float[2, {SIDE}] o2) {{ o2 = Neg(s) }}>
    }}"""
    model = onnx.parser.parse_model(text)
    for name, values in (("A", weights["A"]), ("A_copy", weights["A"]), ("B", weights["B"]),
                         ("tiny", np.ones(SIDE, np.float32))):  # fmt: skip
        model.graph.initializer.append(onnx.numpy_helper.from_array(values, name))
    model.graph.node[2].attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(weights["C"]))
    helper.set_model_props(model, {"kept": "yes"})
    return model


def _saved(folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    return save_model(_model(), folder / "in.onnx", external_data=True)


def _data_of(model_path: pathlib.Path) -> pathlib.Path:
    """The content-named data file (NAME.HASH.data) the saved model records."""
    (name,) = previous_data_files(pathlib.Path(model_path))
    return pathlib.Path(model_path).parent / name


def _feeds() -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(1).standard_normal((2, SIDE)).astype(np.float32)
    return [{"x": x, "c": np.array(True)}, {"x": x, "c": np.array(False)}]


def test_lazy_load_keeps_large_tensors_as_checked_references(tmp_path):
    source = _saved(tmp_path / "m")
    model, files = load_model_with_files(source, lazy_above_bytes=0)
    assert [path.name for path in files] == ["in.onnx", _data_of(source).name]
    lazy = {tensor.name for tensor in model.graph.initializer if lazy_io.is_lazy(tensor)}
    assert lazy == {"A", "A_copy", "B"}
    tiny = next(t for t in model.graph.initializer if t.name == "tiny")
    assert tiny.HasField("raw_data") and len(tiny.raw_data) == SIDE * 4
    assert lazy_io.is_lazy(model.graph.node[2].attribute[0].t)
    assert not has_lazy_tensors(load_model(source)), "plain load_model stays eager"
    location = next(e.value for e in model.graph.initializer[0].external_data if e.key == "location")
    assert location.startswith("\x00"), "a foreign reader must fail, not resolve against the cwd"
    with pytest.raises((ValueError, onnx.checker.ValidationError)):
        onnx.numpy_helper.to_array(model.graph.initializer[0])


def test_import_maps_read_only_arrays_and_export_references_them(tmp_path):
    model, _ = load_model_with_files(_saved(tmp_path / "m"), lazy_above_bytes=0)
    graph = import_graph(model)
    matmul = next(node for node in graph.nodes if node.op == "MatMul")
    values = weight_values(matmul.inputs[1])
    np.testing.assert_array_equal(values, _weights()["A"])
    assert not values.flags.writeable
    with pytest.raises(ValueError):
        values[0, 0] = 1.0
    exported = export_model(graph, model_shell(model))
    assert sorted(t.name for t, _ in iter_tensors(exported) if lazy_io.is_lazy(t)) == ["", "A", "A_copy", "B"]
    assert exported.ByteSize() < 10_000


def test_lazy_round_trip_writes_the_same_bytes_as_eager(tmp_path):
    source = _saved(tmp_path / "m")
    outputs = {}
    for mode, threshold in (("eager", None), ("lazy", 0)):
        model, _ = load_model_with_files(source, lazy_above_bytes=threshold)
        steps = [create_pass(name) for name in ("constants-to-initializers", "share", "cleanup")]
        result = Pipeline(steps).run(model)
        assert has_lazy_tensors(result.model) == (mode == "lazy")
        (tmp_path / mode).mkdir()
        outputs[mode] = save_model(result.model, tmp_path / mode / "out.onnx", external_data=True)
    for kind, pick in (("model", pathlib.Path), ("data", _data_of)):
        eager, lazy = (pick(outputs[mode]).read_bytes() for mode in ("eager", "lazy"))
        assert eager == lazy, f"the {kind} file differs"
    reloaded = load_model(outputs["lazy"])
    assert {p.key: p.value for p in reloaded.metadata_props} == {"kept": "yes"}
    assert_same_outputs(_model(), reloaded, _feeds())


def test_arrays_a_pass_makes_are_spilled_and_saved_like_eager(tmp_path):
    source = _saved(tmp_path / "m")
    outputs = {}
    for mode, threshold in (("eager", None), ("lazy", 0)):
        model, _ = load_model_with_files(source, lazy_above_bytes=threshold)
        graph = import_graph(model)
        tensors = {name: t for owner in iter_graphs(graph) for name, t in owner.tensors().items()}
        for name in ("A", "B"):
            tensors[name].values = np.asarray(tensors[name].values) * np.float32(2)
        exported = export_model(graph, model_shell(model))
        spilled = sorted(t.name for t, _ in iter_tensors(exported) if lazy_io.is_lazy(t))
        assert spilled == ([] if mode == "eager" else ["", "A", "A_copy", "B"])
        assert tensors["A"].values.flags.writeable, "export puts the pass's own array back"
        (tmp_path / mode).mkdir()
        outputs[mode] = save_model(exported, tmp_path / mode / "out.onnx", external_data=True)
    for kind, pick in (("model", pathlib.Path), ("data", _data_of)):
        eager, lazy = (pick(outputs[mode]).read_bytes() for mode in ("eager", "lazy"))
        assert eager == lazy, f"the {kind} file differs"
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in load_model(outputs["lazy"]).graph.initializer}
    np.testing.assert_array_equal(stored["A"], _weights()["A"] * 2)
    np.testing.assert_array_equal(stored["A_copy"], _weights()["A"])


def test_4bit_weights_a_pass_makes_are_spilled_too_and_read_back_unpacked(tmp_path, monkeypatch):
    """int4 of a lazily loaded model: the packed 4-bit integers go to the spill file (the exported
    model holds references, not 2 bytes per 4 weights in memory), save writes the bytes an eager
    run writes, and a spilled 4-bit tensor read back gives the values it holds."""
    monkeypatch.setattr(lazy_io, "SPILL_MIN_BYTES", 1024)  # a 128 x 128 weight packs into 8 KB
    source = _saved(tmp_path / "m")
    outputs, exported = {}, {}
    for mode, threshold in (("eager", None), ("lazy", 0)):
        model, _ = load_model_with_files(source, lazy_above_bytes=threshold)
        quantize = create_pass("quantize", weight_type="int4", mode="weights", block_size=16)
        result = Pipeline([create_pass("cleanup"), quantize]).run(model)
        exported[mode] = result.model
        (tmp_path / mode).mkdir()
        outputs[mode] = save_model(result.model, tmp_path / mode / "out.onnx", external_data=True)
    packed = [t for t, _ in iter_tensors(exported["lazy"]) if t.data_type in (TensorProto.INT4, TensorProto.UINT4)]
    assert len(packed) >= 3 and all(lazy_io.is_lazy(t) for t in packed if len(t.dims) == 2)
    assert exported["lazy"].ByteSize() < exported["eager"].ByteSize() // 2
    for kind, pick in (("model", pathlib.Path), ("data", _data_of)):
        eager, lazy = (pick(outputs[mode]).read_bytes() for mode in ("eager", "lazy"))
        assert eager == lazy, f"the {kind} file differs"
    load_model(exported["lazy"])  # the load checks accept a spilled 4-bit reference
    assert to_sparse_initializers(exported["lazy"], names=[], storage="sparse")[1] == {}  # and pass it by
    graph = import_graph(exported["lazy"])
    eager = {t.name: t for t, _ in iter_tensors(load_model(outputs["eager"]))}
    for tensor in packed:
        constant = next(c for g in iter_graphs(graph) for n, c in g.tensors().items() if n == tensor.name)
        np.testing.assert_array_equal(np.asarray(constant.values), onnx.numpy_helper.to_array(eager[tensor.name]))


def test_lazy_model_saves_inline_on_request_and_checks_in_a_file(tmp_path):
    model, _ = load_model_with_files(_saved(tmp_path / "m"), lazy_above_bytes=0)
    inline = save_model(model, tmp_path / "inline.onnx", external_data=False)
    assert not list(tmp_path.glob("inline.onnx*.data"))
    assert_same_outputs(_model(), load_model(inline), _feeds())
    automatic = save_model(model, tmp_path / "auto.onnx")
    assert list(tmp_path.glob("auto.onnx.*.data")), "lazy tensors stay out of memory: external by default"
    onnx.checker.check_model(str(automatic), full_check=True)
    assert has_lazy_tensors(model), "saving does not change the caller's model"


def test_reference_from_an_untrusted_source_is_refused(tmp_path):
    """A marker names a file by path and identity; only files this process verified count."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones((SIDE, SIDE), np.float32).tobytes())
    fd = os.open(secret, os.O_RDONLY)
    try:
        identity = lazy_io.FileIdentity.of(fd, str(secret))
    finally:
        os.close(fd)
    weight = TensorProto(name="A", data_type=TensorProto.FLOAT, dims=[SIDE, SIDE])
    lazy_io.make_lazy(weight, identity, 0, SIDE * SIDE * 4)
    model = _model()
    model.graph.initializer[0].CopyFrom(weight)
    for source in (model, model.SerializeToString()):
        with pytest.raises(ModelLoadError, match="not loaded by this process"):
            load_model(source)
    with pytest.raises(ModelSaveError, match="not loaded by this process"):
        save_model(model, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_data_file_replaced_after_load_is_an_error_not_other_data(tmp_path):
    source = _saved(tmp_path / "m")
    model, _ = load_model_with_files(source, lazy_above_bytes=0)
    data = _data_of(source)
    replacement = tmp_path / "m" / "other.data"
    replacement.write_bytes(bytes(data.stat().st_size))
    os.replace(replacement, data)
    lazy_io._OPEN.clear()  # what a new process would see: no descriptor kept from the load
    with pytest.raises(ModelSaveError, match="changed since the model was loaded"):
        save_model(model, tmp_path / "out.onnx")
    with pytest.raises(ModelLoadError, match="changed since the model was loaded"):
        weight_values(import_graph(model).tensors()["A"])


def test_output_never_overwrites_the_data_a_lazy_model_reads(tmp_path):
    source = _saved(tmp_path / "m")
    model, _ = load_model_with_files(source, lazy_above_bytes=0)
    before = _data_of(source).read_bytes()
    with pytest.raises(ModelSaveError, match="refusing to overwrite"):
        save_model(model, tmp_path / "m" / "in.onnx")
    assert _data_of(source).read_bytes() == before


_CHILD = r"""
import json, sys
def peak_kb():
    # VmHWM belongs to this process image; ru_maxrss would include the forking parent's peak
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
from optimizer.fileio.model import load_model_with_files
before = peak_kb()
model, _ = load_model_with_files(sys.argv[1], lazy_above_bytes=0)
after = peak_kb()
print(json.dumps({"growth_kb": after - before, "initializers": len(model.graph.initializer)}))
"""


def test_lazy_load_of_300_mb_does_not_read_the_data(tmp_path):
    """Measured in a child process: peak RSS grows by far less than the data it references."""
    count, rows = 10, 7680  # 10 x 7680 x 1024 float32 = 300 MiB
    data = tmp_path / "big.onnx.data"
    with open(data, "wb") as stream:
        block = np.random.default_rng(0).standard_normal((rows, 1024)).astype(np.float32).tobytes()
        for _ in range(count):
            stream.write(block)
    tensors = []
    for index in range(count):
        tensor = TensorProto(name=f"W{index}", data_type=TensorProto.FLOAT, dims=[rows, 1024])
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data.name), ("offset", index * len(block)), ("length", len(block))):
            tensor.external_data.add(key=key, value=str(value))
        tensors.append(tensor)
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"s{i - 1}", f"W{i}"], [f"s{i}"]) for i in range(count)]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, 1024])],
                              [helper.make_tensor_value_info(f"s{count - 1}", TensorProto.FLOAT, [rows, 1024])],
                              tensors)  # fmt: skip
    (tmp_path / "big.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    run = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "big.onnx")], capture_output=True, text=True,
                         cwd=REPO_ROOT, check=True)  # fmt: skip
    found = json.loads(run.stdout)
    assert found["initializers"] == count
    assert found["growth_kb"] < 30_000, found


def test_calibration_runs_on_a_lazily_loaded_model(tmp_path, monkeypatch):
    """GPTQ observes activations by running the model: a lazily loaded one (over 256 MB of external
    data) used to fail there ("onnxruntime cannot load <in-memory model>"); its session now reads a
    saved copy, and the result is the eager run's."""
    import optimizer.app_inputs as app_inputs
    from optimizer.api import OptimizeOptions, optimize

    source = _saved(tmp_path / "m")
    calibration = [{"x": np.random.default_rng(i).standard_normal((2, SIDE)).astype(np.float32),
                    "c": np.array(True)} for i in range(3)]
    options = OptimizeOptions(passes=["quantize"], calibration=calibration,
                              pass_options={"quantize": {"weight_type": "int4", "mode": "weights", "block_size": 16}})
    outputs = {}
    for mode, threshold in (("eager", 2**40), ("lazy", 0)):
        monkeypatch.setattr(app_inputs, "LAZY_LOAD_ABOVE_BYTES", threshold)
        (tmp_path / mode).mkdir()
        result = optimize(source, tmp_path / mode / "out.onnx", options)
        assert result.report.passes[0]["report"]["counts"]["weights_gptq"] >= 1
        outputs[mode] = {t.name: t for t, _ in iter_tensors(load_model(tmp_path / mode / "out.onnx"))}
    assert sorted(outputs["eager"]) == sorted(outputs["lazy"])
    for name, tensor in outputs["eager"].items():
        eager, lazy = (onnx.numpy_helper.to_array(t) for t in (tensor, outputs["lazy"][name]))
        np.testing.assert_array_equal(eager, lazy)
