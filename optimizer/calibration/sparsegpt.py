"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot"), in numpy: GPTQ's row-by-row solver with pruning in place of rounding.

For ``X @ W`` with ``W`` of K x N (rows = input features), the rows are visited in order; a row's
pruned entries are set to zero and the error this makes in ``X @ W`` is moved onto the rows not yet
visited, weighted by ``H = X^T X`` (the inverse factor GPTQ uses, ``gptq.InverseFactor``). Which
entries go is decided per block of rows, on the weights as updated so far, by the optimal brain
surgeon saliency w^2 / [H^-1]_jj^2: unstructured, the lowest ``sparsity`` of the block's entries
(one threshold over the block); N:M, the M-N lowest of every group of M rows in each column.
"""

from __future__ import annotations

import numpy as np

from optimizer.calibration.gptq import InverseFactor

BLOCK_ROWS = 128
"""Rows whose mask is chosen together and whose updates are applied lazily (the paper's Bs)."""


def sparsegpt_prune(
    weight: np.ndarray, factor: InverseFactor, sparsity: float, nm: tuple[int, int] | None = None
) -> np.ndarray:
    """``weight`` (K x N) with ``sparsity`` of its entries (or N:M along K) zeroed and the rest
    updated to keep ``X @ W`` close; float32, zeros exact."""
    weight = np.asarray(weight, np.float64)
    upper = factor.upper
    if weight.ndim != 2 or upper.shape != (weight.shape[0],) * 2:
        raise ValueError(f"sparsegpt needs a K x N weight and a K x K factor; got {weight.shape} and {upper.shape}")
    if factor.act_order:
        raise ValueError("sparsegpt visits rows in their own order: give it a factor without act_order")
    rows = weight.shape[0]
    work = weight.copy()
    work[factor.dead] = 0.0  # an input that is always zero: its weights do not matter
    pruned = np.zeros(weight.shape, bool)
    diagonal = np.diag(upper)
    for start in range(0, rows, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, rows)
        part = work[start:stop].copy()
        errors = np.zeros_like(part)
        if nm is None:
            pruned[start:stop] = _block_mask(part, diagonal[start:stop], sparsity)
        for offset in range(stop - start):
            row = start + offset
            if nm is not None and offset % nm[1] == 0:
                group = slice(offset, min(offset + nm[1], stop - start))
                pruned[start + group.start : start + group.stop] = _group_mask(
                    part[group], diagonal[start + group.start : start + group.stop], nm
                )
            current = part[offset]
            kept = np.where(pruned[row], 0.0, current)
            error = (current - kept) / upper[row, row]
            part[offset + 1 :] -= np.outer(upper[row, row + 1 : stop], error)
            part[offset] = kept
            errors[offset] = error
        work[start:stop] = part
        work[stop:] -= upper[start:stop, stop:].T @ errors
    work[pruned] = 0.0
    return work.astype(np.float32)


def _block_mask(block: np.ndarray, diagonal: np.ndarray, sparsity: float) -> np.ndarray:
    """The ``sparsity`` lowest-saliency entries of the block (stable ties: the same on every run)."""
    saliency = (block / diagonal[:, None]) ** 2
    count = int(np.floor(sparsity * saliency.size + 0.5))
    mask = np.zeros(saliency.size, bool)
    mask[np.argsort(saliency.ravel(), kind="stable")[:count]] = True
    return mask.reshape(block.shape)


def _group_mask(group: np.ndarray, diagonal: np.ndarray, nm: tuple[int, int]) -> np.ndarray:
    """In each column, the M-N lowest-saliency rows of the group of M."""
    saliency = (group / diagonal[:, None]) ** 2
    mask = np.zeros(group.shape, bool)
    drop = max(0, group.shape[0] - nm[0])
    np.put_along_axis(mask, np.argsort(saliency, axis=0, kind="stable")[:drop], True, axis=0)
    return mask
