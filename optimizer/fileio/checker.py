"""onnx's full checker, for models of any size."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from optimizer.fileio.model import fits_one_message
from optimizer.fileio.onnxruntime_ops import checker_view
from optimizer.fileio.save import save_model


def check_model_full(model: onnx.ModelProto) -> None:
    """Run ``onnx.checker.check_model(full_check=True)``; raises onnx's ValidationError.

    onnx checks models over protobuf's 2 GB limit only from a path, so those are written with
    external data to a temporary folder first. Ops that only onnxruntime defines in the ONNX domain
    are left to onnxruntime (``checker_view``).
    """
    with checker_view(model):
        if fits_one_message(model):
            onnx.checker.check_model(model, full_check=True)
            return
        with tempfile.TemporaryDirectory(prefix="onnx-compress-check-") as folder:
            path = save_model(model, Path(folder) / "model.onnx", external_data=True)
            onnx.checker.check_model(str(path), full_check=True)
