"""onnx's full checker, for models of any size."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from optimizer.model import PROTOBUF_LIMIT_BYTES, save_model, serialized_size_bytes


def check_model_full(model: onnx.ModelProto) -> None:
    """Run ``onnx.checker.check_model(full_check=True)``; raises onnx's ValidationError.

    onnx checks models over protobuf's 2 GB limit only from a path, so those are written with
    external data to a temporary folder first.
    """
    if serialized_size_bytes(model) < PROTOBUF_LIMIT_BYTES:
        onnx.checker.check_model(model, full_check=True)
        return
    with tempfile.TemporaryDirectory(prefix="onnx-compress-check-") as folder:
        path = save_model(model, Path(folder) / "model.onnx", external_data=True)
        onnx.checker.check_model(str(path), full_check=True)
