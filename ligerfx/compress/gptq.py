"""GPTQ: round a linear's weight to its low-bit grid one input column at a time, moving each
column's rounding error onto the columns not yet rounded, weighted by the layer's inputs.

For a layer y = x W^T and calibration inputs X, the output error of a rounded weight W' is
tr((W - W') H (W - W')^T) with H = X^T X.  Rounding column j alone and compensating the
remaining columns optimally (least squares, their inverse-Hessian rows) is the OBS step; GPTQ
does it in a fixed column order with the Cholesky factor U of H^-1 (upper), so each step is a
rank-one update:  err = (w_j - q(w_j)) / U[j, j],  W[:, j+1:] -= err U[j, j+1:].  That sweep
(inverse factor, lazy block updates, dead columns) is compress/obs.py, shared with SparseGPT.

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

from . import obs

DAMP = obs.DAMP


class _Int4Grid:
    def __init__(self, K, group_size, scale_dtype):
        self.G, self.scale_dtype = group_size, scale_dtype
        self.n = int4_matmul.n_groups(K, group_size)
        self.scale = self.offset = None
        self.s = self.z = None

    def start(self, Wt, j):
        if j % self.G:
            return
        g = j // self.G
        s, z = self._group_grid(Wt[j:j + self.G])
        if self.scale is None:
            self.scale = torch.empty(Wt.shape[1], self.n, dtype=self.scale_dtype)
            self.offset = torch.empty_like(self.scale)
        self.scale[:, g], self.offset[:, g] = s, z
        self.s, self.z = s.double(), z.double()

    def _group_grid(self, cols):
        lo, hi = cols.amin(0), cols.amax(0)
        return ((hi - lo) / 15).float().to(self.scale_dtype), lo.float().to(self.scale_dtype)

    def level(self, w):
        return ((w - self.z) / torch.where(self.s > 0, self.s, 1.0)).round().clamp(0, 15)

    def value(self, q):
        return q * self.s + self.z

    def packed(self, Q):
        return int4_matmul.pack_levels(Q.to(torch.uint8).contiguous()), self.scale, self.offset


class _StaticInt4Grid:
    """Group grids fixed from the weights before any column is rounded, so columns may be taken
    in any order (act-order): each column reads its own group's scale and offset.  Each group's
    range is the one of a few clipped ranges (shrunk towards zero by CLIPS) with the least
    rounding error weighted by its inputs' energy diag(H), as stored."""

    CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)

    def __init__(self, W, diag, group_size, scale_dtype, clip=True):
        self.G = group_size
        N, K = W.shape
        wg = int4_matmul._grouped(W.float(), group_size).double()  # [N, n, G]
        dg = int4_matmul._grouped(diag[None].float(), group_size).double()[0]  # [n, G]
        pad = wg.shape[1] * group_size - K
        if pad:  # the padding repeats the last column: it must not count twice
            dg = dg.clone()
            dg[-1, group_size - pad:] = 0
        lo, hi = wg.amin(-1), wg.amax(-1)
        best = None
        for a in (self.CLIPS if clip else (1.0,)):
            sc = ((hi - lo) * a / 15).float().to(scale_dtype)
            of = (lo * a).float().to(scale_dtype)
            s, z = sc.double()[..., None], of.double()[..., None]
            q = ((wg - z) / torch.where(s > 0, s, 1.0)).round().clamp(0, 15)
            err = (((q * s + z) - wg) ** 2 * dg).sum(-1)
            if best is None:
                best, self.scale, self.offset = err, sc, of
            else:
                better = err < best
                best = torch.where(better, err, best)
                self.scale = torch.where(better, sc, self.scale)
                self.offset = torch.where(better, of, self.offset)
        self.s_all, self.z_all = self.scale.double(), self.offset.double()

    def start(self, Wt, k):
        self.s, self.z = self.s_all[:, k // self.G], self.z_all[:, k // self.G]

    level = _Int4Grid.level
    value = _Int4Grid.value
    packed = _Int4Grid.packed


class _Int8Grid:
    def __init__(self, W, scale_dtype):
        self.scale = (W.abs().amax(1) / int8_matmul.QMAX).float().to(scale_dtype)
        self.s = self.scale.double()

    def start(self, Wt, j):
        pass

    def level(self, w):
        q = torch.where(self.s > 0, w / torch.where(self.s > 0, self.s, 1.0), 0.0)
        return q.round().clamp(-int8_matmul.QMAX, int8_matmul.QMAX)

    def value(self, q):
        return q * self.s

    def packed(self, Q):
        return Q.to(torch.int8), self.scale


def gptq_pack(weight: torch.Tensor, H: torch.Tensor, scheme: str, group_size: int = 128,
              scale_dtype: Optional[torch.dtype] = None, damp: float = DAMP,
              act_order: bool = True) -> tuple:
    """The packed tensors of `weight` [N, K] in `scheme` ("int4" or "int8"), rounded by GPTQ
    against the input second moment H [K, K] (sum of x x^T over the calibration tokens).

    `act_order`: round the columns with the most input energy (diag H) first, while the most
    columns are left to absorb their error; int4 group grids are then fixed beforehand (static
    groups, clipped for the least input-weighted rounding error) so the packed format is the
    same."""
    return obs.one_thread(_gptq, weight, H, scheme, group_size, scale_dtype, damp, act_order)


def _gptq(weight, H, scheme, group_size, scale_dtype, damp, act_order):
    K = weight.shape[1]
    scale_dtype = scale_dtype or weight.dtype
    W, H, _ = obs.prepare(weight, H, "GPTQ")
    if scheme == "int8":
        grid = _Int8Grid(W, scale_dtype)
    elif act_order:
        grid = _StaticInt4Grid(W, H.diagonal(), group_size, scale_dtype)
    else:
        grid = _Int4Grid(K, group_size, scale_dtype)
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order \
        else torch.arange(K)
    U = obs.inverse_factor(H[order][:, order], damp, "GPTQ")
    # Columns of W are rows of Wt: every per-column step reads and writes contiguous memory.
    Wt = W.t()[order].contiguous()
    Qt = torch.empty_like(Wt)

    def fix(j, Wt):
        grid.start(Wt, int(order[j]) if act_order else j)
        Qt[j] = grid.level(Wt[j])
        return grid.value(Qt[j])

    obs.sweep(Wt, U, fix)
    Q = torch.empty_like(Qt)
    Q[order] = Qt
    return grid.packed(Q.t())
