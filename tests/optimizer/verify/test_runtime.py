import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.errors import OptionError, RuntimeSessionError
from optimizer.verify.runtime import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    IN_MEMORY_MODEL,
    ProviderChoice,
    create_session,
    external_data_locations,
    fallback_note,
    resolve_provider,
    run_session,
)
from tests.helpers.runtime import open_session

CUDA_AVAILABLE = CUDA_PROVIDER in onnxruntime.get_available_providers()


def matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def broken_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("NoSuchOperator", ["x"], ["y"])],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


WEIGHT = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


@pytest.mark.parametrize(
    "name", ["cpu", "CPU", " Cpu ", "CPUExecutionProvider", "cpuexecutionprovider"]
)
def test_resolve_cpu_aliases(name):
    assert resolve_provider(name) == ProviderChoice("cpu", (CPU_PROVIDER,), None)


def test_unknown_provider_lists_valid_names():
    with pytest.raises(OptionError, match="unknown execution provider 'tpu'") as info:
        resolve_provider("tpu")
    for valid in ("cpu", "cuda", CPU_PROVIDER, CUDA_PROVIDER):
        assert valid in str(info.value)


@pytest.mark.skipif(CUDA_AVAILABLE, reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "CUDA", CUDA_PROVIDER])
def test_cuda_falls_back_to_cpu_with_note(name):
    choice = resolve_provider(name)
    assert choice.requested == "cuda"
    assert choice.providers == (CPU_PROVIDER,)
    assert choice.note.startswith(f"CUDA requested but onnxruntime has no {CUDA_PROVIDER}")
    assert "installed: onnxruntime" in choice.note
    assert f"available: {', '.join(onnxruntime.get_available_providers())}" in choice.note
    assert choice.note.endswith("falling back to CPU")


@pytest.mark.skipif(CUDA_AVAILABLE, reason="this machine has CUDA")
def test_cuda_session_runs_on_cpu_and_says_so():
    choice = resolve_provider("cuda")
    _, provider_used = create_session(matmul_model(WEIGHT), choice)
    assert provider_used == CPU_PROVIDER
    assert fallback_note(choice, provider_used) == choice.note


def test_fallback_note_when_provider_silently_failed():
    choice = ProviderChoice("cuda", (CUDA_PROVIDER, CPU_PROVIDER), None)
    note = fallback_note(choice, CPU_PROVIDER)
    assert note is not None and "ran the model on CPUExecutionProvider" in note
    assert fallback_note(choice, CUDA_PROVIDER) is None


def test_path_bytes_and_proto_give_the_same_outputs(tmp_path):
    model = matmul_model(WEIGHT)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    feed = {"x": np.ones((2, 4), dtype=np.float32)}
    expected = feed["x"] @ WEIGHT
    for source in (model, model.SerializeToString(), path, str(path)):
        session, provider_used = create_session(source, resolve_provider("cpu"), threads=1)
        assert provider_used == CPU_PROVIDER
        np.testing.assert_allclose(run_session(session, feed, label="m")["y"], expected, rtol=1e-6)


def test_sessions_are_quiet_and_deterministic():
    session, _ = create_session(matmul_model(WEIGHT), resolve_provider("cpu"), threads=2)
    options = session.get_session_options()
    assert options.log_severity_level == 4  # fatal only: a failure is raised in onnxruntime's words
    assert options.use_deterministic_compute
    assert options.intra_op_num_threads == 2


def test_broken_model_error_quotes_onnxruntime():
    model_bytes = broken_model().SerializeToString()
    with pytest.raises(Exception) as raw:
        open_session(broken_model())
    raw_message = " ".join(str(raw.value).split())
    with pytest.raises(RuntimeSessionError) as info:
        create_session(model_bytes, resolve_provider("cpu"))
    message = str(info.value)
    assert message.startswith(f"onnxruntime cannot load {IN_MEMORY_MODEL}: ")
    assert raw_message in message
    assert "NoSuchOperator" in message


def test_missing_file_error_names_the_path(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(RuntimeSessionError, match=r"nope\.onnx"):
        create_session(missing, resolve_provider("cpu"))


@pytest.mark.parametrize("threads", [0, -1, 1.5])
def test_bad_thread_count(threads):
    with pytest.raises(OptionError, match="threads"):
        create_session(matmul_model(WEIGHT), resolve_provider("cpu"), threads=threads)


def test_unsupported_model_type():
    with pytest.raises(RuntimeSessionError, match="unsupported model type int"):
        create_session(42, resolve_provider("cpu"))


def test_external_data_path_loads_but_bare_proto_is_refused(tmp_path):
    model = matmul_model(np.ones((64, 32), dtype=np.float32))
    path = tmp_path / "big.onnx"
    onnx.save(model, path, save_as_external_data=True, location="big.onnx.data", size_threshold=0)
    session, _ = create_session(path, resolve_provider("cpu"))
    outputs = run_session(session, {"x": np.ones((1, 64), dtype=np.float32)}, label=str(path))
    np.testing.assert_allclose(outputs["y"], np.full((1, 32), 64.0))
    header = onnx.load(path, load_external_data=False)
    assert external_data_locations(header) == ["big.onnx.data"]
    assert external_data_locations(matmul_model(WEIGHT)) == []
    with pytest.raises(RuntimeSessionError, match="external data"):
        create_session(header, resolve_provider("cpu"))


def test_run_errors_name_the_model_and_input():
    session, _ = create_session(matmul_model(WEIGHT), resolve_provider("cpu"))
    with pytest.raises(RuntimeSessionError, match=r"cand\.onnx needs input\(s\) x"):
        run_session(session, {"z": np.ones((1, 4), np.float32)}, label="cand.onnx")
    with pytest.raises(RuntimeSessionError, match=r"onnxruntime failed to run cand\.onnx: .*"):
        run_session(session, {"x": np.ones((1, 5), np.float32)}, label="cand.onnx")


def test_extra_feed_entries_are_not_passed_to_the_session():
    session, _ = create_session(matmul_model(WEIGHT), resolve_provider("cpu"))
    feed = {"x": np.ones((1, 4), np.float32), "unused": np.zeros(3, np.int64)}
    assert run_session(session, feed, label="m")["y"].shape == (1, 3)
