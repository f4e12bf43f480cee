"""Names outside the nodes that refer to initializers: graph inputs and training bindings.

Initializers that are also graph inputs (overridable inputs) stay inputs.

ONNX lets a graph list an initializer in ``graph.input``: the initializer is a default value a
caller may override by feeding the name. onnx-graphsurgeon imports such an initializer as a
constant and drops it from the inputs, so a model that went through any pass would answer
"Invalid input name" to callers that feed it. Here the constant goes back into the graph's
inputs, at its place, after import; on export its declared type and shape (which may be
dynamic) replace the ones onnx-graphsurgeon derives from the values.

``ModelProto.training_info`` binds main-graph initializers by name (initialization_binding,
update_binding). Lossy passes leave bound initializers as they are (``passes.weight_guard``), and
one that only the training algorithm reads, which onnx-graphsurgeon drops on import, is written
back on export, so no binding is left naming nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from optimizer.graph.walk import iter_graphs, walk, walk_proto


def restore_initializer_inputs(proto: onnx.GraphProto, graph: gs.Graph) -> None:
    """Put overridable inputs back into ``graph.inputs`` (and every subgraph's) after import."""
    for proto_graph, gs_graph in _paired_graphs(proto, graph):
        stored = {t.name: t for t in proto_graph.initializer}
        if not any(value.name in stored for value in proto_graph.input):
            continue
        tensors = gs_graph.tensors()
        inputs, declared = [], {}
        for value in proto_graph.input:
            if value.name in stored:
                tensor = tensors.get(value.name)
                if not isinstance(tensor, gs.Constant):
                    tensor = gs.Constant(value.name, LazyValues(stored[value.name]))
                declared[value.name] = value
            else:
                tensor = next((t for t in gs_graph.inputs if t.name == value.name), None)
            if tensor is not None:
                inputs.append(tensor)
        inputs.extend(t for t in gs_graph.inputs if all(t is not kept for kept in inputs))
        gs_graph.inputs = inputs
        gs_graph.input_declarations = declared


def keep_input_declarations(graph: gs.Graph, proto: onnx.GraphProto) -> None:
    """Overridable inputs keep the type and shape they were declared with, on export."""
    for gs_graph, proto_graph in ((g, p) for p, g in _paired_graphs(proto, graph)):
        declared = vars(gs_graph).get("input_declarations", {})  # gs.Graph.__getattr__ looks up ops
        stored = {t.name for t in proto_graph.initializer}
        for index, value in enumerate(proto_graph.input):
            original = declared.get(value.name)
            if original is not None and value.name in stored and _same_elem_type(original, value):
                proto_graph.input[index].CopyFrom(original)


def overridable_input_ids(root: gs.Graph) -> frozenset[int]:
    """ids of the constants that are also inputs of some graph: callers may feed them."""
    return frozenset(id(t) for g in iter_graphs(root) for t in g.inputs if isinstance(t, gs.Constant))


def _same_elem_type(original: onnx.ValueInfoProto, exported: onnx.ValueInfoProto) -> bool:
    return original.type.tensor_type.elem_type == exported.type.tensor_type.elem_type


def _paired_graphs(proto: onnx.GraphProto, graph: gs.Graph) -> Iterator[tuple[onnx.GraphProto, gs.Graph]]:
    """The proto graph and the gs graph, then their subgraphs pairwise: same path label, under a
    paired parent with as many nodes on both sides (otherwise the node lists do not correspond)."""
    gs_sites = {site.path: site for site in walk(graph)}
    paired: set[str] = set()
    for site in walk_proto(proto):
        other = gs_sites.get(site.path)
        if other is None:
            continue
        if (
            site.parent is not None
            and other.parent is not None
            and (site.parent.path not in paired or len(site.parent.graph.node) != len(other.parent.graph.nodes))
        ):
            continue
        paired.add(site.path)
        yield site.graph, other.graph


def record_training_bindings(model: onnx.ModelProto, graph: gs.Graph) -> None:
    """Remember the initializers ``model.training_info`` binds, and those no node reads."""
    bound = frozenset(
        binding.key
        for info in model.training_info
        for binding in list(info.initialization_binding) + list(info.update_binding)
    )
    graph.training_bound_names = bound
    present = graph.tensors()
    graph.training_only_initializers = [t for t in model.graph.initializer if t.name in bound and t.name not in present]


def keep_training_initializers(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Write back bound initializers that no node reads (onnx-graphsurgeon dropped them)."""
    stored = {t.name for t in model.graph.initializer}
    for tensor in vars(graph).get("training_only_initializers", []):
        if tensor.name not in stored:
            model.graph.initializer.append(tensor)


TRAINING_BINDING_REASON = "bound by training_info (initialization_binding / update_binding)"


def training_bound_ids(root: gs.Graph) -> frozenset[int]:
    """ids of the main-graph constants a training_info binding names."""
    bound = vars(root).get("training_bound_names", frozenset())
    if not bound:
        return frozenset()
    return frozenset(id(t) for name, t in root.tensors().items() if name in bound and isinstance(t, gs.Constant))


def copy_interface_records(source: gs.Graph, target: gs.Graph) -> None:
    """Carry training-binding records over to a re-imported copy of ``source`` (opset conversion)."""
    for key in ("training_bound_names", "training_only_initializers"):
        if key in vars(source):
            setattr(target, key, vars(source)[key])
