"""Building blocks of the quantize pass: fresh names, integer initializers, and the float view of
a quantized weight (DequantizeLinear, or a Cast/Mul chain onnxruntime folds when it loads).

Two float views exist because onnxruntime treats them differently (FIELD-NOTES):
- ``dq``: DequantizeLinear. onnxruntime fuses it into MatMulNBits on a MatMul weight and into
  QLinear* kernels in a QDQ graph, but keeps it at run time elsewhere (a Conv then re-reads the
  dequantized weight every run and loses its NCHWc layout).
- ``fold``: Cast -> (Sub zero point) -> Mul scale. Every input is constant, so onnxruntime's
  constant folding turns it into the float weight at load time: the file stays integer, run time
  is exactly fp32's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from optimizer.calibration.quant_math import QType, QuantizedTensor, pack_4bit
from optimizer.errors import PassError
from optimizer.graph.bytes import stored_bytes, tensor_proto_dtype
from optimizer.graph.names import NameAllocator
from optimizer.graph.walk import iter_graphs
from optimizer.graph.weights import Weight
from passes.quantize.targets import QUANTIZED_SUFFIX

MAX_ACTIVATION_ABS = 1e4
"""An activation whose calibrated range reaches past this stays float in every mode: 8 bits cannot
hold it without collapsing everything near zero (an attention mask of -1e9; a power spectrum up to
2.6e12 broke the default int8 of a mel-spectrogram model, cosine 0.956)."""


def too_wide_for_8_bits(low: float, high: float) -> bool:
    """True when a calibrated range [low, high] is not finite or reaches past MAX_ACTIVATION_ABS."""
    return not (np.isfinite(low) and np.isfinite(high)) or max(-low, high) > MAX_ACTIVATION_ABS


MAX_CHANNEL_SPREAD = 255.0
"""Per-tensor 8 bits split the widest channel's range into 255 steps: when the median channel's
|max| is this many times smaller, most channels round to one step or zero."""


def hopeless_activation(absmax: np.ndarray, split: np.ndarray) -> str:
    """Why an activation with per-channel ``absmax`` cannot be quantized to 8 bits per tensor ('' if
    it can): its range is too wide, or, without the ``split`` channels computed apart, the median
    channel falls within one step of the widest."""
    peak = float(absmax.max(initial=0.0)) if np.isfinite(absmax).all() else math.inf
    if too_wide_for_8_bits(-peak, peak):
        return f"activation range up to {peak:.3g}"
    rest = np.delete(absmax, split)
    median = float(np.median(rest)) if rest.size else 0.0
    if median > 0 and float(rest.max()) > MAX_CHANNEL_SPREAD * median:
        return f"channel ranges spread {float(rest.max()) / median:.3g}x (the median channel within one 8-bit step)"
    return ""


FloatForm = Literal["dq", "fold"]
ONNX_INTEGER_TYPES = {
    "int8": onnx.TensorProto.INT8,
    "uint8": onnx.TensorProto.UINT8,
    "int4": onnx.TensorProto.INT4,
    "uint4": onnx.TensorProto.UINT4,
}


def integer_constant(name: str, values: np.ndarray, qtype: QType) -> gs.Constant:
    """An integer initializer stored as its real type (4-bit values packed two per byte)."""
    if qtype.bits == 4:
        proto = onnx.helper.make_tensor(
            name, ONNX_INTEGER_TYPES[qtype.name], list(values.shape), pack_4bit(values), raw=True
        )
    else:
        proto = onnx.numpy_helper.from_array(np.array(values, dtype=qtype.storage_dtype, order="C"), name)
    return gs.Constant(name, LazyValues(proto))


def float_constant(name: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.array(values, dtype=np.float32, order="C"))


def stored_scale(
    names: NameAllocator, base: str, suffix: str, values: np.ndarray, bits: int
) -> tuple[gs.Tensor, list[gs.Node]]:
    """The scale input of a dequantizing node and the nodes that make it: float32, or for 4-bit
    weights float16 behind a Cast onnxruntime folds at load (constant folding runs before its
    fusions: DequantizeLinear -> MatMul still becomes MatMulNBits). A float32 scale per 32 4-bit
    values is a fifth of the bytes; ``quant_math.half_exact`` chose scales float16 holds exactly, so
    the model computes the same. Scales float16 cannot hold (above 65504, or under about 3.8e-6,
    where its subnormals are too coarse) leave the tensor's scales float32."""
    values = np.asarray(values, np.float32)
    if bits != 4 or not _exact_in_float16(values):
        return float_constant(names.fresh(base, suffix), values), []
    half = gs.Constant(names.fresh(base, suffix + "_float16"), values.astype(np.float16))
    scale = gs.Variable(names.fresh(base, suffix + "_float"), dtype=np.float32)
    cast = gs.Node("Cast", names.fresh(base, "_ScaleCast"), {"to": onnx.TensorProto.FLOAT}, [half], [scale])
    return scale, [cast]


def int64_constant(name: str, values: Iterable[int]) -> gs.Constant:
    return gs.Constant(name, np.asarray(list(values), np.int64))


def is_symmetric_signed(quantized: QuantizedTensor) -> bool:
    return quantized.qtype.signed and not np.any(quantized.zero_point)


@dataclass
class QuantizedWeight:
    """One weight's integer initializer, scale and zero point, and (once) its float view."""

    target: Weight
    quantized: QuantizedTensor
    names: NameAllocator
    integer: gs.Constant = field(init=False)
    _scale: gs.Constant | None = field(default=None, init=False)
    zero_point: gs.Constant | None = field(init=False)
    float_view: gs.Tensor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        base = self.target.name
        self.integer = integer_constant(
            self.names.fresh(base, QUANTIZED_SUFFIX), self.quantized.values, self.quantized.qtype
        )
        self.zero_point = None
        if not is_symmetric_signed(self.quantized):
            self.zero_point = integer_constant(
                self.names.fresh(base, "_zero_point"), np.asarray(self.quantized.zero_point), self.quantized.qtype
            )

    @property
    def scale(self) -> gs.Constant:
        """The scale as a float32 initializer (made on first use)."""
        if self._scale is None:
            self._scale = float_constant(self.names.fresh(self.target.name, "_scale"), self.quantized.scale)
        return self._scale

    def make_float_view(self, form: FloatForm) -> gs.Tensor:
        """Replace the float weight, for every reader, by its dequantized value (done once)."""
        if self.float_view is not None:
            return self.float_view
        output = self.target.take_over(np.float32)
        nodes = self._dq_nodes(output) if form == "dq" else self._fold_nodes(output)
        if self.target.owner is None:
            raise PassError(f"weight '{self.target.name}' has no graph to hold its dequantizing nodes")
        self.target.owner.nodes.extend(nodes)
        self.float_view = output
        return output

    def _dq_nodes(self, output: gs.Tensor) -> list[gs.Node]:
        q = self.quantized
        attrs: dict[str, int] = {}
        if q.axis is not None:
            attrs["axis"] = int(q.axis)
        if q.block_size is not None and q.axis is not None:
            attrs["block_size"] = int(q.block_size)
        scale, nodes = (
            (self.scale, [])
            if q.qtype.bits != 4
            else stored_scale(self.names, self.target.name, "_scale", self.quantized.scale, q.qtype.bits)
        )
        inputs = [self.integer, scale] + ([self.zero_point] if self.zero_point is not None else [])
        name = self.names.fresh(self.target.name, "_DequantizeLinear")
        return [*nodes, gs.Node("DequantizeLinear", name, attrs, inputs, [output])]

    def _fold_nodes(self, output: gs.Tensor) -> list[gs.Node]:
        """Cast -> [Reshape into blocks] -> [Sub zero point] -> Mul scale -> [Reshape back]."""
        q = self.quantized
        shape = tuple(q.values.shape)
        base = self.target.name
        broadcast = _broadcast_shape(shape, q.axis, q.block_size)
        nodes: list[gs.Node] = []
        current = self._variable(base, "_cast")
        nodes.append(
            gs.Node("Cast", self.names.fresh(base, "_Cast"), {"to": onnx.TensorProto.FLOAT}, [self.integer], [current])
        )
        if q.block_size is not None and q.axis is not None:
            blocked = self._variable(base, "_blocks")
            split = int64_constant(self.names.fresh(base, "_block_shape"), _block_split(shape, q.axis, q.block_size))
            nodes.append(gs.Node("Reshape", self.names.fresh(base, "_Reshape"), {}, [current, split], [blocked]))
            current = blocked
        if self.zero_point is not None:
            zero_int = integer_constant(
                self.names.fresh(base, "_zero_point_broadcast"), np.asarray(q.zero_point).reshape(broadcast), q.qtype
            )
            zero = self._variable(base, "_zero_point_float")
            centered = self._variable(base, "_centered")
            nodes.append(
                gs.Node(
                    "Cast", self.names.fresh(base, "_ZeroPointCast"), {"to": onnx.TensorProto.FLOAT}, [zero_int], [zero]
                )
            )
            nodes.append(gs.Node("Sub", self.names.fresh(base, "_Sub"), {}, [current, zero], [centered]))
            current = centered
        scale, made = stored_scale(
            self.names, base, "_scale_broadcast", np.asarray(q.scale, np.float32).reshape(broadcast), q.qtype.bits
        )
        nodes.extend(made)
        scaled = output if q.block_size is None else self._variable(base, "_scaled")
        nodes.append(gs.Node("Mul", self.names.fresh(base, "_Mul"), {}, [current, scale], [scaled]))
        if q.block_size is not None and q.axis is not None:
            full = int64_constant(self.names.fresh(base, "_shape"), shape)
            nodes.append(gs.Node("Reshape", self.names.fresh(base, "_ReshapeBack"), {}, [scaled, full], [output]))
        return nodes

    def _variable(self, base: str, suffix: str) -> gs.Variable:
        return gs.Variable(self.names.fresh(base, suffix), dtype=np.float32)


def _exact_in_float16(values: np.ndarray) -> bool:
    """Every value is a non-zero float16 number, exactly."""
    finite = np.isfinite(values) & (values != 0) & (np.abs(values) <= np.finfo(np.float16).max)
    return bool(values.size) and bool(np.all(finite)) and bool(np.all(values.astype(np.float16) == values))


def _broadcast_shape(shape: tuple[int, ...], axis: int | None, block_size: int | None) -> tuple[int, ...]:
    if axis is None:
        return ()
    if block_size is None:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return tuple(view)
    return shape[:axis] + (shape[axis] // block_size, 1) + shape[axis + 1 :]


def _block_split(shape: tuple[int, ...], axis: int, block_size: int) -> tuple[int, ...]:
    return shape[:axis] + (shape[axis] // block_size, block_size) + shape[axis + 1 :]


def bytes_by_dtype(root: gs.Graph) -> dict[str, int]:
    """Bytes of every stored tensor (initializers and Constant nodes, all graphs) by dtype."""
    totals: dict[str, int] = {}
    seen: set[int] = set()
    for graph in iter_graphs(root):
        for node in graph.nodes:
            tensors = [t for t in node.inputs if isinstance(t, gs.Constant)]
            if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
                tensors.append(node.attrs["value"])
            for tensor in tensors:
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                dtype, size = constant_dtype_and_bytes(tensor)
                totals[dtype] = totals.get(dtype, 0) + size
    return dict(sorted(totals.items()))


def constant_dtype_and_bytes(tensor: gs.Constant) -> tuple[str, int]:
    values = tensor._values
    if isinstance(values, LazyValues):
        return dtype_name(tensor_proto_dtype(values.tensor)), stored_bytes(tensor)
    return str(np.asarray(values).dtype), stored_bytes(tensor)


def dtype_name(data_type: int) -> str:
    """numpy-style name of an ONNX element type ("float32", "int8", "int4")."""
    name = onnx.TensorProto.DataType.Name(data_type).lower()
    return {"float": "float32", "double": "float64", "bool": "bool"}.get(name, name)
