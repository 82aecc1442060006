"""The `liger` torch.compile backend: rewrite Dynamo's graph, then hand it to an inner backend.

Registered under the `torch_dynamo_backends` entry point, so `torch.compile(model,
backend="liger")` works without importing ligerfx first.  The rewritten graph calls `liger::` ops
(custom ops with fake and autograd implementations), so AOTAutograd traces forward and backward
through them like any aten op.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.fx as fx

from .frame_report import FrameReports
from .options import Options
from .compiler.passes import run_patterns
from .compiler.report import Report

log = logging.getLogger("ligerfx")

# The report of every graph of the model (or function) compiled most recently: all its graph
# breaks, DDP buckets, the latest version of each recompiled frame (see frame_report.py).
last_report: Report | None = None
_frames = FrameReports()


def rewrite(gm: fx.GraphModule, options: Options, upstream: list | tuple = (),
            produced: list | None = None, refuse: dict | None = None) -> Report:
    """Apply every enabled pattern to `gm` in place (patterns import the kernels they call), then
    the quantization pass (which also counts linears packed by `ligerfx.quantize_`).
    `upstream` / `produced`: what earlier graphs of the model return, and this one (before the
    rewrite), so a pattern cut by a graph boundary is reported (ligerfx/compiler/boundary.py).
    `refuse`: matches translation validation dropped (`run_patterns`)."""
    from .builtins import enabled_patterns  # registers the built-ins and plugins on first use

    report = run_patterns(gm, enabled_patterns(options), options, upstream=upstream,
                          produced=produced, refuse=refuse)
    from .compiler.quantize_pass import run_quantize

    q = run_quantize(gm, options)
    if q.matches or q.near_misses:
        report.matches = sorted(report.matches + q.matches, key=lambda m: m.position)
        report.near_misses = sorted(report.near_misses + q.near_misses, key=lambda m: m.position)
    report.notes.extend(q.notes)  # e.g. the bytes 2:4 sparsity stores against dense
    return report


def _on_cpu(example_inputs) -> bool:
    """Every tensor the graph takes is on the CPU (and Triton's interpreter is not requested)."""
    from .kernels.runtime import interpreting

    devs = {x.device.type for x in example_inputs if isinstance(x, torch.Tensor)}
    return devs <= {"cpu"} and not interpreting()


def cpu_paths(gm: fx.GraphModule, report: Report) -> dict:
    """On a CPU graph compiled by inductor: the decompositions to hand to inductor (the `liger::`
    ops that registered one, see kernels/runtime.py; inductor inlines those present), and each
    match's `path` set to what runs on the CPU for it."""
    from .kernels.runtime import cpu_decompositions, cpu_path
    from .compiler.rewriter import PATTERN_META

    table = cpu_decompositions()
    calls = []
    # the graph's own nodes and those of its checkpoint bodies, which inductor inlines
    for n in (n for sub in gm.modules() if isinstance(sub, fx.GraphModule)
              for n in sub.graph.nodes):
        pattern = n.meta.get(PATTERN_META)
        op = n.target
        if isinstance(op, torch._ops.OpOverloadPacket):  # the rewriter calls torch.ops.liger.x
            op = op.default
        # every liger op call, the user's own ones too (ligerfx.kernels' functions in a model)
        if n.op == "call_function" and isinstance(op, torch._ops.OpOverload) \
                and op.namespace == "liger":
            args, kwargs = fx.node.map_aggregate((n.args, n.kwargs), _meta_val)
            try:
                path = cpu_path(op, args, kwargs)
            except Exception:  # noqa: BLE001 - no example values: keep the op, which is safe
                path = None
            calls.append((pattern, op, path))
    # Inductor either inlines an op everywhere or keeps every call of it (an op both in its
    # decomposition table and left as a call is an error there), so an op whose decomposition
    # does not cover all of its calls in this graph is kept for all of them.
    for _, op, path in calls:
        if path is None:
            table.pop(op, None)
    paths = {pattern: path if op in table else f"CPU: {op.name()}'s own CPU implementation"
             for pattern, op, path in calls if pattern}
    for m in report.matches:
        m.path = paths.get(m.pattern, m.path)
    return table


def _validated(gm: fx.GraphModule, saved: fx.Graph, opts: Options, report: Report,
               example_inputs: list, upstream, bodies: dict) -> Report:
    """Translation validation (ligerfx/compiler/validate.py): check each rewrite of `gm` on the
    compile's real inputs; while one differs, rewrite a fresh copy of the original graph (`saved`,
    and `bodies`: its higher-order op bodies, validate.save_bodies) into `gm` without it and
    check what that rewrite made.  Returns the final report."""
    from .compiler.passes import anchor_key
    from .compiler import validate
    from .compiler.report import ValidationRecord

    done: dict = {}  # region key -> Result
    refuse: dict = {}
    dropped: list = []
    while True:
        original = validate.original_module(gm, saved, bodies)
        results = validate.check(original, gm, report.matches, example_inputs, done)
        done.update((r.key, r) for r in results)
        bad = [r for r in results if r.status == validate.DROPPED]
        for r in results:
            if r.status == validate.NOT_VALIDATED:
                validate.warn(r)
        if not bad:
            break
        if opts.validate == "raise":
            raise validate.ValidationError("ligerfx translation validation: " + "; ".join(
                f"the {r.record.pattern} rewrite at {r.record.location} differs from the "
                f"original code: {r.detail}" for r in bad))
        for r in bad:
            validate.warn(r)
            dropped.append(r)
            reg = r.record.region
            refuse[(r.record.pattern, anchor_key(reg.get("body", ""), reg["anchor"]))] = (
                f"translation validation: the rewrite differs from the original code on the "
                f"first call's values: {r.detail}")
        validate.restore(gm, saved, bodies)
        report = rewrite(gm, opts, upstream, None, refuse=refuse)
    report.validation = [
        ValidationRecord(r.record.pattern, r.record.location, r.status, r.detail,
                         position=r.record.position, not_compared=list(r.not_compared))
        for r in [done[validate.region_key(m)] for m in report.matches if m.region is not None]
        + dropped]
    report.validation.sort(key=lambda v: v.position)
    return report


def _meta_val(a):
    from ligerfx.graph.nodes import node_value

    return node_value(a) if isinstance(a, fx.Node) else a


def _inner(name: str, mode: str | None, decompositions: dict | None = None,
           cache_token: str | None = None) -> Callable:
    """The inner backend. `cache_token` (inductor): ligerfx's decisions for this compile, put
    into inductor's cache keys (ligerfx/compiler/cache_key.py)."""
    if name == "eager":
        return lambda gm, example_inputs: gm.forward
    if name == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")

    def inductor(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        from .compiler.cache_key import config_patches

        patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
        if cache_token is not None:
            patches.update(config_patches(cache_token))
        if not decompositions:
            return compile_fx(gm, example_inputs, config_patches=patches or None)
        from torch._inductor.decomposition import select_decomp_table

        table = {**select_decomp_table(), **decompositions}
        return compile_fx(gm, example_inputs, config_patches=patches or None,
                          decompositions=table)

    return inductor


def liger_backend(gm: fx.GraphModule, example_inputs: list[Any], *, mode: str | None = None,
                  options: dict | Options | None = None) -> Callable:
    """torch.compile backend: rewrite `gm` with the enabled patterns, then compile it."""
    global last_report
    opts = Options.from_any(options)
    upstream = _frames.begin()
    produced: list = []
    saved = bodies = None
    if opts.validate:
        from .compiler.validate import copy_graph, save_bodies

        saved = copy_graph(gm.graph)  # the graph as Dynamo gave it
        bodies = save_bodies(gm)  # and its checkpoint bodies, which the rewrite changes in place
    report = rewrite(gm, opts, upstream, produced)
    if saved is not None:
        report = _validated(gm, saved, opts, report, example_inputs, upstream, bodies)
    from .checkpointing import graph_break_misses

    report.near_misses.extend(graph_break_misses())  # checkpointed code Dynamo ran eagerly
    decomps = None
    if opts.inner == "inductor" and _on_cpu(example_inputs):
        decomps = cpu_paths(gm, report)
    last_report = _frames.add(report, produced)
    if opts.log_report:
        log.info("%s", report)
        if last_report.graphs > 1:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(last_report.counts.items()))
            log.info("ligerfx: this compiled model so far: %d rewrite(s), %d near miss(es) in "
                     "%d graph(s)%s (ligerfx.backend.last_report has them all)",
                     len(last_report.matches), len(last_report.near_misses), last_report.graphs,
                     f"; counts: {counts}" if counts else "")
    token = None
    if opts.inner == "inductor":
        from .compiler.cache_key import token as cache_token

        # after the rewrite and cpu_paths: what they decided from the environment is keyed
        token = cache_token(opts, mode, decomps)
    return _inner(opts.inner, mode, decomps, token)(gm, example_inputs)
