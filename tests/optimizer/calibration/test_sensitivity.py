from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from optimizer.calibration.sensitivity import LayerSensitivity, SensitivityTable, sensitivity_scan
from optimizer.errors import OptionError
from optimizer.fileio.model import load_model
from optimizer.graph.sparse_storage import size_report, sparse_bytes, to_dense_initializers, to_sparse_initializers
from tests.helpers.runtime import open_session, run_model
from tests.helpers.samples import MODELS_DIR, seeded_feeds


def test_scan_measures_every_weight_and_pruning_more_hurts_more():
    model = load_model(MODELS_DIR / "mlp.onnx")
    table = sensitivity_scan(model, seeded_feeds(model, count=3), sparsities=(0.1, 0.5, 0.9), min_elements=0)
    assert sorted(layer.name for layer in table.layers) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert table.samples == 3 and table.provider_used == "CPUExecutionProvider"
    at_90 = [layer.sqnr_db[-1] for layer in table.layers]
    assert at_90 == sorted(at_90)  # most sensitive (lowest SQNR when pruned) first, not by name
    for layer in table.layers:
        assert 1.0 > layer.cosine[0] >= layer.cosine[1] >= layer.cosine[2] > 0
        assert layer.sqnr_db[0] > layer.sqnr_db[2]
    fc1 = next(layer for layer in table.layers if layer.name == "fc1.weight")
    assert fc1.elements == 8192 and fc1.cosine[0] > 0.999  # its 16 near-dead rows go first
    json.dumps(table.to_dict())
    assert table.to_markdown().splitlines()[2] == "| layer | elements | cos@0.1 | cos@0.5 | cos@0.9 |"


def test_scan_reads_weights_held_in_constant_nodes():
    model = load_model(MODELS_DIR / "constant_weights.onnx")
    table = sensitivity_scan(model, seeded_feeds(model, count=2), sparsities=(0.5,), min_elements=0)
    assert sorted(layer.name for layer in table.layers) == ["conv2d_0.w_0", "conv2d_1.w_0", "fc_0.w_0"]
    assert table.layers[0].name == "fc_0.w_0"  # hurts most, listed first


def test_allocation_reaches_the_target_and_spares_the_sensitive_layer():
    sparsities = (0.25, 0.5, 0.75)
    table = SensitivityTable(sparsities, [
        LayerSensitivity("sensitive", 1000, [0.99, 0.9, 0.5], [20.0, 10.0, 3.0]),
        LayerSensitivity("robust", 3000, [1.0, 0.999, 0.99], [50.0, 40.0, 30.0]),
    ], samples=1, provider_used="CPUExecutionProvider")
    allocation = table.allocate(0.5)
    assert allocation == {"sensitive": 0.0, "robust": 0.75}
    assert sum(layer.elements * allocation[layer.name] for layer in table.layers) >= 0.5 * 4000
    assert table.allocate(0.0) == {"sensitive": 0.0, "robust": 0.0}
    assert table.allocate(0.9) == {"sensitive": 0.75, "robust": 0.75}  # the most the grid allows
    assert "| robust | 3000 | 1.0000 | 0.9990 | 0.9900 | 0.75 |" in table.to_markdown()
    with pytest.raises(OptionError):
        table.allocate(1.5)


def test_bad_sparsity_grid_is_an_option_error():
    model = load_model(MODELS_DIR / "mlp.onnx")
    with pytest.raises(OptionError):
        sensitivity_scan(model, seeded_feeds(model, count=1), sparsities=(0.5, 0.2))


def pruned_matrix(sparsity: float, seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal((64, 64)).astype(np.float32)
    values[np.abs(values) < np.quantile(np.abs(values), sparsity)] = 0
    return values


def test_sparse_storage_breaks_even_at_two_thirds_with_int64_indices():
    assert sparse_bytes(pruned_matrix(0.6)) > pruned_matrix(0.6).nbytes
    assert sparse_bytes(pruned_matrix(0.7)) < pruned_matrix(0.7).nbytes


def test_sparse_initializers_run_in_onnxruntime_and_convert_back_exactly():
    model = load_model(MODELS_DIR / "mlp.onnx")
    for tensor in model.graph.initializer:
        if tensor.name == "fc2.weight":
            values = numpy_helper.to_array(tensor).copy()
            values[np.abs(values) < np.quantile(np.abs(values), 0.9)] = 0
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    sparse, decisions = to_sparse_initializers(model, storage="auto")
    assert [t.values.name for t in sparse.graph.sparse_initializer] == ["fc2.weight"]
    assert decisions["fc1.weight"]["stored_as"] == "dense" and decisions["fc2.weight"]["stored_as"] == "sparse"
    assert sparse.graph.sparse_initializer[0].indices.data_type == onnx.TensorProto.INT64
    onnx.checker.check_model(sparse)
    assert size_report(sparse)["raw_bytes"] < size_report(model)["raw_bytes"]
    feeds = seeded_feeds(model)
    session = open_session(sparse)
    for feed, expected in zip(feeds, run_model(model, feeds), strict=True):
        np.testing.assert_array_equal(session.run(None, feed)[0], expected[0])
    dense = to_dense_initializers(sparse)
    restored = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert sorted(restored) == sorted(original)
    for name, values in original.items():
        np.testing.assert_array_equal(restored[name], values)


def test_gzip_size_shows_what_zeros_are_worth_in_a_dense_file():
    model = load_model(MODELS_DIR / "mlp.onnx")
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor).copy()
        values[np.abs(values) < np.quantile(np.abs(values), 0.5)] = 0
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    sizes, dense_sizes = size_report(model), size_report(load_model(MODELS_DIR / "mlp.onnx"))
    assert sizes["raw_bytes"] == dense_sizes["raw_bytes"]
    assert sizes["gzip_bytes"] < 0.75 * dense_sizes["gzip_bytes"]
