from __future__ import annotations

import numpy as np
import pytest

from optimizer.calibration.quant_math import (
    BIAS_INT32_LIMIT,
    QTYPES,
    bias_weight_scale_floor,
    dequantize,
    half_exact,
    pack_4bit,
    qtype,
    quantize,
    quantize_bias,
    quantize_weight,
    relative_error,
    scale_shape,
    scale_zero_point,
    unpack_4bit,
    value_ranges,
)


def test_round_half_to_even_like_onnx_quantize_linear():
    values = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.5, 300.0], np.float32)
    q = quantize(values, np.float32(1.0), np.int8(0), qtype("int8"))
    assert q.dtype == np.int8
    assert q.tolist() == [0, 2, 2, 0, -2, 126, 127, 127]


@pytest.mark.parametrize("name", list(QTYPES))
@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_is_exact_and_range_is_covered(name, symmetric):
    target = qtype(name)
    rng = np.random.default_rng(0)
    values = rng.standard_normal((16, 40)).astype(np.float32) + 0.3
    values[:, ::5] = 0.0
    quantized = quantize_weight(values, target, symmetric=symmetric, axis=0)
    restored = quantized.dequantized()
    assert np.all(restored[values == 0] == 0.0)
    assert quantized.values.min() >= target.qmin and quantized.values.max() <= target.qmax
    step = np.asarray(quantized.scale)[:, None]
    assert np.all(np.abs(restored - values) <= step / 2 + 1e-7)


@pytest.mark.parametrize("name", ["int4", "uint4"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_4bit_scales_are_float16_numbers_rounded_up_and_out_of_range_ones_stay_float32(name, symmetric):
    """4-bit scales are stored as float16 (a float32 one per 32 values is a fifth of the bytes), so
    they are chosen as float16 numbers, rounded up so the range stays covered; 8-bit ones are not."""
    rng = np.random.default_rng(3)
    values = rng.standard_normal((64, 48)).astype(np.float32)
    quantized = quantize_weight(values, qtype(name), symmetric=symmetric, axis=0, block_size=32)
    scale = np.asarray(quantized.scale)
    assert np.all(scale.astype(np.float16).astype(np.float32) == scale)
    low, high = value_ranges(values, 0, 32)
    plain, _ = scale_zero_point(low, high, qtype(name.replace("4", "8")), symmetric=symmetric)
    low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)
    exact = np.maximum(-low, high) * 2 / 14 if symmetric else (high - low) / 15  # 14: symmetric drops a code
    assert np.all(scale >= exact * (1 - 1e-7)) and np.all(scale <= exact * (1 + 2**-10))
    assert not np.all(plain.astype(np.float16).astype(np.float32) == plain)  # 8-bit: float32 as computed
    restored = quantized.dequantized()
    assert np.all(np.abs(restored - values) <= np.repeat(scale, 32, axis=0) / 2 + 1e-7)
    far = np.array([1e-9, 2e-7, 70000.0], np.float32)  # float16 subnormals too coarse; beyond its max
    assert half_exact(far).tolist() == far.tolist()
    near = np.array([3e-5, 4.8e-6, 1.0e-3], np.float32)  # subnormal ones within 2^-6, a normal one
    rounded = half_exact(near)
    assert np.all(rounded.astype(np.float16).astype(np.float32) == rounded)
    assert np.all(rounded >= near) and np.all(rounded <= near * (1 + 2**-6))
    small_column = values.copy()
    small_column[:, 5] *= 1e-4  # scales near 3e-5, float16 subnormals: must not send all scales to float32
    scales = np.asarray(quantize_weight(small_column, qtype(name), symmetric=symmetric, axis=0, block_size=32).scale)
    assert np.all(scales.astype(np.float16).astype(np.float32) == scales)


def test_symmetric_signed_has_zero_point_zero_and_unsigned_the_middle():
    low, high = np.array([-1.0, -0.1]), np.array([0.5, 2.0])
    scale, zero = scale_zero_point(low, high, qtype("int8"), symmetric=True)
    assert zero.tolist() == [0, 0] and zero.dtype == np.int8
    np.testing.assert_allclose(scale, np.array([1.0, 2.0]) / 127, rtol=1e-6)
    _, zero_u = scale_zero_point(low, high, qtype("uint4"), symmetric=True)
    assert zero_u.tolist() == [8, 8]


def test_asymmetric_widens_to_hold_zero_and_all_zero_range_gets_scale_one():
    scale, zero = scale_zero_point(np.array([0.5, 0.0]), np.array([2.0, 0.0]), qtype("uint8"), symmetric=False)
    assert zero.tolist() == [0, 0]
    assert scale[0] == np.float32(2.0 / 255) and scale[1] == np.float32(1.0)


def test_blocked_ranges_with_a_partial_last_block():
    values = np.arange(10, dtype=np.float32).reshape(10, 1) - 4
    low, high = value_ranges(values, axis=0, block_size=4)
    assert low.ravel().tolist() == [-4, 0, 4] and high.ravel().tolist() == [-1, 3, 5]
    assert scale_shape((10, 1), 0, 4) == (3, 1)
    quantized = quantize_weight(values, qtype("int4"), symmetric=True, axis=0, block_size=4)
    assert quantized.scale.shape == (3, 1)
    assert relative_error(values, quantized.dequantized()) < 0.1


def test_dequantize_matches_onnx_formula_bit_for_bit():
    rng = np.random.default_rng(1)
    values = rng.standard_normal((8, 6)).astype(np.float32)
    q = quantize_weight(values, qtype("uint8"), symmetric=False, axis=1)
    expected = (q.values.astype(np.float32) - q.zero_point.astype(np.float32)[None, :]) * q.scale[None, :]
    np.testing.assert_array_equal(dequantize(q.values, q.scale, q.zero_point, axis=1), expected)


@pytest.mark.parametrize("signed", [True, False])
def test_pack_4bit_low_nibble_first_and_round_trip(signed):
    values = np.array([1, -2, 7, -8, 3] if signed else [1, 14, 7, 0, 15], np.int8 if signed else np.uint8)
    packed = pack_4bit(values)
    assert len(packed) == 3
    assert packed[0] == (int(values[0]) & 0xF) | ((int(values[1]) & 0xF) << 4)
    np.testing.assert_array_equal(unpack_4bit(packed, 5, signed=signed), values)


def test_bias_int32_uses_input_scale_times_weight_scale():
    bias = np.array([0.5, -1.25, 0.0], np.float32)
    integers, scale = quantize_bias(bias, 0.01, np.array([0.1, 0.5, 0.2], np.float32))
    assert integers.dtype == np.int32
    np.testing.assert_allclose(scale, np.float32(0.01) * np.array([0.1, 0.5, 0.2], np.float32))
    np.testing.assert_allclose(integers * scale, bias, atol=np.max(scale) / 2)
    assert integers[2] == 0


def test_a_weight_scale_floor_keeps_a_near_zero_channels_bias_in_int32():
    weight = np.stack([np.linspace(-1, 1, 9), np.full(9, 1e-30)]).astype(np.float32)
    bias, input_scale = np.array([0.25, 0.5], np.float32), 0.02
    floor = bias_weight_scale_floor(bias, input_scale)
    plain = quantize_weight(weight, qtype("int8"), symmetric=True, axis=0)
    floored = quantize_weight(weight, qtype("int8"), symmetric=True, axis=0, min_scale=floor)
    assert floored.scale[0] == plain.scale[0]  # a live channel's scale is already far above its floor
    assert floored.scale[1] >= floor[1] > plain.scale[1]
    for quantized, kept in ((plain, False), (floored, True)):
        integers, scale = quantize_bias(bias, input_scale, quantized.scale)
        assert np.isclose(integers[1] * scale[1], bias[1], rtol=1e-6) == kept
        assert abs(int(integers[1])) <= (BIAS_INT32_LIMIT if kept else np.iinfo(np.int32).max)
    positive = np.abs(weight) + 0.1  # asymmetric: a floor that does not bind must not widen [0.1, 1.1] to hold -floor
    plain = quantize_weight(positive, qtype("uint8"), symmetric=False, axis=0)
    floored = quantize_weight(positive, qtype("uint8"), symmetric=False, axis=0, min_scale=np.full(2, 1e-6, np.float32))
    np.testing.assert_array_equal(floored.scale, plain.scale)
    np.testing.assert_array_equal(floored.values, plain.values)


def test_unknown_type_is_refused():
    with pytest.raises(ValueError, match="valid: int8"):
        qtype("int3")
