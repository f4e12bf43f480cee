"""GPTQ rounding for blocked weights (Frantar et al., 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers"), in numpy.

Round-to-nearest treats every weight alone. GPTQ rounds the rows of ``W`` (the reduction axis
of ``X @ W``) one at a time and moves each row's rounding error onto the rows not yet rounded,
weighted by ``H = X^T X`` measured on calibration data, so the error of ``X @ W`` (not of ``W``)
is what gets minimised. In natural order a block's scales and zero points are chosen from the
weights as updated when its first row is reached; in act-order (rows by decreasing input energy,
``InverseFactor(act_order=True)``) every block's are chosen first, from the weight as given. Either
way the result is an ordinary blocked tensor that DequantizeLinear (and onnxruntime's MatMulNBits)
reads like any other.

Weights that are exactly zero (pruned, e.g. by SparseGPT) stay zero and their would-be updates move
onto the weights kept: pruning then GPTQ is SparseGPT's joint sparsify-and-quantize, and the
sparsity survives quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optimizer.calibration.quant_math import QType, QuantizedTensor, scale_zero_point

DAMPING = 0.01
"""Added to the Hessian's diagonal, as a fraction of its mean: keeps the inverse well conditioned."""
BATCH_ROWS = 128
"""Rows whose updates are applied lazily as one matrix product (the paper's lazy batch)."""


FLUSH_ROWS = 1024
"""Activation rows buffered before one ``X^T X`` product: the product costs K^2 per call whatever
the row count, so one sentence (30 rows) at a time would spend it 30 times over."""


class HessianAccumulator:
    """Streaming ``X^T X`` of one activation over calibration samples (rows = all leading axes)."""

    def __init__(self, channels: int) -> None:
        self.sum = np.zeros((channels, channels), np.float64)
        self.rows = 0
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    def add(self, activation: np.ndarray) -> None:
        rows = np.asarray(activation, np.float32).reshape(-1, self.sum.shape[0])
        if not np.isfinite(rows).all():
            rows = rows[np.isfinite(rows).all(axis=1)]
        self._pending.append(rows)
        self._pending_rows += rows.shape[0]
        self.rows += rows.shape[0]
        if self._pending_rows >= FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            rows = np.concatenate(self._pending)
            self.sum += (rows.T @ rows).astype(np.float64)
        self._pending, self._pending_rows = [], 0

    def hessian(self) -> np.ndarray:
        self._flush()
        return self.sum / max(self.rows, 1)


class InverseFactor:
    """The upper Cholesky factor of the damped inverse Hessian, shared by every weight that
    multiplies the same activation (the Q, K and V projections of one attention block).

    ``act_order``: rows are visited by decreasing ``H`` diagonal (the inputs with the most energy
    first, GPTQ's "act-order"), so the rows that matter most are rounded while the most rows remain
    to take their error. ``order`` maps a visiting position to its row; ``dead`` is by position."""

    def __init__(self, hessian: np.ndarray, damping: float = DAMPING, *, act_order: bool = False) -> None:
        h = np.array(hessian, np.float64)
        if h.ndim != 2 or h.shape[0] != h.shape[1]:
            raise ValueError(f"a Hessian is square; got shape {h.shape}")
        self.order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(h.shape[0])
        self.act_order = act_order
        h = h[np.ix_(self.order, self.order)]
        self.dead = np.diag(h) <= 0
        h[self.dead, self.dead] = 1.0
        h[np.diag_indices(h.shape[0])] += damping * float(np.mean(np.diag(h)))
        self.upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U


def gptq_quantize(
    weight: np.ndarray, factor: InverseFactor, target: QType, *, symmetric: bool, block_size: int
) -> QuantizedTensor:
    """Blocked quantization of ``weight`` (``K x N``, blocks of ``block_size`` along K) by GPTQ.

    In natural order a block's scales come from its weights as updated when its first row is
    reached; in act-order (``factor.act_order``) rows of one block are visited apart, so every
    block's scales come first from the weights as given ("static groups")."""
    weight = np.asarray(weight, np.float64)
    upper, order = factor.upper, factor.order
    if weight.ndim != 2 or upper.shape != (weight.shape[0],) * 2:
        raise ValueError(f"gptq needs a K x N weight and a K x K factor; got {weight.shape} and {upper.shape}")
    rows, columns = weight.shape
    work = weight[order]
    work[factor.dead] = 0.0  # an input that is always zero: its weights do not matter
    pruned = work == 0.0  # zeros stay zeros (pruned weights): their error moves onto the weights kept
    blocks = -(-rows // block_size)
    grid = _Grid(
        target,
        symmetric,
        block_size,
        factor.act_order,
        np.empty((blocks, columns), np.float32),
        np.empty((blocks, columns), target.storage_dtype),
    )
    if factor.act_order:
        dead = np.zeros(rows, bool)
        dead[order[factor.dead]] = True
        for block in range(blocks):
            span = slice(block * block_size, (block + 1) * block_size)
            grid.choose(block, np.where(dead[span, None], 0.0, weight[span]))
    values = np.empty((rows, columns), target.storage_dtype)
    batch = max(block_size, BATCH_ROWS // block_size * block_size)
    for start in range(0, rows, batch):
        stop = min(start + batch, rows)
        errors = _round_batch(work, (start, stop), order, upper, pruned, values, grid)
        work[stop:] -= upper[start:stop, stop:].T @ errors
    return QuantizedTensor(values, grid.scales, grid.zeros, target, 0, block_size)


@dataclass
class _Grid:
    """The blocks' scales and zero points, chosen as GPTQ goes (natural order) or first (static)."""

    target: QType
    symmetric: bool
    block_size: int
    static: bool
    scales: np.ndarray
    zeros: np.ndarray

    def choose(self, block: int, rows: np.ndarray) -> None:
        self.scales[block], self.zeros[block] = scale_zero_point(
            rows.min(axis=0), rows.max(axis=0), self.target, symmetric=self.symmetric
        )


def _round_batch(
    work: np.ndarray,
    span: tuple[int, int],
    order: np.ndarray,
    upper: np.ndarray,
    pruned: np.ndarray,
    values: np.ndarray,
    grid: _Grid,
) -> np.ndarray:
    """Round the positions ``span`` (rows ``order[start:stop]``) one at a time, each one's error moved
    onto the rest of the batch; the batch's errors (for the positions after it)."""
    start, stop = span
    part = work[start:stop].copy()
    errors = np.zeros_like(part)
    for offset in range(stop - start):
        position, row = start + offset, int(order[start + offset])
        block = row // grid.block_size
        if not grid.static and row % grid.block_size == 0:
            grid.choose(block, part[offset : offset + grid.block_size])
        scale, zero = grid.scales[block], grid.zeros[block].astype(np.float64)
        current = part[offset]
        codes = np.clip(np.rint(current.astype(np.float32) / scale) + zero, grid.target.qmin, grid.target.qmax)
        codes = np.where(pruned[position], zero, codes)
        values[row] = codes.astype(grid.target.storage_dtype)
        error = (current - (codes - zero) * scale.astype(np.float64)) / upper[position, position]
        part[offset + 1 :] -= np.outer(upper[position, position + 1 : stop], error)
        errors[offset] = error
    return errors
