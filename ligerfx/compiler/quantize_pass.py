"""The quantization pass: frozen `linear` ops on module parameters -> `liger::<scheme>_linear`.

For each `F.linear(x, w, b)` in Dynamo's graph whose weight is a module parameter (a lifted
placeholder whose `grapharg.example` is the real `nn.Parameter`), the pass

- skips it, with a near miss, when the graph needs the weight's gradient (grad mode was on at
  compile time and the parameter requires grad), when its module name matches `quantize_skip`,
  when it is the lm head (weight tied to an embedding of the graph, or out_features equal to an
  embedding's vocabulary size) unless `quantize_lm_head`, or when the scheme cannot serve its
  shape;
- otherwise quantizes the parameter now (cached per parameter, see `ligerfx.compress.quantize`) and
  replaces the op by `liger::frozen_quantized_weight` (cache lookup, re-quantizing a parameter
  changed in place) feeding `liger::<scheme>_linear`.

With `sparsity` ("2:4" / "2:4+int8"), an eligible linear whose weight is exactly 2:4 sparse (zeros
of either sign counting as zero) and not written by the graph itself becomes
`liger::frozen_sparse24_linear`: served compressed through the same cache, or by the exact dense
product (with a warning) while a weight written after compilation is not 2:4; any other gets a
near miss saying why (e.g. the fraction of groups that break the pattern) and is then quantized
if `quantize` is set.

Linears already packed by `ligerfx.quantize_` (or `ligerfx.sparsify_`) reach the graph as
`liger::<scheme>_linear` calls; they are counted here too (detail "quantize_").
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ligerfx.compress import quantize as Q
from ligerfx.compress import sparsify as SP
from ligerfx.graph.mutation import Memory, describe
from ligerfx.graph.nodes import node_value
from ligerfx.graph.source import clean_module_path, locate

from .report import MatchRecord, NearMiss, Report

_LINEAR = (F.linear, torch._C._nn.linear)
_EMBEDDING = (F.embedding, torch.embedding)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _param_of(node) -> tuple[str, torch.Tensor] | None:
    """(module parameter path, the parameter) of a lifted parameter placeholder, else None."""
    if not isinstance(node, fx.Node) or node.op != "placeholder":
        return None
    ga = node.meta.get("grapharg")
    ex = getattr(ga, "example", None) if ga is not None else None
    if not isinstance(ex, nn.Parameter):
        return None
    # Dynamo may spell the path L['self']._modules['up']._parameters['weight'].
    path = ".".join(p for p in clean_module_path(ga.source.name).split(".")
                    if p not in ("_modules", "_parameters"))
    return path, ex


def _args(node: fx.Node, names: tuple) -> list:
    out = list(node.args) + [None] * (len(names) - len(node.args))
    for i, n in enumerate(names):
        if n in node.kwargs:
            out[i] = node.kwargs[n]
    return out


def _prequantized_ops() -> dict:
    ops = {}
    for name in Q.OP_NAMES.values():
        packet = getattr(torch.ops.liger, name, None)
        if packet is not None:
            ops[packet] = ops[packet.default] = name
    return ops


def run_quantize(gm: fx.GraphModule, options) -> Report:
    """Rewrite `gm` in place; a report of this graph's quantized linears and near misses."""
    report = Report(graphs=1)
    graph = gm.graph
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    pre = _prequantized_ops()
    sparse_stored = [0, 0]  # compressed bytes, dense bytes of the 2:4 linears
    for n in nodes:
        if n.op == "call_function" and n.target in pre:
            report.matches.append(MatchRecord(pre[n.target], locate(n), [n.name], detail="quantize_",
                                              position=position[n]))
            if pre[n.target] in (Q.OP_NAMES[s] for s in Q.SPARSE_SCHEMES):
                _count_sparsified(n, sparse_stored)
    scheme = options.quantize
    sparsity = options.sparsity
    if scheme is None and sparsity is None:
        _note_sparse(report, sparse_stored)
        return report
    op_name = Q.OP_NAMES[scheme or sparsity]  # the name of the shared near misses

    tied, vocab = set(), set()
    for n in nodes:
        if n.op == "call_function" and n.target in _EMBEDDING:
            w = _args(n, ("input", "weight"))[1] if n.target is F.embedding else n.args[0]
            if isinstance(w, fx.Node):
                tied.add(w)
                v = node_value(w)
                if isinstance(v, torch.Tensor) and v.dim() == 2:
                    vocab.add(int(v.shape[0]))

    grad_on = torch.is_grad_enabled()
    changed = False
    memory = Memory(graph) if sparsity is not None else None
    for n in nodes:
        if n.op != "call_function" or n.target not in _LINEAR:
            continue
        x, w, b = _args(n, ("input", "weight", "bias"))
        info = _param_of(w)
        loc = locate(n)

        def miss(reason):
            report.near_misses.append(NearMiss(op_name, loc, reason, position=position[n]))

        if info is None:
            miss("the weight is not a module parameter (computed in the graph" + _computed_from(w) + ")")
            continue
        path, param = info
        module = path.rsplit(".", 1)[0]
        N, K = param.shape if param.dim() == 2 else (0, 0)
        if Q.matches_any(module, options.quantize_skip):
            miss(f"{module} matches quantize_skip")
            continue
        if not options.quantize_lm_head and (w in tied or N in vocab):
            why = "tied to an embedding" if w in tied else f"out_features {N} = vocabulary size"
            miss(f"lm head ({why}) is skipped by default; set quantize_lm_head=True to quantize it")
            continue
        if grad_on and param.requires_grad:
            miss(f"the graph needs the gradient of {path}; freeze it ({module}.requires_grad_(False)) "
                 "or run under torch.no_grad() / torch.inference_mode() to quantize it")
            continue
        xv = node_value(x) if isinstance(x, fx.Node) else None
        sdt = xv.dtype if isinstance(xv, torch.Tensor) and xv.dtype in _FLOATS else param.dtype
        if sparsity is not None:
            sparse_op = Q.OP_NAMES[sparsity]
            reason = _written(memory, w) or SP.frozen_reason(param)
            if reason is None:
                key = Q.frozen_weight(param, sparsity, 0, sdt)
                _replace_sparse_linear(graph, n, x, w, b, key, sparsity, sdt)
                stored, dense = SP.bytes_stored(sparsity, param, sdt)
                sparse_stored[0] += stored
                sparse_stored[1] += dense
                changed = True
                report.matches.append(MatchRecord(
                    sparse_op, loc, [n.name], position=position[n],
                    detail=f"{sparsity} {module}: {stored} bytes stored vs {dense} dense "
                           f"({stored / dense:.2f}x)"))
                continue
            report.near_misses.append(NearMiss(sparse_op, loc, reason, position=position[n]))
            if scheme is None:
                continue
        reason = Q.unsupported_reason(scheme, N, K, options.group_size)
        if reason is not None:
            miss(reason)
            continue
        if scheme == "fp8":
            Q.check_fp8_device(param.device)
        key = Q.frozen_weight(param, scheme, options.group_size, sdt)
        gs = options.group_size if scheme == "int4" else 0
        _replace_linear(graph, n, x, w, b, key, scheme, gs, sdt)
        changed = True
        report.matches.append(MatchRecord(op_name, loc, [n.name], detail=f"{scheme} {module}",
                                          position=position[n]))
    _note_sparse(report, sparse_stored)
    if changed:
        graph.lint()
        gm.recompile()
    return report


def _replace_linear(graph: fx.Graph, n: fx.Node, x, w, b, key: int, scheme: str, gs: int, sdt) -> None:
    """Replace the linear node `n` by the cache lookup of its packed weight feeding the scheme's op."""
    op = getattr(torch.ops.liger, Q.OP_NAMES[scheme]).default
    parts_n = 3 if scheme in ("int4", "2:4+int8") else 2
    with graph.inserting_before(n):
        packed = graph.call_function(torch.ops.liger.frozen_quantized_weight.default,
                                     (w, key, scheme, gs, sdt))
        parts = [graph.call_function(operator.getitem, (packed, i)) for i in range(parts_n)]
        new = graph.call_function(op, (x, *parts, b))
    _move_meta(n, new)


def _move_meta(n: fx.Node, new: fx.Node) -> None:
    """Give `new` the source facts of the linear `n` and put it in its place."""
    for k in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if k in n.meta:
            new.meta[k] = n.meta[k]
    n.replace_all_uses_with(new)
    n.graph.erase_node(n)


def _replace_sparse_linear(graph: fx.Graph, n: fx.Node, x, w, b, key: int, scheme: str, sdt) -> None:
    with graph.inserting_before(n):
        new = graph.call_function(torch.ops.liger.frozen_sparse24_linear.default,
                                  (x, w, key, scheme, sdt, b))
    _move_meta(n, new)


def _written(memory: Memory, w: fx.Node) -> str | None:
    """A near-miss reason when the graph itself writes the weight's memory (e.g. `mul_` in the
    forward): it would be re-checked and re-packed on every call, for nothing."""
    hit = memory.first_write([w], -1, len(memory.pos))
    if hit is None:
        return None
    return f"the weight is written in the graph ({describe(*hit)}); left to the dense product"


def _computed_from(w) -> str:
    """`from <parameter>` and a hint, when a computed weight is derived from a module parameter
    (a pruning mask or weight-norm reparametrization)."""
    seen, todo = set(), [w] if isinstance(w, fx.Node) else []
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        info = _param_of(v)
        if info is not None:
            return (f" from {info[0]}, e.g. a pruning mask applied in a forward pre-hook; make the "
                    "result a parameter, e.g. torch.nn.utils.prune.remove(module, 'weight')")
        todo.extend(v.all_input_nodes)
    return ""


def _count_sparsified(n: fx.Node, totals: list) -> None:
    """Add the stored and dense bytes of a `sparsify_`'d linear call (x, values, meta[, scale], b)."""
    x, *packed = [node_value(a) if isinstance(a, fx.Node) else None for a in n.args[:-1]]
    if isinstance(x, torch.Tensor) and all(isinstance(t, torch.Tensor) for t in packed):
        totals[0] += sum(t.numel() * t.element_size() for t in packed)
        totals[1] += packed[0].shape[0] * 2 * packed[0].shape[1] * x.element_size()


def _note_sparse(report: Report, totals: list) -> None:
    if totals[1]:
        report.notes.append(f"2:4 sparsity: {totals[0]} bytes of linear weights stored against "
                            f"{totals[1]} dense ({totals[0] / totals[1]:.2f}x)")
