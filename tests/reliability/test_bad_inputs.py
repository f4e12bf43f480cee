"""The bad-input matrix, end to end through the CLI in a child process.

Every case builds its input in a few lines and expects the same: exit code 2, one error line
naming the file, tensor or node and the reason, input files unchanged, nothing new in the output
folder or the temp folder, no file opened outside the model's folder (audit hook), and no
MemoryError under a 3 GB address-space limit (sizes are checked before anything is allocated).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.fileio.tensor_checks import MAX_CONSTANT_OF_SHAPE_BYTES, MAX_SUBGRAPH_DEPTH
from tests.reliability.child import error_lines, run_cli_child, tree_state

WEIGHT_VALUES = np.arange(16, dtype=np.float32).reshape(4, 4)
SECRET_BYTES = WEIGHT_VALUES.tobytes()
CUSTOM_DOMAIN = "custom.domain"

Case = tuple[Path, list[str], list[str]]
"""(input path, extra CLI arguments, texts the error line must contain)."""


# --------------------------------------------------------------------------- model builders


def matmul_model(weight: TensorProto | None = None, *, nodes=None, extra=(), opset: int = 18,
                 ir_version: int = 10, outputs=(("y", [1, 4]),)) -> onnx.ModelProto:  # fmt: skip
    """y = x @ W with x [1, 4] unless ``nodes`` replaces the graph body."""
    weight = numpy_helper.from_array(WEIGHT_VALUES, "W") if weight is None else weight
    graph = helper.make_graph(
        nodes or [helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs],
        [weight, *extra],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=ir_version)  # fmt: skip


def external_weight(location: str, *, dims=(4, 4), name: str = "W", **entries) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, **entries}.items():
        tensor.external_data.add(key=key, value=str(value))
    return tensor


def write(path: Path, data: bytes | onnx.ModelProto) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.SerializeToString())
    return path


def nested_if_bytes(depth: int) -> bytes:
    """``depth`` If nodes, each in the then-branch of the one above, built in place: helper's
    copies would already hit protobuf's parse depth."""
    model = matmul_model(nodes=[helper.make_node("Identity", ["x"], ["y"])])
    model.graph.input.add().CopyFrom(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    del model.graph.initializer[:], model.graph.node[:]
    graph, out = model.graph, "y"
    for level in range(depth):
        node = graph.node.add(op_type="If", input=["c"], output=[out], name=f"if{level}")
        other = node.attribute.add(name="else_branch", type=onnx.AttributeProto.GRAPH).g
        other.name = f"else{level}"
        other.node.add(op_type="Identity", input=["x"], output=[f"e{level}"])
        other.output.add(name=f"e{level}")
        graph = node.attribute.add(name="then_branch", type=onnx.AttributeProto.GRAPH).g
        graph.name, out = f"then{level}", f"t{level}"
        graph.output.add(name=out)
    graph.node.add(op_type="Identity", input=["x"], output=[out])
    return model.SerializeToString()


def custom_op_model() -> onnx.ModelProto:
    model = matmul_model(nodes=[helper.make_node("MyOp", ["x"], ["y"], domain=CUSTOM_DOMAIN,
                                                 name="my_custom_node")])  # fmt: skip
    del model.graph.initializer[:]
    model.opset_import.add(domain=CUSTOM_DOMAIN, version=1)
    return model


# --------------------------------------------------------------------------- the cases


def _file(data: bytes, reason: str) -> Callable[[Path, Path], Case]:
    return lambda folder, outside: (write(folder / "model.onnx", data), [], [reason])


def _external(location: str | Callable[[Path, Path], str], reason: str, **entries):
    def build(folder: Path, outside: Path) -> Case:
        (folder / "w.bin").write_bytes(SECRET_BYTES)
        where = location(folder, outside) if callable(location) else location
        path = write(folder / "model.onnx", matmul_model(external_weight(where, **entries)))
        return path, [], ["'W'", reason]
    return build


def _inline(reason: str, **fields) -> Callable[[Path, Path], Case]:
    def build(folder: Path, outside: Path) -> Case:
        weight = numpy_helper.from_array(WEIGHT_VALUES, "W")
        for key, value in fields.items():
            if key == "dims":
                weight.dims[:] = value
            elif key == "float_data":
                weight.float_data[:] = value
            else:
                setattr(weight, key, value)
        return write(folder / "model.onnx", matmul_model(weight)), [], ["'W'", reason]
    return build


def _model(make: Callable[[], onnx.ModelProto], *needles: str, args=()):
    return lambda folder, outside: (write(folder / "model.onnx", make()), list(args), list(needles))


def _symlink_to_secret(folder: Path, outside: Path) -> str:
    (folder / "link.bin").symlink_to(outside / "secret.bin")
    return "link.bin"


def _symlinked_parent(folder: Path, outside: Path) -> str:
    (folder / "sub").symlink_to(outside)
    return "sub/secret.bin"


def _hard_link(folder: Path, outside: Path) -> str:
    os.link(outside / "secret.bin", folder / "hard.bin")
    return "hard.bin"


def _larger_than_memory(folder: Path, outside: Path) -> Case:
    """An 8 GiB sparse file that exactly matches its tensor: only memory can refuse it."""
    with open(folder / "big.bin", "wb") as big:
        big.truncate(2**33)
    weight = external_weight("big.bin", dims=(4, 2**29))
    return write(folder / "model.onnx", matmul_model(weight)), [], ["'W'", "bytes of memory"]


def _fifo(folder: Path, outside: Path) -> Case:
    os.mkfifo(folder / "model.onnx")
    return folder / "model.onnx", [], ["a FIFO"]


def _directory(folder: Path, outside: Path) -> Case:
    (folder / "model.onnx").mkdir()
    return folder / "model.onnx", [], ["a folder"]


def _over_limit(folder: Path, outside: Path) -> Case:
    path = write(folder / "model.onnx", matmul_model())
    return path, ["--max-input-bytes", "100"], ["over the limit of 100"]


def _constant_of_shape() -> onnx.ModelProto:
    shape = numpy_helper.from_array(np.array([8, 2**30], np.int64), "shape")
    nodes = [helper.make_node("Constant", [], ["s"], value=shape, name="shape_const"),
             helper.make_node("ConstantOfShape", ["s"], ["big"], name="fill_32gib"),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")]  # fmt: skip
    return matmul_model(nodes=nodes, outputs=(("y", [1, 4]), ("big", [8, 2**30])))


def _cycle() -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="add_a"),
             helper.make_node("Relu", ["a"], ["b"], name="relu_b"),
             helper.make_node("MatMul", ["a", "W"], ["y"], name="matmul")]  # fmt: skip
    return matmul_model(nodes=nodes)


def _no_opset() -> onnx.ModelProto:
    model = matmul_model()
    del model.opset_import[:]
    return model


def _sparse_outside(folder: Path, outside: Path) -> Case:
    values = external_weight("../outside/secret.bin", dims=(2,), name="sparse_values", length=8)
    indices = numpy_helper.from_array(np.array([0, 5], np.int64), "sparse_indices")
    model = matmul_model()
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4, 4]))
    return write(folder / "model.onnx", model), [], ["sparse initializer", "'..'"]


def _png() -> bytes:
    return b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200)


CASES: dict[str, Callable[[Path, Path], Case]] = {
    "empty-file": _file(b"", "empty file"),
    "random-bytes": _file(np.random.default_rng(0).bytes(4096), "not an ONNX model"),
    "half-a-file": _file(matmul_model().SerializeToString()[:60], "not an ONNX model"),
    "png": _file(_png(), "not an ONNX model"),
    "directory": _directory,
    "fifo": _fifo,
    "dev-zero": lambda folder, outside: (Path("/dev/zero"), [], ["character device"]),
    "over-max-input-bytes": _over_limit,
    "nested-if-32": _file(nested_if_bytes(32), f"limit of {MAX_SUBGRAPH_DEPTH} levels"),
    "nested-if-40": _file(nested_if_bytes(40), "nested deeper than protobuf parses"),
    "external-dotdot": _external("../outside/secret.bin", "'..'"),
    "external-absolute": _external(lambda f, o: str(o / "secret.bin"), "absolute path"),
    "external-dev-zero": _external("/dev/zero", "absolute path"),
    "external-symlink": _external(_symlink_to_secret, "resolves outside"),
    "external-symlinked-parent": _external(_symlinked_parent, "resolves outside"),
    "external-hard-link": _external(_hard_link, "hard link"),
    "external-nul": _external("w.bin\x00/../../outside/secret.bin", "control characters"),
    "external-control-char": _external("w\x1b.bin", "control characters"),
    "external-offset-beyond-file": _external("w.bin", "beyond", offset=4096),
    "external-length-beyond-file": _external("w.bin", "beyond", offset=32, length=64),
    "external-length-short": _external("w.bin", "does not match", length=32),
    "external-larger-than-memory": _larger_than_memory,
    "raw-data-longer": _inline("raw_data is 68 bytes", raw_data=SECRET_BYTES + bytes(4)),
    "raw-data-shorter": _inline("raw_data is 60 bytes", raw_data=SECRET_BYTES[:60]),
    "raw-data-plus-float-data": _inline("several fields", float_data=WEIGHT_VALUES.ravel()),
    "dtype-0": _inline("unknown data type 0", data_type=0),
    "dtype-99": _inline("unknown data type 99", data_type=99),
    "dims-2^62": _inline(f"needs {(2**124) * 4}", dims=[2**62, 2**62]),
    "dims-negative": _inline("negative dimension", dims=[4, -4]),
    "constant-of-shape-32gib": _model(_constant_of_shape, "'fill_32gib' (ConstantOfShape)",
                                      f"{2**35} bytes", f"limit of {MAX_CONSTANT_OF_SHAPE_BYTES}"),
    "duplicate-initializer": _model(lambda: matmul_model(extra=[numpy_helper.from_array(
        WEIGHT_VALUES, "W")]), "W initializer name is not unique"),
    "cycle": _model(_cycle, "cycle", "'add_a' (Add)", "'relu_b' (Relu)"),
    "dangling-input": _model(lambda: matmul_model(nodes=[helper.make_node(
        "MatMul", ["x", "nowhere"], ["y"], name="matmul")]), "'matmul'", "'nowhere'",
        "produced by no node"),
    "ir-version-99": _model(lambda: matmul_model(ir_version=99), "ir_version 99"),
    "opset-99": _model(lambda: matmul_model(opset=99), "opset_import 'ai.onnx'", "version 99"),
    "no-opset-import": _model(_no_opset, "no opset_import"),
    "custom-op-with-validate": _model(custom_op_model, CUSTOM_DOMAIN, "MyOp", args=["--validate"]),
    "sparse-external-outside": _sparse_outside,
}  # fmt: skip


@pytest.fixture
def workspace(tmp_path):
    for name in ("model", "outside", "out"):
        (tmp_path / name).mkdir()
    (tmp_path / "outside" / "secret.bin").write_bytes(SECRET_BYTES)
    return tmp_path


def temp_files(workspace: Path) -> list[str]:
    """What the child left in its TMPDIR; importing onnxruntime 1.32 itself writes '.ses'."""
    return sorted(set(os.listdir(workspace / "tmp")) - {".ses"})


def assert_nothing_outside_opened(run, workspace: Path) -> None:
    allowed = [workspace / "model", workspace / "out", workspace / "tmp"]
    allowed_prefixes = tuple(str(folder.resolve()) + os.sep for folder in allowed)
    stray = [path for path in run.opened_under(workspace)
             if not (path + os.sep).startswith(allowed_prefixes)]  # fmt: skip
    assert stray == [], f"opened outside the model folder: {stray}"
    walked = [path for path in run.relative_opens() if "/" in path or path in ("..", ".")]
    assert walked == [], f"relative opens that are not single names: {walked}"
    assert not any(path.startswith("/dev/zero") for path in run.opened)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_and_touches_nothing(case, workspace):
    path, extra_args, needles = CASES[case](workspace / "model", workspace / "outside")
    before = {name: tree_state(workspace / name) for name in ("model", "outside")}
    run = run_cli_child(["optimize", str(path), "-o", str(workspace / "out" / "o.onnx"), *extra_args],
                        workspace=workspace)  # fmt: skip
    lines = error_lines(run.stderr)
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1, f"expected one error line, got {run.stderr!r}"
    assert lines[0].startswith("onnx-compress: error: ") and "Traceback" not in run.stderr
    for needle in [str(path), *needles]:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert {name: tree_state(workspace / name) for name in ("model", "outside")} == before
    assert os.listdir(workspace / "out") == [] and temp_files(workspace) == []
    assert_nothing_outside_opened(run, workspace)


def test_custom_domain_op_passes_through_untouched_without_validate(workspace):
    path = write(workspace / "model" / "model.onnx", custom_op_model())
    output = workspace / "out" / "o.onnx"
    run = run_cli_child(["optimize", str(path), "-o", str(output), "--quiet"], workspace=workspace)
    assert run.returncode == 0, run.stderr
    node = onnx.load(output).graph.node[0]
    assert (node.domain, node.op_type, list(node.input), list(node.output)) == (
        CUSTOM_DOMAIN, "MyOp", ["x"], ["y"])
    assert_nothing_outside_opened(run, workspace)


@pytest.mark.parametrize("validate", [False, True])
def test_custom_domain_op_is_reported_as_not_validated(workspace, validate):
    path = write(workspace / "model" / "model.onnx", custom_op_model())
    args = ["optimize", str(path), "-o", str(workspace / "out" / "o.onnx")]
    run = run_cli_child(args + (["--validate"] if validate else []), workspace=workspace)
    assert run.returncode == (2 if validate else 0)
    assert "not validated" in run.stdout + run.stderr and f"{CUSTOM_DOMAIN}" in run.stdout + run.stderr
