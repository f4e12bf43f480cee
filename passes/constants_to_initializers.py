"""constants-to-initializers: turn weight-holding Constant nodes into initializers.

Exporters such as paddle2onnx keep every weight in a Constant node; onnxruntime's quantizer and
most passes look only at initializers. The values are kept bit for bit: the tensor proto the
Constant node held becomes the initializer.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.errors import OptionError
from optimizer.graph.bytes import stored_bytes
from optimizer.graph.edit import cleanup
from optimizer.graph.walk import iter_graphs
from optimizer.graph.weights import is_constant_node
from optimizer.internal_errors import working_on
from optimizer.pass_base import Pass, PassContext, PassReport, PassResult, option
from optimizer.registry import register

SCALAR_ATTRIBUTES = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


@register
class ConstantsToInitializersPass(Pass):
    name = "constants-to-initializers"
    summary = "store Constant-node tensors as initializers, in the graph that holds the node"
    lossless = True

    min_size_bytes: int = option(0, "leave Constant nodes smaller than this many bytes in place")

    def __post_init__(self) -> None:
        if self.min_size_bytes < 0:
            raise OptionError(f"pass '{self.name}' option 'min_size_bytes' must be >= 0, got {self.min_size_bytes}")

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        report = PassReport()
        converted = 0
        for owner in iter_graphs(graph):
            outputs = {id(t) for t in owner.outputs}
            for node in list(owner.nodes):
                if not is_constant_node(node):
                    continue
                with working_on("node", node.name or node.outputs[0].name):
                    converted += self._convert(node, outputs, report)
        if converted:
            cleanup(graph)
        report.count("constants_converted", converted)
        return PassResult(graph, converted > 0, report.to_dict())

    def _convert(self, node: gs.Node, graph_outputs: set[int], report: PassReport) -> bool:
        tensor = node.outputs[0]
        label = node.name or tensor.name
        if id(tensor) in graph_outputs:
            report.skip("node", label, "its output is a graph output; an initializer cannot be one in every runtime")
            return False
        values = _constant_values(node)
        if values is None:
            attribute = next(iter(node.attrs), "none")
            report.skip("node", label, f"attribute '{attribute}' is not a dense tensor")
            return False
        size_bytes = _size_bytes(values)
        if size_bytes < self.min_size_bytes:
            report.skip("node", label, f"{size_bytes} bytes < min_size_bytes={self.min_size_bytes}")
            return False
        node.outputs.clear()
        tensor.to_constant(values)
        return True


def _constant_values(node: gs.Node):
    """The Constant node's tensor as it was stored (LazyValues keep dtype and bytes exact)."""
    attrs = node.attrs
    if "value" in attrs and isinstance(attrs["value"], gs.Constant):
        return attrs["value"]._values
    for key, dtype in SCALAR_ATTRIBUTES.items():
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    return None


def _size_bytes(values) -> int:
    if isinstance(values, np.ndarray):
        return int(values.nbytes)
    return stored_bytes(values.tensor)
