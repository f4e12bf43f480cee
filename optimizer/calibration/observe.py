"""Calibration runs that look inside the model: the graph as a model whose outputs include chosen
main-graph tensors (``probe_model``), run on calibration feeds one sample at a time
(``observe_activations``). Quantize (ranges, outlier channels, GPTQ's X^T X), float16 compute (ranges)
and prune (Wanda's input norms) all observe activations through here."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.graph.convert import export_model
from optimizer.graph.edit import toposort
from optimizer.verify.runtime import DEFAULT_TIMEOUT_S, checked_timeout, create_session, resolve_provider, run_outputs


@dataclass(frozen=True)
class Sampling:
    """Which calibration runs to make: up to ``max_samples`` feeds (None: all) on ``provider``,
    each run bounded by ``timeout_s``."""

    max_samples: int | None
    provider: str = "cpu"
    timeout_s: float | None = DEFAULT_TIMEOUT_S


def probe_model(graph: gs.Graph, tensor_names: Sequence[str], *, integers: bool = False) -> onnx.ModelProto:
    """The graph as a model whose outputs also include ``tensor_names`` (main-graph tensors), typed
    float, or with ``integers`` left untyped (onnxruntime takes the type its producer gives)."""
    template = onnx.ModelProto()
    template.ir_version = 8
    template.opset_import.extend(graph.import_domains or [onnx.helper.make_opsetid("", int(graph.opset))])
    toposort(graph)
    model = export_model(graph, template)
    present = {output.name for output in model.graph.output}
    for name in tensor_names:
        if name in present:
            continue
        if integers:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
        else:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model


def observe_activations(
    graph: gs.Graph,
    tensor_names: Sequence[str],
    feeds: Callable[[], Iterable],
    visit: Callable[[str, np.ndarray], None],
    sampling: Sampling,
    stage: str = "activation calibration",
    *,
    integers: bool = False,
) -> int:
    """Run the feeds ``sampling`` asks for with ``tensor_names`` exposed and hand every float32
    value (with ``integers``, every integer value instead: indices) to ``visit(name, value)``, one
    sample at a time; returns the number of samples run. A run longer than ``sampling.timeout_s``
    raises ``RunTimeoutError`` naming ``stage``."""
    checked_timeout(sampling.timeout_s)
    if not tensor_names:
        return 0
    model = probe_model(graph, tensor_names, integers=integers)
    session, _ = create_session(model, resolve_provider(sampling.provider))
    del model
    inputs = [node_arg.name for node_arg in session.get_inputs()]
    names = list(tensor_names)
    count = 0
    for feed in itertools.islice(feeds(), sampling.max_samples):
        values = run_outputs(
            session,
            names,
            {name: feed[name] for name in inputs},
            label="calibration model",
            stage=stage,
            timeout_s=sampling.timeout_s,
        )
        for name, value in zip(names, values, strict=True):
            if (value.dtype.kind in "iu") if integers else (value.ndim > 0 and value.dtype == np.float32):
                visit(name, value)
        count += 1
    return count
