"""onnx-graphsurgeon glue: import/export that keeps what real models carry, graph walking,
weights in initializers or Constant nodes, cleanup and topological order.

onnx-graphsurgeon shares one tensor object between a graph and the subgraphs that read it from
the outer scope, which is what passes want. Its exporter, though, drops ``metadata_props`` and the
model doc string, and copies every outer-scope constant into each subgraph that reads it as a
new initializer (a weight used in both branches of an If is stored three times). ``export_model``
repairs both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from optimizer.errors import PassError
from optimizer.fileio.lazy_io import MappedValues, SpillFile, is_lazy, mapped_tensor, spillable
from optimizer.graph.interface import (
    keep_input_declarations,
    keep_training_initializers,
    record_training_bindings,
    restore_initializer_inputs,
)
from optimizer.graph.sparse_storage import restore_unchanged_sparse, wrap_sparse_constants

G_LOGGER.severity = G_LOGGER.ERROR

DEFAULT_DOMAINS = (None, "", "ai.onnx")
GRAPH_ATTRIBUTE_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import ``model`` into onnx-graphsurgeon.

    The graph keeps references to the model's tensor protos (no copy of large weights), so pass a
    model the caller does not own, such as the one ``optimizer.fileio.model.load_model`` returns. Lazy
    tensors (a large model loaded lazily) become read-only memory maps: a pass that changes a
    weight assigns new values.
    """
    try:
        graph = gs.import_onnx(model)
    except Exception as error:  # onnx-graphsurgeon raises bare exceptions on malformed graphs
        raise PassError(f"cannot import graph '{model.graph.name}': {error}") from error
    restore_initializer_inputs(model.graph, graph)
    record_training_bindings(model, graph)
    bound = graph.training_bound_names
    graph.dropped_initializers = [entry for entry in unused_initializers(model.graph)
                                  if entry["graph"] != "main" or entry["tensor"] not in bound]
    graph.lazy_tensors = _map_lazy_constants(graph)
    constants = _all_constants(graph)
    wrap_sparse_constants(constants)
    _wrap_string_constants(constants)
    return graph


class StringValues(LazyValues):
    """onnx-graphsurgeon values of a STRING tensor, loaded as the bytes it stores.

    ``numpy_helper.to_array`` decodes strings as UTF-8, which fails on the arbitrary bytes ONNX
    allows; a pass that merely looks at such a tensor must not break the model.
    """

    def load(self) -> np.ndarray:
        shape = tuple(int(d) for d in self.tensor.dims)
        return np.array(list(self.tensor.string_data), dtype=object).reshape(shape)


def _wrap_string_constants(constants: list[gs.Constant]) -> None:
    for constant in constants:
        values = constant._values
        if (type(values) is LazyValues and isinstance(values.tensor, onnx.TensorProto)
                and values.tensor.data_type == onnx.TensorProto.STRING):
            constant._values = StringValues(values.tensor)


def _all_constants(root: gs.Graph) -> list[gs.Constant]:
    """Every Constant once: initializers and Constant-node values, in every graph and function."""
    graphs = list(iter_graphs(root))
    for function in getattr(root, "functions", []):
        graphs.extend(iter_graphs(function))
    found: dict[int, gs.Constant] = {}
    for graph in graphs:
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant):
                found.setdefault(id(tensor), tensor)
        for node in graph.nodes:
            for value in node.attrs.values():
                if isinstance(value, gs.Constant):
                    found.setdefault(id(value), value)
    return list(found.values())


def _map_lazy_constants(root: gs.Graph) -> bool:
    """Lazy tensors become read-only memory maps of their verified files, never a path that
    onnx-graphsurgeon would resolve against the working folder."""
    found = False
    for constant in _all_constants(root):
        values = constant._values
        if (isinstance(values, LazyValues) and not isinstance(values, MappedValues)
                and isinstance(values.tensor, onnx.TensorProto) and is_lazy(values.tensor)):
            constant._values = MappedValues(values.tensor)
            constant.data_location = None
            found = True
    return found


def release_mapped_values(root: gs.Graph) -> None:
    """Unmap every unchanged weight a pass read, so memory holds only what passes changed."""
    for constant in _all_constants(root):
        marker = mapped_tensor(constant._values)
        if marker is not None:
            constant._values = MappedValues(marker)


def _spill_new_arrays(root: gs.Graph) -> list[tuple[gs.Constant, np.ndarray]]:
    """Write the large arrays passes made to a spill file and reference them, for export.

    Only for graphs imported with lazy tensors. Returns what to put back afterwards.
    """
    chosen = [(c, spillable(c._values)) for c in _all_constants(root) if getattr(c, "_export_dtype", None) is None]
    chosen = [(constant, data) for constant, data in chosen if data is not None]
    if not chosen:
        return []
    spill = SpillFile()
    tensors = [spill.add(data, constant.name) for constant, data in chosen]
    chosen = [constant for constant, _ in chosen]
    spill.close()
    restore = [(constant, constant._values) for constant in chosen]
    for constant, tensor in zip(chosen, tensors):
        constant._values = MappedValues(tensor)
    return restore


def dropped_initializers(graph: gs.Graph) -> list[dict[str, object]]:
    """Initializers no node read; onnx-graphsurgeon leaves them out when it imports a model."""
    return list(getattr(graph, "dropped_initializers", []))


def unused_initializers(graph: onnx.GraphProto, path: str = "main") -> list[dict[str, object]]:
    """Initializers of ``graph`` and its subgraphs that no node and no graph output reads."""
    read = _names_read(graph)
    unused: list[dict[str, object]] = []
    for tensor in graph.initializer:
        if tensor.name not in read:
            unused.append({"tensor": tensor.name, "graph": path, "bytes": tensor_proto_bytes(tensor)})
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in _attribute_graphs(attribute):
                unused.extend(unused_initializers(subgraph, f"{path}/{node.name or node.op_type}.{attribute.name}"))
    return unused


def _names_read(graph: onnx.GraphProto) -> set[str]:
    read = {output.name for output in graph.output} | {value.name for value in graph.input}
    for node in graph.node:
        read.update(name for name in node.input if name)
        for attribute in node.attribute:
            for subgraph in _attribute_graphs(attribute):
                read.update(_names_read(subgraph))
    return read


PACKED_4BIT_TYPES = frozenset(
    getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, name)
)


PACKED_SUB_BYTE_TYPES = PACKED_4BIT_TYPES | frozenset(
    getattr(onnx.TensorProto, name) for name in ("INT2", "UINT2") if hasattr(onnx.TensorProto, name)
)


def tensor_proto_bytes(tensor: onnx.TensorProto | onnx.SparseTensorProto) -> int:
    """Bytes the tensor's values take when stored raw (4-bit types pack two per byte); a sparse
    tensor counts its values and indices."""
    if isinstance(tensor, onnx.SparseTensorProto):
        return tensor_proto_bytes(tensor.values) + tensor_proto_bytes(tensor.indices)
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(item) for item in tensor.string_data)
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    if tensor.data_type in PACKED_4BIT_TYPES:
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def tensor_proto_dtype(tensor: onnx.TensorProto | onnx.SparseTensorProto) -> int:
    """The ONNX element type of a dense or sparse tensor proto."""
    return tensor.values.data_type if isinstance(tensor, onnx.SparseTensorProto) else tensor.data_type


def export_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` as a model carrying ``template``'s model-level fields.

    Restores metadata, doc string, producer and training info, keeps every opset the template
    declared (custom domains included), raises the IR version only when the opset needs it, and
    stores each outer-scope constant once, in the scope that owns it. A graph imported with
    lazy tensors exports them as lazy references, and large arrays passes made are spilled to
    a file first (``optimizer.fileio.lazy_io``), so the model never holds all weights in memory.
    """
    release_mapped_values(graph)
    restore_unchanged_sparse(_all_constants(graph))
    _store_special_arrays(graph)
    restore = _spill_new_arrays(graph) if getattr(graph, "lazy_tensors", False) else []
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    except Exception as error:
        raise PassError(f"cannot export graph '{graph.name}': {error}") from error
    finally:
        for constant, values in restore:
            constant._values = values
    _hoist_sibling_copies(model.graph)
    _remove_outer_scope_copies(model.graph, frozenset())
    keep_input_declarations(graph, model.graph)
    keep_training_initializers(graph, model)
    _copy_model_fields(template, model)
    _merge_opsets(template, graph, model)
    return model


def _store_special_arrays(root: gs.Graph) -> None:
    """Store loaded 4-bit (and 2-bit) arrays packed, and string arrays as ``string_data``.

    onnx-graphsurgeon turns a weight into a numpy array as soon as a pass reads it, and exports
    an array with ``tobytes()``, one byte per element: a packed INT4 tensor read by any pass
    would come out twice too long, and a STRING tensor cannot be exported at all.
    ``numpy_helper.from_array`` stores both correctly.
    """
    for constant in _all_constants(root):
        values = constant._values
        if not isinstance(values, np.ndarray):
            continue
        if values.dtype.kind in "OSU" or _onnx_dtype(values.dtype) in PACKED_SUB_BYTE_TYPES:
            constant._values = LazyValues(onnx.numpy_helper.from_array(values, constant.name))


def _onnx_dtype(dtype: np.dtype) -> int | None:
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(dtype))
    except (KeyError, ValueError, TypeError):
        return None


def _copy_model_fields(template: onnx.ModelProto, model: onnx.ModelProto) -> None:
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.domain = template.domain
    model.model_version = template.model_version
    model.doc_string = template.doc_string
    if template.graph.doc_string:
        model.graph.doc_string = template.graph.doc_string
    else:
        model.graph.ClearField("doc_string")
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    del model.training_info[:]
    model.training_info.extend(template.training_info)


def _merge_opsets(template: onnx.ModelProto, graph: gs.Graph, model: onnx.ModelProto) -> None:
    versions: dict[str, int] = {}
    for entry in list(template.opset_import) + list(model.opset_import):
        domain = "" if entry.domain in DEFAULT_DOMAINS else entry.domain
        versions[domain] = max(versions.get(domain, 0), entry.version)
    if graph.opset:
        versions[""] = int(graph.opset)
    del model.opset_import[:]
    for domain in [d for d in (entry.domain for entry in template.opset_import)] + sorted(versions):
        key = "" if domain in DEFAULT_DOMAINS else domain
        if key in versions:
            model.opset_import.append(onnx.helper.make_opsetid(domain, versions.pop(key)))
    minimum_ir = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(template.ir_version, minimum_ir)


def _remove_outer_scope_copies(graph: onnx.GraphProto, outer_names: frozenset[str]) -> None:
    """Drop subgraph initializers and value_info that duplicate names of an enclosing scope."""
    if outer_names:
        kept = [t for t in graph.initializer if t.name not in outer_names]
        if len(kept) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(kept)
        info = [v for v in graph.value_info if v.name not in outer_names]
        if len(info) != len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(info)
    visible = outer_names | _defined_names(graph)
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in _attribute_graphs(attribute):
                _remove_outer_scope_copies(subgraph, visible)


def _hoist_sibling_copies(graph: onnx.GraphProto) -> None:
    """Store once, in ``graph``, a constant that several of its subgraphs each hold a copy of.

    onnx-graphsurgeon writes a constant into every graph whose nodes read it, so a weight read
    only by both branches of an If would be stored twice. Deepest graphs are handled first, so
    each constant ends up in the closest graph that encloses all its readers.
    """
    subtrees: list[dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]]] = []
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in _attribute_graphs(attribute):
                _hoist_sibling_copies(subgraph)
                subtrees.append(_initializers_in_tree(subgraph))
    defined = _defined_names(graph)
    shared = sorted({name for tree in subtrees for name in tree if sum(name in t for t in subtrees) > 1} - defined)
    for name in shared:
        copies = [location for tree in subtrees for location in tree.get(name, [])]
        first = copies[0][1].SerializeToString(deterministic=True)
        if any(tensor.SerializeToString(deterministic=True) != first for _, tensor in copies[1:]):
            continue
        graph.initializer.append(copies[0][1])
        for owner, _ in copies:
            kept = [t for t in owner.initializer if t.name != name]
            del owner.initializer[:]
            owner.initializer.extend(kept)


def _initializers_in_tree(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]]:
    found: dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}
    for tensor in graph.initializer:
        found.setdefault(tensor.name, []).append((graph, tensor))
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in _attribute_graphs(attribute):
                for name, locations in _initializers_in_tree(subgraph).items():
                    found.setdefault(name, []).extend(locations)
    return found


def _defined_names(graph: onnx.GraphProto) -> frozenset[str]:
    names = {t.name for t in graph.initializer}
    names.update(t.values.name for t in graph.sparse_initializer)
    names.update(v.name for v in graph.input)
    names.update(output for node in graph.node for output in node.output if output)
    return frozenset(names)


def _attribute_graphs(attribute: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attribute.type == onnx.AttributeProto.GRAPH:
        return [attribute.g]
    if attribute.type == onnx.AttributeProto.GRAPHS:
        return list(attribute.graphs)
    return []


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph, then every subgraph (If/Loop/Scan bodies and custom-op graphs), depth first."""
    yield graph
    for node in graph.nodes:
        for subgraph in node_subgraphs(node):
            yield from iter_graphs(subgraph)


def node_subgraphs(node: gs.Node) -> list[gs.Graph]:
    found: list[gs.Graph] = []
    for key in node.attrs:
        value = node.attrs[key]
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(item for item in value if isinstance(item, gs.Graph))
    return found


def iter_nodes(graph: gs.Graph) -> Iterator[tuple[gs.Graph, gs.Node]]:
    """Every node of every graph, with the graph that holds it."""
    for owner in iter_graphs(graph):
        for node in owner.nodes:
            yield owner, node


def is_constant_derived(tensor: gs.Tensor, memo: dict[int, bool | None]) -> bool:
    """True when ``tensor`` is computed from constants only (onnxruntime folds it at load, so it is
    a weight, not an activation). ``memo`` caches answers by tensor id across calls."""
    stack = [(tensor, False)]
    while stack:
        current, expanded = stack.pop()
        key = id(current)
        if isinstance(current, gs.Constant):
            memo[key] = True
            continue
        producers = current.inputs
        if len(producers) != 1 or producers[0].domain not in DEFAULT_DOMAINS or any(
                isinstance(value, gs.Graph) for value in producers[0].attrs.values()):  # fmt: skip
            memo[key] = False
            continue
        inputs = [t for t in producers[0].inputs if t.name]
        if expanded:
            memo[key] = all(isinstance(t, gs.Constant) or memo.get(id(t)) is True for t in inputs)
        elif key not in memo:  # None while in progress: a cycle reads as "not constant"
            memo[key] = None
            stack.append((current, True))
            stack.extend((t, False) for t in inputs if id(t) not in memo)
    return memo[id(tensor)] is True


def is_constant_node(node: gs.Node) -> bool:
    return node.op == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.outputs) == 1


def constant_node_values(node: gs.Node) -> np.ndarray | None:
    """The tensor a Constant node produces, or None when it holds a sparse or unknown value."""
    attrs = node.attrs
    if "value" in attrs and isinstance(attrs["value"], gs.Constant):
        return attrs["value"].values
    scalar_forms = {
        "value_float": np.float32,
        "value_floats": np.float32,
        "value_int": np.int64,
        "value_ints": np.int64,
    }
    for key, dtype in scalar_forms.items():
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    return None


def weight_values(tensor: gs.Tensor) -> np.ndarray | None:
    """Values of a weight held as an initializer or produced by a Constant node, else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    producers = tensor.inputs
    if len(producers) == 1 and is_constant_node(producers[0]):
        return constant_node_values(producers[0])
    return None


@dataclass(frozen=True)
class TensorUse:
    """One node input slot reading a tensor, wherever the node lives."""

    graph: gs.Graph
    node: gs.Node
    index: int


def tensor_uses(root: gs.Graph) -> dict[str, list[TensorUse]]:
    """Every node input slot in every graph, keyed by tensor name (outer-scope reads included)."""
    uses: dict[str, list[TensorUse]] = {}
    for owner, node in iter_nodes(root):
        for index, tensor in enumerate(node.inputs):
            if tensor.name:
                uses.setdefault(tensor.name, []).append(TensorUse(owner, node, index))
    return uses


def graph_output_names(root: gs.Graph) -> frozenset[str]:
    """Names that are an output of the main graph or of any subgraph."""
    return frozenset(t.name for g in iter_graphs(root) for t in g.outputs)


def toposort(graph: gs.Graph) -> None:
    """Sort every graph topologically; a cycle is a PassError naming the graph."""
    try:
        graph.toposort(recurse_subgraphs=True, recurse_functions=True)
    except Exception as error:
        raise PassError(f"graph '{graph.name}' cannot be sorted topologically: {error}") from error


def cleanup(graph: gs.Graph) -> None:
    """Remove nodes and tensors that no graph output depends on, in every graph."""
    graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True, recurse_functions=True)
