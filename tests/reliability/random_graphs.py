"""Seeded random models for property tests: the shapes of real exported graphs, small.

Each seed picks, with its own RNG: a dense chain of MatMul / Gemm (either transB) / MatMul+Add
with optional Relu; an optional Conv block on a second input (Conv, Relu, GlobalAveragePool,
Flatten, MatMul back into the chain); an optional square weight shared by two MatMuls; an
optional If whose branches read an outer-scope weight (one branch with its own Constant bias);
an optional dead node; and each weight stored either as an initializer or as a Constant node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
WIDTHS = (16, 32, 48)


@dataclass
class _Builder:
    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    counter: int = 0

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_{self.counter}"

    def weight(self, shape: tuple[int, ...], prefix: str = "w", *, scale: float | None = None) -> str:
        """A float weight, as an initializer or (half the time) a Constant node."""
        name = self.name(prefix)
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[0] if len(shape) > 1 else 4)
        values = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        tensor = numpy_helper.from_array(values, name)
        if self.rng.random() < 0.5:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor, name=f"const_{name}"))
        else:
            self.initializers.append(tensor)
        return name

    def node(self, op: str, inputs: list[str], **attributes) -> str:
        output = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], name=f"n_{output}", **attributes))
        return output


def _dense(builder: _Builder, current: str, width: int) -> tuple[str, int]:
    out_width = int(builder.rng.choice(WIDTHS))
    kind = builder.rng.integers(3)
    if kind == 0:
        current = builder.node("MatMul", [current, builder.weight((width, out_width))])
    elif kind == 1:
        trans_b = int(builder.rng.integers(2))
        shape = (out_width, width) if trans_b else (width, out_width)
        bias = builder.weight((out_width,), "b", scale=0.1)
        current = builder.node("Gemm", [current, builder.weight(shape), bias], transB=trans_b)
    else:
        current = builder.node("MatMul", [current, builder.weight((width, out_width))])
        current = builder.node("Add", [current, builder.weight((out_width,), "b", scale=0.1)])
    if builder.rng.random() < 0.7:
        current = builder.node("Relu", [current])
    return current, out_width


def _conv_block(builder: _Builder, width: int) -> str:
    kernels = int(builder.rng.choice((4, 8)))
    current = builder.node("Conv", ["image", builder.weight((kernels, 3, 3, 3), scale=0.3),
                                    builder.weight((kernels,), "b", scale=0.1)], pads=[1, 1, 1, 1])
    current = builder.node("Relu", [current])
    current = builder.node("GlobalAveragePool", [current])
    current = builder.node("Flatten", [current])
    return builder.node("MatMul", [current, builder.weight((kernels, width))])


def _if_block(builder: _Builder, current: str, width: int) -> str:
    shared = builder.weight((width, width), "if_w")
    own_bias = numpy_helper.from_array((builder.rng.standard_normal(width) * 0.1).astype(np.float32), "then_b")
    then_nodes = [helper.make_node("MatMul", [current, shared], ["then_m"], name="then_matmul"),
                  helper.make_node("Constant", [], ["then_b"], value=own_bias, name="then_const"),
                  helper.make_node("Add", ["then_m", "then_b"], ["then_y"], name="then_add")]
    else_nodes = [helper.make_node("MatMul", [current, shared], ["else_m"], name="else_matmul"),
                  helper.make_node("Relu", ["else_m"], ["else_y"], name="else_relu")]
    info = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, width]) for name in ("then_y", "else_y")]
    then_branch = helper.make_graph(then_nodes, "then", [], [info[0]])
    else_branch = helper.make_graph(else_nodes, "else", [], [info[1]])
    return builder.node("If", ["cond"], then_branch=then_branch, else_branch=else_branch)


def random_model(seed: int) -> onnx.ModelProto:
    """A small, valid, seeded model; the same seed always gives the same bytes."""
    builder = _Builder(np.random.default_rng(seed))
    width = int(builder.rng.choice(WIDTHS))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])]
    current = "x"
    if builder.rng.random() < 0.5:
        inputs.append(helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8]))
        current = builder.node("Add", [current, _conv_block(builder, width)])
    for _ in range(int(builder.rng.integers(2, 5))):
        current, width = _dense(builder, current, width)
    if builder.rng.random() < 0.5:
        shared = builder.weight((width, width), "shared")
        current = builder.node("MatMul", [builder.node("Relu", [builder.node("MatMul", [current, shared])]), shared])
    if builder.rng.random() < 0.3:
        builder.node("Relu", [current])
    outputs = [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, width])]
    if builder.rng.random() < 0.5:
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
        outputs.append(helper.make_tensor_value_info(_if_block(builder, current, width), TensorProto.FLOAT, [1, width]))
    graph = helper.make_graph(builder.nodes, f"random_{seed}", inputs, outputs, builder.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="random_graphs", doc_string=f"seed {seed}")
    helper.set_model_props(model, {"seed": str(seed)})
    return model


def features(model: onnx.ModelProto) -> set[str]:
    """What a generated model contains, so tests can check the seeds cover every feature."""
    ops = {node.op_type for node in model.graph.node}
    found = {op for op in ("Conv", "Gemm", "If") if op in ops}
    if "Constant" in ops:
        found.add("constant-weights")
    reads: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            reads[name] = reads.get(name, 0) + 1
    if any(count > 1 and name.startswith("shared") for name, count in reads.items()):
        found.add("shared-weight")
    return found
