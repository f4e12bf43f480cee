"""The one walker over every graph of a model: the main graph, If/Loop/Scan bodies (and any
graph-valued attribute of a custom op), model-local functions and training graphs.

Two representations are walked the same way: onnx protobuf (load checks, inspection, export
repair, calibration) and onnx-graphsurgeon (passes). The walk is iterative, so a hostile nesting
depth is reported (``max_depth``) instead of exhausting Python's stack, and every graph gets one
path label, used in reports and messages::

    main/<node name or Op_index>.<attribute>          a GRAPH attribute
    main/<node name or Op_index>.<attribute>[k]       the k-th graph of a GRAPHS attribute
    main/<label>#<index>.<attribute>                  when two nodes share a name
    function:<domain>.<name>[:<overload>]             a model-local function
    training[i].initialization / training[i].algorithm

``events`` gives the lexical order (enter a graph, each node, the node's subgraphs right after
it, leave the graph); ``walk`` gives graphs in pre-order or post-order (deepest first).
Passes walk with ``functions=False``: compressing inside a function body would change what every
call site computes, so it is a decision of its own, not a side effect of walking.

This module imports only onnx and onnx-graphsurgeon, so every layer may use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import onnx
import onnx_graphsurgeon as gs

MAIN_GRAPH = "main"
LOOPING_OPS = ("Loop", "Scan")
"""Ops whose body runs once per iteration: work hoisted out of them runs once."""

GraphKind = Literal["main", "subgraph", "function", "training-init", "training-algo"]
Order = Literal["pre", "post"]


@dataclass(frozen=True, eq=False)
class GraphSite:
    """One graph of a model and where it sits: its path label, depth and the node that holds it."""

    graph: Any  # onnx.GraphProto | onnx.FunctionProto | gs.Graph (gs.Function)
    kind: GraphKind
    path: str
    depth: int = 0
    parent: GraphSite | None = None
    owner: Any = None  # the NodeProto / gs.Node whose attribute holds this graph
    attribute: str | None = None  # "then_branch", "body", "branches[1]"


@dataclass(frozen=True)
class Enter:
    site: GraphSite


@dataclass(frozen=True)
class NodeStep:
    site: GraphSite
    node: Any
    index: int


@dataclass(frozen=True)
class Leave:
    site: GraphSite


Event = Enter | NodeStep | Leave


def proto_subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """The graphs a protobuf node's attributes hold, each with its attribute label."""
    found: list[tuple[str, onnx.GraphProto]] = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            found.append((attribute.name, attribute.g))
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            found.extend((f"{attribute.name}[{k}]", graph) for k, graph in enumerate(attribute.graphs))
    return found


def gs_subgraphs(node: gs.Node) -> list[tuple[str, gs.Graph]]:
    """The graphs an onnx-graphsurgeon node's attributes hold, each with its attribute label."""
    found: list[tuple[str, gs.Graph]] = []
    for key, value in node.attrs.items():
        if isinstance(value, gs.Graph):
            found.append((key, value))
        elif isinstance(value, (list, tuple)):
            found.extend((f"{key}[{k}]", item) for k, item in enumerate(value) if isinstance(item, gs.Graph))
    return found


def node_subgraphs(node: gs.Node) -> list[gs.Graph]:
    return [graph for _, graph in gs_subgraphs(node)]


@dataclass
class _Shape:
    """How to read nodes and child graphs of one representation."""

    nodes: Callable[[Any], Sequence[Any]]
    subgraphs: Callable[[Any], list[tuple[str, Any]]]
    op: Callable[[Any], str]
    max_depth: int | None = None
    too_deep: Callable[[Any], NoReturn] | None = None
    paths: set[str] = field(default_factory=set)

    def children(self, site: GraphSite, node: Any, index: int) -> list[GraphSite]:
        found = []
        for attribute, graph in self.subgraphs(node):
            if self.max_depth is not None and site.depth + 1 > self.max_depth:
                if self.too_deep is not None:
                    self.too_deep(node)
                raise RecursionError(f"subgraphs nested over {self.max_depth} levels")
            found.append(
                GraphSite(
                    graph, "subgraph", self._path(site, node, index, attribute), site.depth + 1, site, node, attribute
                )
            )
        return found

    def _path(self, site: GraphSite, node: Any, index: int, attribute: str) -> str:
        label = node.name or f"{self.op(node)}_{index}"
        path = f"{site.path}/{label}.{attribute}"
        if path in self.paths:
            path = f"{site.path}/{label}#{index}.{attribute}"
        self.paths.add(path)
        return path


def _events(roots: Iterable[GraphSite], shape: _Shape) -> Iterator[Event]:
    """Lexical order without recursion: a stack of iterators over pending steps."""
    for root in roots:
        shape.paths.add(root.path)
        stack: list[Iterator[Event | GraphSite]] = [iter([root])]
        while stack:
            step = next(stack[-1], None)
            if step is None:
                stack.pop()
            elif isinstance(step, GraphSite):
                yield Enter(step)
                nodes = shape.nodes(step.graph)
                stack.append(iter([Leave(step)]))
                stack.append(iter([NodeStep(step, node, index) for index, node in enumerate(nodes)]))
            elif isinstance(step, NodeStep):
                yield step
                stack.append(iter(shape.children(step.site, step.node, step.index)))
            else:
                yield step


def _sites(events: Iterator[Event], order: Order) -> Iterator[GraphSite]:
    wanted = Enter if order == "pre" else Leave
    for event in events:
        if isinstance(event, wanted):
            yield event.site


# --- protobuf ----------------------------------------------------------------------------------


def function_path(function: onnx.FunctionProto) -> str:
    overload = getattr(function, "overload", "")
    suffix = f":{overload}" if overload else ""
    return f"function:{function.domain}.{function.name}{suffix}"


def _proto_shape(max_depth: int | None, too_deep: Callable[[Any], NoReturn] | None) -> _Shape:
    return _Shape(lambda graph: graph.node, proto_subgraphs, lambda node: node.op_type, max_depth, too_deep)


def _model_roots(model: onnx.ModelProto, functions: bool, training: bool) -> list[GraphSite]:
    roots = [GraphSite(model.graph, "main", MAIN_GRAPH)]
    if functions:
        roots.extend(GraphSite(function, "function", function_path(function)) for function in model.functions)
    if training:
        for position, info in enumerate(model.training_info):
            roots.append(GraphSite(info.initialization, "training-init", f"training[{position}].initialization"))
            roots.append(GraphSite(info.algorithm, "training-algo", f"training[{position}].algorithm"))
    return roots


def model_events(
    model: onnx.ModelProto,
    *,
    functions: bool = True,
    training: bool = False,
    max_depth: int | None = None,
    too_deep: Callable[[Any], NoReturn] | None = None,
) -> Iterator[Event]:
    """Enter/NodeStep/Leave over every graph of ``model`` in lexical order.

    Roots in this order: the main graph, then model-local functions, then training graphs.
    ``too_deep(node)`` is called (and must raise) for a node whose subgraph would exceed ``max_depth``.
    """
    return _events(_model_roots(model, functions, training), _proto_shape(max_depth, too_deep))


def walk_model(
    model: onnx.ModelProto,
    *,
    functions: bool = True,
    training: bool = False,
    order: Order = "pre",
    max_depth: int | None = None,
    too_deep: Callable[[Any], NoReturn] | None = None,
) -> Iterator[GraphSite]:
    """Every graph of ``model`` (see ``model_events`` for the roots), pre-order or post-order."""
    events = model_events(model, functions=functions, training=training, max_depth=max_depth, too_deep=too_deep)
    return _sites(events, order)


def proto_events(graph: onnx.GraphProto, *, path: str = MAIN_GRAPH) -> Iterator[Event]:
    """Enter/NodeStep/Leave over ``graph`` and every graph nested in it, in lexical order."""
    return _events([GraphSite(graph, "main", path)], _proto_shape(None, None))


def walk_proto(graph: onnx.GraphProto, *, order: Order = "pre", path: str = MAIN_GRAPH) -> Iterator[GraphSite]:
    """``graph`` and every graph nested in it."""
    return _sites(proto_events(graph, path=path), order)


def names_read(graph: onnx.GraphProto, *, implicit_only: bool = False, include_interface: bool = False) -> set[str]:
    """Names the nodes of ``graph`` and of every nested graph read.

    ``include_interface`` adds each graph's input and output names (a name a graph declares is
    in use); ``implicit_only`` keeps only the names read from outside ``graph``: at each level,
    what a graph defines itself (inputs, initializers, node outputs) is taken away.
    """
    nested: dict[int, set[str]] = {}  # id(site) -> names its subgraphs read
    names: set[str] = set()
    for site in walk_proto(graph, order="post"):
        names = {name for node in site.graph.node for name in node.input if name}
        if include_interface:
            names.update(value.name for value in site.graph.output)
            names.update(value.name for value in site.graph.input)
        names |= nested.pop(id(site), set())
        if implicit_only:
            names -= defined_names(site.graph)
        if site.parent is not None:
            nested.setdefault(id(site.parent), set()).update(names)
    return names


def defined_names(graph: onnx.GraphProto) -> frozenset[str]:
    """Names ``graph`` itself defines: inputs, initializers (sparse ones too) and node outputs."""
    names = {value.name for value in graph.input}
    names.update(tensor.name for tensor in graph.initializer)
    names.update(tensor.values.name for tensor in graph.sparse_initializer)
    names.update(output for node in graph.node for output in node.output if output)
    return frozenset(names)


# --- onnx-graphsurgeon -------------------------------------------------------------------------


def _gs_shape() -> _Shape:
    return _Shape(lambda graph: graph.nodes, gs_subgraphs, lambda node: node.op)


def _gs_roots(root: gs.Graph, functions: bool) -> list[GraphSite]:
    roots = [GraphSite(root, "main", MAIN_GRAPH)]
    if functions:
        roots.extend(
            GraphSite(function, "function", f"function:{function.domain}.{function.name}")
            for function in getattr(root, "functions", [])
        )
    return roots


def gs_events(root: gs.Graph, *, functions: bool = False) -> Iterator[Event]:
    return _events(_gs_roots(root, functions), _gs_shape())


def walk(root: gs.Graph, *, functions: bool = False, order: Order = "pre") -> Iterator[GraphSite]:
    """Every graph under ``root`` (and its functions' bodies with ``functions=True``)."""
    return _sites(gs_events(root, functions=functions), order)


def iter_graphs(root: gs.Graph, *, functions: bool = False) -> Iterator[gs.Graph]:
    """The graph, then every subgraph (If/Loop/Scan bodies and custom-op graphs), depth first."""
    return (site.graph for site in walk(root, functions=functions))


def iter_nodes(root: gs.Graph, *, functions: bool = False) -> Iterator[tuple[gs.Graph, gs.Node]]:
    """Every node of every graph, with the graph that holds it."""
    for graph in iter_graphs(root, functions=functions):
        for node in graph.nodes:
            yield graph, node


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


@dataclass
class ScopeTree:
    """Where each graph sits under the main graph: parent, owning node, depth, walk order, path."""

    root: gs.Graph
    sites: dict[int, GraphSite] = field(default_factory=dict)
    order: dict[int, int] = field(default_factory=dict)
    node_graph: dict[int, gs.Graph] = field(default_factory=dict)

    @classmethod
    def build(cls, root: gs.Graph) -> ScopeTree:
        tree = cls(root)
        for site in walk(root):
            tree.sites[id(site.graph)] = site
            tree.order[id(site.graph)] = len(tree.order)
            for node in site.graph.nodes:
                tree.node_graph[id(node)] = site.graph
        return tree

    def path(self, graph: gs.Graph) -> str:
        return self.sites[id(graph)].path

    def depth(self, graph: gs.Graph) -> int:
        return self.sites[id(graph)].depth

    def add_node(self, graph: gs.Graph, node: gs.Node) -> None:
        """Append a new node to ``graph`` (the caller sorts the graph afterwards)."""
        graph.nodes.append(node)
        self.node_graph[id(node)] = graph

    def graph_of(self, node: gs.Node) -> gs.Graph:
        return self.node_graph[id(node)]

    def ancestors(self, graph: gs.Graph) -> list[gs.Graph]:
        """``graph`` itself, then each enclosing graph up to the main graph."""
        chain = [self.sites[id(graph)]]
        while chain[-1].parent is not None:
            chain.append(chain[-1].parent)
        return [site.graph for site in chain]

    def is_within(self, inner: gs.Graph, outer: gs.Graph) -> bool:
        return any(g is outer for g in self.ancestors(inner))

    def common_ancestor(self, graphs: Sequence[gs.Graph], *, hoist_out_of_loops: bool = False) -> gs.Graph:
        """The innermost graph enclosing all ``graphs``; with ``hoist_out_of_loops``, moved out of
        Loop/Scan bodies so that what is placed there runs once, not once per iteration."""
        common = self.ancestors(graphs[0])
        for graph in graphs[1:]:
            chain = {id(g) for g in self.ancestors(graph)}
            common = [g for g in common if id(g) in chain]
        site = self.sites[id(common[0])]
        while hoist_out_of_loops and site.parent is not None and site.owner.op in LOOPING_OPS:
            site = site.parent
        return site.graph

    def outermost(self, graphs: Sequence[gs.Graph]) -> list[gs.Graph]:
        """The graphs of ``graphs`` that no other one of them encloses, in walk order."""
        unique = {id(g): g for g in graphs}
        kept = [g for g in unique.values() if not any(id(a) in unique for a in self.ancestors(g)[1:])]
        return sorted(kept, key=lambda g: self.order[id(g)])
