"""GPTQ rounding: lower X @ W error than round-to-nearest, same blocked layout, exact bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from optimizer.calibration.gptq import FLUSH_ROWS, HessianAccumulator, InverseFactor, gptq_quantize
from optimizer.calibration.quant_math import qtype, quantize_weight


def _activations(rows: int, k: int, seed: int, correlated: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k))
    if correlated:
        x = x @ (np.random.default_rng(7).standard_normal((k, k)) * 0.4 + np.eye(k))
        x[:, :3] *= 12.0
    return x.astype(np.float32)


def _output_error(x: np.ndarray, w: np.ndarray, quantized) -> float:
    return float(np.linalg.norm(x @ quantized.dequantized() - x @ w))


@pytest.mark.parametrize("name,symmetric", [("uint4", False), ("int4", True), ("int8", True)])
def test_gptq_beats_nearest_on_held_out_rows_and_keeps_the_blocked_layout(name, symmetric):
    k, n = 256, 96
    w = (np.random.default_rng(0).standard_normal((k, n)) * 0.05).astype(np.float32)
    accumulator = HessianAccumulator(k)
    accumulator.add(_activations(3000, k, seed=1))
    target = qtype(name)
    gptq = gptq_quantize(w, InverseFactor(accumulator.hessian()), target, symmetric=symmetric, block_size=32)
    nearest = quantize_weight(w, target, symmetric=symmetric, axis=0, block_size=32)
    assert gptq.values.shape == w.shape and gptq.scale.shape == nearest.scale.shape == (k // 32, n)
    assert gptq.values.dtype == target.storage_dtype and (gptq.axis, gptq.block_size) == (0, 32)
    assert gptq.values.min() >= target.qmin and gptq.values.max() <= target.qmax
    held_out = _activations(500, k, seed=2)
    assert _output_error(held_out, w, gptq) < 0.8 * _output_error(held_out, w, nearest)


def test_with_white_inputs_gptq_is_no_worse_than_nearest_and_dead_inputs_get_zero_weights():
    k, n = 128, 64
    w = (np.random.default_rng(3).standard_normal((k, n)) * 0.05).astype(np.float32)
    x = _activations(4000, k, seed=4, correlated=False)
    x[:, 5] = 0.0  # an input channel that never fires
    accumulator = HessianAccumulator(k)
    accumulator.add(x)
    factor = InverseFactor(accumulator.hessian())
    assert factor.dead[5] and factor.dead.sum() == 1
    gptq = gptq_quantize(w, factor, qtype("uint4"), symmetric=False, block_size=32)
    nearest = quantize_weight(w, qtype("uint4"), symmetric=False, axis=0, block_size=32)
    held_out = _activations(500, k, seed=5, correlated=False)
    held_out[:, 5] = 0.0
    assert _output_error(held_out, w, gptq) <= 1.02 * _output_error(held_out, w, nearest)
    assert np.all(gptq.dequantized()[5] == 0.0)


def test_accumulator_buffers_rows_drops_non_finite_rows_and_equals_the_direct_product():
    k = 16
    parts = [_activations(rows, k, seed=rows, correlated=False) for rows in (3, FLUSH_ROWS, 40, 1)]
    parts[2][7, 4] = np.nan
    accumulator = HessianAccumulator(k)
    for part in parts:
        accumulator.add(part.reshape(1, -1, k))  # leading axes are rows too
    kept = np.concatenate([np.delete(parts[2], 7, axis=0) if i == 2 else p for i, p in enumerate(parts)])
    assert accumulator.rows == kept.shape[0], "rows still buffered count too"
    expected = kept.astype(np.float64).T @ kept.astype(np.float64) / kept.shape[0]
    np.testing.assert_allclose(accumulator.hessian(), expected, rtol=1e-5, atol=1e-6)


def test_shapes_that_do_not_match_are_refused():
    factor = InverseFactor(np.eye(8))
    with pytest.raises(ValueError, match="K x N"):
        gptq_quantize(np.zeros((16, 4), np.float32), factor, qtype("uint4"), symmetric=False, block_size=16)
    with pytest.raises(ValueError, match="square"):
        InverseFactor(np.zeros((3, 4)))


@pytest.mark.parametrize("name,symmetric", [("uint4", False), ("int8", True)])
def test_pruned_zeros_stay_zero_and_their_error_moves_onto_the_kept_weights(name, symmetric):
    """Half the weights pruned first: GPTQ keeps exactly those zeros (updating them would undo the
    pruning) and still beats round-to-nearest on the X @ W of the pruned weight."""
    k, n = 128, 48
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    w[rng.random((k, n)) < 0.5] = 0.0
    x = _activations(3000, k, seed=12)
    accumulator = HessianAccumulator(k)
    accumulator.add(x)
    gptq = gptq_quantize(w, InverseFactor(accumulator.hessian()), qtype(name), symmetric=symmetric, block_size=32)
    nearest = quantize_weight(w, qtype(name), symmetric=symmetric, axis=0, block_size=32)
    np.testing.assert_array_equal(gptq.dequantized()[w == 0.0], 0.0)
    held_out = _activations(500, k, seed=13)
    assert _output_error(held_out, w, gptq) < 0.9 * _output_error(held_out, w, nearest)


def _uneven_activations(rows: int, k: int, seed: int) -> np.ndarray:
    """Inputs whose channels differ in size by orders of magnitude (as a decoder's do after RMSNorm)."""
    sizes = np.exp(np.random.default_rng(21).normal(0.0, 1.0, k))
    mixing = np.random.default_rng(27).standard_normal((k, k)) * 0.1 + np.eye(k)
    return (_activations(rows, k, seed, correlated=False) @ mixing * sizes).astype(np.float32)


@pytest.mark.parametrize("name,symmetric,block", [("uint4", False, 32), ("int4", True, 64)])
def test_act_order_visits_large_inputs_first_with_static_blocks_and_beats_natural_order(name, symmetric, block):
    k, n = 256, 64
    w = (np.random.default_rng(22).standard_normal((k, n)) * 0.05).astype(np.float32)
    accumulator = HessianAccumulator(k)
    accumulator.add(_uneven_activations(4000, k, seed=23))
    hessian = accumulator.hessian()
    factor = InverseFactor(hessian, act_order=True)
    np.testing.assert_array_equal(factor.order, np.argsort(-np.diag(hessian), kind="stable"))
    target = qtype(name)
    ordered = gptq_quantize(w, factor, target, symmetric=symmetric, block_size=block)
    natural = gptq_quantize(w, InverseFactor(hessian), target, symmetric=symmetric, block_size=block)
    nearest = quantize_weight(w, target, symmetric=symmetric, axis=0, block_size=block)
    # static blocks: the scales are the given weight's own, as round-to-nearest chooses them
    np.testing.assert_array_equal(ordered.scale, nearest.scale)
    assert ordered.values.shape == w.shape and (ordered.axis, ordered.block_size) == (0, block)
    assert ordered.values.min() >= target.qmin and ordered.values.max() <= target.qmax
    held_out = _uneven_activations(800, k, seed=24)
    assert _output_error(held_out, w, ordered) < 0.9 * _output_error(held_out, w, natural)


def test_act_order_keeps_dead_inputs_and_pruned_weights_at_zero_in_their_own_rows():
    k, n = 128, 32
    rng = np.random.default_rng(25)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    w[rng.random((k, n)) < 0.3] = 0.0
    x = _uneven_activations(3000, k, seed=26)
    x[:, 70] = 0.0  # never fires: sorted last, its row still row 70
    accumulator = HessianAccumulator(k)
    accumulator.add(x)
    factor = InverseFactor(accumulator.hessian(), act_order=True)
    assert factor.order[-1] == 70 and factor.dead[-1] and factor.dead.sum() == 1
    gptq = gptq_quantize(w, factor, qtype("uint4"), symmetric=False, block_size=32)
    assert np.all(gptq.dequantized()[70] == 0.0)
    np.testing.assert_array_equal(gptq.dequantized()[w == 0.0], 0.0)
