"""Calibrated 2:4 pruning of one linear weight against its input second moment H = sum x x^T:
SparseGPT (mask by OBS saliency, error moved onto the columns not yet pruned), Wanda (mask by
|w| * ||x_j||, no update) and magnitude (mask by |w|, the uncalibrated default).

SparseGPT runs the GPTQ column sweep (compress/obs.py) in input order.  When a group of 4 columns
starts, each output row chooses the 2 entries to drop from the group's compensated values:
greedily by w_j^2 / U[j, j]^2 (the OBS cost of dropping column j alone, U the Cholesky factor of
H^-1), or, `search=True`, by the exact cost of each of the 6 pairs under the sweep (dropping the
first of a pair moves error onto the second before it is dropped too).  Each column is then fixed
to its kept value (or 0) and its error spread onto the later columns.  With int8 ("2:4+int8",
SparseGPT's joint mode) the kept values are rounded to the int8 per-channel grid in the same step
(the scale fixed beforehand from each row, as GPTQ's int8), so the rounding error is compensated
too and the levels pack into the existing SparseLinear format as they are.
"""

from __future__ import annotations

from typing import Optional

import torch

from ligerfx.kernels import sparse24_matmul as S24

from . import obs
from .gptq import _Int8Grid

METHODS = ("sparsegpt", "wanda", "magnitude")
CALIBRATED = ("sparsegpt", "wanda")
_PAIRS = [(a, b) for a in range(4) for b in range(a + 1, 4)]


def _keep_top2(score: torch.Tensor) -> torch.Tensor:
    """Keep mask [N, K] of the 2 largest scores of each group of 4 along K."""
    N, K = score.shape
    s = score.reshape(N, K // 4, 4)
    idx = s.topk(2, dim=-1).indices
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True).reshape(N, K)


def wanda_keep(weight: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Wanda's 2:4 keep mask: the 2 largest |w_nj| * ||x_j|| of each group (||x_j||^2 = H_jj)."""
    norms = H.diagonal().to(torch.float64).clamp_min(0).sqrt()
    return _keep_top2(weight.detach().to(torch.float64).abs() * norms)


def _pair_costs(C: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[6, N] sweep cost of dropping each pair (a < b) of a group: C [4, N] its compensated
    columns, u [4, 4] its block of U.  Kept columns in between are fixed at zero error."""
    out = []
    for a, b in _PAIRS:
        ea = C[a] / u[a, a]
        eb = (C[b] - u[a, b] * ea) / u[b, b]
        out.append(ea * ea + eb * eb)
    return torch.stack(out)


def sparsegpt_24(weight: torch.Tensor, H: torch.Tensor, int8: bool = False,
                 scale_dtype: Optional[torch.dtype] = None, damp: float = obs.DAMP,
                 search: bool = False):
    """SparseGPT 2:4 of `weight` [N, K] against H [K, K].  Returns the pruned, compensated
    weight [N, K] (float64, exactly 2:4), or with `int8` (levels float64 [N, K] with the same
    zeros, per-channel scale [N] in `scale_dtype`, default the weight's dtype)."""
    return obs.one_thread(_sparsegpt, weight, H, int8, scale_dtype or weight.dtype, damp, search)


def _sparsegpt(weight, H, int8, scale_dtype, damp, search):
    N, K = weight.shape
    if K % 4:
        raise ValueError(f"2:4 pruning needs in_features divisible by 4, got {K}")
    W, H, _ = obs.prepare(weight, H, "SparseGPT")
    grid = _Int8Grid(W, scale_dtype) if int8 else None
    U = obs.inverse_factor(H, damp, "SparseGPT")
    d = U.diagonal()
    pairs = torch.tensor(_PAIRS)
    Wt = W.t().contiguous()
    Out = torch.empty_like(Wt)
    keep = torch.empty(4, N, dtype=torch.bool)

    def fix(j, Wt):
        g = j % 4
        if g == 0:  # the block size is a multiple of 4: the group's rows are up to date here
            C = Wt[j:j + 4]
            if search:
                best = _pair_costs(C, U[j:j + 4, j:j + 4]).argmin(0)  # [N]
                drop = pairs[best].t()  # [2, N]
            else:
                drop = (C * C / (d[j:j + 4, None] ** 2)).topk(2, dim=0, largest=False).indices
            keep.fill_(True)
            keep.scatter_(0, drop, False)
        if grid is not None:
            Out[j] = torch.where(keep[g], grid.level(Wt[j]), 0.0)
            return grid.value(Out[j])
        Out[j] = torch.where(keep[g], Wt[j], 0.0)
        return Out[j]

    obs.sweep(Wt, U, fix)
    if grid is not None:
        return Out.t().contiguous(), grid.scale
    return Out.t().contiguous()


def pruned_24(weight: torch.Tensor, H: Optional[torch.Tensor], method: str, int8: bool = False,
              damp: float = obs.DAMP, search: bool = False) -> tuple:
    """(2:4-pruned dense weight in the weight's dtype, packed tensors for SparseLinear or None).

    The packed tensors are given only where the method chose the int8 levels itself (SparseGPT
    with `int8`); otherwise the dense weight is packed as usual (2:4+int8: rounded to nearest)."""
    if method == "magnitude":
        return S24.prune_24(weight), None
    if method == "wanda":
        keep = wanda_keep(weight, H)
        return torch.where(keep, weight.detach(), torch.zeros((), dtype=weight.dtype)), None
    if not int8:
        return sparsegpt_24(weight, H, damp=damp, search=search).to(weight.dtype), None
    levels, scale = sparsegpt_24(weight, H, int8=True, scale_dtype=weight.dtype, damp=damp, search=search)
    values, meta = S24.pack_24(levels.float())
    values = values.to(torch.int8)
    dense = S24.unpack_24(values, meta, scale, weight.dtype)
    return dense, (values, meta, scale)
