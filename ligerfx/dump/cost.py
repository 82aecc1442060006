"""FLOP and byte estimates of one FX node from its example values (the dump's coverage summary).

`node_cost(node) -> (flops, bytes)` is an estimate of the work of running that node alone, as
eager runs it, read from the `example_value` Dynamo records (symbolic sizes use their hint):

- matrix products (`linear`, `matmul`/`mm`/`bmm`, attention) count 2 FLOPs per multiply-add;
- every other computing op (elementwise, reductions, softmax, losses, norms) counts one FLOP per
  element of its largest tensor, input or output;
- ops that only re-index memory (`view`, `reshape`, `transpose`, `getitem`, `expand`, ...), and
  placeholders, attributes and the output, cost nothing; casts move bytes but count no FLOPs
  (a cast to the dtype it already has costs nothing: eager returns the input);
- bytes are every tensor argument read once plus every tensor result written once: the memory
  traffic of the op on its own, which a fused kernel avoids for the intermediates it keeps.

The dump sums this over the nodes each rewrite replaced to say how much of a graph now runs in
fused kernels.  It is a ranking aid, not a performance claim (those live in benchmarks/).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ligerfx.graph.nodes import CAST_METHODS, op_name

# Ops that only re-index (a view or a metadata query), whatever the spelling.
_FREE = frozenset({
    "view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "expand_as",
    "flatten", "unflatten", "getitem", "chunk", "split", "narrow", "t", "size", "dim", "numel",
    "view_as", "view_as_complex", "view_as_real", "contiguous", "detach", "unbind", "movedim",
    "slice", "as_strided", "select", "stride", "is_contiguous",
})
_MATMUL = frozenset({"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum"})


def _int(s: Any) -> int:
    """A size as an int: a symbolic size gives its hint (never a guard), unknown gives 1."""
    if isinstance(s, int):
        return s
    hint = getattr(getattr(s, "node", None), "hint", None)
    try:
        return int(hint) if hint is not None else 1
    except (TypeError, ValueError):
        return 1


def _tensors(v: Any) -> list:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensors(x)]
    if isinstance(v, dict):
        return [t for x in v.values() for t in _tensors(x)]
    return []


def _numel(t: torch.Tensor) -> int:
    n = 1
    for s in t.shape:
        n *= _int(s)
    return n


def _value(n: Any) -> Any:
    if isinstance(n, fx.Node):
        return n.meta.get("example_value", n.meta.get("val"))
    return n


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1] if "." in name and not name.startswith("liger.") else name


def node_cost(node: fx.Node) -> tuple[int, int]:
    """(FLOPs, bytes) of running `node` alone, estimated from example values (see module doc)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return 0, 0
    name = _short(op_name(node))
    if name in _FREE:
        return 0, 0
    ins = [t for a in node.all_input_nodes for t in _tensors(_value(a))]
    outs = _tensors(_value(node))
    nbytes = sum(_numel(t) * t.element_size() for t in ins + outs)
    if name in CAST_METHODS or name == "type_as":
        same = bool(ins) and bool(outs) and ins[0].dtype == outs[0].dtype
        return 0, 0 if same else nbytes  # a cast to the same dtype returns its input
    if name in _MATMUL and ins and outs:
        k = _int(ins[0].shape[-1]) if ins[0].dim() else 1
        return 2 * _numel(outs[0]) * k, nbytes
    if name == "scaled_dot_product_attention" and len(ins) >= 3 and outs:
        q, key = ins[0], ins[1]
        lk = _int(key.shape[-2]) if key.dim() >= 2 else 1
        # q @ k^T and p @ v: two matrix products over the key length
        return 2 * _numel(q) * lk + 2 * _numel(outs[0]) * lk, nbytes
    if name == "embedding":
        return 0, nbytes
    return max((_numel(t) for t in ins + outs), default=0), nbytes
