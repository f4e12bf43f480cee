"""The bundled sample models: up to date with make_models.py, valid, runnable, and shaped as promised."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.helpers.runtime import open_session
from tests.helpers.samples import all_graphs

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
SCRIPT = MODELS_DIR / "make_models.py"
MODEL_NAMES = [
    "mlp", "cnn", "transformer_tied", "constant_weights", "if_subgraph", "loop_subgraph", "voice_activity", "decoder_kv"
]
DIM_PARAM_SIZES = {"batch": 3, "seq": 7, "past_seq": 5, "total_seq": 12}
INT_INPUT_HIGH = {"input_ids": 128, "attention_mask": 2}


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(MODELS_DIR / f"{name}.onnx"))


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded feeds for every graph input; int inputs stay in their valid index range."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        dims = tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else DIM_PARAM_SIZES[d.dim_param] for d in dims]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if dtype == np.bool_:
            feeds[value.name] = np.asarray(True)
        elif np.issubdtype(dtype, np.integer):
            feeds[value.name] = rng.integers(0, INT_INPUT_HIGH[value.name], shape, dtype=dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run(name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = open_session(MODELS_DIR / f"{name}.onnx")
    return session.run(None, feeds)


def initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def test_committed_models_match_a_fresh_regeneration(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    regenerated = sorted(p.name for p in tmp_path.glob("*.onnx"))
    committed = sorted(p.name for p in MODELS_DIR.glob("*.onnx"))
    assert regenerated == committed == sorted(f"{n}.onnx" for n in MODEL_NAMES)
    stale = [n for n in regenerated if (tmp_path / n).read_bytes() != (MODELS_DIR / n).read_bytes()]
    assert not stale, f"run `python models/make_models.py` and commit: {stale}"


def test_samples_stay_small() -> None:
    total_bytes = sum((MODELS_DIR / f"{n}.onnx").stat().st_size for n in MODEL_NAMES)
    assert total_bytes < 2_000_000


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_full_checker_passes(name: str) -> None:
    onnx.checker.check_model(load(name), full_check=True)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_onnxruntime_outputs_are_finite(name: str) -> None:
    model = load(name)
    outputs = run(name, random_feeds(model))
    assert len(outputs) == len(model.graph.output)
    for value, output in zip(model.graph.output, outputs, strict=True):
        assert np.isfinite(output).all(), value.name
        assert output.shape[0] == DIM_PARAM_SIZES["batch"], value.name


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_metadata_doc_string_and_producer(name: str) -> None:
    model = load(name)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    assert metadata["sample"] == name
    assert metadata["purpose"]
    assert name in model.doc_string
    assert model.producer_name == "onnx-compress/make_models"
    assert model.ir_version in (8, 9)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_nodes_have_unique_names_and_batch_is_dynamic(name: str) -> None:
    model = load(name)
    node_names = [node.name for graph in all_graphs(model.graph) for node in graph.node]
    assert all(node_names) and len(node_names) == len(set(node_names))
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims:
            assert dims[0].dim_param == "batch", value.name


def test_transformer_ties_embedding_to_a_stored_transpose() -> None:
    graph = load("transformer_tied").graph
    weights = initializers(graph)
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in weights]
    assert [n.input[0] for n in gathers] == ["embed.weight"]
    embedding = weights["embed.weight"]
    assert embedding.shape == (512, 64)
    tied = [
        n.input[1]
        for n in graph.node
        if n.op_type == "MatMul" and n.input[1] in weights and weights[n.input[1]].shape == embedding.T.shape
        and np.array_equal(weights[n.input[1]], embedding.T)
    ]
    assert tied == ["lm_head.weight"]
    assert [o.name for o in graph.output] == ["logits", "hidden"]


def test_transformer_accepts_any_sequence_length_up_to_max() -> None:
    for seq_len in (1, 32):
        ids = np.arange(2 * seq_len, dtype=np.int64).reshape(2, seq_len) % 512
        logits, hidden = run("transformer_tied", {"input_ids": ids})
        assert logits.shape == (2, seq_len, 512) and hidden.shape == (2, seq_len, 64)


def test_constant_weights_has_only_constant_nodes_one_shared() -> None:
    graph = load("constant_weights").graph
    assert len(graph.initializer) == 0
    constant_outputs = [n.output[0] for n in graph.node if n.op_type == "Constant"]
    assert len(constant_outputs) >= 4
    uses = Counter(name for n in graph.node for name in n.input if name in constant_outputs)
    assert [name for name, count in uses.items() if count == 2] == ["conv2d_1.w_0"]
    assert {n.op_type for n in graph.node} >= {"Conv", "Reshape", "MatMul"}


def outer_weight_readers(model: onnx.ModelProto, control_op: str) -> tuple[list[str], list[str]]:
    """Node names reading shared.weight in the main graph and inside the control op's subgraphs."""
    graph = model.graph
    assert "shared.weight" in initializers(graph)
    outer = [n.name for n in graph.node if "shared.weight" in n.input]
    control = [n for n in graph.node if n.op_type == control_op]
    assert len(control) == 1
    inner = []
    for attr in control[0].attribute:
        assert attr.type == onnx.AttributeProto.GRAPH
        assert "shared.weight" not in initializers(attr.g)
        assert any(initializers(attr.g)) or any(n.op_type == "Constant" for n in attr.g.node)
        inner += [n.name for n in attr.g.node if "shared.weight" in n.input]
    return outer, inner


def test_if_branches_read_the_outer_weight() -> None:
    outer, inner = outer_weight_readers(load("if_subgraph"), "If")
    assert outer == ["pre.matmul"]
    assert sorted(inner) == ["branch_a.matmul", "branch_b.matmul"]


def test_if_branches_compute_different_outputs() -> None:
    feeds = random_feeds(load("if_subgraph"))
    (branch_a,) = run("if_subgraph", {**feeds, "use_branch_a": np.asarray(True)})
    (branch_b,) = run("if_subgraph", {**feeds, "use_branch_a": np.asarray(False)})
    assert not np.allclose(branch_a, branch_b)


def test_loop_body_reads_the_outer_weight() -> None:
    model = load("loop_subgraph")
    outer, inner = outer_weight_readers(model, "Loop")
    assert outer == ["pre.matmul"]
    assert inner == ["body.matmul"]
    loop = next(n for n in model.graph.node if n.op_type == "Loop")
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    assert producers[loop.input[0]] == "Constant"


def test_cnn_has_the_ops_structured_pruning_must_handle() -> None:
    graph = load("cnn").graph
    weights = initializers(graph)
    op_types = {n.op_type for n in graph.node}
    assert op_types >= {"Conv", "BatchNormalization", "Relu", "MaxPool", "GlobalAveragePool", "Gemm", "Add"}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs}
    out_channels = {n.name: weights[n.input[1]].shape[0] for n in convs}
    depthwise = [name for name, group in groups.items() if group > 1 and group == out_channels[name]]
    assert depthwise == ["dw.conv"]
    producers = {out: n.op_type for n in graph.node for out in n.output}
    adds = [n for n in graph.node if n.op_type == "Add"]
    residual = [n for n in adds if all(producers.get(i) in ("Conv", "Relu") for i in n.input)]
    assert [n.name for n in residual] == ["res.add"]


def test_mlp_spells_dense_layers_three_ways() -> None:
    graph = load("mlp").graph
    assert [n.op_type for n in graph.node] == ["Gemm", "Relu", "MatMul", "Add", "Relu", "Gemm"]
    trans_b = [next((a.i for a in n.attribute if a.name == "transB"), 0) for n in graph.node if n.op_type == "Gemm"]
    assert trans_b == [1, 0]


def test_decoder_kv_continues_from_its_cache_as_from_the_whole_sequence() -> None:
    ids = np.random.default_rng(0).integers(0, 128, (2, 12), dtype=np.int64)
    empty = {f"past_key_values.{layer}.{part}": np.zeros((2, 2, 0, 16), np.float32)
             for layer in range(2) for part in ("key", "value")}
    whole = run("decoder_kv", {"input_ids": ids, "attention_mask": np.ones((2, 12), np.int64), **empty})
    first = run("decoder_kv", {"input_ids": ids[:, :9], "attention_mask": np.ones((2, 9), np.int64), **empty})
    cache = dict(zip(empty, first[1:], strict=True))
    rest = run("decoder_kv", {"input_ids": ids[:, 9:], "attention_mask": np.ones((2, 12), np.int64), **cache})
    np.testing.assert_allclose(rest[0], whole[0][:, 9:], atol=1e-4)
    np.testing.assert_allclose(first[0], whole[0][:, :9], atol=1e-4)
    assert [value.shape for value in rest[1:]] == [(2, 2, 12, 16)] * 4
    padded = np.ones((2, 12), np.int64)
    padded[:, 0] = 0  # a padded first position changes what later tokens see
    masked = run("decoder_kv", {"input_ids": ids, "attention_mask": padded, **empty})
    assert not np.allclose(masked[0][:, 1:], whole[0][:, 1:], atol=1e-3)
