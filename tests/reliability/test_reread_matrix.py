"""Every output of every request is a valid input to every request (issue 11, item 12).

For each sample model, each request of ``REQUESTS`` runs first; each request then runs again on
that output, in-process through ``optimizer.cli.main``. No run may exit 2 or 3 on the tool's own
output, and every second output must pass onnx's full checker (models with a sparse_initializer:
the plain checker, since onnx 1.23's shape inference reads them as rank 0) and load in
onnxruntime. The first outputs are computed once per module.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import onnx
import pytest

from optimizer.calibration.feeds import generate_feeds, model_input_specs
from optimizer.cli import main
from tests.helpers.runtime import open_session
from tests.helpers.samples import SAMPLE_MODELS, sample_ids

REQUESTS: dict[str, list[str]] = {
    "default": [],
    "int8": ["--quantize", "int8"],
    "int8-static": ["--quantize", "int8", "--quantize-mode", "static"],
    "int4-weights": ["--quantize", "int4", "--quantize-mode", "weights"],
    "uint8-weights": ["--quantize", "uint8", "--quantize-mode", "weights"],
    "prune-sparse": ["--prune", "0.8", "--sparse-storage", "sparse"],
    "prune-nm": ["--prune", "0.5", "--prune-mode", "nm"],
    "prune-channels": ["--prune", "0.25", "--prune-mode", "channels"],
    "cluster": ["--cluster", "4"],
}
MODELS = dict(zip(sample_ids(), SAMPLE_MODELS, strict=True))


def _calibration_folder(model_path: Path, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    specs = model_input_specs(onnx.load(str(model_path)))
    for index, feed in enumerate(generate_feeds(specs, count=4, seed=1)):
        np.savez(folder / f"{index}.npz", **feed)
    return folder


def _optimize(source: Path, output: Path, request: str) -> tuple[int, str]:
    args = ["optimize", str(source), "-o", str(output), "--quiet", *REQUESTS[request]]
    if request == "int8-static":
        args += ["--calibration-data", str(_calibration_folder(source, output.with_name(output.stem + ".cal")))]
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = main(args)
    return code, errors.getvalue().strip()


def _assert_valid(path: Path) -> None:
    model = onnx.load(str(path))
    has_sparse = any(len(graph.sparse_initializer) for graph in [model.graph])
    onnx.checker.check_model(model, full_check=not has_sparse)
    open_session(path)


@pytest.fixture(scope="module")
def first_output(tmp_path_factory):
    folder = tmp_path_factory.mktemp("first")
    cache: dict[tuple[str, str], Path] = {}

    def make(model: str, request: str) -> Path:
        if (model, request) not in cache:
            output = folder / f"{model}.{request}.onnx"
            code, message = _optimize(MODELS[model], output, request)
            assert code == 0, f"{model} {request}: exit {code}: {message}"
            _assert_valid(output)
            cache[model, request] = output
        return cache[model, request]

    return make


@pytest.mark.parametrize("second", list(REQUESTS))
@pytest.mark.parametrize("first", list(REQUESTS))
@pytest.mark.parametrize("model", list(MODELS))
def test_output_of_first_request_is_valid_input_to_second(model, first, second, first_output, tmp_path):
    source = first_output(model, first)
    before = source.read_bytes()
    output = tmp_path / "second.onnx"
    code, message = _optimize(source, output, second)
    assert code == 0, f"{model}: {first} then {second}: exit {code}: {message}"
    assert source.read_bytes() == before
    _assert_valid(output)
