"""Casts and precision: which dtype each matched op computes in, and which casts change values.

Patterns look through casts structurally (`allow_casts=True`); whether the kernel then gives
eager's answer depends on the dtypes along the way.  A kernel states its dtype sequence (e.g.
"the statistic is computed in fp32"); the helpers here compare it with the matched subgraph's
example values and return a reason when they differ, so every pattern judges casts by one rule:

- a cast is *free* only when it preserves every value of its input: a widening float cast
  (fp16/bf16 -> fp32 -> fp64).  float -> int, int -> float, bf16 <-> fp16, and any narrowing
  cast are never free (they round, truncate or overflow);
- an elementwise op or a reduction computes in the dtype of its result (eager's elementwise ops
  on fp16/bf16 compute in fp32 and round the result to fp16/bf16; its reductions accumulate in
  fp32 and round the result), so a node whose example value is fp16/bf16 rounds there;
- option `upcast_statistics` lets a statistic (a reduction and the ops computing it) that the
  code computes in fp16/bf16 be computed in fp32 instead: more accurate, not bit-equal, and the
  match's notes say so.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx

from .nodes import CAST_METHODS, node_value, noop_source

LOW = (torch.bfloat16, torch.float16)
FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def short(dt) -> str:
    return str(dt).replace("torch.", "")


def dtype_of(n) -> torch.dtype | None:
    return getattr(node_value(n), "dtype", None) if isinstance(n, fx.Node) else None


def is_free_cast(src, dst) -> bool:
    """Every value of dtype `src` is exactly a value of dtype `dst` (a widening float cast)."""
    if src == dst:
        return True
    if src in LOW:
        return dst in (torch.float32, torch.float64)
    return src == torch.float32 and dst == torch.float64


def chain_problem(dtypes: Iterable, what: str) -> str | None:
    """Reason why a sequence of dtypes (a value cast step by step) is not value-preserving."""
    dts = [d for d in dtypes if d is not None]
    for a, b in zip(dts, dts[1:]):
        if not is_free_cast(a, b):
            return (f"{what} is cast {short(a)} -> {short(b)}, which changes values (rounds, "
                    "truncates or overflows) where the kernel keeps them")
    return None


def kernel_compute_dtype(dt) -> torch.dtype | None:
    """The dtype the fused kernels compute statistics in for inputs of dtype `dt` (fp32), or None
    when they do not handle it (fp64, whose eager math the fp32 kernels would round)."""
    return torch.float32 if dt in (torch.bfloat16, torch.float16, torch.float32) else None


def is_cast(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target in CAST_METHODS


def through_casts(n):
    """`n` with casts and no-op arithmetic (`x * 1.0`, see canonical) stripped: (source, steps)."""
    steps = []
    while isinstance(n, fx.Node):
        if is_cast(n):
            nxt = n.args[0]
        else:
            nxt = noop_source(n)
            if nxt is None:
                break
        steps.append(n)
        n = nxt
    return n, steps


def ancestors_within(root: fx.Node, inside: set) -> list[fx.Node]:
    """`root` and every node of `inside` it is computed from (program order)."""
    seen, todo = set(), [root]
    while todo:
        n = todo.pop()
        if n in seen or n not in inside:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return [n for n in root.graph.nodes if n in seen]


def functional_norm_problem(match, what: str, names: Iterable[str]) -> str | None:
    """A functional norm (`F.rms_norm`, `F.layer_norm`) computes in fp32 internally (fp16/bf16
    too) and rounds once, as the kernels do, but in the dtype it reads when that is wider (fp64
    after `x.double()`); its inputs must reach it through free casts."""
    top = match.tops[0]
    if kernel_compute_dtype(dtype_of(top)) is None:
        return (f"{what} computes in {short(dtype_of(top))} at `{top.name}`; the kernel "
                "computes in fp32")
    return input_chain_problems(match, [top], names)


def input_chain_problems(match, nodes: Iterable[fx.Node], names: Iterable[str]) -> str | None:
    """Every way a bound input reaches `nodes` (through casts outside the match) must be free."""
    wanted = {match[nm]: nm for nm in names if isinstance(match.bindings.get(nm), fx.Node)}
    inside = set(match.covered)
    for n in nodes:
        for a in n.all_input_nodes:
            if a in inside:
                continue
            src, steps = through_casts(a)
            if src in wanted and steps:
                dts = [dtype_of(src)] + [dtype_of(s) for s in reversed(steps)]
                p = chain_problem(dts, f"`{wanted[src]}`")
                if p:
                    return p
    return None


def compute_problem(match, nodes: Iterable[fx.Node], cdt, what: str, *,
                    statistic: bool) -> str | None:
    """Each node of `nodes` must compute in `cdt` (the kernel's dtype).  A statistic computed in
    fp16/bf16 is accepted under option `upcast_statistics`, with a note on the match."""
    lower = []
    for n in nodes:
        dt = dtype_of(n)
        if dt is None or dt == cdt:
            continue
        if statistic and dt in LOW and cdt == torch.float32:
            lower.append((n, dt))
            continue
        return (f"{what} is computed in {short(dt)} at `{n.name}`; the kernel computes it in "
                f"{short(cdt)}")
    if not lower:
        return None
    n, dt = lower[0]
    if not getattr(match.options, "upcast_statistics", False):
        return (f"{what} is computed in {short(dt)} at `{n.name}` (eager rounds it there and may "
                f"overflow); the kernel computes it in {short(cdt)}: set option "
                "upcast_statistics=True to accept the more accurate fp32 statistic")
    note = (f"upcast_statistics: {match.pattern.name} at `{match.tops[0].name}` computes {what} "
            f"in {short(cdt)} where the code computes it in {short(dt)} (not bit-equal)")
    if note not in match.notes:
        match.notes.append(note)
    return None


def shared_cast_problem(match) -> str | None:
    """A bound input that needs a gradient, read through a widening cast whose value is also used
    outside the match: eager sums the gradients reaching that cast in the wide dtype and rounds
    the sum once to the input's dtype; the kernel's gradient would reach the input already
    rounded and be summed there (two roundings).  Casts outside the match that are not shared
    change no gradient (each backward rounds once, as eager's cast does)."""
    wanted = {b: nm for nm, b in match.bindings.items()
              if isinstance(b, fx.Node) and getattr(node_value(b), "requires_grad", False)}
    inside = set(match.covered)
    for n in match.covered:
        for a in n.all_input_nodes:
            if a in inside:
                continue
            src, steps = a, []
            while src not in wanted and (is_cast(src) or noop_source(src) is not None):
                steps.append(src)
                src = src.args[0] if is_cast(src) else noop_source(src)
            if src not in wanted:
                continue
            for s in steps:
                outside = [u for u in s.users if _escapes(u, inside, {})]
                if outside and dtype_of(s) != dtype_of(src):
                    return (f"`{wanted[src]}` is cast to {short(dtype_of(s))} at `{s.name}`, which "
                            f"`{outside[0].name}` outside the pattern also reads: eager sums the "
                            f"gradients there in {short(dtype_of(s))} before rounding them to "
                            f"{short(dtype_of(src))}; the kernel's would be rounded first")
    return None


def _escapes(n: fx.Node, inside: set, memo: dict) -> bool:
    """`n` (outside the match) passes a value on to something other than the match: a node
    whose every use is inside the match (`chunk` under the match's `getitem`s) dies with it."""
    if n in inside:
        return False
    if n not in memo:
        memo[n] = True  # (graphs are acyclic: this only guards against re-walking)
        memo[n] = n.op == "output" or any(_escapes(u, inside, memo) for u in n.users)
    return memo[n]
