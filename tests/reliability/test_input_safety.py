"""The read side under hostile conditions: inputs changed or truncated during a run, invalid
UTF-8 and absurd numbers in a model, thousands of external-data files under a small fd limit,
location spellings onnxruntime refuses, and symlinked weights in a Hugging Face cache layout."""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import optimizer.api as api_module
import optimizer.app_inputs as app_inputs
import optimizer.fileio.model as model_module
from optimizer.cli import main
from optimizer.errors import ModelLoadError, ModelSaveError
from optimizer.executor import ExecutorOptions
from optimizer.fileio import lazy_io
from optimizer.fileio.model import load_model, load_model_with_files
from optimizer.fileio.save import save_model

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MLP = REPO_ROOT / "models" / "mlp.onnx"
WEIGHTS = np.arange(16, dtype=np.float32).reshape(4, 4)


def _digests(folder: pathlib.Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and not path.is_symlink()}  # fmt: skip


def _matmul_model(weight: TensorProto) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _external(location: str, name: str = "W", **entries: object) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4, 4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, **entries}.items():
        tensor.external_data.add(key=key, value=str(value))
    return tensor


# ------------------------------------------------------------------ 4: input changed mid-run


@pytest.fixture
def lazy_everything(monkeypatch):
    """optimize() loads every external tensor lazily, as it would a > 256 MB model."""
    monkeypatch.setattr(app_inputs, "LAZY_LOAD_ABOVE_BYTES", 0)
    monkeypatch.setattr(model_module, "LAZY_TENSOR_MIN_BYTES", 0)


def _large_input(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "in"
    folder.mkdir()
    source = save_model(load_model(MLP), folder / "mlp.onnx", external_data=True)
    (written,) = folder.glob("mlp.onnx.*.data")  # save_model names data by content; tests use NAME.data
    written.rename(folder / "mlp.onnx.data")
    stored = onnx.load_model(source, load_external_data=False)
    for tensor in stored.graph.initializer:
        for entry in tensor.external_data:
            entry.value = "mlp.onnx.data" if entry.key == "location" else entry.value
    source.write_bytes(stored.SerializeToString())
    return source


def _rewrite_in_place(data: pathlib.Path) -> None:
    with open(data, "r+b") as stream:
        stream.seek(4096)
        stream.write(b"\x7f" * 64)


def _replace(data: pathlib.Path) -> None:
    replacement = data.with_name("other")
    replacement.write_bytes(data.read_bytes()[::-1])
    os.replace(replacement, data)


def _truncate(data: pathlib.Path) -> None:
    os.truncate(data, 100)


@pytest.mark.parametrize("change", [_rewrite_in_place, _replace, _truncate])
@pytest.mark.parametrize("arguments", [[], ["--quantize", "int8", "--quantize-mode", "weights"], ["--validate"]])
def test_input_changed_after_load_fails_with_exit_2_and_writes_nothing(
    tmp_path, monkeypatch, capsys, lazy_everything, change, arguments
):
    source = _large_input(tmp_path)
    data = source.with_name(source.name + ".data")
    version = api_module.tool_version  # called once the passes ran, before anything is saved

    def change_then_continue():
        change(data)
        return version()

    monkeypatch.setattr(api_module, "tool_version", change_then_continue)
    (tmp_path / "out").mkdir()
    code = main(["optimize", str(source), "-o", str(tmp_path / "out" / "o.onnx"), "--samples", "1", *arguments])
    assert code == 2, capsys.readouterr().err
    error = capsys.readouterr().err
    assert "mlp.onnx.data" in error and "changed" in error, error
    assert list((tmp_path / "out").iterdir()) == []


_TRUNCATE_WHILE_MAPPED = r"""
import os, sys
import optimizer.app_inputs as app_inputs, optimizer.fileio.model as model
from optimizer.fileio import lazy_io
from optimizer.cli import main
app_inputs.LAZY_LOAD_ABOVE_BYTES = 0
model.LAZY_TENSOR_MIN_BYTES = 0
original = lazy_io.map_array
def map_then_truncate(tensor):
    array = original(tensor)
    os.truncate(sys.argv[1] + ".data", 0)  # the pass then reads pages past the end of the file
    return array
lazy_io.map_array = map_then_truncate
sys.exit(main(["optimize", sys.argv[1], "-o", sys.argv[2], "--quantize", "int8", "--quantize-mode", "weights"]))
"""


def test_truncating_a_mapped_input_is_exit_2_never_sigbus(tmp_path):
    source = _large_input(tmp_path)
    run = subprocess.run([sys.executable, "-c", _TRUNCATE_WHILE_MAPPED, str(source), str(tmp_path / "o.onnx")],
                         check=False, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)  # fmt: skip
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "mlp.onnx.data" in run.stderr and "changed" in run.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_save_refuses_a_lazy_source_rewritten_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "LAZY_TENSOR_MIN_BYTES", 0)
    source = _large_input(tmp_path)
    model, _ = load_model_with_files(source, lazy_above_bytes=0)
    lazy_io.read_range(lazy_io.lazy_ref(model.graph.initializer[0]))  # caches the descriptor
    _rewrite_in_place(source.with_name(source.name + ".data"))
    with pytest.raises(ModelSaveError, match="changed"):
        save_model(model, tmp_path / "o.onnx", external_data=True)
    assert not (tmp_path / "o.onnx").exists()


def test_mapped_arrays_are_private_copies_of_user_files(tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "LAZY_TENSOR_MIN_BYTES", 0)
    source = _large_input(tmp_path)
    model, _ = load_model_with_files(source, lazy_above_bytes=0)
    tensor = model.graph.initializer[0]
    array = lazy_io.map_array(tensor)
    expected = onnx.numpy_helper.to_array(load_model(MLP).graph.initializer[0])
    data = source.with_name(source.name + ".data")
    assert str(data) not in pathlib.Path("/proc/self/maps").read_text(), "the user's file must not be mapped"
    os.truncate(data, 0)
    np.testing.assert_array_equal(array, expected)  # would be SIGBUS on a map of the user's file
    with pytest.raises(ModelLoadError, match="changed"):
        lazy_io.check_sources_unchanged([source.with_name(source.name + ".data")])


# ------------------------------------------------------------------ 13: invalid text, absurd numbers


def _patched(model: onnx.ModelProto, marker: bytes, replacement: bytes) -> bytes:
    assert len(marker) == len(replacement)
    data = model.SerializeToString()
    assert data.count(marker) == 1
    return data.replace(marker, replacement)


def _invalid_utf8(field: str):
    def build(folder: pathlib.Path) -> pathlib.Path:
        model = load_model(MLP)
        if field == "doc_string":
            model.doc_string = "MARKER"
        elif field == "producer_name":
            model.producer_name = "MARKER"
        elif field == "opset domain":
            model.opset_import.add(domain="MARKER", version=1)
        elif field == "tensor name":
            model.graph.node[0].input[1] = model.graph.initializer[0].name = "MARKER"
            return _write(folder, model.SerializeToString().replace(b"MARKER", b"\xffARKER"))
        elif field == "dim_param":
            model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "MARKER"
        return _write(folder, _patched(model, b"MARKER", b"\xffARKER"))

    return build


def _write(folder: pathlib.Path, data: bytes, name: str = "bad.onnx") -> pathlib.Path:
    (folder / name).write_bytes(data)
    return folder / name


def _external_location_utf8(folder: pathlib.Path) -> pathlib.Path:
    (folder / "MARKER").write_bytes(WEIGHTS.tobytes())
    return _write(folder, _patched(_matmul_model(_external("MARKER")), b"MARKER", b"\xffARKER"))


def _huge_empty_dims(folder: pathlib.Path) -> pathlib.Path:
    model = load_model(MLP)
    model.graph.initializer.append(helper.make_tensor("huge", TensorProto.FLOAT, [2**62, 0], b"", raw=True))
    return _write(folder, model.SerializeToString())


def _long_offset(folder: pathlib.Path) -> pathlib.Path:
    (folder / "w.bin").write_bytes(WEIGHTS.tobytes())
    return _write(folder, _matmul_model(_external("w.bin", offset="9" * 5001)).SerializeToString())


def _graph_input(dim: int, elem_type: int = TensorProto.FLOAT):
    def build(folder: pathlib.Path) -> pathlib.Path:
        model = load_model(MLP)
        tensor_type = model.graph.input[0].type.tensor_type
        tensor_type.elem_type = elem_type
        tensor_type.shape.dim[1].dim_value = dim
        return _write(folder, model.SerializeToString())

    return build


MODEL_CASES = {
    **{f"utf8-{field}": (_invalid_utf8(field), "UTF-8")
       for field in ("doc_string", "producer_name", "opset domain", "tensor name", "dim_param")},
    "utf8-external-location": (_external_location_utf8, "UTF-8"),
    "dims-2^62x0": (_huge_empty_dims, "overflows"),
    "offset-5001-digits": (_long_offset, "offset"),
}  # fmt: skip
INPUT_CASES = {
    # a negative size is dynamic (paddle2onnx writes -1; onnxruntime reads it so): the generated 8
    # does not fit the MLP's 64, and the error names the generated shape and --shape
    "input-dim-negative": (_graph_input(-4), "the inputs were generated (x=1x8)"),
    "input-dim-2^40": (_graph_input(2**40), "bytes"),
    "input-elem-type-0": (_graph_input(64, 0), "element type 0"),
    "input-elem-type-99": (_graph_input(64, 99), "element type 99"),
}


def _commands(path: pathlib.Path, out: pathlib.Path) -> dict[str, list[str]]:
    feeds = ["--samples", "1"]
    return {
        "optimize": ["optimize", str(path), "-o", str(out / "o.onnx"), "--validate", *feeds],
        "inspect": ["inspect", str(path)],
        "validate": ["validate", str(path), str(path), *feeds],
        "bench": ["bench", str(path), "--rounds", "1", "--warmup", "0", *feeds],
        "debug": ["debug", str(path), str(path), *feeds],
        "sensitivity": ["sensitivity", str(path), "--sparsities", "0.5", *feeds],
    }


@pytest.mark.parametrize("case", sorted(MODEL_CASES) + sorted(INPUT_CASES))
def test_hostile_model_fields_are_exit_2_in_every_command(tmp_path, capsys, case):
    build, expected = {**MODEL_CASES, **INPUT_CASES}[case]
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    path = build(folder)
    before = _digests(folder)
    commands = _commands(path, out)
    if case in INPUT_CASES:  # the model loads; generating feeds for its input is what must fail
        commands.pop("inspect")
    if case == "input-dim-negative":  # debug of a model against itself finds no layer to run: exit 0
        commands.pop("debug")
    for name, argv in commands.items():
        code = main(argv)
        error = capsys.readouterr().err
        assert code == 2, f"{name}: exit {code}: {error}"
        assert expected in error and len(error.strip().splitlines()) == 1, f"{name}: {error}"
    assert _digests(folder) == before
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------ 17: many files, few descriptors

_MANY_FILES = r"""
import resource, sys
import optimizer.fileio.model as model_module
from optimizer.fileio.model import load_model, load_model_with_files
from optimizer.fileio.save import save_model
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
model = load_model(sys.argv[1])
assert len(model.graph.initializer) == int(sys.argv[3])
model_module.LAZY_TENSOR_MIN_BYTES = 0
lazy, files = load_model_with_files(sys.argv[1], lazy_above_bytes=0)
assert len(files) == int(sys.argv[3]) + 1
save_model(lazy, sys.argv[2], external_data=True, size_threshold_bytes=0)
print("ok")
"""


def test_hundreds_of_external_files_load_under_a_limit_of_64_descriptors(tmp_path):
    count = 300
    folder = tmp_path / "in"
    folder.mkdir()
    weights, nodes, previous = [], [], "x"
    for index in range(count):
        (folder / f"w{index}.bin").write_bytes(np.full(16, index, np.float32).tobytes())
        weights.append(_external(f"w{index}.bin", name=f"W{index}"))
        nodes.append(helper.make_node("Add", [previous, f"W{index}"], [f"s{index}"]))
        previous = f"s{index}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [4, 4])],
                              weights)  # fmt: skip
    model_path = folder / "many.onnx"
    model_path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    run = subprocess.run([sys.executable, "-c", _MANY_FILES, str(model_path), str(tmp_path / "o.onnx"), str(count)],
                         check=False, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    saved = load_model(tmp_path / "o.onnx")
    np.testing.assert_array_equal(numpy_helper.to_array(saved.graph.initializer[-1]), np.full((4, 4), count - 1))


# ------------------------------------------------------------------ 18: spellings onnxruntime refuses


@pytest.mark.parametrize("location", ["w.bin/.", "w.bin/", "sub/w.bin/.", "sub/."])
def test_locations_naming_a_folder_are_refused_like_onnxruntime(tmp_path, capsys, location):
    (tmp_path / "sub").mkdir()
    for name in ("w.bin", "sub/w.bin"):
        (tmp_path / name).write_bytes(WEIGHTS.tobytes())
    path = _write(tmp_path, _matmul_model(_external(location)).SerializeToString())
    with pytest.raises(ModelLoadError, match=r"onnxruntime refuses|names no file|is a folder"):
        load_model(path)
    assert main(["inspect", str(path)]) == 2


@pytest.mark.parametrize("location", ["./w.bin", "sub//w.bin", "sub/./w.bin", ".//w.bin"])
def test_locations_onnxruntime_accepts_still_load(tmp_path, location):
    (tmp_path / "sub").mkdir()
    for name in ("w.bin", "sub/w.bin"):
        (tmp_path / name).write_bytes(WEIGHTS.tobytes())
    path = _write(tmp_path, _matmul_model(_external(location)).SerializeToString())
    np.testing.assert_array_equal(numpy_helper.to_array(load_model(path).graph.initializer[0]), WEIGHTS)


# ------------------------------------------------------------------ symlinks: Hugging Face, --allow-symlinks-under


def _hub_snapshot(tmp_path: pathlib.Path) -> pathlib.Path:
    """models--org--name/{blobs/HASH, snapshots/REV/model.onnx -> ../../blobs/HASH}, as the hub writes."""
    repo = tmp_path / "hub" / "models--org--name"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (blobs / "aaaa").write_bytes(WEIGHTS.tobytes())
    (blobs / "bbbb").write_bytes(_matmul_model(_external("model.onnx_data")).SerializeToString())
    (snapshot / "model.onnx_data").symlink_to("../../blobs/aaaa")
    (snapshot / "model.onnx").symlink_to("../../blobs/bbbb")
    return snapshot / "model.onnx"


def test_hugging_face_snapshot_with_symlinked_weights_loads(tmp_path, capsys):
    path = _hub_snapshot(tmp_path)
    model, files = load_model_with_files(path)
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), WEIGHTS)
    assert [file.name for file in files] == ["bbbb", "aaaa"], "real paths are the files protected from writes"
    assert main(["inspect", str(path)]) == 0
    (tmp_path / "out").mkdir()
    argv = ["optimize", str(path), "-o", str(tmp_path / "out" / "o.onnx"), "--validate", "--samples", "1", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err


def _link_out_of_blobs(tmp_path: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    path = _hub_snapshot(tmp_path)
    link = path.parent / "model.onnx_data"
    link.unlink()
    link.symlink_to(target)
    return path


def test_hugging_face_symlink_leaving_the_blobs_folder_is_refused(tmp_path, capsys):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(WEIGHTS.tobytes())
    for index, target in enumerate((secret, pathlib.Path("/etc/passwd"))):
        path = _link_out_of_blobs(tmp_path / f"case{index}", target)
        with pytest.raises(ModelLoadError, match="outside"):
            load_model(path)
        assert main(["inspect", str(path)]) == 2


def test_symlink_chain_that_leaves_the_root_is_refused(tmp_path):
    path = _hub_snapshot(tmp_path)
    blobs = path.parent.parent.parent / "blobs"
    outside = tmp_path / "outside-link"
    outside.symlink_to(blobs / "aaaa")  # leaves the root, then points back into it
    (blobs / "hop").symlink_to(outside)
    link = path.parent / "model.onnx_data"
    link.unlink()
    link.symlink_to("../../blobs/hop")
    with pytest.raises(ModelLoadError, match="outside"):
        load_model(path)


def test_hard_link_and_fifo_in_the_blobs_folder_stay_refused(tmp_path):
    path = _hub_snapshot(tmp_path)
    blobs = path.parent.parent.parent / "blobs"
    os.link(blobs / "aaaa", tmp_path / "second-name")
    with pytest.raises(ModelLoadError, match="hard link"):
        load_model(path)
    os.unlink(tmp_path / "second-name")
    os.mkfifo(blobs / "pipe")
    link = path.parent / "model.onnx_data"
    link.unlink()
    link.symlink_to("../../blobs/pipe")
    with pytest.raises(ModelLoadError, match="FIFO"):
        load_model(path)


def test_allow_symlinks_under_a_named_folder(tmp_path, capsys):
    store, folder = tmp_path / "store", tmp_path / "model"
    store.mkdir()
    folder.mkdir()
    (store / "w.bin").write_bytes(WEIGHTS.tobytes())
    (tmp_path / "elsewhere.bin").write_bytes(WEIGHTS.tobytes())
    (folder / "w.bin").symlink_to(store / "w.bin")
    (folder / "x.bin").symlink_to(tmp_path / "elsewhere.bin")
    path = _write(folder, _matmul_model(_external("w.bin")).SerializeToString())
    with pytest.raises(ModelLoadError, match="symlink"):
        load_model(path)
    assert main(["inspect", str(path)]) == 2
    np.testing.assert_array_equal(
        numpy_helper.to_array(load_model(path, allow_symlinks_under=[store]).graph.initializer[0]), WEIGHTS)
    assert main(["inspect", str(path), "--allow-symlinks-under", str(store)]) == 0
    (tmp_path / "out").mkdir()
    result = api_module.optimize(path, tmp_path / "out" / "o.onnx",
                                 api_module.OptimizeOptions(allow_symlinks_under=[store]))
    assert result.output_path is not None
    outside = _write(folder, _matmul_model(_external("x.bin")).SerializeToString(), "outside.onnx")
    with pytest.raises(ModelLoadError, match="outside"):
        load_model(outside, allow_symlinks_under=[store])


def test_budget_workers_load_with_the_same_symlink_roots(tmp_path):
    """--max-drop with --workers loads the model again in each worker: the folders the user allowed
    travel with it (before, every worker refused the symlink)."""
    store, folder = tmp_path / "store", tmp_path / "model"
    store.mkdir()
    folder.mkdir()
    weights = np.random.default_rng(0).standard_normal((3, 64, 64)).astype(np.float32)
    (store / "w.bin").write_bytes(weights.tobytes())
    (folder / "w.bin").symlink_to(store / "w.bin")
    nodes, tensors = [], []
    for index in range(3):
        tensor = _external("w.bin", f"W{index}", offset=index * 64 * 64 * 4, length=64 * 64 * 4)
        tensor.dims[:] = [64, 64]
        tensors.append(tensor)
        nodes.append(helper.make_node("MatMul", [f"h{index}", f"W{index}"], [f"h{index + 1}"], name=f"matmul{index}"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("h3", TensorProto.FLOAT, [1, 64])], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    path = _write(folder, model.SerializeToString())
    (tmp_path / "out").mkdir()
    result = api_module.optimize(path, tmp_path / "out" / "o.onnx", api_module.OptimizeOptions(
        allow_symlinks_under=[store], passes=["prune"], pass_options={"prune": {"sparsity": 0.5}},
        budget=api_module.BudgetOptions(max_drop=0.0, metric="max_abs", max_trials=8),
        executor=ExecutorOptions(workers=2)))
    assert result.output_path is not None
    assert result.report.budget is not None and result.report.budget["trials"] >= 3
    # a budget implies validation: onnxruntime refuses data outside the model's folder, so the
    # loaded model is what runs as the reference
    assert result.comparison is not None and result.passed


def test_a_misspelled_symlink_root_is_an_error(tmp_path):
    path = _write(tmp_path, _matmul_model(numpy_helper.from_array(WEIGHTS, "W")).SerializeToString())
    with pytest.raises(ModelLoadError, match=r"--allow-symlinks-under .*no such folder"):
        load_model(path, allow_symlinks_under=[tmp_path / "no-such-store"])
    assert main(["inspect", str(path), "--allow-symlinks-under", str(tmp_path / "no-such-store")]) == 2
