"""Graph edits every pass ends with: topological order and dead-node cleanup, in every graph."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from optimizer.errors import PassError


def toposort(graph: gs.Graph) -> None:
    """Sort every graph topologically; a cycle is a PassError naming the graph."""
    try:
        graph.toposort(recurse_subgraphs=True, recurse_functions=True)
    except Exception as error:
        raise PassError(f"graph '{graph.name}' cannot be sorted topologically: {error}") from error


def cleanup(graph: gs.Graph) -> None:
    """Remove nodes and tensors that no graph output depends on, in every graph."""
    graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True, recurse_functions=True)
