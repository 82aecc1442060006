"""Calibration: run a model on the user's batches and collect what calibrated compression needs
from each linear layer's inputs (the second moment H = sum of x x^T over every token).

Batches are token-id tensors (called as `model(batch)`) or dicts of keyword arguments
(`model(**batch)`), run under `torch.no_grad()`.  Linears that read the same input tensor (q, k
and v of one attention; gate and up of one MLP) compute its x^T x once per batch.

Two ways to measure:
- `input_moments`: every linear's H on the model as it is (one pass; "one-shot").
- `layerwise`: block by block through the model's stack of repeated blocks, each block's
  linears measured on the inputs the blocks before it produce *after* their compression, handed
  to a `visit` callback that compresses them, then the block rerun to give the next block its
  inputs (the sequential scheme of GPTQ / SparseGPT: later layers see, and correct for, the
  errors of earlier ones).
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable, Iterable, Optional

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


def _moment_hooks(mods: dict, acc: dict, this_call: dict) -> list:
    """Forward pre-hooks adding each linear's x^T x (float64) into acc[name]; an input tensor
    read by several linears in one call (same storage, shape, stride) is multiplied once."""

    def hook(name):
        def pre(mod, args):
            x = args[0]
            # The input is kept alive for the batch, so no later tensor can reuse its address.
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
            hit = this_call.get(key)
            if hit is None:
                x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
                hit = this_call[key] = (x, x2.t() @ x2)
            if name in acc:
                acc[name] += hit[1]
            else:
                acc[name] = hit[1].clone()
        return pre

    return [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]


def _missing(names, acc):
    missing = [n for n in names if n not in acc]
    if missing:
        raise CalibrationError(f"linear(s) {', '.join(map(repr, missing[:5]))} were never called "
                               "on the calibration batches")


def input_moments(model: nn.Module, names: list[str], batches: Iterable) -> dict[str, torch.Tensor]:
    """{linear name: H [K, K] float64} for the named nn.Linear modules of `model`.  Memory: one
    K x K float64 matrix per linear (about 1 GB for a 135M model); a model whose matrices do not
    fit should be calibrated in parts (`names` a subset at a time)."""
    mods = {n: model.get_submodule(n) for n in names}
    acc: dict[str, torch.Tensor] = {}
    this_call: dict[tuple, tuple] = {}  # (input, x^T x) of each input tensor seen in this batch
    handles = _moment_hooks(mods, acc, this_call)

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
    _missing(names, acc)
    return acc


# ---------------------------------------------------------------------------------------------
# Layer-wise (sequential) calibration

Visit = Callable[[str, nn.Module, torch.Tensor], Optional[nn.Module]]


class _Stop(Exception):
    pass


def _blocks(model: nn.Module, names: list[str]) -> tuple[str, list[nn.Module]]:
    """The model's stack of repeated blocks: the ModuleList (or Sequential) with the most members holding one of
    `names` (at least two such members), as (its name, its members); ("", []) if none."""
    best, best_n = ("", []), 1
    for lname, ml in model.named_modules():
        if not isinstance(ml, (nn.ModuleList, nn.Sequential)):
            continue
        prefix = f"{lname}." if lname else ""
        n = sum(any(x.startswith(f"{prefix}{i}.") for x in names) for i in range(len(ml)))
        if n > best_n:
            best, best_n = (lname, list(ml)), n
    return best


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or (type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b)


def _chain_slot(calls: list) -> tuple[Optional[object], str]:
    """Where each block's input hidden state sits (an index into args or a kwarg name), checked on
    one batch of the uncompressed model: block i's output must be block i+1's input there, and
    every other argument the same for all blocks.  (slot, "") or (None, why not)."""
    slot = None
    for i in range(len(calls) - 1):
        (args, kwargs, out), (nargs, nkwargs, _) = calls[i], calls[i + 1]
        y = _first(out)
        here = [j for j, a in enumerate(nargs) if isinstance(a, torch.Tensor) and _same(a, y)]
        here += [k for k, a in nkwargs.items() if isinstance(a, torch.Tensor) and _same(a, y)]
        if len(here) != 1 or (slot is not None and here[0] != slot):
            return None, f"block {i}'s output is not exactly one argument of block {i + 1}"
        slot = here[0]
        rest = [(a, b) for j, (a, b) in enumerate(zip(args, nargs)) if j != slot]
        rest += [(kwargs.get(k), nkwargs[k]) for k in nkwargs if k != slot]
        if len(args) != len(nargs) or set(kwargs) != set(nkwargs) or not all(_same(a, b) for a, b in rest):
            return None, f"blocks {i} and {i + 1} are called with different other arguments"
    return slot, ""


def _with_slot(args, kwargs, slot, value):
    if isinstance(slot, int):
        args = args[:slot] + (value,) + args[slot + 1:]
    else:
        kwargs = {**kwargs, slot: value}
    return args, kwargs


def layerwise(model: nn.Module, names: list[str], batches: Iterable, visit: Visit,
              what: str = "calibration") -> str:
    """Measure and compress the named linears block by block; returns "" or the reason it fell
    back to one-shot measuring (all H on the uncompressed model, visited in order).  A model
    without a stack of two or more blocks holding the linears is measured in one pass, silently
    (there is nothing to sequence).

    `visit(name, module, H)` compresses one linear given its input moment H [K, K] (float64) and
    returns a module to put in its place (or None to keep it; it may also change other modules
    of the same block).  Inside a block every linear is measured before any is visited (q, k, v
    and o alike see the block's compressed-so-far inputs, not each other's compression).
    Linears outside the block stack are measured first, on the uncompressed model."""
    batches = list(batches)
    lname, blocks = _blocks(model, names)
    prefix = f"{lname}." if lname else ""
    in_block = {i: [n for n in names if n.startswith(f"{prefix}{i}.")] for i in range(len(blocks))}
    inside = {n for v in in_block.values() for n in v}
    outside = [n for n in names if n not in inside]
    done = [0]

    def apply(moments, group):
        done[0] = _visit(model, group, moments, visit, what, done[0], len(names))

    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:  # a KV cache would keep keys across the reruns of a block
        config.use_cache = False
    try:
        if not blocks:  # nothing to sequence: one pass measures the same
            apply(input_moments(model, names, batches), names)
            return ""
        calls, why = _record(model, blocks, batches)
        if why:
            apply(input_moments(model, names, batches), names)
            return why
        if outside:
            apply(input_moments(model, outside, batches), outside)
        slot, why = _chain_slot(calls)
        if slot is None:
            apply(input_moments(model, list(inside), batches), list(inside))
            return why
        inputs = _capture(model, blocks[0], batches)
        with torch.no_grad():
            for i, block in enumerate(blocks):
                group = in_block[i]
                if group:
                    acc, this_call = {}, {}
                    handles = _moment_hooks({n: model.get_submodule(n) for n in group}, acc, this_call)
                    try:
                        for args, kwargs in inputs:
                            this_call.clear()
                            block(*args, **kwargs)
                    finally:
                        this_call.clear()
                        for h in handles:
                            h.remove()
                    _missing(group, acc)
                    apply(acc, group)
                if i + 1 < len(blocks):
                    inputs = [_with_slot(a, k, slot, _first(block(*a, **k))) for a, k in inputs]
        return ""
    finally:
        if use_cache:
            config.use_cache = use_cache


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` of `model` was."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _visit(model, names, moments, visit, what, done=0, total=None) -> int:
    """visit(name, module, H) for each name in order, putting back what it returns; the count
    of layers done so far."""
    for n in names:
        new = visit(n, model.get_submodule(n), moments.pop(n))
        if new is not None:
            replace_module(model, n, new)
        done += 1
        progress(done, total or len(names), what)
    return done


def compress_layers(model: nn.Module, names: list[str], batches: Iterable, visit: Visit,
                    what: str, sequential: bool = True) -> None:
    """The calibrated compressors' one entry: every named linear visited with its input moment,
    layer by layer (`layerwise`, with a warning naming why where it had to fall back) or, with
    `sequential=False`, all measured on the model as it is in one pass."""
    if not sequential:
        _visit(model, names, input_moments(model, names, batches), visit, what)
        return
    why = layerwise(model, names, batches, visit, what)
    if why:
        warnings.warn(f"{what}: layer-wise calibration was not possible ({why}); every layer was "
                      "calibrated on the uncompressed model's inputs instead", stacklevel=3)


def _record(model, blocks, batches) -> tuple[list, str]:
    """Every block's (args, kwargs, output) on the first batch, uncompressed."""
    calls = []
    seen = {}

    def pre(i):
        def hook(mod, args, kwargs):
            seen[i] = (args, kwargs)
        return hook

    def post(i):
        def hook(mod, args, kwargs, out):
            calls.append((*seen.pop(i), out))
        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        run_batches(model, batches[:1])
    finally:
        for h in handles:
            h.remove()
    if len(calls) != len(blocks):
        return [], f"the {len(blocks)} blocks ran {len(calls)} times on one batch, not once each"
    return calls, ""


def _capture(model, first, batches) -> list:
    """The first block's (args, kwargs) on every batch; the rest of the model is not run."""
    got = []

    def hook(mod, args, kwargs):
        got.append((args, kwargs))
        raise _Stop

    h = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                run_batches(model, [b])
            except _Stop:
                pass
    finally:
        h.remove()
    return got


def progress(done: int, total: int, what: str) -> None:
    """One line on stderr, rewritten in place (no dependency on a progress-bar package)."""
    if sys.stderr.isatty() or done == total:
        end = "\n" if done == total else ""
        print(f"\r{what}: {done}/{total}", end=end, file=sys.stderr, flush=True)
