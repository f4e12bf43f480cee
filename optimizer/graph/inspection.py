"""Inspect an ONNX model: ops, weights by dtype and consumer, subgraphs, duplicate weights.

Works directly on a loaded ``onnx.ModelProto`` (external data already in memory) so it can
describe a model before and after any pass without depending on the pass framework. Every
graph is walked: the main graph, If/Loop/Scan bodies and any GRAPH/GRAPHS attribute of a
custom op, and ``model.functions``. Output is deterministic: every mapping is sorted.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx
from onnx import helper, numpy_helper

from optimizer.graph.bytes import stored_bytes
from optimizer.graph.duplicates import DuplicateGroup, StoredTensor, duplicate_groups
from optimizer.graph.inspect_values import NonFiniteTensor, non_finite_tensors
from optimizer.graph.walk import MAIN_GRAPH, Enter, GraphSite, Leave, NodeStep, model_events

UNUSED_OP = "(unused)"
_STANDARD_DOMAINS = ("", "ai.onnx")
_STRING = onnx.TensorProto.STRING
_SCALAR_ATTRS = {
    "value_float": (onnx.TensorProto.FLOAT, "f"),
    "value_int": (onnx.TensorProto.INT64, "i"),
    "value_string": (_STRING, "s"),
}
_LIST_ATTRS = {
    "value_floats": (onnx.TensorProto.FLOAT, "floats"),
    "value_ints": (onnx.TensorProto.INT64, "ints"),
    "value_strings": (_STRING, "strings"),
}
_ANY_TENSOR = onnx.TensorProto | onnx.SparseTensorProto


@dataclass(frozen=True)
class TensorInfo:
    """One stored weight, wherever it lives (initializer, Constant node, sparse initializer)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    size_bytes: int
    source: str
    graph: str
    consumers: int


@dataclass
class ModelInspection:
    """What a model holds and where its bytes go; the input of every size report."""

    path: str | None
    file_size_bytes: int | None
    ir_version: int
    opsets: dict[str, int]
    producer: str
    nodes_by_op: dict[str, int]
    weight_bytes_by_dtype: dict[str, int]
    weight_bytes_by_op: dict[str, int]
    weight_bytes_total: int
    constant_node_weights: int
    constant_node_weight_bytes: int
    subgraphs: list[str]
    largest_tensors: list[TensorInfo]
    duplicates: list[DuplicateGroup]
    inputs: list[str]
    outputs: list[str]
    metadata_keys: list[str]
    non_finite: list[NonFiniteTensor] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON types only (shapes and names as lists), for report.py and --json."""
        plain = asdict(self)
        for info in plain["largest_tensors"]:
            info["shape"] = list(info["shape"])
        for group in plain["duplicates"]:
            group["tensors"] = list(group["tensors"])
        return plain


@dataclass
class _Weight:
    """A weight found by the walk; consumers are counted before TensorInfo is frozen."""

    graph: str
    name: str
    source: str
    tensor: _ANY_TENSOR
    consumers: int = 0
    first_consumer_op: str | None = None

    def info(self) -> TensorInfo:
        sparse = isinstance(self.tensor, onnx.SparseTensorProto)
        dtype = self.tensor.values.data_type if sparse else self.tensor.data_type
        return TensorInfo(
            name=self.name,
            dtype=dtype_name(dtype),
            shape=tuple(int(d) for d in self.tensor.dims),
            size_bytes=stored_bytes(self.tensor),
            source=self.source,
            graph=self.graph,
            consumers=self.consumers,
        )


@dataclass
class _Walk:
    """Everything one pass over all graphs collects."""

    weights: list[_Weight] = field(default_factory=list)
    nodes_by_op: Counter = field(default_factory=Counter)
    subgraphs: list[str] = field(default_factory=list)


def human_bytes(n: int) -> str:
    """Decimal units ("1.2 MB") so sizes match what file managers and ``du --si`` print."""
    if abs(n) < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        value /= 1000.0
        if abs(value) < 999.95 or unit == "PB":
            return f"{value:.1f} {unit}"
    return f"{n} B"


def dtype_name(data_type: int) -> str:
    """ONNX type name ("FLOAT", "INT8"); unknown codes stay visible instead of raising."""
    try:
        return onnx.TensorProto.DataType.Name(data_type)
    except ValueError:
        return f"UNKNOWN({data_type})"


def _op_key(node: onnx.NodeProto) -> str:
    if node.domain in _STANDARD_DOMAINS:
        return node.op_type
    return f"{node.domain}::{node.op_type}"


def _display_name(graph: str, name: str) -> str:
    return name if graph == MAIN_GRAPH else f"{graph}/{name}"


def _graph_label(path: str, node_count: int) -> str:
    return f"{path} ({node_count} node{'' if node_count == 1 else 's'})"


def _constant_tensor(node: onnx.NodeProto) -> _ANY_TENSOR | None:
    """The value a Constant node stores; value_float(s)/int(s)/string(s) become tiny tensors."""
    if node.op_type != "Constant" or node.domain not in _STANDARD_DOMAINS or not node.output:
        return None
    name = node.output[0]
    for attr in node.attribute:
        if attr.ref_attr_name:
            continue
        if attr.name == "value":
            return attr.t
        if attr.name == "sparse_value":
            return attr.sparse_tensor
        if attr.name in _SCALAR_ATTRS:
            data_type, field_name = _SCALAR_ATTRS[attr.name]
            return helper.make_tensor(name, data_type, [], [getattr(attr, field_name)])
        if attr.name in _LIST_ATTRS:
            data_type, field_name = _LIST_ATTRS[attr.name]
            values = list(getattr(attr, field_name))
            return helper.make_tensor(name, data_type, [len(values)], values)
    return None


def _resolve(scopes: list[dict[str, _Weight | None]], name: str) -> _Weight | None:
    """Innermost definition wins: a subgraph's own tensor shadows an outer one."""
    for scope in reversed(scopes):
        if name in scope:
            return scope[name]
    return None


def _walk_model(model: onnx.ModelProto) -> _Walk:
    """One lexical walk over every graph and function, resolving each read to the innermost
    definition in scope (a function body sees only its own inputs)."""
    walk = _Walk()
    chains: dict[int, list[dict[str, _Weight | None]]] = {}
    for event in model_events(model, functions=True):
        site = event.site
        if isinstance(event, Enter):
            if site.kind != "main":
                walk.subgraphs.append(_graph_label(site.path, len(site.graph.node)))
            outer = chains[id(site.parent)] if site.parent is not None else []
            chains[id(site)] = [*outer, _define(site, walk)]
        elif isinstance(event, NodeStep):
            op = _op_key(event.node)
            walk.nodes_by_op[op] += 1
            for name in event.node.input:
                weight = _resolve(chains[id(site)], name) if name else None
                if weight is not None:
                    weight.consumers += 1
                    weight.first_consumer_op = weight.first_consumer_op or op
        elif isinstance(event, Leave):
            del chains[id(site)]
    return walk


def _define(site: GraphSite, walk: _Walk) -> dict[str, _Weight | None]:
    """The names a graph defines: inputs, stored weights, then every node output."""
    graph, path = site.graph, site.path
    scope: dict[str, _Weight | None] = dict.fromkeys(
        graph.input if site.kind == "function" else [value.name for value in graph.input]
    )
    if site.kind != "function":
        stored = [(t.name, "initializer", t) for t in graph.initializer]
        stored += [(s.values.name, "sparse-initializer", s) for s in graph.sparse_initializer]
        for name, source, tensor in stored:
            found = _Weight(path, name, source, tensor)
            scope[name] = found
            walk.weights.append(found)
    for node in graph.node:
        constant = _constant_tensor(node)
        for position, output in enumerate(node.output):
            if not output:
                continue
            weight = None
            if constant is not None and position == 0:
                weight = _Weight(path, output, "constant-node", constant)
                walk.weights.append(weight)
            scope[output] = weight
    return scope


def weight_tensors(model: onnx.ModelProto) -> list[TensorInfo]:
    """Every stored weight in every graph, in walk order (graph by graph, node order)."""
    return [weight.info() for weight in _walk_model(model).weights]


def weight_bytes_by_dtype(model: onnx.ModelProto) -> dict[str, int]:
    """Stored weight bytes per dtype name over all graphs, sorted by dtype name."""
    return _sum_by(weight_tensors(model), lambda info: info.dtype)


def _sum_by(infos: list[TensorInfo], key) -> dict[str, int]:
    totals: Counter = Counter()
    for info in infos:
        totals[key(info)] += info.size_bytes
    return dict(sorted(totals.items()))


def _duplicate_candidates(weights: list[_Weight]) -> list[StoredTensor]:
    """The weights share's finder can compare, as share collects them: dense numeric tensors held in
    memory (sparse ones, external data not loaded and string/float8 tensors are not compared)."""
    candidates = []
    for order, weight in enumerate(weights):
        tensor = weight.tensor
        if not isinstance(tensor, onnx.TensorProto) or (
            tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data
        ):
            continue
        try:
            values = numpy_helper.to_array(tensor)
        except (ValueError, TypeError, KeyError, NotImplementedError, OSError):
            continue
        if values.dtype.kind in "biuf":
            name = _display_name(weight.graph, weight.name)
            candidates.append(StoredTensor(name, values, order, stored_bytes(tensor), weight.graph))
    return candidates


def _external_locations(weights: list[_Weight]) -> list[str]:
    locations: set[str] = set()
    for weight in weights:
        parts = [weight.tensor]
        if isinstance(weight.tensor, onnx.SparseTensorProto):
            parts = [weight.tensor.values, weight.tensor.indices]
        for tensor in parts:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(locations)


def _file_size_bytes(path: str, model: onnx.ModelProto, weights: list[_Weight], weight_bytes: int) -> int | None:
    """Model file plus referenced external data files (stat only; missing files ignored).

    Loading external data erases the locations from the in-memory model, so when the file is
    too small to hold the weights we re-read the (then small) model file without its data.
    """
    try:
        size = os.path.getsize(path)
    except OSError:
        return None
    locations = _external_locations(weights)
    if not locations and size < weight_bytes:
        try:
            on_disk = onnx.load(path, load_external_data=False)
        except Exception:
            on_disk = None
        if on_disk is not None:
            locations = _external_locations(_walk_model(on_disk).weights)
    folder = os.path.dirname(os.path.abspath(path))
    for location in locations:
        try:
            size += os.path.getsize(os.path.join(folder, location))
        except OSError:
            continue
    return size


def format_type(value_type: onnx.TypeProto) -> str:
    """ "FLOAT[batch,3,224,224]"; symbolic dims by name, unknown dims as "?"."""
    kind = value_type.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        tensor_type = getattr(value_type, kind)
        prefix = "sparse " if kind == "sparse_tensor_type" else ""
        dtype = prefix + dtype_name(tensor_type.elem_type)
        if not tensor_type.HasField("shape"):
            return dtype
        dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
        return f"{dtype}[{','.join(dims)}]"
    if kind == "sequence_type":
        return f"seq({format_type(value_type.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({format_type(value_type.optional_type.elem_type)})"
    if kind == "map_type":
        key = dtype_name(value_type.map_type.key_type)
        return f"map({key},{format_type(value_type.map_type.value_type)})"
    return "?"


def _format_value(value: onnx.ValueInfoProto) -> str:
    return f"{value.name}: {format_type(value.type)}"


def inspect_model(
    model: onnx.ModelProto,
    *,
    path: str | os.PathLike | None = None,
    top: int = 10,
    min_duplicate_bytes: int = 0,
) -> ModelInspection:
    """Describe a loaded model; ``path`` only adds the on-disk size (model + external data).

    ``weight_bytes_by_op`` attributes each weight once, to the op type of its first consumer
    in walk order (graph node order, a subgraph right after the node that owns it, functions
    last); weights nobody reads are listed under ``"(unused)"``.
    """
    walk = _walk_model(model)
    infos = [weight.info() for weight in walk.weights]
    total_bytes = sum(info.size_bytes for info in infos)
    constants = [info for info in infos if info.source == "constant-node"]
    by_op: Counter = Counter()
    for weight, info in zip(walk.weights, infos, strict=True):
        by_op[weight.first_consumer_op or UNUSED_OP] += info.size_bytes
    initializer_names = {tensor.name for tensor in model.graph.initializer}
    path_text = os.fspath(path) if path is not None else None
    return ModelInspection(
        path=path_text,
        file_size_bytes=(_file_size_bytes(path_text, model, walk.weights, total_bytes) if path_text else None),
        ir_version=int(model.ir_version),
        opsets=dict(sorted((o.domain or "ai.onnx", int(o.version)) for o in model.opset_import)),
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        nodes_by_op=dict(sorted(walk.nodes_by_op.items())),
        weight_bytes_by_dtype=_sum_by(infos, lambda info: info.dtype),
        weight_bytes_by_op=dict(sorted(by_op.items())),
        weight_bytes_total=total_bytes,
        constant_node_weights=len(constants),
        constant_node_weight_bytes=sum(info.size_bytes for info in constants),
        subgraphs=list(walk.subgraphs),
        largest_tensors=sorted(infos, key=lambda i: (-i.size_bytes, i.graph, i.name))[:top],
        duplicates=duplicate_groups(_duplicate_candidates(walk.weights), min_bytes=min_duplicate_bytes),
        inputs=[_format_value(v) for v in model.graph.input if v.name not in initializer_names],
        outputs=[_format_value(v) for v in model.graph.output],
        metadata_keys=sorted(prop.key for prop in model.metadata_props),
        non_finite=non_finite_tensors([(_display_name(w.graph, w.name), w.tensor) for w in walk.weights]),
    )
