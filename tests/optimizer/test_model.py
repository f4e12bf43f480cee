"""Tests for optimizer.model: safe loading, external data, atomic saving."""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper, parser

import optimizer.model as model_module
from optimizer.errors import ModelLoadError, ModelSaveError
from optimizer.model import load_model, load_model_with_files, save_model, serialized_size_bytes

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
WEIGHTS = np.arange(1, 5, dtype=np.float32)
EXTERNAL_NAME = "weight_ext"

FUNCTION_MODEL_TEXT = """
<ir_version: 10, opset_import: ["" : 18, "custom.domain" : 1],
 producer_name: "unit-test", producer_version: "1.2", doc_string: "model doc">
main (float[4] x) => (float[4] y) {
    w = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
    y = custom.domain.AddW (x, w)
}
<domain: "custom.domain", opset_import: ["" : 18], doc_string: "function doc">
AddW (a, b) => (c) {
    c = Add(a, b)
}
"""


def _function_model() -> onnx.ModelProto:
    model = parser.parse_model(FUNCTION_MODEL_TEXT)
    helper.set_model_props(model, {"charset": "abc\u4e2d", "author": "tests"})
    model.graph.doc_string = "graph doc"
    return model


def _add_model(weight: TensorProto, *, extra: list[TensorProto] = ()) -> onnx.ModelProto:
    """y = x + weight, with weight (and any extra tensors) as initializers."""
    dims = list(weight.dims) if weight.data_type == TensorProto.FLOAT else [4]
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", weight.name], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        [weight, *extra],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _external_tensor(
    name: str, location: str, *, dims=(4,), data_type=TensorProto.FLOAT, **entries: object
) -> TensorProto:
    tensor = TensorProto(name=name, data_type=data_type, dims=list(dims))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, **entries}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return tensor


def _write_external_model(folder: pathlib.Path, location: str = "w.bin", **entries) -> pathlib.Path:
    """model.onnx in folder whose weight lives at location; w.bin holds WEIGHTS."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "w.bin").write_bytes(WEIGHTS.tobytes())
    model_path = folder / "model.onnx"
    model_path.write_bytes(_add_model(_external_tensor(EXTERNAL_NAME, location, **entries))
                           .SerializeToString())
    return model_path


def _file_hashes(folder: pathlib.Path) -> dict[str, str]:
    """Every entry under folder (links not followed) with a content hash for regular files."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        kind = "link" if path.is_symlink() else "file" if path.is_file() else "other"
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if kind == "file" else kind
        hashes[str(path.relative_to(folder))] = digest
    return hashes


def _run_add(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


# --------------------------------------------------------------------------- round trips


def test_round_trip_keeps_metadata_docs_opsets_and_functions(tmp_path):
    model = _function_model()
    loaded = load_model(save_model(model, tmp_path / "m.onnx"))
    assert loaded.SerializeToString(deterministic=True) == model.SerializeToString(
        deterministic=True
    )
    assert {p.key: p.value for p in loaded.metadata_props}["charset"] == "abc\u4e2d"
    assert (loaded.doc_string, loaded.graph.doc_string) == ("model doc", "graph doc")
    assert (loaded.producer_name, loaded.producer_version) == ("unit-test", "1.2")
    assert {o.domain: o.version for o in loaded.opset_import} == {"": 18, "custom.domain": 1}
    assert [(f.domain, f.name, f.doc_string) for f in loaded.functions] == [
        ("custom.domain", "AddW", "function doc")
    ]
    np.testing.assert_array_equal(_run_add(loaded, np.ones(4, np.float32)), WEIGHTS + 1)


def test_load_from_path_bytes_and_proto_gives_new_equal_models(tmp_path):
    model = _function_model()
    before = model.SerializeToString(deterministic=True)
    path = save_model(model, tmp_path / "m.onnx")
    from_proto = load_model(model)
    assert from_proto is not model
    from_proto.doc_string = "changed"
    assert model.SerializeToString(deterministic=True) == before
    for loaded in (load_model(path), load_model(str(path)), load_model(path.read_bytes())):
        assert loaded.SerializeToString(deterministic=True) == before


def test_external_data_is_read_into_memory_once_per_file(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "sub").mkdir()
    (folder / "sub" / "w.bin").write_bytes(WEIGHTS.tobytes() + (WEIGHTS * 10).tobytes())
    first = _external_tensor("first", "sub/w.bin", offset=0, length=16)
    second = _external_tensor("second", "./sub/w.bin", offset=16)
    (folder / "model.onnx").write_bytes(_add_model(first, extra=[second]).SerializeToString())
    model, files = load_model_with_files(folder / "model.onnx")
    assert files == ((folder / "model.onnx").resolve(), (folder / "sub" / "w.bin").resolve())
    for tensor, expected in zip(model.graph.initializer, (WEIGHTS, WEIGHTS * 10)):
        assert not tensor.external_data and tensor.data_location == TensorProto.DEFAULT
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), expected)


def test_external_data_inside_if_branch_constant_is_loaded(tmp_path):
    (tmp_path / "w.bin").write_bytes(WEIGHTS.tobytes())
    constant = helper.make_node(
        "Constant", [], ["c"], value=_external_tensor("branch_const", "w.bin")
    )
    branch = helper.make_graph(
        [constant], "then", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])]
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    (tmp_path / "if.onnx").write_bytes(model.SerializeToString())
    loaded = load_model(tmp_path / "if.onnx")
    value = loaded.graph.node[0].attribute[0].g.node[0].attribute[0].t
    np.testing.assert_array_equal(numpy_helper.to_array(value), WEIGHTS)
    (tmp_path / "w.bin").write_bytes(WEIGHTS.tobytes()[:8])
    with pytest.raises(ModelLoadError, match="branch_const"):
        load_model(tmp_path / "if.onnx")


# --------------------------------------------------------------------------- hostile external data


def _make_symlinked_file(folder: pathlib.Path) -> str:
    (folder / "link.bin").symlink_to(folder / "w.bin")
    return "link.bin"


def _make_symlinked_parent(folder: pathlib.Path) -> str:
    outside = folder.parent / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(WEIGHTS.tobytes())
    (folder / "sub").symlink_to(outside)
    return "sub/w.bin"


def _make_inner_symlinked_parent(folder: pathlib.Path) -> str:
    (folder / "real").mkdir()
    (folder / "real" / "w.bin").write_bytes(WEIGHTS.tobytes())
    (folder / "alias").symlink_to(folder / "real")
    return "alias/w.bin"


def _make_hard_link(folder: pathlib.Path) -> str:
    os.link(folder / "w.bin", folder / "hard.bin")
    return "hard.bin"


def _make_fifo(folder: pathlib.Path) -> str:
    os.mkfifo(folder / "pipe.bin")
    return "pipe.bin"


def _make_directory(folder: pathlib.Path) -> str:
    (folder / "dir.bin").mkdir()
    return "dir.bin"


@pytest.mark.parametrize(
    ("location_or_maker", "entries", "reason"),
    [
        ("../w.bin", {}, "'..'"),
        ("sub/../../w.bin", {}, "'..'"),
        ("ABSOLUTE", {}, "absolute"),
        ("w.bin\x00.txt", {}, "control"),
        ("w.bin\n", {}, "control"),
        ("w\x7f.bin", {}, "control"),
        ("..\\w.bin", {}, "backslash"),
        ("", {}, "names no file"),
        ("missing.bin", {}, "No such file"),
        (_make_symlinked_file, {}, "symlink"),
        (_make_symlinked_parent, {}, "outside"),
        (_make_inner_symlinked_parent, {}, "symlink"),
        (_make_hard_link, {}, "hard link"),
        (_make_fifo, {}, "FIFO"),
        (_make_directory, {}, "folder"),
        ("w.bin", {"offset": 100}, "beyond"),
        ("w.bin", {"offset": 8, "length": 16}, "beyond"),
        ("w.bin", {"length": 12}, "does not match"),
        ("w.bin", {"offset": 4}, "does not match"),
        ("w.bin", {"offset": -1}, "not a number"),
        ("w.bin", {"length": "1e3"}, "not a number"),
        ("w.bin", {"dims": (2, -2)}, "negative"),
        ("w.bin", {"dims": (2**40,)}, "beyond|does not match"),
        ("w.bin", {"data_type": TensorProto.STRING}, "string"),
        ("w.bin", {"data_type": 99}, "unknown data type"),
        ("w.bin", {"data_type": 0}, "unknown data type"),
    ],
)
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_hostile_external_data_is_rejected_and_files_untouched(
    tmp_path, monkeypatch, location_or_maker, entries, reason, lazy
):
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "w.bin").write_bytes(WEIGHTS.tobytes())
    location = location_or_maker
    if callable(location_or_maker):
        (folder / "w.bin").write_bytes(WEIGHTS.tobytes())
        location = location_or_maker(folder)
    elif location == "ABSOLUTE":
        location = str(tmp_path / "w.bin")
    model_path = _write_external_model(folder, location, **entries)
    before = _file_hashes(tmp_path)
    monkeypatch.setattr(model_module, "LAZY_TENSOR_MIN_BYTES", 0)
    with pytest.raises(ModelLoadError, match=reason) as caught:
        load_model_with_files(model_path, lazy_above_bytes=-1 if lazy else None)
    message = str(caught.value)
    assert EXTERNAL_NAME in message and str(model_path) in message and "\n" not in message
    assert _file_hashes(tmp_path) == before


@pytest.mark.parametrize("as_bytes", [True, False])
def test_external_data_without_a_folder_is_rejected(tmp_path, as_bytes):
    model = onnx.load_model(_write_external_model(tmp_path), load_external_data=False)
    source = model.SerializeToString() if as_bytes else model
    with pytest.raises(ModelLoadError, match=f"{EXTERNAL_NAME}.*no folder"):
        load_model(source)


def test_external_data_counts_towards_max_input_bytes(tmp_path):
    model_path = _write_external_model(tmp_path)
    model_size = model_path.stat().st_size
    load_model(model_path, max_input_bytes=model_size + 16)
    with pytest.raises(ModelLoadError, match=f"{EXTERNAL_NAME}.*max_input_bytes"):
        load_model(model_path, max_input_bytes=model_size + 15)


# --------------------------------------------------------------------------- inline tensors


def _float_weight(**fields: object) -> TensorProto:
    tensor = TensorProto(name="inline_w", data_type=TensorProto.FLOAT, dims=[4])
    for key, value in fields.items():
        if key in ("float_data", "int32_data", "dims"):
            getattr(tensor, key)[:] = value
        else:
            setattr(tensor, key, value)
    return tensor


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"raw_data": b"\0" * 20}, "raw_data is 20 bytes.*needs 16"),
        ({"raw_data": b"\0" * 12}, "raw_data is 12 bytes.*needs 16"),
        ({"raw_data": b"\0" * 16, "float_data": [1, 2, 3, 4]}, "several fields"),
        ({"float_data": [1, 2, 3]}, "float_data has 3 values, shape needs 4"),
        ({"int32_data": [1, 2, 3, 4]}, "int32_data"),
        ({}, "no data for 4 elements"),
        ({"data_type": 0, "raw_data": b"\0" * 16}, "unknown data type 0"),
        ({"data_type": 99, "raw_data": b"\0" * 16}, "unknown data type 99"),
        ({"dims": [-4], "raw_data": b""}, "negative dimension"),
        ({"data_type": TensorProto.INT4, "raw_data": b"\0" * 3}, "raw_data is 3 bytes.*needs 2"),
    ],
)
def test_inline_tensor_that_disagrees_with_its_shape_is_rejected(fields, reason):
    model = _add_model(_float_weight(**fields))
    before = model.SerializeToString()
    with pytest.raises(ModelLoadError, match=f"inline_w.*{reason}"):
        load_model(model)
    with pytest.raises(ModelLoadError, match=f"inline_w.*{reason}"):
        load_model(model.SerializeToString())
    assert model.SerializeToString() == before


def test_packed_sub_byte_tensor_is_accepted():
    model = _add_model(_float_weight(data_type=TensorProto.INT4, raw_data=b"\x21\x03", dims=[3]))
    model.graph.node[0].op_type = "Identity"
    del model.graph.node[0].input[1:]
    loaded = load_model(model)
    assert loaded.graph.initializer[0].raw_data == b"\x21\x03"


def test_bad_sparse_initializer_is_rejected():
    model = _add_model(_float_weight(float_data=[1, 2, 3, 4]))
    values = TensorProto(name="sparse_w", data_type=TensorProto.FLOAT, dims=[2], float_data=[1])
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "sparse_w_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    with pytest.raises(ModelLoadError, match="sparse_w.*float_data has 1 values, shape needs 2"):
        load_model(model)


def test_bad_tensor_inside_subgraph_is_rejected():
    bad = TensorProto(name="deep_const", data_type=TensorProto.FLOAT, dims=[4], raw_data=b"1")
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=bad)],
        "branch",
        [],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])],
    )
    body = helper.make_graph([helper.make_node("If", ["cond"], ["c"], then_branch=branch,
                                               else_branch=branch)], "outer", [], [])
    model = _add_model(_float_weight(float_data=[1, 2, 3, 4]))
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=body,
                                             else_branch=body))
    with pytest.raises(ModelLoadError, match="deep_const.*raw_data is 1 bytes"):
        load_model(model)


# --------------------------------------------------------------------------- hostile files


def _valid_model_bytes() -> bytes:
    return _function_model().SerializeToString()


@pytest.mark.parametrize(
    ("make_path", "reason"),
    [
        (lambda d: _write(d / "empty.onnx", b""), "empty file"),
        (lambda d: _write(d / "random.onnx", np.random.default_rng(0).bytes(4000)),
         "not an ONNX model"),
        (lambda d: _write(d / "half.onnx", _valid_model_bytes()[: len(_valid_model_bytes()) // 2]),
         "not an ONNX model"),
        (lambda d: _write(d / "png.onnx", b"\x89PNG\r\n\x1a\n" + bytes(100)),
         "not an ONNX model"),
        (lambda d: _write(d / "irversion_only.onnx", b"\x08\x07"), "no graph"),
        (lambda d: d, "a folder"),
        (lambda d: (os.mkfifo(d / "fifo.onnx"), d / "fifo.onnx")[1], "a FIFO"),
        (lambda d: pathlib.Path("/dev/zero"), "character device"),
        (lambda d: d / "missing.onnx", "No such file"),
    ],
)
def test_unreadable_or_garbage_file_is_rejected(tmp_path, make_path, reason):
    path = make_path(tmp_path)
    with pytest.raises(ModelLoadError, match=reason) as caught:
        load_model(path)
    assert str(path) in str(caught.value)


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path


def test_file_over_max_input_bytes_is_rejected(tmp_path):
    path = _write(tmp_path / "m.onnx", _valid_model_bytes())
    with pytest.raises(ModelLoadError, match="over the limit"):
        load_model(path, max_input_bytes=path.stat().st_size - 1)
    with pytest.raises(ModelLoadError, match="over the limit"):
        load_model(path.read_bytes(), max_input_bytes=10)
    assert load_model(path, max_input_bytes=path.stat().st_size).graph.name == "main"


# --------------------------------------------------------------------------- saving: refusals


def _refusal_setup(tmp_path: pathlib.Path) -> tuple[onnx.ModelProto, tuple[pathlib.Path, ...]]:
    model_path = _write_external_model(tmp_path)
    return load_model_with_files(model_path)


@pytest.mark.parametrize(
    ("output", "options", "reason"),
    [
        ("model.onnx", {}, "refusing to overwrite"),
        ("w.bin", {}, "refusing to overwrite"),
        ("link.onnx", {}, "symlink"),
        ("nope/out.onnx", {}, "does not exist"),
        ("w.bin/out.onnx", {}, "is not a folder"),
        ("adir", {}, "is a folder"),
        ("w", {"external_data": True}, "refusing to overwrite"),
    ],
)
def test_save_refuses_and_writes_nothing(tmp_path, output, options, reason):
    model, inputs = _refusal_setup(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "link.onnx").symlink_to(tmp_path / "model.onnx")
    if output == "w":
        inputs = (*inputs, tmp_path / "w.data")
    before = _file_hashes(tmp_path)
    with pytest.raises(ModelSaveError, match=reason):
        save_model(model, tmp_path / output, protected_paths=inputs, **options)
    assert _file_hashes(tmp_path) == before


def test_save_refuses_hard_link_to_protected_file(tmp_path):
    model, inputs = _refusal_setup(tmp_path)
    os.link(tmp_path / "model.onnx", tmp_path / "alias.onnx")
    with pytest.raises(ModelSaveError, match="refusing to overwrite"):
        save_model(model, tmp_path / "alias.onnx", protected_paths=inputs)


def test_save_refuses_unwritable_folder(tmp_path):
    if os.geteuid() == 0:
        with pytest.raises(ModelSaveError, match="folder /proc"):
            save_model(_function_model(), "/proc/onnx-compress-test.onnx")
        return
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(ModelSaveError, match=f"folder {folder}"):
        save_model(_function_model(), folder / "out.onnx")
    assert list(folder.iterdir()) == []


def test_save_refuses_model_with_unresolved_external_data(tmp_path):
    model = onnx.load_model(_write_external_model(tmp_path / "in"), load_external_data=False)
    with pytest.raises(ModelSaveError, match=f"{EXTERNAL_NAME}.*external data"):
        save_model(model, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


# --------------------------------------------------------------------------- saving: layout


def _large_weight_model(count: int, name: str = "big_w") -> onnx.ModelProto:
    values = np.arange(count, dtype=np.float32)
    return _add_model(numpy_helper.from_array(values, name))


def test_save_twice_is_byte_identical_and_data_file_is_replaced(tmp_path):
    model = _large_weight_model(4000)
    target = tmp_path / "out.onnx"
    save_model(model, target, external_data=True)
    first = (target.read_bytes(), (tmp_path / "out.onnx.data").read_bytes())
    save_model(model, target, external_data=True)
    assert (target.read_bytes(), (tmp_path / "out.onnx.data").read_bytes()) == first
    save_model(_large_weight_model(1000), target, external_data=True)
    assert (tmp_path / "out.onnx.data").stat().st_size == 4000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]


def test_external_data_save_round_trips_and_leaves_caller_model_alone(tmp_path):
    model = _large_weight_model(1000)
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "tiny"))
    model.graph.initializer.append(numpy_helper.from_array(np.full(2000, 7, np.int64), "ints"))
    before = model.SerializeToString(deterministic=True)
    target = save_model(model, tmp_path / "out.onnx", external_data=True)
    assert model.SerializeToString(deterministic=True) == before
    on_disk = onnx.load_model(target, load_external_data=False)
    stored = {t.name: {e.key: e.value for e in t.external_data} for t in on_disk.graph.initializer}
    assert stored["tiny"] == {}
    assert stored["big_w"] == {"location": "out.onnx.data", "offset": "0", "length": "4000"}
    assert stored["ints"] == {"location": "out.onnx.data", "offset": "4096", "length": "16000"}
    reloaded, files = load_model_with_files(target)
    assert reloaded.SerializeToString(deterministic=True) == before
    assert files == (target, tmp_path / "out.onnx.data")
    x = np.ones(1000, np.float32)
    np.testing.assert_array_equal(_run_add(str(target), x), np.arange(1000) + 1.0)


def test_automatic_external_data_above_the_protobuf_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "PROTOBUF_LIMIT_BYTES", 3000)
    monkeypatch.setattr(model_module, "PROTOBUF_MARGIN_BYTES", 0)
    model = _large_weight_model(1000)
    assert serialized_size_bytes(model) >= 4000
    with pytest.raises(ModelSaveError, match="over protobuf's 2 GB limit"):
        save_model(model, tmp_path / "never.onnx", external_data=False)
    assert list(tmp_path.iterdir()) == []
    save_model(model, tmp_path / "auto.onnx")
    assert (tmp_path / "auto.onnx.data").stat().st_size == 4000
    assert (tmp_path / "auto.onnx").stat().st_size < 3000


def test_small_model_is_saved_inline_by_default(tmp_path):
    save_model(_large_weight_model(1000), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_stale_temps_of_the_same_target_are_removed(tmp_path):
    stale = [".out.onnx.tmp-abcd_123", ".out.onnx.data.tmp-zz99yy88"]
    kept = [".out.onnx.tmp-keep", ".other.onnx.tmp-abcd1234", "out.onnx.tmp-abcd1234"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"old")
    save_model(_function_model(), tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["out.onnx"])


@pytest.mark.parametrize("external_data", [False, True])
def test_disk_full_leaves_no_file_and_no_temp(tmp_path, external_data):
    source = _write(tmp_path / "src.onnx", _large_weight_model(100_000).SerializeToString())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from optimizer.errors import ModelSaveError
from optimizer.model import load_model, save_model
model = load_model({str(source)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    save_model(model, {str(out_dir / "out.onnx")!r}, external_data={external_data})
except ModelSaveError as error:
    print(error)
    sys.exit(3)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert "out.onnx" in result.stdout
    assert list(out_dir.iterdir()) == []


# --------------------------------------------------------------------------- > 2 GB


@pytest.mark.slow
def test_model_over_two_gigabytes_round_trips_through_external_data(tmp_path):
    element_count = 190_000_000
    graph = helper.make_graph(
        [helper.make_node("Add", [a, w], [b]) for a, w, b in
         (("x", "w0", "s0"), ("s0", "w1", "s1"), ("s1", "w2", "y"))],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [element_count])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [element_count])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    for index in range(3):
        values = (np.arange(element_count, dtype=np.uint32) % np.uint32(251)).astype(np.float32)
        weight = model.graph.initializer.add(name=f"w{index}", data_type=TensorProto.FLOAT)
        weight.dims.append(element_count)
        weight.raw_data = (values + np.float32(index)).tobytes()
        del values
    assert serialized_size_bytes(model) > 2**31
    target = save_model(model, tmp_path / "big.onnx")
    del model
    assert target.stat().st_size < 10_000
    assert (tmp_path / "big.onnx.data").stat().st_size > 2**31
    loaded = load_model(target)
    probes = [0, 1, 250, 251, 123_456_789, element_count - 1]
    for index, tensor in enumerate(loaded.graph.initializer):
        values = np.frombuffer(tensor.raw_data, dtype=np.float32)
        assert values.size == element_count
        expected = np.array([p % 251 + index for p in probes], dtype=np.float32)
        np.testing.assert_array_equal(values[probes], expected)
    del loaded, values
    for path in tmp_path.iterdir():
        path.unlink()


# --------------------------------------------------------------------------- crash safety


class _Crash(BaseException):
    """Stands for SIGKILL between two renames: nothing after it runs."""


def test_crash_between_data_and_model_rename_never_pairs_an_old_model_with_new_data(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    save_model(_large_weight_model(1000), target, external_data=True)
    real_replace, calls = os.replace, []

    def replace_then_crash(source, destination):
        real_replace(source, destination)
        calls.append(destination)
        raise _Crash

    monkeypatch.setattr(model_module.os, "replace", replace_then_crash)
    with pytest.raises(_Crash):
        save_model(_large_weight_model(2000, "other"), target, external_data=True)
    assert [pathlib.Path(path).name for path in calls] == ["out.onnx.data"]
    assert not target.exists(), "the old model now points into the new data file"
    monkeypatch.undo()
    save_model(_large_weight_model(2000, "other"), target, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    assert load_model(target).graph.initializer[0].name == "other"
