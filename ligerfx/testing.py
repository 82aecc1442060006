"""`ligerfx.testing.check_pattern`: test a registered pattern's replacement in one line.

    from ligerfx.testing import check_pattern
    check_pattern("quick_gelu")        # raises AssertionError naming what differs

Every spelling (variant) of the pattern is run eagerly on fresh random inputs shaped like the
registered example inputs, next to the replacement on the same inputs; outputs and the gradients
of every floating-point input (for a random output gradient) must agree within per-dtype
tolerances.  Non-tensor example inputs (eps, dims) are kept as registered.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .compiler.pattern import REGISTRY, Pattern, _examples_for, call_replacement

# (rtol, atol) per dtype: fused kernels reorder float sums, so bitwise equality is not expected.
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def _fresh(v: Any, gen: torch.Generator) -> Any:
    if not isinstance(v, torch.Tensor):
        return v
    if v.is_floating_point() or v.is_complex():
        wide = torch.complex64 if v.is_complex() else torch.float32
        return torch.randn(v.shape, generator=gen, dtype=wide).to(v.dtype).to(v.device)
    if v.dtype == torch.bool:
        return v.clone()
    lo, hi = (int(v.min()), int(v.max()) + 1) if v.numel() else (0, 1)
    return torch.randint(lo, max(hi, lo + 1), v.shape, generator=gen, dtype=v.dtype).to(v.device)


def _differentiable(fn, params, ins, frozen) -> set[str]:
    """Floating inputs that get a gradient: all but `frozen` and those eager torch itself cannot
    differentiate (cross_entropy's class weights)."""
    out = set()
    for p, x in zip(params, ins):
        if p in frozen or not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            continue
        probe = [y.detach().requires_grad_(q == p) if isinstance(y, torch.Tensor)
                 and y.is_floating_point() else y for q, y in zip(params, ins)]
        try:
            fn(*probe)
        except RuntimeError:
            continue
        out.add(p)
    return out


def _as_list(x) -> list:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _close(name: str, what: str, got: torch.Tensor, exp: torch.Tensor, rtol, atol) -> None:
    if got.shape != exp.shape or got.dtype != exp.dtype:
        raise AssertionError(f"pattern {name!r}: {what}: replacement gives {tuple(got.shape)} "
                             f"{got.dtype}, pattern gives {tuple(exp.shape)} {exp.dtype}")
    r, a = TOLERANCES.get(exp.dtype, (0.0, 0.0))
    r, a = (rtol if rtol is not None else r), (atol if atol is not None else a)
    if not torch.allclose(got.float() if got.is_floating_point() else got,
                          exp.float() if exp.is_floating_point() else exp,
                          rtol=r, atol=a, equal_nan=True):
        diff = (got.double() - exp.double()).abs().max().item()
        raise AssertionError(f"pattern {name!r}: {what} differs from the pattern's: max abs "
                             f"difference {diff:.3g} (rtol={r}, atol={a})")


def check_pattern(name: str, *, trials: int = 2, seed: int = 0, backward: bool = True,
                  rtol: float | None = None, atol: float | None = None,
                  frozen: Sequence[str] = (), skip: Sequence[str] = ()) -> int:
    """Compare the replacement of pattern `name` with each of its spellings, forward and backward.

    frozen: inputs given without a gradient (those your constraints refuse with one, such as
        rotary tables); inputs eager torch cannot differentiate are left without one anyway.
    skip: names of spellings that equal the replacement only under a relation the constraints
        prove on the real graph (a subtrahend that must be the logsumexp), not on random inputs.

    Returns the number of (variant, trial) comparisons made; raises AssertionError on a mismatch.
    """
    from . import builtins  # noqa: F401 - the pattern may be a built-in or a plugin's

    if name not in REGISTRY:
        raise KeyError(f"no pattern named {name!r} is registered; registered: "
                       f"{', '.join(REGISTRY.names())}")
    pat: Pattern = REGISTRY.get(name)
    gen = torch.Generator().manual_seed(seed)
    checks = 0
    names = [getattr(v.fn, "__name__", "") for v in pat.rewritable]
    unknown = sorted(set(skip) - set(names)) + sorted(
        set(frozen) - {p for v in pat.rewritable for p in v.inputs})
    if unknown:
        raise KeyError(f"pattern {name!r} has no spelling or input named {unknown}; spellings: "
                       f"{', '.join(names)}")
    for v in pat.rewritable:
        params, examples = _examples_for(v.fn, pat.example_inputs, name)
        label = f"{getattr(v.fn, '__name__', 'variant')}"
        if label in skip:
            continue
        for _ in range(trials):
            ins = [_fresh(x, gen) for x in examples]
            grads = _differentiable(v.fn, params, ins, frozen) if backward else set()
            ins = [x.requires_grad_(True) if p in grads else x for p, x in zip(params, ins)]
            expected = _as_list(v.fn(*ins))
            try:
                got = _as_list(call_replacement(pat, v, dict(zip(params, ins)), None))
            except Exception as e:  # noqa: BLE001 - say which pattern, then re-raise its cause
                raise AssertionError(f"pattern {name!r}: the replacement failed on fresh inputs "
                                     f"({label}): {type(e).__name__}: {e}") from e
            if len(got) != len(expected):
                raise AssertionError(f"pattern {name!r}: replacement returns {len(got)} outputs, "
                                     f"{label} returns {len(expected)}")
            for i, (g, e) in enumerate(zip(got, expected)):
                _close(name, f"output {i} ({label})", g.detach(), e.detach(), rtol, atol)
            checks += 1
            if not backward:
                continue
            leaves = [(p, x) for p, x in zip(params, ins)
                      if isinstance(x, torch.Tensor) and x.requires_grad]
            outs = [(g, e) for g, e in zip(got, expected)
                    if e.requires_grad and e.is_floating_point()]
            if not leaves or not outs:
                continue
            cot = [torch.randn(e.shape, generator=gen, dtype=torch.float32).to(e.dtype)
                   for _, e in outs]
            xs = [x for _, x in leaves]
            g_exp = torch.autograd.grad([e for _, e in outs], xs, cot, allow_unused=True)
            if not all(g.requires_grad for g, _ in outs):
                raise AssertionError(f"pattern {name!r}: the replacement's output does not "
                                     "require grad: its op has no autograd formula "
                                     "(torch.library.register_autograd)")
            try:
                g_got = torch.autograd.grad([g for g, _ in outs], xs, cot, allow_unused=True)
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"pattern {name!r}: the replacement's backward failed "
                                     f"({label}): {type(e).__name__}: {e}") from e
            for (p, x), ge, gg in zip(leaves, g_exp, g_got):
                ge = torch.zeros_like(x) if ge is None else ge
                gg = torch.zeros_like(x) if gg is None else gg
                _close(name, f"gradient of `{p}` ({label})", gg, ge, rtol, atol)
    return checks
