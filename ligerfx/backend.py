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

from .options import Options
from .passes import enabled_patterns, run_patterns
from .report import Report

log = logging.getLogger("ligerfx")

# The report of the most recent graph the backend compiled (handy in notebooks and tests).
last_report: Report | None = None


def rewrite(gm: fx.GraphModule, options: Options) -> Report:
    """Apply every enabled pattern to `gm` in place (patterns import the kernels they call), then
    the quantization pass (which also counts linears packed by `ligerfx.quantize_`)."""
    report = run_patterns(gm, enabled_patterns(options), options)
    from .quantize_pass import run_quantize

    q = run_quantize(gm, options)
    if q.matches or q.near_misses:
        report.matches = sorted(report.matches + q.matches, key=lambda m: m.position)
        report.near_misses = sorted(report.near_misses + q.near_misses, key=lambda m: m.position)
    report.notes.extend(q.notes)  # e.g. the bytes 2:4 sparsity stores against dense
    return report


def _inner(name: str, mode: str | None) -> Callable:
    if name == "eager":
        return lambda gm, example_inputs: gm.forward
    if name == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")

    def inductor(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        patches = torch._inductor.list_mode_options(mode) if mode else None
        return compile_fx(gm, example_inputs, config_patches=patches)

    return inductor


def liger_backend(gm: fx.GraphModule, example_inputs: list[Any], *, mode: str | None = None,
                  options: dict | Options | None = None) -> Callable:
    """torch.compile backend: rewrite `gm` with the enabled patterns, then compile it."""
    global last_report
    opts = Options.from_any(options)
    report = rewrite(gm, opts)
    last_report = report
    if opts.log_report:
        log.info("%s", report)
    return _inner(opts.inner, mode)(gm, example_inputs)
