"""`ligerfx.compile(model, **options)`: `torch.compile(model, backend="liger")` with the options
checked now.

torch calls a backend only at the first forward and wraps whatever it raises in
`torch._dynamo.exc.BackendCompilerFailed`, so a bad option given to `torch.compile(...,
options=...)` surfaces late and as torch's error (its `inner_exception` is the `OptionsError`).
This entry point validates first, so `except ligerfx.OptionsError` works at the call itself; it
also takes torch.compile's `mode` together with liger options, which torch.compile refuses.
"""

from __future__ import annotations

from typing import Any

import functools

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
