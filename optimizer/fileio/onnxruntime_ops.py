"""Ops that onnxruntime runs in the ONNX domain although onnx does not define them there, and the
view of a model that onnx's checker can judge.

onnxruntime-genai's model builder writes RMSNorm as ``SimplifiedLayerNormalization`` in the default
domain (onnxruntime registers it there), and models from onnxruntime's older transformer optimizer
use its contrib ``LayerNormalization`` below opset 17, where onnx has none. onnx's checker rejects
both ("No Op registered for ..."), so every decoder those tools export would be refused at load.
The checker skips ops of other domains, so for its eyes only these nodes move to ``com.microsoft``;
every other node is checked as before, and the model itself is left as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx

from optimizer.graph.walk import walk_model

ONNX_DOMAINS = ("", "ai.onnx")
CHECKER_DOMAIN = "com.microsoft"
ONNXRUNTIME_ONNX_DOMAIN_OPS: dict[str, int] = {
    "SimplifiedLayerNormalization": 10**6,  # at every opset
    "LayerNormalization": 17,  # onnx's own from opset 17 on
}
"""op type -> the first default-domain opset at which onnx defines it itself."""


def default_opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ONNX_DOMAINS), 1)


def onnxruntime_only_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Default-domain nodes (any graph or function) that only onnxruntime defines at this opset."""
    opset = default_opset(model)
    return [
        node
        for site in walk_model(model, functions=True)
        for node in site.graph.node
        if node.domain in ONNX_DOMAINS and opset < ONNXRUNTIME_ONNX_DOMAIN_OPS.get(node.op_type, 0)
    ]


@contextlib.contextmanager
def checker_view(model: onnx.ModelProto) -> Iterator[onnx.ModelProto]:
    """``model`` with its onnxruntime-only default-domain nodes in ``com.microsoft`` (imported for
    the while if it is not), restored on exit. In place, so a model of any size is not copied."""
    nodes = onnxruntime_only_nodes(model)
    if not nodes:
        yield model
        return
    domains = [node.domain if node.HasField("domain") else None for node in nodes]
    imported = any(entry.domain == CHECKER_DOMAIN for entry in model.opset_import)
    if not imported:
        model.opset_import.add(domain=CHECKER_DOMAIN, version=1)
    for node in nodes:
        node.domain = CHECKER_DOMAIN
    try:
        yield model
    finally:
        for node, domain in zip(nodes, domains, strict=True):
            if domain is None:
                node.ClearField("domain")  # unset, as it was (an empty domain set would serialize)
            else:
                node.domain = domain
        if not imported:
            del model.opset_import[len(model.opset_import) - 1]


CONVERTER_DOMAIN = "ai.onnx_compress.onnxruntime_only"
"""Where onnxruntime-only default-domain nodes wait while onnx's version converter runs (it has no
schema for them and no adapter for LayerNormalization below 17); nothing else uses this name."""


def hide_from_converter(model: onnx.ModelProto) -> bool:
    """Move the onnxruntime-only default-domain nodes of ``model`` (a copy made for conversion) out
    of the converter's way; True when there were any (``unhide_after_conversion`` brings them back)."""
    nodes = onnxruntime_only_nodes(model)
    for node in nodes:
        node.domain = CONVERTER_DOMAIN
    if nodes:
        model.opset_import.add(domain=CONVERTER_DOMAIN, version=1)
    return bool(nodes)


def unhide_after_conversion(model: onnx.ModelProto) -> None:
    """The hidden nodes back in the default domain (LayerNormalization is onnx's own from opset 17,
    with the same inputs, outputs and attributes), and the temporary domain import dropped."""
    for site in walk_model(model, functions=True):
        for node in site.graph.node:
            if node.domain == CONVERTER_DOMAIN:
                node.domain = ""
    kept = [entry for entry in model.opset_import if entry.domain != CONVERTER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
