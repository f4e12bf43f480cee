"""cleanup: remove what no output needs (nodes, initializers, Identity copies) and sort the graph."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from optimizer.graph.convert import dropped_initializers
from optimizer.graph.edit import cleanup, toposort
from optimizer.graph.opsets import DEFAULT_DOMAINS
from optimizer.graph.walk import iter_graphs
from optimizer.pass_base import Pass, PassContext, PassReport, PassResult, option
from optimizer.registry import register


@register
class CleanupPass(Pass):
    name = "cleanup"
    summary = "remove unused nodes and initializers and Identity nodes; sort topologically"
    lossless = True

    remove_identity: bool = option(True, "bypass Identity nodes (kept where a graph output copies an input)")

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        report = PassReport()
        before = graph_fingerprint(graph)
        dropped = dropped_initializers(graph)
        graph.dropped_initializers = []
        for entry in dropped:
            report.count("unused_initializers_removed")
            report.saved_bytes += int(entry["bytes"])
        nodes_before = _node_count(graph)
        if self.remove_identity:
            for owner in iter_graphs(graph):
                _bypass_identities(owner, report)
        cleanup(graph)
        toposort(graph)
        bypassed = report.counts.get("identities_removed", 0)
        report.count("unused_nodes_removed", nodes_before - _node_count(graph) - bypassed)
        modified = bool(dropped) or graph_fingerprint(graph) != before
        return PassResult(graph, modified, report.to_dict())


def graph_fingerprint(graph: gs.Graph) -> tuple:
    """Nodes, their order and their connections in every graph: equal when nothing changed."""
    return tuple(
        (
            id(owner),
            tuple(
                (id(node), node.op, tuple(t.name for t in node.inputs), tuple(t.name for t in node.outputs))
                for node in owner.nodes
            ),
            tuple(t.name for t in owner.outputs),
        )
        for owner in iter_graphs(graph)
    )


def _node_count(graph: gs.Graph) -> int:
    return sum(len(owner.nodes) for owner in iter_graphs(graph))


def _bypass_identities(graph: gs.Graph, report: PassReport) -> None:
    own_outputs = {id(t) for t in graph.outputs}
    produced_here = {id(t) for node in graph.nodes for t in node.outputs}
    for node in list(graph.nodes):
        if node.op != "Identity" or node.domain not in DEFAULT_DOMAINS or len(node.inputs) != 1:
            continue
        source, copy = node.inputs[0], node.outputs[0]
        if id(copy) not in own_outputs:
            _replace_uses(copy, source)
        elif id(source) in produced_here and id(source) not in own_outputs:
            _rename_producer_output(source, copy)
        else:
            report.skip(
                "node",
                node.name or copy.name,
                "graph output copies a graph input, a constant, an outer-scope tensor or another output",
            )
            continue
        node.inputs.clear()
        node.outputs.clear()
        report.count("identities_removed")


def _replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new


def _rename_producer_output(source: gs.Tensor, copy: gs.Tensor) -> None:
    """The node that made ``source`` makes the graph output ``copy`` directly."""
    producer = source.inputs[0]
    index = next(i for i, t in enumerate(producer.outputs) if t is source)
    _replace_uses(source, copy)
    copy.inputs.clear()
    producer.outputs[index] = copy
