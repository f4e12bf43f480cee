"""The one name allocator: fresh, deterministic tensor and node names that collide with nothing in any
graph (the main graph and every subgraph), so a pass adding tensors never shadows or reuses a name.

Passes differ in one choice, made explicit by ``reserve_node_names``: quantize also avoids node names
(its new nodes are named through the allocator); share and cluster do not (their node names are built
apart), and reserving node names for them would rename a tensor that happens to carry a node's name.
"""

from __future__ import annotations

import itertools

import onnx_graphsurgeon as gs

from optimizer.graph.walk import iter_graphs


class NameAllocator:
    """Names taken in ``root`` and all its subgraphs: graph inputs and outputs, node inputs and outputs
    (with the ids of the tensor objects carrying each name), and node names when asked."""

    def __init__(self, root: gs.Graph, *, reserve_node_names: bool) -> None:
        self.carriers: dict[str, set[int]] = {}
        self.reserved: set[str] = set()
        for graph in iter_graphs(root):
            for tensor in itertools.chain(graph.inputs, graph.outputs):
                self.carriers.setdefault(tensor.name, set()).add(id(tensor))
            for node in graph.nodes:
                if reserve_node_names and node.name:
                    self.reserved.add(node.name)
                for tensor in itertools.chain(node.inputs, node.outputs):
                    if tensor.name:
                        self.carriers.setdefault(tensor.name, set()).add(id(tensor))

    def taken(self, name: str) -> bool:
        return name in self.carriers or name in self.reserved

    def others(self, tensor: gs.Tensor) -> set[int]:
        """Ids of other tensor objects (in any graph) carrying ``tensor``'s name: a name a kept tensor
        cannot be read by from everywhere."""
        return self.carriers.get(tensor.name, set()) - {id(tensor)}

    def fresh(self, base: str, suffix: str = "") -> str:
        """``base + suffix``, else ``base_1 + suffix``, ``base_2 + suffix``...; the name is reserved."""
        candidate, counter = f"{base}{suffix}", 0
        while self.taken(candidate):
            counter += 1
            candidate = f"{base}_{counter}{suffix}"
        self.reserved.add(candidate)
        return candidate
