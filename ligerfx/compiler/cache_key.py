"""ligerfx's part of inductor's cache keys: what the backend decided when it compiled a graph.

Inductor stores compiled graphs on disk, in an FX-graph cache and an AOTAutograd cache under
TORCHINDUCTOR_CACHE_DIR, shared by every process of the user.  Their keys cover the graph, the
inputs, torch's version and inductor's config, but not what a backend in front of inductor decided
from its own state.  Several of ligerfx's decisions change what the compiled code calls or what an
op returns without showing in the graph inductor is given:

* Triton's interpreter (TRITON_INTERPRET=1) or not: the CPU decompositions are handed to inductor
  only without it, and an op whose call leaves a mode to the environment (the fused lm head's
  logits_mode=-1) has other outputs under it;
* the CPU decompositions themselves: the AOTAutograd key is taken on the graph before they apply;
* the backend's options and inductor mode, and ligerfx's own source (the fake implementations,
  decompositions and kernels a cached graph was compiled against).

Inductor hashes the uuid() of each custom graph pass in its config into both keys (the
AOTAutograd key extends the FX-graph key's details, see torch/_inductor/codecache.py
FxGraphHashDetails and torch/_functorch/_aot_autograd/autograd_cache.py).  The backend therefore
adds a pass that changes nothing to the config patches of each compile, as
`post_grad_custom_post_pass`, whose uuid() is a hash of the above: an entry is found again only by
a compile that decided the same, and a process in another mode compiles its own.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import os
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

# Options that only change what is reported, never what is compiled.
_REPORT_ONLY_OPTIONS = ("log_report",)


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """sha256 of ligerfx's Python sources: ligerfx/ with its rooms, and the kernels/ and patterns/
    folders (read once per process, as the modules a process runs are imported once)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # ligerfx/
    roots = [package]
    for name in ("kernels", "patterns"):  # beside ligerfx/ in a checkout, inside it in a wheel
        folder = importlib.util.find_spec(f"ligerfx.{name}").submodule_search_locations[0]
        if not os.path.abspath(folder).startswith(package + os.sep):
            roots.append(folder)
    h = hashlib.sha256()
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, os.path.dirname(root)).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read())
                h.update(b"\0")
    return h.hexdigest()


def _name(fn: Any) -> str:
    fn = inspect.unwrap(fn)  # the registered function under the layout / coverage wrappers
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def compile_state(options: Any, mode: str | None, decompositions: dict | None) -> dict:
    """Everything ligerfx decided for one compile that inductor's keys do not see (JSON-able).

    `decompositions`: the `liger::` ops' CPU decompositions handed to inductor (op -> function),
    None or empty when none are."""
    from ligerfx.kernels.runtime import interpreting, triton_available

    opts = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if f.name not in _REPORT_ONLY_OPTIONS}
    return {
        "ligerfx": source_hash(),
        "interpreting": interpreting(),
        "triton": triton_available(),
        "mode": mode,
        "options": {k: repr(v) for k, v in sorted(opts.items())},
        "decompositions": sorted(f"{op.name()}={_name(fn)}"
                                 for op, fn in (decompositions or {}).items()),
    }


def token(options: Any, mode: str | None, decompositions: dict | None) -> str:
    """A hash of compile_state(...)."""
    state = compile_state(options, mode, decompositions)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


class CacheKeyPass(CustomGraphPass):
    """A post-grad pass that leaves the graph alone; its uuid() is ligerfx's cache token.

    `inner`: the pass the user had configured in the same slot (a torch that takes one pass per
    slot), run first and keyed with ours; a pass inductor cannot key (no uuid) keeps disabling
    the caches, as it would without ligerfx."""

    def __init__(self, token: str, inner: Any = None):
        self.token = token
        self.inner = inner

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self) -> Any:
        if self.inner is None:
            return f"ligerfx:{self.token}"
        inner_uuid = self.inner.uuid() if isinstance(self.inner, CustomGraphPass) else None
        if not inner_uuid:
            return None  # inductor bypasses its caches for a pass it cannot key
        return (f"ligerfx:{self.token}", inner_uuid)


def config_patches(token: str) -> dict:
    """Inductor config patches that put `token` into both cache keys.

    A pass already configured in the slot stays: in a list beside ours where this torch takes
    lists of passes, else wrapped by ours."""
    from torch._inductor import config

    current = config.post_grad_custom_post_pass
    if isinstance(current, CacheKeyPass):  # a compile inside a liger compile: ours is replaced
        current = current.inner
    if current is None:
        return {"post_grad_custom_post_pass": CacheKeyPass(token)}
    try:
        from torch._inductor.custom_graph_pass import get_custom_graph_passes
    except ImportError:  # one pass per slot in this torch
        return {"post_grad_custom_post_pass": CacheKeyPass(token, inner=current)}
    passes = [p for p in get_custom_graph_passes(current) if not isinstance(p, CacheKeyPass)]
    return {"post_grad_custom_post_pass": passes + [CacheKeyPass(token)]}
