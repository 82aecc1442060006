"""Which dtypes eager's RoPE computes in, forward and backward, and whether `liger::rope` can
reproduce them (used by patterns/rope.py's `check`).

Forward.  Each product `x * cos`, `rotate_half(x) * sin` computes in the promoted dtype of its
operands (bf16 * bf16 -> bf16, bf16 * fp32 -> fp32, bf16 * fp16 -> fp32) and so does their sum.
The kernel either rounds both products and the sum to one low dtype (round_steps) or computes the
whole rotation in fp32 (or fp64 on the torch path) and rounds once: products of two different
dtypes, one rounded to bf16 and the other not, are refused.

Backward.  Autograd of a promoting product casts its gradient back to the dtype of the product's
input, and the two gradients of each element of x (one through the cos product, one through the
sin product) are summed where the two branches meet, in that value's dtype.  With a bf16 x and
fp32 tables eager therefore rounds each branch to bf16 and adds them in bf16, which the kernel
reproduces with `grad_dtype`; a branch rounded to a dtype other than where it is summed (x cast
separately at each use through an odd chain) is refused when x needs a gradient.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ligerfx.graph.nodes import CAST_METHODS
from ligerfx.patterns.gated_act import dtype_of


def short(dt) -> str:
    return str(dt).replace("torch.", "")


def _is_cast(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target in CAST_METHODS


def _is_split(n) -> bool:
    """`chunk` / `split`: the canonical view reads its pieces as slices of its input."""
    return isinstance(n, fx.Node) and (
        n.op == "call_method" and n.target in ("chunk", "split")
        or n.op == "call_function" and n.target in (torch.chunk, torch.split))


def _data_inputs(n: fx.Node) -> list:
    # a cast's other arguments (`type_as(x)`) only give it a dtype
    return list(n.args[:1]) if _is_cast(n) else list(n.all_input_nodes)


def walk(a, bound) -> list | None:
    """The nodes from `a` up to `bound` (a first, bound last) when `a` is `bound` behind casts and
    chunk/split nodes (which the canonical view looks through), else None."""
    path = [a]
    while path[-1] is not bound:
        n = path[-1]
        if not (_is_cast(n) or _is_split(n)) or not n.args or not isinstance(n.args[0], fx.Node):
            return None
        path.append(n.args[0])
    return path


def _chain(path) -> list:
    """dtypes of the real casts along a path (program order), as cast_chain gives them."""
    chain, prev = [], dtype_of(path[-1])
    for n in reversed(path[:-1]):
        dt = dtype_of(n) if _is_cast(n) else prev
        if dt != prev:
            chain.append(dt)
            prev = dt
    return chain


def entries(match, name: str) -> list:
    """(node, path) for each node outside the match through which its nodes read bound input
    `name`: the input itself or the last cast / chunk of a chain from it (each once)."""
    bound, inside, out = match[name], set(match.covered), {}
    for n in match.covered:
        for a in _data_inputs(n):
            if isinstance(a, fx.Node) and a not in inside and a not in out:
                path = walk(a, bound)
                if path is not None:
                    out[a] = path
    return list(out.items())


def use_chain(match, name: str) -> list | str:
    """The dtypes of the casts between bound input `name` and its uses inside the match (through
    chunk/split too), or a reason when its uses see it cast differently."""
    chains = []
    for _, path in entries(match, name):
        c = _chain(path)
        if c not in chains:
            chains.append(c)
    if len(chains) > 1:
        return f"`{name}` is cast differently at its uses ({[[short(d) for d in c] for c in chains]})"
    return chains[0] if chains else []


def products(match, tables) -> list:
    """(node, table name) for each node of the match that reads a table (a product by it)."""
    out, inside = [], set(match.covered)
    for t in tables:
        for e, _ in entries(match, t):
            out += [(u, t) for u in e.users if u in inside]
    return out


def _real(dt):
    return torch.empty(0, dtype=dt).real.dtype if dt is not None and dt.is_complex else dt


def product_problem(match, tables, top_dtype) -> str | None:
    """Why the products by the tables do not all compute in the dtype of the result (type
    promotion with tables of different dtypes), or None."""
    prods = products(match, tables)
    if all(_real(dtype_of(n)) == top_dtype for n, _ in prods):
        return None
    parts = []
    for n, t in prods:
        others = [a for a in n.all_input_nodes if walk(a, match[t]) is None]
        left = "/".join(short(dtype_of(a)) for a in others) or "?"
        tab = [a for a in n.all_input_nodes if a not in others]
        parts.append(f"x ({left}) * {t} ({short(dtype_of(tab[0]) if tab else None)}) -> "
                     f"{short(dtype_of(n))}")
    return ("the products compute in different dtypes by type promotion ("
            + ", ".join(sorted(set(parts))) + f"; the rotation's result is {short(top_dtype)}): "
            "eager rounds one product to its low dtype and not the other, which liger::rope "
            "does not reproduce (give cos and sin one dtype)")


def _kinds(match, start: fx.Node, tables) -> set:
    """Which tables' products are reached from `start` through the match's nodes."""
    inside, seen, todo, kinds = set(match.covered), set(), [start], set()
    prods = {n: t for n, t in products(match, tables)}
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in inside and u not in seen:
                seen.add(u)
                if u in prods:
                    kinds.add(prods[u])
                else:
                    todo.append(u)
    return kinds


def _dtype_on(path, i: int):
    """The tensor dtype of path[i], or of the nearest tensor below it (a chunk node is a tuple)."""
    return next(dtype_of(n) for n in path[i:] if dtype_of(n) is not None)


def grad_sum_dtype(match, name: str, tables, compute_dtype):
    """The dtype in which eager's autograd sums the two gradients of each element of `name`
    (through the cos and the sin product), given the products compute in `compute_dtype`; or a
    reason when each branch is rounded in a way liger::rope's `grad_dtype` does not reproduce."""
    ents = entries(match, name)
    if not ents:
        return "no use of `" + name + "` found in the match"
    if len(ents) == 1:
        # one way in: the branches meet at the entry or below it, where every value has the
        # entry's dtype (the match has no casts of its own; neg/cat/slices keep the dtype)
        return _dtype_on(ents[0][1], 0)
    kinds = [_kinds(match, e, tables) for e, _ in ents]
    if all(len(k) > 1 for k in kinds):
        return _dtype_on(ents[0][1], 0)  # each way in reaches both products: they meet below it
    if any(len(k) > 1 for k in kinds):
        return (f"`{name}` enters the rotation through {len(ents)} separate casts, some leading "
                "to both products and some to one, so where autograd sums its gradients is not "
                "modelled")
    paths = [p for _, p in ents]
    common = next(n for n in paths[0] if all(n in p for p in paths))
    g = _dtype_on(paths[0], paths[0].index(common))
    for p in paths:
        steps = [_dtype_on(p, i) for i in range(p.index(common))]
        if any(d not in (compute_dtype, g) for d in steps):
            return (f"`{name}` is cast separately at each use ({' -> '.join(map(short, steps))}); "
                    f"eager rounds each product's gradient through those casts before summing "
                    f"them in {short(g)}, which liger::rope does not reproduce")
    return g
