"""The compute nodes a static-int8 model runs on 8-bit activations, in graph order.

Auto mode backs these off to weight-only int8 first layers first when static int8 fails its check:
rounding in an early layer is carried and amplified by every layer after it. Measured: YOLOv8n
passes with its first 2 Convs backed off (static: box F1 0.812 on the check images; a ranking by
each tensor's own rounding noise also found its second Conv); PP-OCRv4 det, with full calibration
ranges, with its first 8 (mask IoU 0.874 -> pass), where the rounding-noise ranking chose head
layers and failed up to 16 groups backed off; backing off its last 6 layers changed nothing. Since
its per-channel affines are folded into the Convs (static int8 IoU 0.948 -> 0.951 on the held-out
page), it passes the check with its first 32 (16: mask IoU 0.8997 against 0.9).
"""

from __future__ import annotations

import onnx

COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def static_groups(model: onnx.ModelProto) -> list[str]:
    """Names of the main graph's compute nodes whose data input is a DequantizeLinear of an
    activation (a QuantizeLinear's output), in graph order."""
    producers = {output: node for node in model.graph.node for output in node.output}
    found = []
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS or not node.name or not node.input:
            continue
        dequantize = producers.get(node.input[0])
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        quantize = producers.get(dequantize.input[0])
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            found.append(node.name)
    return found
