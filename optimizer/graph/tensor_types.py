"""Element types of every tensor, and which of a node's inputs and outputs share a type parameter.

``tensor_types`` runs onnx's shape inference on a weight-free copy of the graph and reads the
element type of every tensor in every graph (subgraphs included); a tensor inference cannot type
is absent. ``slot_types`` binds each input and output slot of a node to its schema's type string
("T", "T1", "tensor(float)") so a pass can change a type parameter's tensors together, and
``allowed`` says which types a parameter admits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from optimizer.graph.convert import export_model
from optimizer.graph.opsets import DEFAULT_DOMAINS
from optimizer.graph.shapes import shapes_only
from optimizer.graph.walk import walk_proto


def tensor_types(root: gs.Graph, template: onnx.ModelProto) -> dict[str, int]:
    """Name -> ``TensorProto`` element type, for every tensor of ``root`` and its subgraphs."""
    model = export_model(root, template)
    with contextlib.suppress(Exception):  # onnx raises several types; best effort (declared types remain)
        model = onnx.shape_inference.infer_shapes(shapes_only(model), strict_mode=False)
    types: dict[str, int] = {}
    for site in walk_proto(model.graph):
        graph = site.graph
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                types.setdefault(info.name, info.type.tensor_type.elem_type)
        for tensor in graph.initializer:
            types.setdefault(tensor.name, tensor.data_type)
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                types.setdefault(node.output[0], node.attribute[0].t.data_type)
    return types


@dataclass(frozen=True)
class SlotTypes:
    """The type string of each input and output slot of one node, and what each parameter admits."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    constraints: dict[str, frozenset[str]]

    def allowed(self, type_string: str) -> frozenset[str]:
        """Types a slot's type string admits: a parameter's list, or the fixed type itself."""
        return self.constraints.get(type_string, frozenset({type_string}))


def slot_types(node: gs.Node, opset: int) -> SlotTypes | None:
    """The node's schema bound to its slots (variadic formals repeated), or None without a schema."""
    if node.domain not in DEFAULT_DOMAINS:
        return None
    try:
        schema = onnx.defs.get_schema(node.op, max_inclusive_version=opset, domain="")
    except onnx.defs.SchemaError:
        return None
    constraints = {c.type_param_str: frozenset(c.allowed_type_strs) for c in schema.type_constraints}
    inputs = _bind(schema.inputs, len(node.inputs))
    outputs = _bind(schema.outputs, len(node.outputs))
    if inputs is None or outputs is None:
        return None
    return SlotTypes(inputs, outputs, constraints)


def _bind(formals: Sequence[onnx.defs.OpSchema.FormalParameter], count: int) -> tuple[str, ...] | None:
    bound = []
    for index in range(count):
        if index < len(formals):
            bound.append(formals[index].type_str)
        elif formals and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
            bound.append(formals[-1].type_str)
        else:
            return None
    return tuple(bound)
