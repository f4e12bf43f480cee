"""Where 8-bit activations hurt: each QuantizeLinear's own rounding error, and the groups it belongs to.

``activation_noise`` runs a QDQ model with the float input of every activation QuantizeLinear
exposed and measures, per tensor, the noise that rounding to its scale and zero point adds
(noise power / signal power, summed over the feeds), both on the values clipped to the grid: a
QuantizeLinear's saturation often stands for a Relu or Clip that static mode folded into it
(HardSwish's Clip(x + 3, 0, 6)), so clipping is no error of its own. This is the tensor's own error, not the
error it inherits from the layers before it (what ``layer_debug`` reports): the deep layers of a
CNN always look worst by inherited error, while the harm is often done by a few early tensors
(YOLOv8n: the second Conv's output, range [-124, 111], rounds at 23.5 dB where most tensors
keep 33-40 dB; backing off that one group makes static int8 pass).

``rank_groups`` scores every compute node (Conv, ConvTranspose, MatMul, Gemm) by the noise of
the quantized tensors its group produces: its output and the chain of ops after it up to the
next compute node (a SiLU's Sigmoid and Mul, an Add, a Concat), the tensors that stay float when
the group is backed off (but the last, which the next quantized op still reads). Worst first.

The ratio is over the whole tensor: a per-channel mean was tried and ranks YOLOv8n's nearly idle
head channels first (8.4 dB) instead of the second Conv (22.1 dB), which is what fails the check.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from optimizer.calibration.expose import expose_outputs
from optimizer.verify.runtime import DEFAULT_TIMEOUT_S, as_provider_choice, create_session, run_session

COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
_INTEGER_BOUNDS = {
    onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT16: (0, 65535),
    onnx.TensorProto.INT16: (-32768, 32767),
}


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    found = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = node.attribute[0].t
    return found


def _activation_quantizers(model: onnx.ModelProto) -> dict[str, tuple[float, int, tuple[int, int]]]:
    """Input tensor -> (scale, zero point, integer bounds) of every per-tensor QuantizeLinear of a
    main-graph activation (its input is no constant)."""
    constants = _constants(model.graph)
    found = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants or node.input[1] not in constants:
            continue
        scale = numpy_helper.to_array(constants[node.input[1]])
        has_zero_point = len(node.input) > 2 and node.input[2] in constants
        zero = numpy_helper.to_array(constants[node.input[2]]) if has_zero_point else np.zeros((), np.uint8)
        bounds = _INTEGER_BOUNDS.get(onnx.helper.np_dtype_to_tensor_dtype(zero.dtype))
        if scale.size != 1 or bounds is None:
            continue
        found[node.input[0]] = (float(scale.reshape(())), int(zero.reshape(())), bounds)
    return found


def activation_noise(
    model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    provider: str = "cpu",
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> dict[str, float]:
    """Tensor name -> its rounding noise power over its signal power, for every activation that a
    per-tensor QuantizeLinear rounds (0.0 for an all-zero tensor rounded exactly)."""
    quantizers = _activation_quantizers(model)
    if not quantizers:
        return {}
    session, _ = create_session(expose_outputs(model, list(quantizers), prune=True), as_provider_choice(provider))
    power = {name: [0.0, 0.0] for name in quantizers}
    for feed in feeds:
        values = run_session(session, dict(feed), label="the candidate", stage="noise ranking", timeout_s=timeout_s)
        for name, value in values.items():
            scale, zero, (low, high) = quantizers[name]
            x = np.clip(np.asarray(value, dtype=np.float64), (low - zero) * scale, (high - zero) * scale)
            rounded = (np.clip(np.rint(x / scale) + zero, low, high) - zero) * scale
            power[name][0] += float(np.sum(x * x))
            power[name][1] += float(np.sum((x - rounded) ** 2))
    return {name: _ratio(signal, noise) for name, (signal, noise) in power.items()}


def _ratio(signal: float, noise: float) -> float:
    if signal > 0:
        return noise / signal
    return 0.0 if noise == 0 else float("inf")


def rank_groups(model: onnx.ModelProto, noise: Mapping[str, float]) -> list[tuple[str, float]]:
    """(compute node name, summed noise ratio of the tensors its group rounds), worst first; nodes
    whose group rounds nothing are left out."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    scored = []
    for position, node in enumerate(model.graph.node):
        if node.op_type not in COMPUTE_OPS or not node.name:
            continue
        score = sum(noise.get(name, 0.0) for name in _group_tensors(node, readers))
        if score > 0:
            scored.append((-score, position, node.name))
    return [(name, -negative) for negative, _, name in sorted(scored)]


def _group_tensors(node: onnx.NodeProto, readers: Mapping[str, list[onnx.NodeProto]]) -> set[str]:
    """The tensors reached from ``node``'s outputs through anything but another compute node."""
    seen: set[str] = set()
    pending = list(node.output)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for reader in readers.get(name, []):
            if reader.op_type not in COMPUTE_OPS:
                pending.extend(reader.output)
    return seen
