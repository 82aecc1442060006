"""Helpers for model-level tests: run eager and liger-compiled copies and compare them."""

from __future__ import annotations

import copy

import torch

import ligerfx.backend


def _loss(out):
    if hasattr(out, "loss") and out.loss is not None:
        return out.loss
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out if out.dim() == 0 else out.float().sum()


def call(model, args):
    return model(**args) if isinstance(args, dict) else model(*args)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of a against reference b (computed in float64)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare_training_step(model, args, *, options=None, rtol=1e-4, dynamic=None):
    """One forward+backward eager and compiled; asserts loss and every grad agree.

    Returns the backend's report for the compiled model (every graph it made).
    """
    ref = model
    test = copy.deepcopy(model)
    opts = {"inner": "aot_eager", **(options or {})}
    ligerfx.backend.last_report = None  # so a stale report cannot pass for this compile
    compiled = torch.compile(test, backend="liger", options=opts, dynamic=dynamic)
    loss_ref = _loss(call(ref, args))
    loss_ref.backward()
    loss = _loss(call(compiled, args))
    assert ligerfx.backend.last_report is not None, "Dynamo did not call the liger backend"
    loss.backward()
    assert torch.isfinite(loss).all()
    assert rel_err(loss.detach(), loss_ref.detach()) < rtol, (loss.item(), loss_ref.item())
    n = 0
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), test.named_parameters()):
        if p_ref.grad is None:
            assert p.grad is None or not p.grad.abs().any(), name
            continue
        assert p.grad is not None, f"{name}: no gradient through the compiled model"
        err = rel_err(p.grad, p_ref.grad)
        assert err < rtol, f"{name}: gradient relative error {err:.2e}"
        n += 1
    assert n > 0
    return ligerfx.backend.last_report
