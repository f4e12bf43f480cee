"""Write the bundled sample models that the passes and tests of onnx-compress run on.

Each model is small, built with onnx.helper only, and byte-identical on every run (fixed seeds,
deterministic serialization), so a stale committed file is caught by a test.

Usage: python models/make_models.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
PRODUCER_NAME = "onnx-compress/make_models"
PRODUCER_VERSION = "0.1.0"
BATCH = "batch"
SEQ = "seq"

VOCAB_SIZE = 512
MODEL_DIM = 64
MAX_SEQ_LEN = 32
NUM_HEADS = 2
FFN_DIM = 256
VOICE_HIDDEN = 64
VOICE_CHANNELS = 32


def he_normal(rng: np.random.Generator, shape: Sequence[int], fan_in: int) -> np.ndarray:
    """He-scaled normal weights, so activations keep a realistic scale through Relu layers."""
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def xavier_normal(rng: np.random.Generator, shape: Sequence[int], fan_in: int, fan_out: int) -> np.ndarray:
    """Xavier-scaled normal weights for layers not followed by Relu (attention, heads)."""
    return (rng.standard_normal(shape) * np.sqrt(2.0 / (fan_in + fan_out))).astype(np.float32)


def small_normal(rng: np.random.Generator, shape: Sequence[int], std: float = 0.02) -> np.ndarray:
    """Small biases and embeddings, the magnitudes trained models tend to have."""
    return (rng.standard_normal(shape) * std).astype(np.float32)


def tensor(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def int64s(name: str, values: Sequence[int]) -> TensorProto:
    return tensor(name, np.asarray(values, dtype=np.int64))


def scalar(name: str, value: float) -> TensorProto:
    return tensor(name, np.asarray(value, dtype=np.float32))


def constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    """A Constant node named after its output, the way paddle2onnx and torch exports hold weights."""
    return helper.make_node("Constant", [], [name], name=f"{name}.const", value=tensor(name, array))


def float_info(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def conv3x3(name: str, inputs: list[str], out: str, group: int = 1) -> onnx.NodeProto:
    """A 3x3 'same' Conv; every Conv in the samples is one."""
    return helper.make_node("Conv", inputs, [out], name=name, kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=group)


def finish_model(
    graph: onnx.GraphProto, sample: str, purpose: str, extra_metadata: dict[str, str] | None = None
) -> onnx.ModelProto:
    """Stamp producer, doc string and metadata that round-trip tests expect to survive."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
        doc_string=f"onnx-compress sample '{sample}': {purpose}",
    )
    model.ir_version = IR_VERSION
    metadata = {"sample": sample, "purpose": purpose, **(extra_metadata or {})}
    helper.set_model_props(model, metadata)
    return model


def build_mlp() -> onnx.ModelProto:
    """Gemm (transB=1) -> MatMul+Add -> Gemm (transB=0): the three dense-layer spellings exporters use."""
    rng = np.random.default_rng(1001)
    fc1_weight = he_normal(rng, (128, 64), 64)
    fc1_weight[::8] *= 1e-3  # 16 near-dead neurons: obvious candidates for magnitude pruning
    inits = [
        tensor("fc1.weight", fc1_weight),
        tensor("fc1.bias", small_normal(rng, (128,))),
        tensor("fc2.weight", he_normal(rng, (128, 128), 128)),
        tensor("fc2.bias", small_normal(rng, (128,))),
        tensor("fc3.weight", xavier_normal(rng, (128, 10), 128, 10)),
        tensor("fc3.bias", small_normal(rng, (10,))),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["fc1.out"], name="fc1.gemm", transB=1),
        helper.make_node("Relu", ["fc1.out"], ["relu1.out"], name="relu1"),
        helper.make_node("MatMul", ["relu1.out", "fc2.weight"], ["fc2.matmul_out"], name="fc2.matmul"),
        helper.make_node("Add", ["fc2.matmul_out", "fc2.bias"], ["fc2.out"], name="fc2.add"),
        helper.make_node("Relu", ["fc2.out"], ["relu2.out"], name="relu2"),
        helper.make_node("Gemm", ["relu2.out", "fc3.weight", "fc3.bias"], ["logits"], name="fc3.gemm"),
    ]
    graph = helper.make_graph(nodes, "mlp", [float_info("x", [BATCH, 64])], [float_info("logits", [BATCH, 10])], inits)
    return finish_model(graph, "mlp", "dense layers as Gemm and MatMul+Add; 16 low-magnitude fc1 rows")


def batch_norm_params(rng: np.random.Generator, prefix: str, channels: int) -> list[TensorProto]:
    """BatchNormalization statistics that differ from identity, so folding them changes weights."""
    return [
        tensor(f"{prefix}.scale", (1.0 + 0.1 * rng.standard_normal(channels)).astype(np.float32)),
        tensor(f"{prefix}.bias", small_normal(rng, (channels,), 0.1)),
        tensor(f"{prefix}.mean", small_normal(rng, (channels,), 0.1)),
        tensor(f"{prefix}.var", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
    ]


def batch_norm(prefix: str, x: str, out: str) -> onnx.NodeProto:
    inputs = [x] + [f"{prefix}.{p}" for p in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", inputs, [out], name=prefix, epsilon=1e-5)


def build_cnn() -> onnx.ModelProto:
    """Conv+BN+Relu stages, a residual Add and a depthwise Conv: what structured pruning must respect."""
    rng = np.random.default_rng(1002)
    inits = [
        tensor("conv1.weight", he_normal(rng, (16, 3, 3, 3), 27)),
        *batch_norm_params(rng, "bn1", 16),
        tensor("conv2.weight", he_normal(rng, (32, 16, 3, 3), 144)),
        tensor("conv2.bias", small_normal(rng, (32,))),
        *batch_norm_params(rng, "bn2", 32),
        tensor("res.conv.weight", he_normal(rng, (32, 32, 3, 3), 288)),
        tensor("res.conv.bias", small_normal(rng, (32,))),
        tensor("dw.conv.weight", he_normal(rng, (32, 1, 3, 3), 9)),
        tensor("dw.conv.bias", small_normal(rng, (32,))),
        tensor("fc.weight", xavier_normal(rng, (10, 32), 32, 10)),
        tensor("fc.bias", small_normal(rng, (10,))),
    ]
    nodes = [
        conv3x3("conv1", ["image", "conv1.weight"], "conv1.out"),
        batch_norm("bn1", "conv1.out", "bn1.out"),
        helper.make_node("Relu", ["bn1.out"], ["relu1.out"], name="relu1"),
        helper.make_node("MaxPool", ["relu1.out"], ["pool1.out"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        conv3x3("conv2", ["pool1.out", "conv2.weight", "conv2.bias"], "conv2.out"),
        batch_norm("bn2", "conv2.out", "bn2.out"),
        helper.make_node("Relu", ["bn2.out"], ["relu2.out"], name="relu2"),
        conv3x3("res.conv", ["relu2.out", "res.conv.weight", "res.conv.bias"], "res.conv.out"),
        helper.make_node("Add", ["res.conv.out", "relu2.out"], ["res.add.out"], name="res.add"),
        helper.make_node("Relu", ["res.add.out"], ["relu3.out"], name="relu3"),
        conv3x3("dw.conv", ["relu3.out", "dw.conv.weight", "dw.conv.bias"], "dw.conv.out", group=32),
        helper.make_node("Relu", ["dw.conv.out"], ["relu4.out"], name="relu4"),
        helper.make_node("GlobalAveragePool", ["relu4.out"], ["gap.out"], name="gap"),
        helper.make_node("Flatten", ["gap.out"], ["flatten.out"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flatten.out", "fc.weight", "fc.bias"], ["logits"], name="fc.gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn", [float_info("image", [BATCH, 3, 32, 32])], [float_info("logits", [BATCH, 10])], inits
    )
    return finish_model(graph, "cnn", "Conv/BN/Relu/MaxPool, residual Add, depthwise Conv, Gemm head")


def attention_nodes(x: str, out: str) -> list[onnx.NodeProto]:
    """Two-head self-attention written out op by op, as torch.onnx exports it without fusion."""
    nodes: list[onnx.NodeProto] = []
    for proj in ("q", "k", "v"):
        p = f"attn.{proj}"
        perm = [0, 2, 3, 1] if proj == "k" else [0, 2, 1, 3]
        nodes += [
            helper.make_node("MatMul", [x, f"{p}.weight"], [f"{p}.matmul_out"], name=f"{p}.matmul"),
            helper.make_node("Add", [f"{p}.matmul_out", f"{p}.bias"], [f"{p}.out"], name=f"{p}.add"),
            helper.make_node("Reshape", [f"{p}.out", "attn.split_heads_shape"], [f"{p}.heads"], name=f"{p}.reshape"),
            helper.make_node("Transpose", [f"{p}.heads"], [f"{p}.t"], name=f"{p}.transpose", perm=perm),
        ]
    nodes += [
        helper.make_node("MatMul", ["attn.q.t", "attn.k.t"], ["attn.scores_raw"], name="attn.scores"),
        helper.make_node("Mul", ["attn.scores_raw", "attn.scale"], ["attn.scores_scaled"], name="attn.scale_mul"),
        helper.make_node("Softmax", ["attn.scores_scaled"], ["attn.probs"], name="attn.softmax", axis=-1),
        helper.make_node("MatMul", ["attn.probs", "attn.v.t"], ["attn.context"], name="attn.context_matmul"),
        helper.make_node(
            "Transpose", ["attn.context"], ["attn.context_t"], name="attn.context_transpose", perm=[0, 2, 1, 3]
        ),
        helper.make_node(
            "Reshape", ["attn.context_t", "attn.merge_heads_shape"], ["attn.merged"], name="attn.merge_reshape"
        ),
        helper.make_node("MatMul", ["attn.merged", "attn.o.weight"], ["attn.o.matmul_out"], name="attn.o.matmul"),
        helper.make_node("Add", ["attn.o.matmul_out", "attn.o.bias"], [out], name="attn.o.add"),
    ]
    return nodes


def feed_forward_nodes(x: str, out: str) -> list[onnx.NodeProto]:
    """MatMul -> exact Gelu spelled with Erf (opset 17 has no Gelu op) -> MatMul."""
    return [
        helper.make_node("MatMul", [x, "ffn.up.weight"], ["ffn.up.matmul_out"], name="ffn.up.matmul"),
        helper.make_node("Add", ["ffn.up.matmul_out", "ffn.up.bias"], ["ffn.up.out"], name="ffn.up.add"),
        helper.make_node("Div", ["ffn.up.out", "gelu.sqrt2"], ["gelu.div_out"], name="gelu.div"),
        helper.make_node("Erf", ["gelu.div_out"], ["gelu.erf_out"], name="gelu.erf"),
        helper.make_node("Add", ["gelu.erf_out", "gelu.one"], ["gelu.add_out"], name="gelu.add"),
        helper.make_node("Mul", ["ffn.up.out", "gelu.add_out"], ["gelu.mul_out"], name="gelu.mul"),
        helper.make_node("Mul", ["gelu.mul_out", "gelu.half"], ["gelu.out"], name="gelu.half_mul"),
        helper.make_node("MatMul", ["gelu.out", "ffn.down.weight"], ["ffn.down.matmul_out"], name="ffn.down.matmul"),
        helper.make_node("Add", ["ffn.down.matmul_out", "ffn.down.bias"], [out], name="ffn.down.add"),
    ]


def layer_norm(prefix: str, x: str, out: str) -> onnx.NodeProto:
    return helper.make_node(
        "LayerNormalization", [x, f"{prefix}.weight", f"{prefix}.bias"], [out], name=prefix, axis=-1, epsilon=1e-5
    )


def layer_norm_params(rng: np.random.Generator, prefix: str) -> list[TensorProto]:
    return [
        tensor(f"{prefix}.weight", (1.0 + 0.05 * rng.standard_normal(MODEL_DIM)).astype(np.float32)),
        tensor(f"{prefix}.bias", small_normal(rng, (MODEL_DIM,))),
    ]


def transformer_initializers(rng: np.random.Generator) -> list[TensorProto]:
    """Weights of the tiny encoder; lm_head.weight is embed.weight transposed and stored again."""
    embedding = small_normal(rng, (VOCAB_SIZE, MODEL_DIM))
    head_dim = MODEL_DIM // NUM_HEADS
    inits = [
        tensor("embed.weight", embedding),
        tensor("pos_embed.weight", small_normal(rng, (MAX_SEQ_LEN, MODEL_DIM))),
        *layer_norm_params(rng, "ln_embed"),
    ]
    for proj in ("q", "k", "v", "o"):
        weight = xavier_normal(rng, (MODEL_DIM, MODEL_DIM), MODEL_DIM, MODEL_DIM)
        inits.append(tensor(f"attn.{proj}.weight", weight))
        inits.append(tensor(f"attn.{proj}.bias", small_normal(rng, (MODEL_DIM,))))
    inits += [
        *layer_norm_params(rng, "ln_attn"),
        tensor("ffn.up.weight", he_normal(rng, (MODEL_DIM, FFN_DIM), MODEL_DIM)),
        tensor("ffn.up.bias", small_normal(rng, (FFN_DIM,))),
        tensor("ffn.down.weight", xavier_normal(rng, (FFN_DIM, MODEL_DIM), FFN_DIM, MODEL_DIM)),
        tensor("ffn.down.bias", small_normal(rng, (MODEL_DIM,))),
        *layer_norm_params(rng, "ln_ffn"),
        tensor("lm_head.weight", embedding.T.copy()),
        int64s("attn.split_heads_shape", [0, 0, NUM_HEADS, head_dim]),
        int64s("attn.merge_heads_shape", [0, 0, MODEL_DIM]),
        scalar("attn.scale", 1.0 / np.sqrt(head_dim)),
        scalar("gelu.sqrt2", np.sqrt(2.0)),
        scalar("gelu.one", 1.0),
        scalar("gelu.half", 0.5),
        int64s("slice.zero", [0]),
        int64s("slice.one", [1]),
        int64s("slice.two", [2]),
    ]
    return inits


def build_transformer_tied() -> onnx.ModelProto:
    """A one-block encoder LM whose output head repeats the embedding as a separate transposed copy."""
    rng = np.random.default_rng(1003)
    nodes = [
        helper.make_node("Gather", ["embed.weight", "input_ids"], ["embed.out"], name="embed.gather", axis=0),
        helper.make_node("Shape", ["input_ids"], ["ids.shape"], name="ids.shape_op"),
        helper.make_node(
            "Slice", ["ids.shape", "slice.one", "slice.two", "slice.zero"], ["seq_len"], name="seq_len.slice"
        ),
        helper.make_node(
            "Slice",
            ["pos_embed.weight", "slice.zero", "seq_len", "slice.zero"],
            ["pos_embed.out"],
            name="pos_embed.slice",
        ),
        helper.make_node("Add", ["embed.out", "pos_embed.out"], ["embed.sum"], name="embed.add_pos"),
        layer_norm("ln_embed", "embed.sum", "ln_embed.out"),
        *attention_nodes("ln_embed.out", "attn.out"),
        helper.make_node("Add", ["ln_embed.out", "attn.out"], ["attn.residual"], name="attn.residual_add"),
        layer_norm("ln_attn", "attn.residual", "ln_attn.out"),
        *feed_forward_nodes("ln_attn.out", "ffn.out"),
        helper.make_node("Add", ["ln_attn.out", "ffn.out"], ["ffn.residual"], name="ffn.residual_add"),
        layer_norm("ln_ffn", "ffn.residual", "hidden"),
        helper.make_node("MatMul", ["hidden", "lm_head.weight"], ["logits"], name="lm_head.matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "transformer_tied",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [BATCH, SEQ])],
        [float_info("logits", [BATCH, SEQ, VOCAB_SIZE]), float_info("hidden", [BATCH, SEQ, MODEL_DIM])],
        transformer_initializers(rng),
    )
    purpose = f"tiny encoder LM, seq <= {MAX_SEQ_LEN}; lm_head.weight is a stored copy of embed.weight.T"
    return finish_model(graph, "transformer_tied", purpose)


def build_constant_weights() -> onnx.ModelProto:
    """No initializers: every weight is a Constant node, as in paddle2onnx (PP-OCR) exports."""
    rng = np.random.default_rng(1004)
    nodes = [
        constant("conv2d_0.w_0", he_normal(rng, (8, 3, 3, 3), 27)),
        constant("conv2d_0.b_0", small_normal(rng, (8,))),
        constant("conv2d_1.w_0", he_normal(rng, (8, 8, 3, 3), 72)),
        constant("reshape_0.shape", np.asarray([-1, 8], dtype=np.int64)),
        constant("fc_0.w_0", xavier_normal(rng, (8, 10), 8, 10)),
        constant("fc_0.b_0", small_normal(rng, (10,))),
    ]
    nodes += [
        conv3x3("conv2d_0", ["image", "conv2d_0.w_0", "conv2d_0.b_0"], "conv2d_0.out"),
        helper.make_node("Relu", ["conv2d_0.out"], ["relu_0.out"], name="relu_0"),
        conv3x3("conv2d_1", ["relu_0.out", "conv2d_1.w_0"], "conv2d_1.out"),
        helper.make_node(
            "HardSigmoid", ["conv2d_1.out"], ["hard_sigmoid_0.out"], name="hard_sigmoid_0", alpha=0.2, beta=0.5
        ),
        conv3x3("conv2d_2", ["hard_sigmoid_0.out", "conv2d_1.w_0"], "conv2d_2.out"),
        helper.make_node("Relu", ["conv2d_2.out"], ["relu_1.out"], name="relu_1"),
        helper.make_node("GlobalAveragePool", ["relu_1.out"], ["pool_0.out"], name="pool_0"),
        helper.make_node("Reshape", ["pool_0.out", "reshape_0.shape"], ["reshape_0.out"], name="reshape_0"),
        helper.make_node("MatMul", ["reshape_0.out", "fc_0.w_0"], ["fc_0.matmul_out"], name="fc_0.matmul"),
        helper.make_node("Add", ["fc_0.matmul_out", "fc_0.b_0"], ["logits"], name="fc_0.add"),
    ]
    graph = helper.make_graph(
        nodes, "constant_weights", [float_info("image", [BATCH, 3, 16, 16])], [float_info("logits", [BATCH, 10])]
    )
    purpose = "all weights in Constant nodes, no initializers; conv2d_1.w_0 feeds two Convs"
    return finish_model(graph, "constant_weights", purpose, {"character_dict": "\n".join("0123456789")})


def build_if_subgraph() -> onnx.ModelProto:
    """An If whose two branches both read the outer initializer shared.weight, also used before the If."""
    rng = np.random.default_rng(1005)
    then_branch = helper.make_graph(
        [
            helper.make_node("MatMul", ["pre.out", "shared.weight"], ["branch_a.matmul_out"], name="branch_a.matmul"),
            helper.make_node("Add", ["branch_a.matmul_out", "branch_a.bias"], ["branch_a.out"], name="branch_a.add"),
        ],
        "branch_a",
        [],
        [float_info("branch_a.out", [BATCH, 32])],
        [tensor("branch_a.bias", small_normal(rng, (32,), 0.1))],
    )
    else_branch = helper.make_graph(
        [
            constant("branch_b.scale", rng.uniform(0.5, 1.5, 32).astype(np.float32)),
            helper.make_node("MatMul", ["pre.out", "shared.weight"], ["branch_b.matmul_out"], name="branch_b.matmul"),
            helper.make_node("Mul", ["branch_b.matmul_out", "branch_b.scale"], ["branch_b.out"], name="branch_b.mul"),
        ],
        "branch_b",
        [],
        [float_info("branch_b.out", [BATCH, 32])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "shared.weight"], ["pre.matmul_out"], name="pre.matmul"),
        helper.make_node("Relu", ["pre.matmul_out"], ["pre.out"], name="pre.relu"),
        helper.make_node(
            "If", ["use_branch_a"], ["y"], name="branch.if", then_branch=then_branch, else_branch=else_branch
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "if_subgraph",
        [float_info("x", [BATCH, 32]), helper.make_tensor_value_info("use_branch_a", TensorProto.BOOL, [])],
        [float_info("y", [BATCH, 32])],
        [tensor("shared.weight", he_normal(rng, (32, 32), 32))],
    )
    purpose = "If branches use outer-scope shared.weight plus their own initializer or Constant"
    return finish_model(graph, "if_subgraph", purpose)


def build_loop_subgraph() -> onnx.ModelProto:
    """A Loop (2 trips) whose body reads the outer initializer shared.weight, also used before the Loop.

    body.iter is a declared scalar because onnxruntime needs its shape; the condition is left
    unshaped because onnx shape inference types it as [1] while onnxruntime feeds a scalar.
    """
    rng = np.random.default_rng(1006)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["body.h_in", "shared.weight"], ["body.matmul_out"], name="body.matmul"),
            helper.make_node("Add", ["body.matmul_out", "body.bias"], ["body.add_out"], name="body.add"),
            helper.make_node("Tanh", ["body.add_out"], ["body.h_out"], name="body.tanh"),
            helper.make_node("Identity", ["body.cond_in"], ["body.cond_out"], name="body.cond_identity"),
        ],
        "loop_body",
        [
            helper.make_tensor_value_info("body.iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("body.cond_in", TensorProto.BOOL, None),
            float_info("body.h_in", [BATCH, 32]),
        ],
        [
            helper.make_tensor_value_info("body.cond_out", TensorProto.BOOL, None),
            float_info("body.h_out", [BATCH, 32]),
        ],
        [tensor("body.bias", small_normal(rng, (32,), 0.1))],
    )
    nodes = [
        constant("loop.trip_count", np.asarray(2, dtype=np.int64)),
        constant("loop.cond", np.asarray(True)),
        helper.make_node("MatMul", ["x", "shared.weight"], ["pre.out"], name="pre.matmul"),
        helper.make_node("Loop", ["loop.trip_count", "loop.cond", "pre.out"], ["y"], name="loop", body=body),
    ]
    graph = helper.make_graph(
        nodes,
        "loop_subgraph",
        [float_info("x", [BATCH, 32])],
        [float_info("y", [BATCH, 32])],
        [tensor("shared.weight", xavier_normal(rng, (32, 32), 32, 32))],
    )
    purpose = "Loop body uses outer-scope shared.weight plus its own initializer; trip count from a Constant"
    return finish_model(graph, "loop_subgraph", purpose)


def _voice_branch(prefix: str, index: int, head: list[onnx.NodeProto], head_input: str) -> onnx.GraphProto:
    """Conv front end and LSTM whose weights are sliced out of outer-scope stacks (index ``index``)."""
    take = [int64s(f"{prefix}.start", [index]), int64s(f"{prefix}.end", [index + 1]), int64s(f"{prefix}.axes", [0])]
    sliced = [f"{prefix}.start", f"{prefix}.end", f"{prefix}.axes"]
    nodes = [
        helper.make_node(
            "Slice", ["encoder.weight_stack", *sliced], [f"{prefix}.conv_w4"], name=f"{prefix}.conv_slice"
        ),
        helper.make_node(
            "Squeeze", [f"{prefix}.conv_w4", f"{prefix}.axes"], [f"{prefix}.conv_w"], name=f"{prefix}.conv_squeeze"
        ),
        helper.make_node(
            "Conv", ["audio", f"{prefix}.conv_w"], [f"{prefix}.conv"], name=f"{prefix}.conv", strides=[2], pads=[4, 4]
        ),
        helper.make_node("Relu", [f"{prefix}.conv"], [f"{prefix}.relu"], name=f"{prefix}.relu"),
        helper.make_node("Transpose", [f"{prefix}.relu"], [f"{prefix}.seq"], name=f"{prefix}.to_seq", perm=[2, 0, 1]),
        *[
            node
            for k in ("W", "R", "B")
            for node in (
                helper.make_node(
                    "Slice", [f"lstm.{k}_stack", *sliced], [f"{prefix}.lstm_{k}4"], name=f"{prefix}.lstm_{k}_slice"
                ),
                helper.make_node(
                    "Squeeze",
                    [f"{prefix}.lstm_{k}4", f"{prefix}.axes"],
                    [f"{prefix}.lstm_{k}"],
                    name=f"{prefix}.lstm_{k}_squeeze",
                ),
            )
        ],
        helper.make_node(
            "LSTM",
            [f"{prefix}.seq", f"{prefix}.lstm_W", f"{prefix}.lstm_R", f"{prefix}.lstm_B"],
            ["", f"{prefix}.h", ""],
            name=f"{prefix}.lstm",
            hidden_size=VOICE_HIDDEN,
        ),
        helper.make_node("Squeeze", [f"{prefix}.h", f"{prefix}.axes"], [head_input], name=f"{prefix}.h_squeeze"),
        *head,
    ]
    return helper.make_graph(nodes, f"{prefix}_branch", [], [float_info(f"{prefix}.prob", [BATCH, 1])], take)


def build_voice_activity() -> onnx.ModelProto:
    """Shaped like a voice-activity detector: one If branch per sample rate, each a Conv front end and
    an LSTM whose weights reach them through Slice/Squeeze from stacks in the outer scope; the 16 kHz
    head weight is a Constant node read through Transpose, the 8 kHz head an initializer read directly."""
    rng = np.random.default_rng(1007)
    hidden, channels = VOICE_HIDDEN, VOICE_CHANNELS
    head16 = [
        constant("sr16.head_row", small_normal(rng, (1, hidden), 0.3)),
        helper.make_node("Transpose", ["sr16.head_row"], ["sr16.head_w"], name="sr16.head_transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["sr16.hidden", "sr16.head_w"], ["sr16.logit"], name="sr16.head"),
        helper.make_node("Sigmoid", ["sr16.logit"], ["sr16.prob"], name="sr16.sigmoid"),
    ]
    head8 = [
        helper.make_node("MatMul", ["sr8.hidden", "sr8.head_w"], ["sr8.logit"], name="sr8.head"),
        helper.make_node("Sigmoid", ["sr8.logit"], ["sr8.prob"], name="sr8.sigmoid"),
    ]
    then_branch = _voice_branch("sr16", 0, head16, "sr16.hidden")
    else_branch = _voice_branch("sr8", 1, head8, "sr8.hidden")
    else_branch.initializer.append(tensor("sr8.head_w", small_normal(rng, (hidden, 1), 0.3)))
    else_branch.output[0].name = "sr8.prob"
    graph = helper.make_graph(
        [
            helper.make_node(
                "If", ["is_16k"], ["speech_prob"], name="rate.if", then_branch=then_branch, else_branch=else_branch
            )
        ],
        "voice_activity",
        [float_info("audio", [BATCH, 1, 64]), helper.make_tensor_value_info("is_16k", TensorProto.BOOL, [])],
        [float_info("speech_prob", [BATCH, 1])],
        [
            tensor("encoder.weight_stack", he_normal(rng, (2, channels, 1, 9), 9)),
            tensor("lstm.W_stack", xavier_normal(rng, (2, 1, 4 * hidden, channels), channels, hidden)),
            tensor("lstm.R_stack", xavier_normal(rng, (2, 1, 4 * hidden, hidden), hidden, hidden)),
            tensor("lstm.B_stack", small_normal(rng, (2, 1, 8 * hidden), 0.1)),
        ],
    )
    purpose = "If per sample rate; Conv and LSTM weights reach their readers through Slice/Squeeze from stacks"
    return finish_model(graph, "voice_activity", purpose)


DECODER_VOCAB = 128
DECODER_DIM = 32
DECODER_HEADS = 2
DECODER_HEAD_SIZE = DECODER_DIM // DECODER_HEADS
DECODER_LAYERS = 2
DECODER_FFN = 64
PAST, TOTAL = "past_seq", "total_seq"


def decoder_mask_nodes() -> list[onnx.NodeProto]:
    """Where a new token may attend: causal over past + new tokens, and not at padding (the mask)."""
    node = helper.make_node
    return [
        node("Shape", ["input_ids"], ["ids.shape"], name="mask.ids_shape"),
        node("Shape", ["attention_mask"], ["mask.shape"], name="mask.mask_shape"),
        node("Gather", ["ids.shape", "mask.one"], ["mask.new"], name="mask.new_count", axis=0),
        node("Gather", ["mask.shape", "mask.one"], ["mask.total"], name="mask.total_count", axis=0),
        node("Sub", ["mask.total", "mask.new"], ["mask.past"], name="mask.past_count"),
        node("Range", ["mask.past", "mask.total", "mask.one"], ["mask.rows"], name="mask.rows_range"),
        node("Range", ["mask.zero", "mask.total", "mask.one"], ["mask.columns"], name="mask.columns_range"),
        node("Unsqueeze", ["mask.rows", "mask.last_axis"], ["mask.rows_2d"], name="mask.rows_unsqueeze"),
        node("LessOrEqual", ["mask.columns", "mask.rows_2d"], ["mask.causal"], name="mask.causal_compare"),
        node("Cast", ["attention_mask"], ["mask.kept"], name="mask.cast", to=TensorProto.BOOL),
        node("Unsqueeze", ["mask.kept", "mask.head_axes"], ["mask.kept_4d"], name="mask.kept_unsqueeze"),
        node("And", ["mask.causal", "mask.kept_4d"], ["mask.allowed"], name="mask.and"),
    ]


def decoder_layer_nodes(layer: int, x: str, out: str) -> list[onnx.NodeProto]:
    """Pre-norm attention over the KV cache, then a gated SiLU MLP, each with a residual."""
    node, p = helper.make_node, f"layers.{layer}"
    nodes = [layer_norm(f"{p}.attn_norm", x, f"{p}.attn_in")]
    heads = {}
    for proj, cache in (("q", None), ("k", "key"), ("v", "value")):
        q = f"{p}.attn.{proj}"
        nodes += [
            node("MatMul", [f"{p}.attn_in", f"{q}.weight"], [f"{q}.flat"], name=f"{q}.matmul"),
            node("Reshape", [f"{q}.flat", "decoder.split_heads"], [f"{q}.split"], name=f"{q}.reshape"),
            node("Transpose", [f"{q}.split"], [f"{q}.heads"], name=f"{q}.transpose", perm=[0, 2, 1, 3]),
        ]
        heads[proj] = f"{q}.heads"
        if cache is not None:
            present = f"present.{layer}.{cache}"
            nodes.append(
                node("Concat", [f"past_key_values.{layer}.{cache}", heads[proj]], [present], name=f"{q}.cache", axis=2)
            )
            heads[proj] = present
    a = f"{p}.attn"
    nodes += [
        node("Transpose", [heads["k"]], [f"{a}.k_t"], name=f"{a}.k_transpose", perm=[0, 1, 3, 2]),
        node("MatMul", [heads["q"], f"{a}.k_t"], [f"{a}.scores"], name=f"{a}.scores_matmul"),
        node("Mul", [f"{a}.scores", "decoder.scale"], [f"{a}.scaled"], name=f"{a}.scale_mul"),
        node("Where", ["mask.allowed", f"{a}.scaled", "decoder.blocked"], [f"{a}.masked"], name=f"{a}.mask_where"),
        node("Softmax", [f"{a}.masked"], [f"{a}.probs"], name=f"{a}.softmax", axis=-1),
        node("MatMul", [f"{a}.probs", heads["v"]], [f"{a}.context"], name=f"{a}.context_matmul"),
        node("Transpose", [f"{a}.context"], [f"{a}.context_t"], name=f"{a}.context_transpose", perm=[0, 2, 1, 3]),
        node("Reshape", [f"{a}.context_t", "decoder.merge_heads"], [f"{a}.merged"], name=f"{a}.merge_reshape"),
        node("MatMul", [f"{a}.merged", f"{a}.o.weight"], [f"{a}.out"], name=f"{a}.o.matmul"),
        node("Add", [x, f"{a}.out"], [f"{p}.attn_residual"], name=f"{a}.residual_add"),
        layer_norm(f"{p}.mlp_norm", f"{p}.attn_residual", f"{p}.mlp_in"),
    ]
    m = f"{p}.mlp"
    return nodes + [
        node("MatMul", [f"{p}.mlp_in", f"{m}.gate.weight"], [f"{m}.gate"], name=f"{m}.gate.matmul"),
        node("Sigmoid", [f"{m}.gate"], [f"{m}.gate_sigmoid"], name=f"{m}.sigmoid"),
        node("Mul", [f"{m}.gate", f"{m}.gate_sigmoid"], [f"{m}.silu"], name=f"{m}.silu_mul"),
        node("MatMul", [f"{p}.mlp_in", f"{m}.up.weight"], [f"{m}.up"], name=f"{m}.up.matmul"),
        node("Mul", [f"{m}.silu", f"{m}.up"], [f"{m}.gated"], name=f"{m}.gate_mul"),
        node("MatMul", [f"{m}.gated", f"{m}.down.weight"], [f"{m}.out"], name=f"{m}.down.matmul"),
        node("Add", [f"{p}.attn_residual", f"{m}.out"], [out], name=f"{m}.residual_add"),
    ]


def decoder_initializers(rng: np.random.Generator) -> list[TensorProto]:
    inits = [tensor("embed.weight", (rng.standard_normal((DECODER_VOCAB, DECODER_DIM)) * 0.5).astype(np.float32))]
    for layer in range(DECODER_LAYERS):
        p = f"layers.{layer}"
        for norm in ("attn_norm", "mlp_norm"):
            inits += [
                tensor(f"{p}.{norm}.weight", np.ones(DECODER_DIM, np.float32)),
                tensor(f"{p}.{norm}.bias", np.zeros(DECODER_DIM, np.float32)),
            ]
        for proj in ("q", "k", "v", "o"):
            weight = xavier_normal(rng, (DECODER_DIM, DECODER_DIM), DECODER_DIM, DECODER_DIM)
            inits.append(tensor(f"{p}.attn.{proj}.weight", weight))
        for proj, shape in (
            ("gate", (DECODER_DIM, DECODER_FFN)),
            ("up", (DECODER_DIM, DECODER_FFN)),
            ("down", (DECODER_FFN, DECODER_DIM)),
        ):
            inits.append(tensor(f"{p}.mlp.{proj}.weight", xavier_normal(rng, shape, shape[0], shape[1])))
    return inits + [
        tensor("final_norm.weight", np.ones(DECODER_DIM, np.float32)),
        tensor("final_norm.bias", np.zeros(DECODER_DIM, np.float32)),
        int64s("decoder.split_heads", [0, 0, DECODER_HEADS, DECODER_HEAD_SIZE]),
        int64s("decoder.merge_heads", [0, 0, DECODER_DIM]),
        scalar("decoder.scale", 1.0 / np.sqrt(DECODER_HEAD_SIZE)),
        scalar("decoder.blocked", -1e9),
        tensor("mask.one", np.asarray(1, np.int64)),
        tensor("mask.zero", np.asarray(0, np.int64)),
        int64s("mask.last_axis", [1]),
        int64s("mask.head_axes", [1, 2]),
    ]


def build_decoder_kv() -> onnx.ModelProto:
    """A two-layer decoder LM with a KV cache in the layout onnxruntime-genai and Optimum export."""
    nodes = [helper.make_node("Gather", ["embed.weight", "input_ids"], ["embedded"], name="embed.gather", axis=0)]
    nodes += decoder_mask_nodes()
    hidden = "embedded"
    for layer in range(DECODER_LAYERS):
        nodes += decoder_layer_nodes(layer, hidden, f"layers.{layer}.out")
        hidden = f"layers.{layer}.out"
    nodes += [
        layer_norm("final_norm", hidden, "final_hidden"),
        helper.make_node("Transpose", ["embed.weight"], ["lm_head.weight"], name="lm_head.transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["final_hidden", "lm_head.weight"], ["logits"], name="lm_head.matmul"),
    ]
    cache_shape = {
        "past": [BATCH, DECODER_HEADS, PAST, DECODER_HEAD_SIZE],
        "present": [BATCH, DECODER_HEADS, TOTAL, DECODER_HEAD_SIZE],
    }
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [BATCH, SEQ]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [BATCH, TOTAL]),
    ]
    outputs = [float_info("logits", [BATCH, SEQ, DECODER_VOCAB])]
    for layer in range(DECODER_LAYERS):
        for part in ("key", "value"):
            inputs.append(float_info(f"past_key_values.{layer}.{part}", cache_shape["past"]))
            outputs.append(float_info(f"present.{layer}.{part}", cache_shape["present"]))
    initializers = decoder_initializers(np.random.default_rng(1008))
    graph = helper.make_graph(nodes, "decoder_kv", inputs, outputs, initializers)
    purpose = "decoder LM with a KV cache (past_key_values.N.key/value in, present.N.key/value out), tied head"
    return finish_model(graph, "decoder_kv", purpose)


MODEL_BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "transformer_tied": build_transformer_tied,
    "constant_weights": build_constant_weights,
    "if_subgraph": build_if_subgraph,
    "loop_subgraph": build_loop_subgraph,
    "voice_activity": build_voice_activity,
    "decoder_kv": build_decoder_kv,
}


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, os.replace: a crash never leaves a half-written model."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_models(out_dir: Path) -> list[Path]:
    """Build, check and write every sample model; returns the written paths in build order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in MODEL_BUILDERS.items():
        model = build()
        onnx.checker.check_model(model, full_check=True)
        path = out_dir / f"{name}.onnx"
        write_atomically(path, model.SerializeToString(deterministic=True))
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args(argv)
    for path in write_models(args.out):
        print(f"{path}  {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
