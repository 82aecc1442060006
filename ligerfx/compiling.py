"""The two ways to compile with the liger backend, options checked at the call.

## `ligerfx.compile(model, **options)`: `torch.compile(model, backend="liger")` with the options
checked now.

torch calls a backend only at the first forward and wraps whatever it raises in
`torch._dynamo.exc.BackendCompilerFailed`, so a bad option given to `torch.compile(...,
options=...)` surfaces late and as torch's error (its `inner_exception` is the `OptionsError`).
This entry point validates first, so `except ligerfx.OptionsError` works at the call itself; it
also takes torch.compile's `mode` together with liger options, which torch.compile refuses.

## `ligerfx.compile_in_place(model, **options)`: the liger backend for loops that own the model.

Hugging Face `Trainer` (and TRL's trainers, which subclass it), DDP / FSDP2 wrappers and
`model.generate()` all keep calling the module object they were given.  `torch.compile(model)`
returns a new `OptimizedModule` instead, and each of them goes wrong with it in its own way:

- `Trainer` reads `forward`'s signature to drop unused dataset columns; the wrapper's is
  `(*args, **kwargs)`, so it drops them all ("The batch received was empty").
- its `state_dict()` keys gain an `_orig_mod.` prefix, so checkpoints stop matching the model's;
- `generate` (and any other method) is looked up on the original module and runs uncompiled.
- `TrainingArguments(torch_compile=True, torch_compile_backend="liger")` is rejected by
  accelerate, which accepts only its own list of backend names.

Gradient (activation) checkpointing: each decoder layer then runs under
`torch.utils.checkpoint`.  Dynamo traces that as a checkpoint op whose body the pattern pass
rewrites (compiler/hop.py), but in transformers' models only with
`torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True`: otherwise the
hub-kernel context variable the attention sets is a side effect inside the checkpoint, Dynamo
breaks the graph there and the layer runs eagerly (a near miss says so, ligerfx/checkpointing.py).
So with checkpointing on and the flag off, compile_in_place warns.  TRL's configs turn
checkpointing on by default.

`nn.Module.compile` compiles the module's call in place instead: the object, its class, its methods
and its `state_dict()` stay the same, and every call of it (`Trainer`'s, DDP's, `generate`'s)
runs compiled.  This is that, with the options validated now (like `ligerfx.compile`) and the
wrong uses above refused with what to do instead.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from .options import Options, OptionsError


def compile(model: Any = None, *, fullgraph: bool = False, dynamic: bool | None = None,
            mode: str | None = None, **options: Any):
    """Compile `model` with the liger backend; liger options are keywords (`inner="eager"`,
    `quantize="int8"`, ...), torch.compile's `fullgraph`, `dynamic` and `mode` are passed on.

    Raises `ligerfx.OptionsError` here, before any tracing, for an unknown option or bad value.
    With `model=None` returns a decorator, like `torch.compile`.
    """
    backend = checked_backend(mode, options)
    if model is None:
        return lambda m: compile(m, fullgraph=fullgraph, dynamic=dynamic, mode=mode, **options)
    if not callable(model):
        raise OptionsError(f"ligerfx.compile needs an nn.Module or a function, got "
                           f"{type(model).__name__}")
    return torch.compile(model, backend=backend, fullgraph=fullgraph, dynamic=dynamic)


def checked_backend(mode: str | None, options: dict):
    """The liger backend with `mode` and the options bound, both validated now (OptionsError)."""
    opts = Options.from_any(options)
    if mode is not None and not isinstance(mode, str):
        raise OptionsError(f"mode must be a string such as 'max-autotune', got {mode!r}")
    # torch.compile refuses `mode` and `options` together; the backend takes both directly.
    from .backend import liger_backend

    return functools.partial(liger_backend, mode=mode, options=opts)

def compile_in_place(model: Any, *, training_args: Any = None, fullgraph: bool = False,
                     dynamic: bool | None = None, mode: str | None = None, **options: Any):
    """Compile `model`'s forward in place with the liger backend and return `model` itself.

    liger options are keywords (`inner="aot_eager"`, `exclude=[...]`); `fullgraph`, `dynamic` and
    `mode` are torch.compile's.  `training_args`: the Hugging Face `TrainingArguments` the model
    will be trained with, to check they do not compile it a second time.  Calling it again
    replaces the earlier compile (as `nn.Module.compile` does).

    Raises `ligerfx.OptionsError` for a bad option, a model that is not an `nn.Module`, the
    `OptimizedModule` that `torch.compile` returns, or `TrainingArguments(torch_compile=True)`.
    """
    backend = checked_backend(mode, options)
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise OptionsError(
            f"compile_in_place got the result of torch.compile (an OptimizedModule around "
            f"{type(model._orig_mod).__name__}): Trainer, checkpoints and generate() need the "
            "module itself. Pass the original module (`model._orig_mod`) instead")
    if not isinstance(model, torch.nn.Module):
        raise OptionsError(f"compile_in_place needs an nn.Module, got {type(model).__name__}; "
                           "to compile a function use ligerfx.compile(fn, ...)")
    if training_args is not None and getattr(training_args, "torch_compile", False):
        raise OptionsError(
            "TrainingArguments(torch_compile=True) makes the Trainer compile the model a second "
            "time, through accelerate, which does not know the liger backend: leave "
            "torch_compile, torch_compile_backend and torch_compile_mode unset; the model "
            "compiled here is what the Trainer runs")
    flag = getattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint", None)
    if (getattr(training_args, "gradient_checkpointing", False)
            or getattr(model, "is_gradient_checkpointing", False) is True) and not flag:
        warnings.warn(
            "gradient checkpointing is on (TrainingArguments(gradient_checkpointing=True), TRL's "
            "default, or model.gradient_checkpointing_enable()): the decoder layers run under "
            "torch.utils.checkpoint, where Dynamo breaks the graph on a Python side effect (as in "
            "transformers' models) and runs the layer eagerly, unfused. To fuse the layers, set "
            + ("`torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True` "
               "before the first call (side effects are then not replayed in the backward's "
               "recompute) or " if flag is not None else "")
            + "gradient_checkpointing=False",
            UserWarning, stacklevel=2)
    model.compile(backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    return model
