"""Export repair for scopes: each constant stored once, in the scope that owns it.

onnx-graphsurgeon's exporter copies every outer-scope constant into each subgraph that reads it
as a new initializer (a weight used in both branches of an If is stored three times).
"""

from __future__ import annotations

import onnx

from optimizer.graph.walk import defined_names, proto_subgraphs, walk_proto


def remove_outer_scope_copies(graph: onnx.GraphProto) -> None:
    """Drop subgraph initializers and value_info that duplicate names of an enclosing scope."""
    visible: dict[int, frozenset[str]] = {}
    for site in walk_proto(graph):
        outer_names = visible[id(site.parent.graph)] if site.parent is not None else frozenset()
        if outer_names:
            _drop_names(site.graph, outer_names)
        visible[id(site.graph)] = outer_names | defined_names(site.graph)


def _drop_names(graph: onnx.GraphProto, names: frozenset[str]) -> None:
    kept = [t for t in graph.initializer if t.name not in names]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
    info = [v for v in graph.value_info if v.name not in names]
    if len(info) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(info)


def value_info_names(graph: onnx.GraphProto) -> frozenset[str]:
    """Names ``graph`` and its subgraphs declare value_info for."""
    return frozenset(info.name for site in walk_proto(graph) for info in site.graph.value_info)


def keep_declared_value_info(graph: onnx.GraphProto, declared: frozenset[str]) -> None:
    """Drop value_info for names the input model did not declare, in every graph.

    Passes give the tensors they touch a type (and onnx-graphsurgeon exports each typed tensor as
    value_info): on PP-OCRv4 det static that added 779 entries, 37 KB of a 1.42 MB file, that
    onnxruntime and the checker infer anyway. What the user's file declared stays.
    """
    for site in walk_proto(graph):
        info = [v for v in site.graph.value_info if v.name in declared]
        if len(info) != len(site.graph.value_info):
            del site.graph.value_info[:]
            site.graph.value_info.extend(info)


def hoist_sibling_copies(graph: onnx.GraphProto) -> None:
    """Store once, in a graph, a constant that several of its subgraphs each hold a copy of.

    onnx-graphsurgeon writes a constant into every graph whose nodes read it, so a weight read
    only by both branches of an If would be stored twice. Deepest graphs are handled first
    (post-order), so each constant ends up in the closest graph that encloses all its readers.
    """
    for site in walk_proto(graph, order="post"):
        _hoist_into(site.graph)


def _hoist_into(graph: onnx.GraphProto) -> None:
    subtrees = [_initializers_in_tree(sub) for node in graph.node for _, sub in proto_subgraphs(node)]
    defined = defined_names(graph)
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
    for site in walk_proto(graph):
        for tensor in site.graph.initializer:
            found.setdefault(tensor.name, []).append((site.graph, tensor))
    return found
