"""The optimal-brain-surgeon column sweep shared by GPTQ (rounding, gptq.py) and SparseGPT
(2:4 pruning, sparsegpt.py): fix a linear's weight one input column at a time and move each
column's error onto the columns not yet fixed, weighted by the layer's inputs.

For y = x W^T and calibration inputs X, a changed weight W' costs tr((W - W') H (W - W')^T) with
H = X^T X.  Fixing column j to a chosen value and re-solving the remaining columns by least
squares is a rank-one update through the upper Cholesky factor U of H^-1:
err = (w_j - chosen_j) / U[j, j],  W[:, j+1:] -= err U[j, j+1:].  U[j, j]^2 is [H^-1]_jj with the
columns before j already eliminated, which is what the OBS saliency of column j reads.  Updates
to columns past the current block are applied lazily, once per block (the same arithmetic, fewer
passes over W), so a callback sees up-to-date values only for the columns of its own block.
"""

from __future__ import annotations

from typing import Callable

import torch

DAMP = 0.01  # fraction of the mean diagonal added to H: keeps the factorisation well posed
BLOCK = 128


def inverse_factor(H: torch.Tensor, damp: float, who: str = "calibration") -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, in float64."""
    H = H.clone()
    d = torch.arange(H.shape[0])
    H[d, d] += damp * H.diagonal().mean().clamp_min(1e-12)
    for _ in range(6):  # a singular H (collinear inputs): damp harder rather than fail
        L, info = torch.linalg.cholesky_ex(H)
        if info == 0:
            break
        H[d, d] += damp * H.diagonal().mean()
    else:
        raise RuntimeError(f"{who}: the calibration Hessian is not positive definite even damped")
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def prepare(weight: torch.Tensor, H: torch.Tensor, who: str) -> tuple:
    """(W float64 copy, H float64 copy, dead columns) with dead input columns (never non-zero in
    calibration: their weights cannot change the output) zeroed in W and given a unit diagonal in
    H so that H stays invertible."""
    K = weight.shape[1]
    if H.shape != (K, K):
        raise ValueError(f"{who}: H must be [{K}, {K}] for a weight of {K} input features, "
                         f"got {tuple(H.shape)}")
    W = weight.detach().to(torch.float64).clone()
    H = H.to(torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H, dead


def sweep(Wt: torch.Tensor, U: torch.Tensor, fix: Callable[[int, torch.Tensor], torch.Tensor],
          block: int = BLOCK) -> None:
    """Fix the rows of Wt [K, N] (the weight's columns, contiguous) in order, in place.

    `fix(j, Wt)` returns the value row j is fixed to, given Wt's rows j.. of the current block
    compensated so far; its error is spread onto rows j+1.. through U (the `inverse_factor` of
    H in the same column order).  Row j of Wt keeps its compensated (pre-fix) value."""
    K, N = Wt.shape
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        E = torch.empty(b1 - b0, N, dtype=Wt.dtype)
        for j in range(b0, b1):
            err = (Wt[j] - fix(j, Wt)) / U[j, j]
            Wt[j + 1:b1] -= U[j, j + 1:b1, None] * err[None, :]
            E[j - b0] = err
        Wt[b1:] -= U[b0:b1, b1:].t() @ E


def one_thread(fn, *args, **kwargs):
    """Run `fn` on one thread: the sweep is thousands of small vector steps, which several threads
    only slow down (measured 15x slower on 2 busy cores for a 1536 x 576 weight)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
