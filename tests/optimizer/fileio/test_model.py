"""Tests for optimizer.fileio.model: safe loading, external data, atomic saving."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import optimizer.fileio.model as model_module
from optimizer.errors import ModelLoadError
from optimizer.fileio.model import load_model, load_model_with_files
from optimizer.fileio.save import save_model
from tests.helpers.model_files import (
    EXTERNAL_NAME,
    WEIGHTS,
    _add_model,
    _external_tensor,
    _file_hashes,
    _function_model,
    _run_add,
    _valid_model_bytes,
    _write,
    _write_external_model,
)


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
    for tensor, expected in zip(model.graph.initializer, (WEIGHTS, WEIGHTS * 10), strict=True):
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
    with pytest.raises(ModelLoadError, match=r"sparse_w.*float_data has 1 values, shape needs 2"):
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
    with pytest.raises(ModelLoadError, match=r"deep_const.*raw_data is 1 bytes"):
        load_model(model)


# --------------------------------------------------------------------------- hostile files


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




def test_file_over_max_input_bytes_is_rejected(tmp_path):
    path = _write(tmp_path / "m.onnx", _valid_model_bytes())
    with pytest.raises(ModelLoadError, match="over the limit"):
        load_model(path, max_input_bytes=path.stat().st_size - 1)
    with pytest.raises(ModelLoadError, match="over the limit"):
        load_model(path.read_bytes(), max_input_bytes=10)
    assert load_model(path, max_input_bytes=path.stat().st_size).graph.name == "main"


def test_fits_one_message_skips_byte_size_for_small_payloads_and_measures_near_the_limit(monkeypatch):
    weight = numpy_helper.from_array(np.zeros(1000, np.float32), "W")
    graph = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1000])], [weight])
    model = helper.make_model(graph)
    assert model_module.fits_one_message(model)
    measured = []
    monkeypatch.setattr(model_module, "serialized_size_bytes", lambda m: measured.append(1) or m.ByteSize())
    monkeypatch.setattr(model_module, "PROTOBUF_MARGIN_BYTES", 0)
    monkeypatch.setattr(model_module, "PROTOBUF_LIMIT_BYTES", 10_000)  # payload 4,000 B: under half, no measuring
    assert model_module.fits_one_message(model) and not measured
    monkeypatch.setattr(model_module, "PROTOBUF_LIMIT_BYTES", 4_050)  # over half: measured, and too big
    assert not model_module.fits_one_message(model) and measured


def _digest_variants() -> dict[str, onnx.ModelProto]:
    """A model with a raw-data initializer, one stored as float_data and a function; each variant
    changes one thing the computation depends on."""
    base = _function_model()
    base.graph.initializer.extend([numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "R"),
                                   helper.make_tensor("F", TensorProto.FLOAT, [2], [1.0, 2.0])])
    variants = {"base": base}
    for name, change in {
        "raw byte": lambda m: setattr(m.graph.initializer[-2], "raw_data", bytes(24)),  # same length, other values
        "raw dims": lambda m: m.graph.initializer[-2].dims.__setitem__(slice(None), [3, 2]),
        "float_data": lambda m: m.graph.initializer[-1].float_data.__setitem__(0, 5.0),
        "node attribute": lambda m: m.graph.node[0].attribute.append(helper.make_attribute("note", 1)),
        "opset": lambda m: setattr(m.opset_import[0], "version", 17),
        "function body": lambda m: setattr(m.functions[0].node[0], "op_type", "Sub"),
        "graph input": lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", TensorProto.DOUBLE),
        "ir_version": lambda m: setattr(m, "ir_version", m.ir_version - 1),
        "raw moved to disk": lambda m: m.graph.initializer[-2].external_data.add(key="location", value="w.bin"),
    }.items():
        copy = onnx.ModelProto()
        copy.CopyFrom(base)
        change(copy)
        variants[name] = copy
    return variants


def test_model_digest_is_equal_for_equal_models_and_differs_for_any_change():
    variants = _digest_variants()
    digests = {name: model_module.model_digest(model) for name, model in variants.items()}
    assert model_module.model_digest(onnx.load_from_string(variants["base"].SerializeToString())) == digests["base"]
    assert len(set(digests.values())) == len(digests), digests
