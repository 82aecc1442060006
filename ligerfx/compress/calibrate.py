"""Calibration: run a model on the user's batches and collect what calibrated compression needs
from each linear layer's inputs (the second moment H = sum of x x^T over every token).

Batches are token-id tensors (called as `model(batch)`) or dicts of keyword arguments
(`model(**batch)`), run under `torch.no_grad()`.  Linears that read the same input tensor (q, k
and v of one attention; gate and up of one MLP) compute its x^T x once per batch.
"""

from __future__ import annotations

import sys
from typing import Iterable

import torch
import torch.nn as nn


class CalibrationError(ValueError):
    pass


def run_batches(model: nn.Module, batches: Iterable) -> int:
    """Call the model on every batch; return how many were run."""
    n = 0
    with torch.no_grad():
        for b in batches:
            if isinstance(b, dict):
                model(**b)
            elif isinstance(b, torch.Tensor):
                model(b)
            else:
                raise CalibrationError(
                    f"calibration batches must be token-id tensors or dicts of model keyword "
                    f"arguments, got {type(b).__name__}")
            n += 1
    if n == 0:
        raise CalibrationError("calibration is empty: pass an iterable of at least one batch")
    return n


def input_moments(model: nn.Module, names: list[str], batches: Iterable) -> dict[str, torch.Tensor]:
    """{linear name: H [K, K] float64} for the named nn.Linear modules of `model`.  Memory: one
    K x K float64 matrix per linear (about 1 GB for a 135M model); a model whose matrices do not
    fit should be calibrated in parts (`names` a subset at a time)."""
    mods = {n: model.get_submodule(n) for n in names}
    acc: dict[str, torch.Tensor] = {}
    this_call: dict[tuple, tuple] = {}  # (input, x^T x) of each input tensor seen in this batch

    def hook(name):
        def pre(mod, args):
            x = args[0]
            # The input is kept alive for the batch, so no later tensor can reuse its address.
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
            hit = this_call.get(key)
            if hit is None:
                x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                hit = this_call[key] = (x, x2.t() @ x2)
            xtx = hit[1]
            if name in acc:
                acc[name] += xtx
            else:
                acc[name] = xtx.clone()
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]

    def one_at_a_time():
        for b in batches:
            this_call.clear()
            yield b

    try:
        run_batches(model, one_at_a_time())
    finally:
        this_call.clear()
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in acc]
    if missing:
        raise CalibrationError(f"linear(s) {', '.join(map(repr, missing[:5]))} were never called "
                               "on the calibration batches")
    return acc


def progress(done: int, total: int, what: str) -> None:
    """One line on stderr, rewritten in place (no dependency on a progress-bar package)."""
    if sys.stderr.isatty() or done == total:
        end = "\n" if done == total else ""
        print(f"\r{what}: {done}/{total}", end=end, file=sys.stderr, flush=True)
