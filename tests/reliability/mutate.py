"""Seeded mutation of ONNX models into hostile inputs, for the fuzzing harness.

A mutant is derived from (seed, index) alone: ``make_mutant(seed, index, samples)`` always gives the
same bytes, so a finding is reproduced from its id. Most mutations keep the protobuf parseable and
attack what the tool believes about it (dims, types, names, attributes, subgraphs, external data);
a few damage the bytes. Invalid UTF-8 cannot be set through the protobuf API, so string fields get an
ASCII placeholder of the same length that is swapped for invalid bytes after serialisation.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import Error as ProtobufError  # type: ignore[import-untyped]
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, helper

MODEL_NAME = "m.onnx"
OUTSIDE_NAME = "outside.bin"  # created by the runner one folder above every case folder
_BAD_UTF8 = b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc"
_PLACEHOLDER = "QZUTF8QZ"  # replaced by invalid UTF-8 bytes of the same length after serialisation
HOSTILE_DIMS = (-1, -4, 0, 2**40, 2**62, 2**31, 1)
HOSTILE_TYPES = (0, 99, TensorProto.STRING, TensorProto.INT4, TensorProto.FLOAT16, TensorProto.BFLOAT16,
                 TensorProto.UINT4, TensorProto.COMPLEX64, TensorProto.FLOAT8E4M3FN, TensorProto.INT64)
COMMON_OPS = ("Relu", "MatMul", "Add", "Gemm", "Conv", "Identity", "Sigmoid", "Mul", "Transpose",
              "Reshape", "Gather", "Softmax", "LayerNormalization", "Concat", "Flatten", "If", "Loop")


@dataclass
class Mutant:
    """A hostile model (bytes of m.onnx) plus side files, all relative to the case folder."""

    sample: str
    seed: int
    index: int
    mutations: list[str]
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def ident(self) -> str:
        return f"seed={self.seed} mutant={self.index} sample={self.sample} [{'; '.join(self.mutations)}]"


class _Context:
    """What a mutation needs besides the model: the generator and the side files it may create."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.files: dict[str, bytes] = {}
        self.bad_utf8 = False

    def pick(self, items):
        items = list(items)
        return items[int(self.rng.integers(len(items)))] if items else None


def iter_graphs(graph: GraphProto) -> Iterator[GraphProto]:
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.GRAPH:
                yield from iter_graphs(attribute.g)
            for sub in attribute.graphs:
                yield from iter_graphs(sub)


def _tensors(model: ModelProto) -> list[TensorProto]:
    found: list[TensorProto] = []
    for graph in iter_graphs(model.graph):
        found.extend(graph.initializer)
        for node in graph.node:
            found.extend(a.t for a in node.attribute if a.type == AttributeProto.TENSOR)
    return found


def _nodes(model: ModelProto) -> list[onnx.NodeProto]:
    return [node for graph in iter_graphs(model.graph) for node in graph.node]


def _value_infos(model: ModelProto) -> list[onnx.ValueInfoProto]:
    graphs = list(iter_graphs(model.graph))
    return [v for g in graphs for v in list(g.input) + list(g.output) + list(g.value_info)]


# --- tensors ------------------------------------------------------------------------------------

def m_dims(model: ModelProto, ctx: _Context) -> str:
    tensor = ctx.pick(_tensors(model))
    if tensor is None or not tensor.dims:
        return "dims:none"
    axis = int(ctx.rng.integers(len(tensor.dims)))
    value = int(ctx.pick(HOSTILE_DIMS))
    tensor.dims[axis] = value
    return f"dims {tensor.name or '<const>'}[{axis}]={value}"


def m_dims_empty_data(model: ModelProto, ctx: _Context) -> str:
    tensor = ctx.pick(_tensors(model))
    if tensor is None:
        return "dims-empty:none"
    del tensor.dims[:]
    tensor.dims.extend([2**62, 0])
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    return f"dims {tensor.name or '<const>'}=[2**62,0] no data"


def m_data_type(model: ModelProto, ctx: _Context) -> str:
    tensor = ctx.pick(_tensors(model))
    if tensor is None:
        return "dtype:none"
    tensor.data_type = int(ctx.pick(HOSTILE_TYPES))
    return f"data_type {tensor.name or '<const>'}={tensor.data_type}"


def m_raw_length(model: ModelProto, ctx: _Context) -> str:
    tensor = ctx.pick([t for t in _tensors(model) if t.raw_data])
    if tensor is None:
        return "raw:none"
    cut = int(ctx.rng.integers(1, 9))
    tensor.raw_data = tensor.raw_data[:-cut] if ctx.rng.random() < 0.5 else tensor.raw_data + b"\x01" * cut
    return f"raw_data length {tensor.name or '<const>'}={len(tensor.raw_data)}"


def m_nonfinite(model: ModelProto, ctx: _Context) -> str:
    tensor = ctx.pick([t for t in _tensors(model) if t.data_type == TensorProto.FLOAT and t.raw_data])
    if tensor is None:
        return "nonfinite:none"
    values = np.frombuffer(tensor.raw_data, dtype=np.float32).copy()
    count = max(1, int(values.size * float(ctx.rng.choice([0.001, 0.1, 1.0]))))
    where = ctx.rng.choice(values.size, size=min(count, values.size), replace=False)
    values[where] = ctx.rng.choice(np.array([np.inf, -np.inf, np.nan], dtype=np.float32), size=where.size)
    tensor.raw_data = values.tobytes()
    return f"non-finite x{where.size} in {tensor.name or '<const>'}"


def m_string_tensor(model: ModelProto, ctx: _Context) -> str:
    labels = np.array(["cat", "dog", "\u00e9t\u00e9"], dtype=object)
    tensor = onnx.numpy_helper.from_array(labels, name="labels_fuzz")
    if ctx.rng.random() < 0.5:
        model.graph.initializer.append(tensor)
    else:
        model.graph.node.insert(0, helper.make_node("Constant", [], ["labels_fuzz"], value=tensor, name="labels"))
    if ctx.rng.random() < 0.5:
        model.graph.output.append(helper.make_tensor_value_info("labels_fuzz", TensorProto.STRING, [3]))
    return "STRING tensor added"


def m_initializer_to_constant(model: ModelProto, ctx: _Context) -> str:
    graph = model.graph
    if graph.initializer:
        tensor = ctx.pick(graph.initializer)
        copy = TensorProto()
        copy.CopyFrom(tensor)
        graph.initializer.remove(tensor)
        graph.node.insert(0, helper.make_node("Constant", [], [copy.name], value=copy, name=f"c_{copy.name}"))
        return f"initializer {copy.name} -> Constant"
    node = ctx.pick([n for n in graph.node if n.op_type == "Constant" and n.attribute
                     and n.attribute[0].type == AttributeProto.TENSOR])
    if node is None:
        return "init<->const:none"
    tensor = TensorProto()
    tensor.CopyFrom(node.attribute[0].t)
    tensor.name = node.output[0]
    graph.node.remove(node)
    graph.initializer.append(tensor)
    return f"Constant {tensor.name} -> initializer"


def m_initializer_as_input(model: ModelProto, ctx: _Context) -> str:
    tensor = ctx.pick(model.graph.initializer)
    if tensor is None:
        return "init-input:none"
    model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return f"initializer {tensor.name} in graph.input"


# --- names, nodes, attributes ---------------------------------------------------------------------

def m_names(model: ModelProto, ctx: _Context) -> str:
    nodes = _nodes(model)
    node = ctx.pick(nodes)
    if node is None:
        return "names:none"
    choice = int(ctx.rng.integers(4))
    if choice == 0 and node.output:
        node.output[0] = ""
        return f"empty output name on {node.op_type}"
    if choice == 1 and len(nodes) > 1 and node.output:
        other = ctx.pick([n for n in nodes if n is not node and n.output])
        if other is not None:
            node.output[0] = other.output[0]
            return f"duplicate output name {other.output[0]}"
    if choice == 2 and model.graph.initializer:
        names = [t.name for t in model.graph.initializer]
        ctx.pick(model.graph.initializer).name = ctx.pick(names)
        return "duplicate initializer name"
    node.name = ctx.pick(["", "a$x^{$", "\x1b]0;pwned\x07", "n" * 300, "../../etc/passwd"])
    return f"node name {node.name!r}"


def m_dangling_input(model: ModelProto, ctx: _Context) -> str:
    node = ctx.pick([n for n in _nodes(model) if n.input])
    if node is None:
        return "dangling:none"
    node.input[int(ctx.rng.integers(len(node.input)))] = "does_not_exist_fuzz"
    return f"dangling input on {node.op_type}"


def m_swap_op(model: ModelProto, ctx: _Context) -> str:
    node = ctx.pick(_nodes(model))
    if node is None:
        return "swap:none"
    before, node.op_type = node.op_type, ctx.pick(COMMON_OPS)
    return f"op {before}->{node.op_type}"


def m_attributes(model: ModelProto, ctx: _Context) -> str:
    node = ctx.pick([n for n in _nodes(model) if n.attribute])
    if node is None:
        return "attr:none"
    attribute = ctx.pick(node.attribute)
    choice = int(ctx.rng.integers(3))
    if choice == 0:
        node.attribute.remove(attribute)
        return f"removed {node.op_type}.{attribute.name}"
    if choice == 1:
        node.attribute.append(attribute)
        return f"duplicated {node.op_type}.{attribute.name}"
    wrong = ctx.pick([helper.make_attribute(attribute.name, "text"), helper.make_attribute(attribute.name, 2**62),
                      helper.make_attribute(attribute.name, [-1, 0]), helper.make_attribute(attribute.name, 1.5)])
    node.attribute.remove(attribute)
    node.attribute.append(wrong)
    return f"wrong type {node.op_type}.{attribute.name}"


def m_opset(model: ModelProto, ctx: _Context) -> str:
    version = int(ctx.pick([0, 1, 7, 13, 21, 99, 2**40]))
    if ctx.rng.random() < 0.2 or not model.opset_import:
        del model.opset_import[:]
        return "no opset_import"
    model.opset_import[0].version = version
    if ctx.rng.random() < 0.3:
        model.ir_version = int(ctx.pick([0, 3, 99]))
    return f"opset {version}"


def m_custom_op(model: ModelProto, ctx: _Context) -> str:
    graph = model.graph
    source = graph.input[0].name
    graph.node.append(helper.make_node("FuzzOp", [source], ["fuzz_out"], domain="com.fuzz", alpha=1.0))
    model.opset_import.append(helper.make_opsetid("com.fuzz", 1))
    if ctx.rng.random() < 0.5:
        graph.output.append(helper.make_tensor_value_info("fuzz_out", TensorProto.FLOAT, None))
    return "custom-domain op"


def m_value_info(model: ModelProto, ctx: _Context) -> str:
    value = ctx.pick(_value_infos(model))
    if value is None or not value.type.HasField("tensor_type"):
        return "vi:none"
    tensor_type = value.type.tensor_type
    if ctx.rng.random() < 0.4:
        tensor_type.elem_type = int(ctx.pick(HOSTILE_TYPES))
        return f"elem_type {value.name}={tensor_type.elem_type}"
    dims = tensor_type.shape.dim
    if not dims:
        tensor_type.shape.dim.add().dim_value = 2**40
        return f"rank grown {value.name}"
    dim = ctx.pick(dims)
    dim.dim_value = int(ctx.pick(HOSTILE_DIMS))
    return f"dim {value.name}={dim.dim_value}"


# --- strings, subgraphs, external data ------------------------------------------------------------

def m_bad_utf8(model: ModelProto, ctx: _Context) -> str:
    ctx.bad_utf8 = True
    target = int(ctx.rng.integers(6))
    if target == 0:
        model.doc_string = _PLACEHOLDER
    elif target == 1:
        model.producer_name = _PLACEHOLDER
    elif target == 2:
        helper.set_model_props(model, {"fuzz": _PLACEHOLDER})
    elif target == 3 and model.graph.initializer:
        old = model.graph.initializer[0].name
        for node in _nodes(model):
            node.input[:] = [_PLACEHOLDER if name == old else name for name in node.input]
        model.graph.initializer[0].name = _PLACEHOLDER
    elif target == 4:
        ctx.pick(_nodes(model)).name = _PLACEHOLDER
    else:
        model.graph.input[0].type.tensor_type.shape.dim.add().dim_param = _PLACEHOLDER
    return f"invalid UTF-8 (target {target})"


def m_subgraph(model: ModelProto, ctx: _Context) -> str:
    graph = model.graph
    source = graph.input[0].name
    depth = int(ctx.pick([0, 1, 3, 8, 16]))
    body = helper.make_graph([], "empty", [], [])
    for level in range(depth):
        cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
        branch = helper.make_graph([helper.make_node("Identity", [source], [f"y{level}"])], f"b{level}", [],
                                   [helper.make_tensor_value_info(f"y{level}", TensorProto.FLOAT, None)])
        inner = [helper.make_node("Constant", [], ["c"], value=cond),
                 helper.make_node("If", ["c"], [f"z{level}"], then_branch=branch, else_branch=body)]
        body = helper.make_graph(inner, f"g{level}", [],
                                 [helper.make_tensor_value_info(f"z{level}", TensorProto.FLOAT, None)])
    graph.node.append(helper.make_node("Constant", [], ["fuzz_cond"],
                                       value=helper.make_tensor("v", TensorProto.BOOL, [], [True])))
    graph.node.append(helper.make_node("If", ["fuzz_cond"], ["fuzz_if"], then_branch=body, else_branch=body))
    if ctx.rng.random() < 0.5:
        graph.output.append(helper.make_tensor_value_info("fuzz_if", TensorProto.FLOAT, None))
    return f"If with depth {depth}"


def m_loop_trip(model: ModelProto, ctx: _Context) -> str:
    trip = int(ctx.pick([2**62, 2**31, -1, 0, 10**6]))
    for node in _nodes(model):
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.data_type == TensorProto.INT64:
            node.attribute[0].t.CopyFrom(helper.make_tensor(node.attribute[0].t.name or "t", TensorProto.INT64,
                                                            [], [trip]))
            return f"Loop trip/int64 constant={trip}"
    graph = model.graph
    source = graph.input[0].name
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    graph.initializer.extend([helper.make_tensor("fuzz_trip", TensorProto.INT64, [], [trip]),
                              helper.make_tensor("fuzz_true", TensorProto.BOOL, [], [True])])
    graph.node.append(helper.make_node("Loop", ["fuzz_trip", "fuzz_true", source], ["fuzz_loop"], body=body))
    graph.output.insert(0, helper.make_tensor_value_info("fuzz_loop", TensorProto.FLOAT, None))
    return f"Loop added, trip={trip}"


def m_external(model: ModelProto, ctx: _Context) -> str:
    tensor = ctx.pick([t for t in _tensors(model) if t.raw_data])
    if tensor is None:
        return "external:none"
    data = bytes(tensor.raw_data)
    ctx.files["w.bin"] = b"\x00" * 16 + data
    location = ctx.pick(["w.bin", "w.bin", "./w.bin", f"../{OUTSIDE_NAME}", "/etc/passwd", "missing.bin", "w.bin/.",
                         "sub/../w.bin", "", "/dev/zero", "."])
    offset = ctx.pick([16, 16, 0, -1, 2**62, len(data) * 4, "1" * 40, "abc"])
    length = ctx.pick([len(data), len(data), len(data) - 1, len(data) + 1, 0, 2**62, -5, None])
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset)}
    if length is not None:
        entries["length"] = str(length)
    if ctx.rng.random() < 0.1:
        entries["checksum"] = "x"
    for key, value in entries.items():
        item = tensor.external_data.add()
        item.key, item.value = key, value
    return f"external {tensor.name or '<const>'} location={location!r} offset={offset} length={length}"


PROTO_MUTATIONS: tuple[Callable[[ModelProto, _Context], str], ...] = (
    m_dims, m_dims_empty_data, m_data_type, m_raw_length, m_nonfinite, m_string_tensor, m_initializer_to_constant,
    m_initializer_as_input, m_names, m_dangling_input, m_swap_op, m_attributes, m_opset, m_custom_op, m_value_info,
    m_bad_utf8, m_subgraph, m_loop_trip, m_external,
)


def _damage_bytes(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    buffer = bytearray(data)
    kind = int(rng.integers(3))
    where = int(rng.integers(max(1, len(buffer))))
    if kind == 0:
        count = int(rng.integers(1, 9))
        for _ in range(count):
            buffer[int(rng.integers(len(buffer)))] ^= 1 << int(rng.integers(8))
        return bytes(buffer), f"flipped {count} bits"
    if kind == 1:
        return bytes(buffer[:where]), f"truncated to {where} bytes"
    noise = rng.integers(0, 256, size=int(rng.integers(1, 33)), dtype=np.uint8).tobytes()
    return bytes(buffer[:where]) + noise + bytes(buffer[where:]), f"inserted {len(noise)} bytes at {where}"


def make_mutant(seed: int, index: int, samples: list[Path]) -> Mutant:
    """The mutant number `index` of `seed`: sample index % len(samples), 1-3 mutations, 10% byte damage."""
    sample = samples[index % len(samples)]
    rng = np.random.default_rng([seed, index])
    model = onnx.load_model_from_string(sample.read_bytes())
    ctx = _Context(rng)
    mutations = []
    for _ in range(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))):
        mutation = PROTO_MUTATIONS[int(rng.integers(len(PROTO_MUTATIONS)))]
        try:
            mutations.append(mutation(model, ctx))
        except (IndexError, ValueError, TypeError, AttributeError, onnx.onnx_cpp2py_export.checker.ValidationError,
                ProtobufError) as error:
            mutations.append(f"{mutation.__name__} skipped ({type(error).__name__})")
    data = model.SerializeToString()
    if ctx.bad_utf8:
        data = data.replace(_PLACEHOLDER.encode(), _BAD_UTF8[:len(_PLACEHOLDER)])
    if rng.random() < 0.1:
        data, damage = _damage_bytes(data, rng)
        mutations.append(damage)
    files = dict(ctx.files)
    files[MODEL_NAME] = data
    return Mutant(sample=sample.name, seed=seed, index=index, mutations=mutations, files=files)


def mutant_checksum(mutant: Mutant) -> int:
    """A cheap fingerprint of every byte of a mutant, for the determinism test."""
    return zlib.crc32(b"".join(name.encode() + data for name, data in sorted(mutant.files.items())))
