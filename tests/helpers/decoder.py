"""A tiny decoder language model with a KV cache in standard ONNX ops, in the layout
onnxruntime-genai's builder writes: ``input_ids``, ``attention_mask``, ``past_key_values.N.key|value``
in ([batch, heads, past, head_size]), ``logits`` and ``present.N.key|value`` out, a tied
embedding / LM head, causal attention over past and new tokens. Seeded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB = 128
HIDDEN = 32
HEADS = 2
HEAD_SIZE = 6
LAYERS = 2


def decoder_model(
    seed: int = 0, symbolic_head: bool = True, mask_type: int = TensorProto.INT64, positions: bool = False
) -> onnx.ModelProto:
    """The decoder; ``symbolic_head`` names the cache's head dims (as the builder's ``kv_cache_dim``);
    ``mask_type`` is the mask's element type; ``positions`` adds a ``position_ids`` input whose rows
    of a position table are added to the embedding."""
    rng = np.random.default_rng(seed)
    heads = "kv_heads" if symbolic_head else HEADS
    size = "kv_cache_dim" if symbolic_head else HEAD_SIZE
    nodes, weights = _shared_nodes(mask_type), {"table": rng.normal(0, 1, (VOCAB, HIDDEN)).astype(np.float32)}
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", mask_type, ["batch", "total"]),
    ]
    if positions:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]))
        weights["positions"] = rng.normal(0, 1, (64, HIDDEN)).astype(np.float32)
        nodes += [
            helper.make_node("Gather", ["positions", "position_ids"], ["placed"]),
            helper.make_node("Add", ["looked_up", "placed"], ["embedded"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["looked_up"], ["embedded"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])]
    hidden = "embedded"
    for layer in range(LAYERS):
        for part in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{layer}.{part}", TensorProto.FLOAT, ["batch", heads, "past", size]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{layer}.{part}", TensorProto.FLOAT, ["batch", heads, "total", size]
                )
            )
        hidden = _layer(nodes, weights, rng, layer, hidden)
    nodes += [
        helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
        helper.make_node("MatMul", [hidden, "table_t"], ["logits"]),
    ]
    initializers = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    initializers.append(numpy_helper.from_array(np.array([0, 0, HEADS, HEAD_SIZE], np.int64), "split_heads"))
    initializers.append(numpy_helper.from_array(np.array([0, 0, HEADS * HEAD_SIZE], np.int64), "merge_heads"))
    graph = helper.make_graph(nodes, "kv_decoder", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    onnx.checker.check_model(model, full_check=True)
    return model


def _shared_nodes(mask_type: int) -> list[onnx.NodeProto]:
    """Embedding lookup and the causal mask [new, total] (True where a token may attend), padding
    (mask 0) excluded."""
    return [
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1, np.int64))),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Constant", [], ["last_axis"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Constant", [], ["blocked"], value=numpy_helper.from_array(np.array(-1e9, np.float32))),
        helper.make_node("Constant", [], ["head_axes"], value=numpy_helper.from_array(np.array([1, 2], np.int64))),
        helper.make_node("Gather", ["table", "input_ids"], ["looked_up"]),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["ids_shape", "one"], ["new_count"], axis=0),
        helper.make_node("Gather", ["mask_shape", "one"], ["total_count"], axis=0),
        helper.make_node("Sub", ["total_count", "new_count"], ["past_count"]),
        helper.make_node("Range", ["past_count", "total_count", "one"], ["rows"]),
        helper.make_node("Range", ["zero", "total_count", "one"], ["columns"]),
        helper.make_node("Unsqueeze", ["rows", "last_axis"], ["rows_2d"]),
        helper.make_node("LessOrEqual", ["columns", "rows_2d"], ["ordered"]),
        helper.make_node("Cast", ["attention_mask"], ["kept"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", ["kept", "head_axes"], ["kept_4d"]),
        helper.make_node("And", ["ordered", "kept_4d"], ["causal"]),
    ]


def _layer(nodes: list, weights: dict, rng: np.random.Generator, layer: int, hidden: str) -> str:
    """One attention block with a residual; returns its output's name."""
    name = f"l{layer}"
    width = HEADS * HEAD_SIZE
    for part in ("q", "k", "v", "o"):
        shape = (width, HIDDEN) if part == "o" else (HIDDEN, width)
        weights[f"{name}.{part}"] = rng.normal(0, 0.4, shape).astype(np.float32)
    heads = {}
    for part, cache in (("q", None), ("k", "key"), ("v", "value")):
        nodes += [
            helper.make_node("MatMul", [hidden, f"{name}.{part}"], [f"{name}.{part}_flat"]),
            helper.make_node("Reshape", [f"{name}.{part}_flat", "split_heads"], [f"{name}.{part}_split"]),
            helper.make_node("Transpose", [f"{name}.{part}_split"], [f"{name}.{part}_heads"], perm=[0, 2, 1, 3]),
        ]
        heads[part] = f"{name}.{part}_heads"
        if cache is not None:
            nodes.append(
                helper.make_node(
                    "Concat", [f"past_key_values.{layer}.{cache}", heads[part]], [f"present.{layer}.{cache}"], axis=2
                )
            )
            heads[part] = f"present.{layer}.{cache}"
    nodes += [
        helper.make_node("Transpose", [heads["k"]], [f"{name}.k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", [heads["q"], f"{name}.k_t"], [f"{name}.scores"]),
        helper.make_node("Where", ["causal", f"{name}.scores", "blocked"], [f"{name}.masked"]),
        helper.make_node("Softmax", [f"{name}.masked"], [f"{name}.weights"], axis=-1),
        helper.make_node("MatMul", [f"{name}.weights", heads["v"]], [f"{name}.mixed"]),
        helper.make_node("Transpose", [f"{name}.mixed"], [f"{name}.mixed_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{name}.mixed_t", "merge_heads"], [f"{name}.merged"]),
        helper.make_node("MatMul", [f"{name}.merged", f"{name}.o"], [f"{name}.out"]),
        helper.make_node("Add", [hidden, f"{name}.out"], [f"{name}.residual"]),
    ]
    return f"{name}.residual"


def write_decoder(
    folder: Path, *, seed: int = 0, symbolic_head: bool = True, genai_config: bool = True, **kinds
) -> Path:
    """``folder/model.onnx`` and, when asked, the ``genai_config.json`` that names its cache sizes;
    ``kinds``: ``decoder_model``'s ``mask_type`` and ``positions``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(decoder_model(seed, symbolic_head, **kinds), path)
    if genai_config:
        decoder = {
            "filename": path.name,
            "head_size": HEAD_SIZE,
            "num_key_value_heads": HEADS,
            "num_hidden_layers": LAYERS,
        }
        (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": decoder}}))
    return path
