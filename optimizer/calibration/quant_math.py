"""Quantization arithmetic in plain numpy: ranges, scales and zero points, rounding, 4-bit packing.

Everything follows ONNX's QuantizeLinear/DequantizeLinear: ``q = saturate(rint(x / scale) + zp)``
with round-half-to-even, ``x' = (q - zp) * scale`` in float32. Granularity is per tensor
(``axis=None``), per channel (``axis``) or blocked (``axis`` + ``block_size``, opset 21). Zero is
always exactly representable, so pruned weights stay exactly zero after a round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLOAT32_TINY = float(np.finfo(np.float32).tiny)
HALF_ROUNDING = 2.0**-6
"""The most a 4-bit scale may grow when rounded up to a float16 number (subnormal ones grow more)."""
HALF_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class QType:
    """An integer type: its name, bit width, range and the numpy dtype that holds its values."""

    name: str
    bits: int
    signed: bool

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def storage_dtype(self) -> np.dtype:
        """numpy dtype holding the values unpacked (4-bit values live in int8/uint8)."""
        return np.dtype(np.int8 if self.signed else np.uint8)

    def symmetric_limits(self) -> tuple[int, int, int]:
        """(qmin, qmax, zero point) of the symmetric range: int8 uses -127..127, uint8 1..255 around 128."""
        if self.signed:
            return -self.qmax, self.qmax, 0
        middle = 1 << (self.bits - 1)
        return 1, self.qmax, middle


QTYPES = {
    "int8": QType("int8", 8, True),
    "uint8": QType("uint8", 8, False),
    "int4": QType("int4", 4, True),
    "uint4": QType("uint4", 4, False),
}


def qtype(name: str) -> QType:
    try:
        return QTYPES[name]
    except KeyError:
        raise ValueError(f"unknown integer type {name!r}; valid: {', '.join(QTYPES)}") from None


def scale_shape(shape: tuple[int, ...], axis: int | None, block_size: int | None) -> tuple[int, ...]:
    """Shape of the scale tensor as DequantizeLinear takes it: () per tensor, (C,) per channel,
    the weight's shape with ``ceil(shape[axis] / block_size)`` on ``axis`` when blocked."""
    if axis is None:
        return ()
    if block_size is None:
        return (shape[axis],)
    blocked = list(shape)
    blocked[axis] = -(-shape[axis] // block_size)
    return tuple(blocked)


def expand_to(values: np.ndarray, shape: tuple[int, ...], axis: int | None, block_size: int | None) -> np.ndarray:
    """Broadcast a scale or zero point of ``scale_shape`` to the full weight ``shape``."""
    if axis is None:
        return np.broadcast_to(values, shape)
    if block_size is None:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return np.broadcast_to(values.reshape(view), shape)
    repeated = np.repeat(values, block_size, axis=axis)
    return np.take(repeated, np.arange(shape[axis]), axis=axis)


def value_ranges(
    values: np.ndarray,
    axis: int | None = None,
    block_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of ``values`` per tensor, per channel along ``axis``, or per block along ``axis``."""
    values = np.asarray(values, dtype=np.float32)
    if axis is None:
        return np.asarray(values.min(initial=0.0), np.float32), np.asarray(values.max(initial=0.0), np.float32)
    axis = axis % values.ndim
    if block_size is None:
        others = tuple(i for i in range(values.ndim) if i != axis)
        return values.min(axis=others, initial=np.inf), values.max(axis=others, initial=-np.inf)
    count = values.shape[axis]
    padded_count = -(-count // block_size) * block_size
    pad = [(0, 0)] * values.ndim
    pad[axis] = (0, padded_count - count)
    low_source = np.pad(values, pad, constant_values=np.inf)
    high_source = np.pad(values, pad, constant_values=-np.inf)
    split = (*values.shape[:axis], padded_count // block_size, block_size, *values.shape[axis + 1 :])
    return low_source.reshape(split).min(axis=axis + 1), high_source.reshape(split).max(axis=axis + 1)


def scale_zero_point(
    low: np.ndarray | np.floating,
    high: np.ndarray | np.floating,
    target: QType,
    *,
    symmetric: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Scales (float32, > 0) and integer zero points covering ``[low, high]`` with 0 inside.

    Symmetric: zero point 0 (signed) or the middle code (unsigned), scale = max|x| / qmax.
    Asymmetric: the range is widened to hold 0 and the zero point is an integer, so 0.0 maps to
    a code exactly. An all-zero range gets scale 1.
    """
    low = np.minimum(np.asarray(low, np.float64), 0.0)
    high = np.maximum(np.asarray(high, np.float64), 0.0)
    if symmetric:
        qmin, qmax, middle = target.symmetric_limits()
        scale = np.maximum(np.abs(low), np.abs(high)) / ((qmax - qmin) / 2)
    else:
        scale = (high - low) / (target.qmax - target.qmin)
    scale = np.where(scale > 0, np.maximum(scale, FLOAT32_TINY), 1.0).astype(np.float32)
    if target.bits == 4:
        scale = half_exact(scale)
    if symmetric:
        zero_point = np.full(scale.shape, middle, np.int64)
    else:
        zero_point = np.clip(np.rint(target.qmin - low / scale), target.qmin, target.qmax).astype(np.int64)
    return scale, zero_point.astype(target.storage_dtype)


def half_exact(scale: np.ndarray) -> np.ndarray:
    """Scales rounded up to the next float16 value, where that moves them by at most 2^-6 (every
    normal float16 number, and subnormal ones down to about 3.8e-6); the others unchanged. 4-bit
    scales take this form so they can be stored as float16 (a float32 scale per 32 4-bit values is
    a fifth of the bytes) and cast back exactly; rounding up keeps every value of the range inside."""
    scale = np.asarray(scale, np.float32)
    with np.errstate(over="ignore"):
        half = scale.astype(np.float16)
        half = np.where(half.astype(np.float32) < scale, np.nextafter(half, np.float16(np.inf)), half)
    wide = half.astype(np.float32)
    inside = (scale > 0) & np.isfinite(wide) & (wide <= HALF_MAX) & (wide <= scale * (1 + HALF_ROUNDING))
    return np.where(inside, wide, scale).astype(np.float32)


def quantize(
    values: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    target: QType,
    axis: int | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """ONNX QuantizeLinear in float32: ``saturate(rint(x / scale) + zero_point)``, half to even."""
    values = np.asarray(values, np.float32)
    full_scale = expand_to(np.asarray(scale, np.float32), values.shape, axis, block_size)
    full_zero = expand_to(np.asarray(zero_point).astype(np.float32), values.shape, axis, block_size)
    with np.errstate(over="ignore"):
        scaled = np.rint(values / full_scale) + full_zero
    return np.clip(scaled, target.qmin, target.qmax).astype(target.storage_dtype)


def dequantize(
    quantized: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None = None,
    axis: int | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` in float32."""
    quantized = np.asarray(quantized)
    full_scale = expand_to(np.asarray(scale, np.float32), quantized.shape, axis, block_size)
    centered = quantized.astype(np.float32)
    if zero_point is not None:
        centered = centered - expand_to(np.asarray(zero_point).astype(np.float32), quantized.shape, axis, block_size)
    return (centered * full_scale).astype(np.float32)


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer values with the scale and zero point that dequantize them."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    qtype: QType
    axis: int | None
    block_size: int | None
    floored: int = 0
    """How many scales ``quantize_weight``'s ``min_scale`` raised."""

    def dequantized(self) -> np.ndarray:
        return dequantize(self.values, self.scale, self.zero_point, self.axis, self.block_size)


def quantize_weight(
    values: np.ndarray,
    target: QType,
    *,
    symmetric: bool,
    axis: int | None = None,
    block_size: int | None = None,
    min_scale: np.ndarray | None = None,
) -> QuantizedTensor:
    """Quantize a weight with its own min/max per tensor, channel or block. ``min_scale`` (shaped
    like the scale) widens a range whose scale would be smaller: a bias must fit int32 at
    input_scale * weight_scale."""
    low, high = value_ranges(values, axis, block_size)
    scale, zero_point = scale_zero_point(low, high, target, symmetric=symmetric)
    binds = np.zeros(np.shape(scale), bool) if min_scale is None else scale < min_scale
    if np.any(binds):
        qmin, qmax, _ = target.symmetric_limits() if symmetric else (target.qmin, target.qmax, 0)
        half = np.where(binds, np.asarray(min_scale, np.float64) * (qmax - qmin) / 2, 0.0)
        low, high = np.minimum(low, -half), np.maximum(high, half)  # only where the floor binds
        scale, zero_point = scale_zero_point(low, high, target, symmetric=symmetric)
    quantized = quantize(values, scale, zero_point, target, axis, block_size)
    return QuantizedTensor(quantized, scale, zero_point, target, axis, block_size, int(np.sum(binds)))


BIAS_INT32_LIMIT = 2**30
"""The largest |int32 bias| a weight's scale is chosen for: half of int32's range, the rest left for
the products QLinearConv/QGemm add to it."""


def bias_weight_scale_floor(bias: np.ndarray, input_scale: float) -> np.ndarray:
    """The smallest weight scale per output at which ``bias`` fits ``BIAS_INT32_LIMIT`` as int32 at
    input_scale * weight_scale. A channel whose weights are all near zero (a pruned or dead one)
    otherwise gets a tiny weight scale, and its bias, clipped to int32, is lost."""
    return (np.abs(np.asarray(bias, np.float64)) / (float(input_scale) * BIAS_INT32_LIMIT)).astype(np.float32)


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale ``input_scale * weight_scale`` (what QLinearConv/QGemm add in int32)."""
    scale = (np.float32(input_scale) * np.asarray(weight_scale, np.float32)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    limit = np.iinfo(np.int32)
    quantized = np.clip(np.rint(np.asarray(bias, np.float64) / scale), limit.min, limit.max).astype(np.int32)
    return quantized, scale


def pack_4bit(values: np.ndarray) -> bytes:
    """ONNX INT4/UINT4 storage: two values per byte, the first in the low nibble."""
    flat = np.asarray(values).astype(np.int16).ravel() & 0x0F
    if flat.size % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_4bit(data: bytes, count: int, *, signed: bool) -> np.ndarray:
    """Inverse of ``pack_4bit``: ``count`` values as int8 (signed) or uint8."""
    packed = np.frombuffer(data, np.uint8)
    nibbles = np.empty(packed.size * 2, np.int16)
    nibbles[0::2] = packed & 0x0F
    nibbles[1::2] = packed >> 4
    nibbles = nibbles[:count]
    if signed:
        nibbles = np.where(nibbles > 7, nibbles - 16, nibbles)
        return nibbles.astype(np.int8)
    return nibbles.astype(np.uint8)


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """||candidate - reference|| / ||reference|| (0 when both are zero)."""
    reference = np.asarray(reference, np.float64)
    norm = float(np.linalg.norm(reference))
    difference = float(np.linalg.norm(np.asarray(candidate, np.float64) - reference))
    return difference / norm if norm > 0 else difference
