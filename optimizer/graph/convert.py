"""Import a model into onnx-graphsurgeon and export it back, keeping what real models carry.

onnx-graphsurgeon shares one tensor object between a graph and the subgraphs that read it from
the outer scope, which is what passes want. Its exporter, though, drops ``metadata_props`` and the
model doc string, and copies every outer-scope constant into each subgraph that reads it as a
new initializer (a weight used in both branches of an If is stored three times). ``export_model``
repairs both (the scope repair is ``export_scopes``).
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from optimizer.errors import PassError
from optimizer.fileio.lazy_io import MappedValues, SpillFile, is_lazy, mapped_tensor, spillable
from optimizer.graph.bytes import PACKED_SUB_BYTE_TYPES, stored_bytes
from optimizer.graph.export_scopes import (
    hoist_sibling_copies,
    keep_declared_value_info,
    remove_outer_scope_copies,
)
from optimizer.graph.interface import (
    keep_input_declarations,
    keep_training_initializers,
    record_training_bindings,
    restore_initializer_inputs,
)
from optimizer.graph.opsets import merge_opsets
from optimizer.graph.sparse_storage import restore_unchanged_sparse, wrap_sparse_constants
from optimizer.graph.walk import iter_graphs, names_read, walk_proto

G_LOGGER.severity = G_LOGGER.ERROR


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
    graph.dropped_initializers = [
        entry for entry in unused_initializers(model.graph) if entry["graph"] != "main" or entry["tensor"] not in bound
    ]
    graph.lazy_tensors = _map_lazy_constants(graph)
    constants = all_constants(graph)
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
        if (
            type(values) is LazyValues
            and isinstance(values.tensor, onnx.TensorProto)
            and values.tensor.data_type == onnx.TensorProto.STRING
        ):
            constant._values = StringValues(values.tensor)


def all_constants(root: gs.Graph) -> list[gs.Constant]:
    """Every Constant once: initializers and Constant-node values, in every graph and function."""
    found: dict[int, gs.Constant] = {}
    for graph in iter_graphs(root, functions=True):
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
    for constant in all_constants(root):
        values = constant._values
        if (
            isinstance(values, LazyValues)
            and not isinstance(values, MappedValues)
            and isinstance(values.tensor, onnx.TensorProto)
            and is_lazy(values.tensor)
        ):
            constant._values = MappedValues(values.tensor)
            constant.data_location = None
            found = True
    return found


def release_mapped_values(root: gs.Graph) -> None:
    """Unmap every unchanged weight a pass read, so memory holds only what passes changed."""
    for constant in all_constants(root):
        marker = mapped_tensor(constant._values)
        if marker is not None:
            constant._values = MappedValues(marker)


def _spill_new_arrays(root: gs.Graph) -> list[tuple[gs.Constant, np.ndarray]]:
    """Write the large arrays passes made to a spill file and reference them, for export.

    Only for graphs imported with lazy tensors. Returns what to put back afterwards.
    """
    candidates = [(c, spillable(c._values)) for c in all_constants(root) if getattr(c, "_export_dtype", None) is None]
    spilled = [(constant, data) for constant, data in candidates if data is not None]
    if not spilled:
        return []
    spill = SpillFile()
    tensors = [spill.add(data, constant.name) for constant, data in spilled]
    chosen = [constant for constant, _ in spilled]
    spill.close()
    restore = [(constant, constant._values) for constant in chosen]
    for constant, tensor in zip(chosen, tensors, strict=True):
        constant._values = MappedValues(tensor)
    return restore


class DroppedInitializer(TypedDict):
    """An initializer no node reads: its name, the path label of its graph, its bytes."""

    tensor: str
    graph: str
    bytes: int


def dropped_initializers(graph: gs.Graph) -> list[DroppedInitializer]:
    """Initializers no node read; onnx-graphsurgeon leaves them out when it imports a model."""
    return list(getattr(graph, "dropped_initializers", []))


def unused_initializers(graph: onnx.GraphProto) -> list[DroppedInitializer]:
    """Initializers of ``graph`` and its subgraphs that no node and no graph output reads."""
    unused: list[DroppedInitializer] = []
    for site in walk_proto(graph):
        read = names_read(site.graph, include_interface=True)
        unused.extend(
            {"tensor": tensor.name, "graph": site.path, "bytes": stored_bytes(tensor)}
            for tensor in site.graph.initializer
            if tensor.name not in read
        )
    return unused


def export_model(
    graph: gs.Graph, template: onnx.ModelProto, *, declared_value_info: frozenset[str] | None = None
) -> onnx.ModelProto:
    """Export ``graph`` as a model carrying ``template``'s model-level fields.

    Restores metadata, doc string, producer and training info, keeps every opset the template
    declared (custom domains included), raises the IR version only when the opset needs it, and
    stores each outer-scope constant once, in the scope that owns it. A graph imported with
    lazy tensors exports them as lazy references, and large arrays passes made are spilled to
    a file first (``optimizer.fileio.lazy_io``), so the model never holds all weights in memory.
    """
    release_mapped_values(graph)
    restore_unchanged_sparse(all_constants(graph))
    _store_special_arrays(graph)
    restore = _spill_new_arrays(graph) if getattr(graph, "lazy_tensors", False) else []
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    except Exception as error:
        raise PassError(f"cannot export graph '{graph.name}': {error}") from error
    finally:
        for constant, values in restore:
            constant._values = values
    hoist_sibling_copies(model.graph)
    remove_outer_scope_copies(model.graph)
    if declared_value_info is not None:
        keep_declared_value_info(model.graph, declared_value_info)
    keep_input_declarations(graph, model.graph)
    keep_training_initializers(graph, model)
    _copy_model_fields(template, model)
    merge_opsets(template, graph, model)
    return model


def _store_special_arrays(root: gs.Graph) -> None:
    """Store loaded 4-bit (and 2-bit) arrays packed, and string arrays as ``string_data``.

    onnx-graphsurgeon turns a weight into a numpy array as soon as a pass reads it, and exports
    an array with ``tobytes()``, one byte per element: a packed INT4 tensor read by any pass
    would come out twice too long, and a STRING tensor cannot be exported at all.
    ``numpy_helper.from_array`` stores both correctly.
    """
    for constant in all_constants(root):
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


MODEL_FIELDS = ("producer_name", "producer_version", "domain", "model_version", "doc_string")
"""Scalar ModelProto fields copied as the template has them: set, or absent (an empty value that
was never set costs bytes and is not what the input said)."""


def _copy_model_fields(template: onnx.ModelProto, model: onnx.ModelProto) -> None:
    for name in MODEL_FIELDS:
        if template.HasField(name):
            setattr(model, name, getattr(template, name))
        else:
            model.ClearField(name)
    if template.graph.doc_string:
        model.graph.doc_string = template.graph.doc_string
    else:
        model.graph.ClearField("doc_string")
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    del model.training_info[:]
    model.training_info.extend(template.training_info)
