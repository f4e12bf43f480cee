"""Model builders shared by the model load and save tests."""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, parser

from tests.helpers.runtime import run_model

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


def _add_model(weight: TensorProto, *, extra: Sequence[TensorProto] = ()) -> onnx.ModelProto:
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
    return run_model(pathlib.Path(model) if isinstance(model, str) else model, [{"x": x}])[0][0]


# --------------------------------------------------------------------------- round trips

def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path


def _valid_model_bytes() -> bytes:
    """A small valid model file's bytes, the starting point the hostile-file tests break."""
    return _function_model().SerializeToString()
