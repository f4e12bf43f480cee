"""Tests for optimizer.fileio.model: atomic saving, refusals, external data on save, faults."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import optimizer.fileio.save as save_module
from optimizer.errors import ModelSaveError
from optimizer.fileio.model import load_model, load_model_with_files, serialized_size_bytes
from optimizer.fileio.output_files import process_start_ticks
from optimizer.fileio.save import save_model
from tests.helpers.model_files import (
    EXTERNAL_NAME,
    REPO_ROOT,
    _add_model,
    _file_hashes,
    _function_model,
    _run_add,
    _write,
    _write_external_model,
)

# --------------------------------------------------------------------------- saving: refusals


def _refusal_setup(tmp_path: pathlib.Path) -> tuple[onnx.ModelProto, tuple[pathlib.Path, ...]]:
    model_path = _write_external_model(tmp_path)
    return load_model_with_files(model_path)


@pytest.mark.parametrize(
    ("output", "reason"),
    [("model.onnx", "refusing to overwrite"), ("w.bin", "refusing to overwrite"), ("link.onnx", "symlink"),
     ("nope/out.onnx", "does not exist"), ("w.bin/out.onnx", "is not a folder"), ("adir", "is a folder")],
)
def test_save_refuses_and_writes_nothing(tmp_path, output, reason):
    model, inputs = _refusal_setup(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "link.onnx").symlink_to(tmp_path / "model.onnx")
    before = _file_hashes(tmp_path)
    with pytest.raises(ModelSaveError, match=reason):
        save_model(model, tmp_path / output, protected_paths=inputs)
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


def _data_file(folder: pathlib.Path) -> pathlib.Path:
    """The one content-named data file (``NAME.HASH.data``) in ``folder``."""
    (found,) = [path for path in folder.iterdir() if path.name.endswith(".data")]
    assert re.fullmatch(r"out\.onnx\.[0-9a-f]{16}\.data", found.name), found.name
    return found


def test_save_twice_is_byte_identical_and_data_file_is_replaced(tmp_path):
    model = _large_weight_model(4000)
    target = tmp_path / "out.onnx"
    save_model(model, target, external_data=True)
    first = (target.read_bytes(), _data_file(tmp_path).read_bytes())
    save_model(model, target, external_data=True)
    assert (target.read_bytes(), _data_file(tmp_path).read_bytes()) == first
    save_model(_large_weight_model(1000), target, external_data=True)
    assert _data_file(tmp_path).stat().st_size == 4000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", _data_file(tmp_path).name]


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
    data_name = _data_file(tmp_path).name
    assert stored["big_w"] == {"location": data_name, "offset": "0", "length": "4000"}
    assert stored["ints"] == {"location": data_name, "offset": "4096", "length": "16000"}
    reloaded, files = load_model_with_files(target)
    assert reloaded.SerializeToString(deterministic=True) == before
    assert files == (target, tmp_path / data_name)
    x = np.ones(1000, np.float32)
    np.testing.assert_array_equal(_run_add(str(target), x), np.arange(1000) + 1.0)


def test_automatic_external_data_above_the_protobuf_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(save_module, "PROTOBUF_LIMIT_BYTES", 3000)
    monkeypatch.setattr(save_module, "PROTOBUF_MARGIN_BYTES", 0)
    model = _large_weight_model(1000)
    assert serialized_size_bytes(model) >= 4000
    with pytest.raises(ModelSaveError, match="over protobuf's 2 GB limit"):
        save_model(model, tmp_path / "never.onnx", external_data=False)
    assert list(tmp_path.iterdir()) == []
    save_model(model, tmp_path / "auto.onnx")
    (data_file,) = tmp_path.glob("auto.onnx.*.data")
    assert data_file.stat().st_size == 4000
    assert (tmp_path / "auto.onnx").stat().st_size < 3000


def test_small_model_is_saved_inline_by_default(tmp_path):
    save_model(_large_weight_model(1000), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_temps_of_provably_dead_writers_are_removed(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead_pid, me = int(finished.stdout), os.getpid()
    my_start = process_start_ticks(me)
    stale = [f".out.onnx.tmp-{dead_pid}-5-abcd_123", f".other.onnx.data.tmp-{me}-{my_start + 1}-zz99yy88"]
    kept = [".out.onnx.tmp-abcd_123", f".out.onnx.tmp-{me}-{my_start}-abcd1234", "out.onnx.tmp-abcd1234",
            f".out.onnx.tmp-{me}-0-abcd1234"]
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
from optimizer.fileio.model import load_model
from optimizer.fileio.save import save_model
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
    (data_file,) = tmp_path.glob("big.onnx.*.data")
    assert data_file.stat().st_size > 2**31
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

    monkeypatch.setattr(save_module.os, "replace", replace_then_crash)
    with pytest.raises(_Crash):
        save_model(_large_weight_model(2000, "other"), target, external_data=True)
    assert len(calls) == 1 and pathlib.Path(calls[0]).name.endswith(".data")
    assert load_model(target).graph.initializer[0].name == "big_w", "the old model lost its data"
    monkeypatch.undo()
    save_model(_large_weight_model(2000, "other"), target, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", pathlib.Path(calls[0]).name]
    assert load_model(target).graph.initializer[0].name == "other"
