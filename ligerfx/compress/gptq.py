"""GPTQ: round a linear's weight to its low-bit grid one input column at a time, moving each
column's rounding error onto the columns not yet rounded, weighted by the layer's inputs.

For a layer y = x W^T and calibration inputs X, the output error of a rounded weight W' is
tr((W - W') H (W - W')^T) with H = X^T X.  Rounding column j alone and compensating the
remaining columns optimally (least squares, their inverse-Hessian rows) is the OBS step; GPTQ
does it in a fixed column order with the Cholesky factor U of H^-1 (upper), so each step is a
rank-one update:  err = (w_j - q(w_j)) / U[j, j],  W[:, j+1:] -= err U[j, j+1:].  Updates are
applied lazily in blocks of columns (the same arithmetic, fewer passes over W).

The grid is the packed format's own (kernels/int4_matmul.py, int8_matmul.py): for int4 a group's
scale and offset come from that group's min and max *as compensated so far* (computed when the
group's first column is reached), stored in the scale dtype and used as stored, so the result
packs bit-exactly into the existing kernels' format.  int8's per-channel scale is fixed from the
whole row before the first column.
"""

from __future__ import annotations

from typing import Optional

import torch

from ligerfx.kernels import int4_matmul, int8_matmul

DAMP = 0.01  # fraction of the mean diagonal added to H: keeps the factorisation well posed
BLOCK = 128


def _inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
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
        raise RuntimeError("GPTQ: the calibration Hessian is not positive definite even damped")
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


class _Int4Grid:
    def __init__(self, K, group_size, scale_dtype):
        self.G, self.scale_dtype = group_size, scale_dtype
        self.n = int4_matmul.n_groups(K, group_size)
        self.scale = self.offset = None
        self.s = self.z = None

    def start(self, W, j):
        if j % self.G:
            return
        g = j // self.G
        s, z = self._group_grid(W[:, j:j + self.G])
        if self.scale is None:
            self.scale = torch.empty(W.shape[0], self.n, dtype=self.scale_dtype)
            self.offset = torch.empty_like(self.scale)
        self.scale[:, g], self.offset[:, g] = s, z
        self.s, self.z = s.double(), z.double()

    def _group_grid(self, cols):
        lo, hi = cols.amin(1), cols.amax(1)
        return ((hi - lo) / 15).float().to(self.scale_dtype), lo.float().to(self.scale_dtype)

    def level(self, w):
        return ((w - self.z) / torch.where(self.s > 0, self.s, 1.0)).round().clamp(0, 15)

    def value(self, q):
        return q * self.s + self.z

    def packed(self, Q):
        return int4_matmul.pack_levels(Q.to(torch.uint8)), self.scale, self.offset


class _Int8Grid:
    def __init__(self, W, scale_dtype):
        self.scale = (W.abs().amax(1) / int8_matmul.QMAX).float().to(scale_dtype)
        self.s = self.scale.double()

    def start(self, W, j):
        pass

    def level(self, w):
        q = torch.where(self.s > 0, w / torch.where(self.s > 0, self.s, 1.0), 0.0)
        return q.round().clamp(-int8_matmul.QMAX, int8_matmul.QMAX)

    def value(self, q):
        return q * self.s

    def packed(self, Q):
        return Q.to(torch.int8), self.scale


def gptq_pack(weight: torch.Tensor, H: torch.Tensor, scheme: str, group_size: int = 128,
              scale_dtype: Optional[torch.dtype] = None, damp: float = DAMP) -> tuple:
    """The packed tensors of `weight` [N, K] in `scheme` ("int4" or "int8"), rounded by GPTQ
    against the input second moment H [K, K] (sum of x x^T over the calibration tokens)."""
    N, K = weight.shape
    if H.shape != (K, K):
        raise ValueError(f"GPTQ: H must be [{K}, {K}] for a weight of {K} input features, "
                         f"got {tuple(H.shape)}")
    scale_dtype = scale_dtype or weight.dtype
    W = weight.detach().to(torch.float64).clone()
    H = H.to(torch.float64)
    dead = H.diagonal() == 0  # inputs never non-zero in calibration: their column cannot matter
    H = H.clone()
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = _inverse_factor(H, damp)
    grid = _Int4Grid(K, group_size, scale_dtype) if scheme == "int4" else _Int8Grid(W, scale_dtype)
    Q = torch.empty_like(W)
    for b0 in range(0, K, BLOCK):
        b1 = min(b0 + BLOCK, K)
        E = torch.empty(N, b1 - b0, dtype=W.dtype)
        for j in range(b0, b1):
            grid.start(W, j)
            q = grid.level(W[:, j])
            Q[:, j] = q
            err = (W[:, j] - grid.value(q)) / U[j, j]
            W[:, j + 1:b1] -= err[:, None] * U[j, j + 1:b1][None, :]
            E[:, j - b0] = err
        W[:, b1:] -= E @ U[b0:b1, b1:]
    return grid.packed(Q)
