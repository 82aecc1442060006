"""Trainable compressed students for recovery by distillation (benchmarks/kd_recover.py).

A student is a copy of the teacher, compressed by the library's own compression APIs, kept as
trainable dense `nn.Linear` weights:

- "2:4": `ligerfx.sparsify_` is run on a throwaway copy (with `calibration=` / `method=` when
  this version of `sparsify_` takes them; else its magnitude rule), and each packed weight is
  unpacked back into the student's `nn.Linear`.  So the zero pattern is exactly the one the
  library chooses, without a second copy of its pruning rule.  `Mask24` keeps those zeros
  through training; at the end `ligerfx.sparsify_` packs the trained weights losslessly (a 2:4
  weight is its own magnitude pruning).
- "prune-mlp": `ligerfx.prune_(model, mlp=..., calibration=...)` (structured MLP pruning, a
  smaller dense model) when this version of ligerfx has it.

The lm head stays dense (tied to the embedding) and, with the embedding, frozen.
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn as nn

import ligerfx
from ligerfx.compress.sparsify import SparseLinear

STUDENTS = ("2:4", "prune-mlp")


class StudentUnavailable(RuntimeError):
    """The student needs a compression API this version of ligerfx does not have."""


def _takes(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def sparse24_student(teacher: nn.Module, calibration=None, method: str | None = None):
    """(student, Mask24, description): a copy of `teacher` whose eligible linears hold the weights
    `ligerfx.sparsify_(…, "2:4")` chooses, as trainable dense weights."""
    kwargs, how = {}, "magnitude"
    if calibration is not None and _takes(ligerfx.sparsify_, "calibration"):
        kwargs["calibration"] = calibration
        if method is not None:
            kwargs["method"] = method
        how = method or "calibrated (sparsify_'s default method)"
    elif method not in (None, "magnitude"):
        raise StudentUnavailable(f"--prune-method {method!r} needs ligerfx.sparsify_(..., "
                                 "calibration=, method=), which this version does not have; "
                                 "use --prune-method magnitude")
    student = copy.deepcopy(teacher).requires_grad_(True)
    packed = copy.deepcopy(teacher)
    skipped = ligerfx.sparsify_(packed, "2:4", **kwargs)
    weights = {name: m.dense_weight(torch.float32) for name, m in packed.named_modules()
               if isinstance(m, SparseLinear)}
    del packed
    if not weights:
        raise StudentUnavailable(f"sparsify_ left every linear dense: {skipped}")
    with torch.no_grad():
        for name, w in weights.items():
            lin = student.get_submodule(name)
            lin.weight.copy_(w.to(lin.weight.dtype))
    return student, Mask24(student, list(weights)), f"2:4 ({how}), {len(weights)} linears"


def prune_mlp_student(teacher: nn.Module, fraction: float, calibration=None,
                      method: str | None = None):
    """(student, None, description): `ligerfx.prune_`'s smaller dense model (MLP width cut by
    `fraction`)."""
    prune_ = getattr(ligerfx, "prune_", None)
    if prune_ is None:
        raise StudentUnavailable("--student prune-mlp needs ligerfx.prune_ (structured pruning), "
                                 "which this version of ligerfx does not have yet; use --student "
                                 "2:4")
    kwargs = {}
    if calibration is not None and _takes(prune_, "calibration"):
        kwargs["calibration"] = calibration
    if method is not None and _takes(prune_, "method"):
        kwargs["method"] = method
    student = copy.deepcopy(teacher).requires_grad_(True)
    out = prune_(student, mlp=fraction, **kwargs)
    # prune_ may work in place or return the smaller model
    student = out if isinstance(out, nn.Module) else student
    return student, None, f"MLP pruned by {fraction:.0%} ({method or 'default method'})"


def make_student(kind: str, teacher: nn.Module, calibration=None, method: str | None = None,
                 mlp_fraction: float = 0.5):
    """(student in train mode with the embedding frozen, Mask24 or None, description)."""
    if kind == "2:4":
        student, mask, what = sparse24_student(teacher, calibration, method)
    elif kind == "prune-mlp":
        student, mask, what = prune_mlp_student(teacher, mlp_fraction, calibration, method)
    else:
        raise ValueError(f"unknown student {kind!r}: choose one of {', '.join(STUDENTS)}")
    freeze_embeddings(student)
    return student.train(), mask, what


def freeze_embeddings(model: nn.Module) -> None:
    """The embedding (and so a tied lm head) is not trained: it stays the teacher's."""
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            m.weight.requires_grad_(False)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        head.weight.requires_grad_(False)


class Mask24:
    """The zero pattern of the student's 2:4 linears, kept through training: the gradient is
    masked (so the optimizer's moments never see the pruned entries) and the mask re-applied
    after each optimizer step (so weight decay or any update cannot revive them)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.params = [model.get_submodule(n).weight for n in names]
        self.masks = [p.detach() != 0 for p in self.params]
        for p, m in zip(self.params, self.masks):
            p.register_hook(lambda g, m=m: g * m)

    @torch.no_grad()
    def apply(self) -> None:
        for p, m in zip(self.params, self.masks):
            p.mul_(m)

    def kept(self) -> bool:
        """Every weight still zero wherever the mask is, and 2:4."""
        from ligerfx.kernels import sparse24_matmul as S24

        return all(not (p.detach()[~m] != 0).any() and S24.broken_fraction(p) == 0
                   for p, m in zip(self.params, self.masks))
