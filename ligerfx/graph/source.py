"""Where in the user's code an FX node came from: the module path and the source line that
Dynamo recorded, as reports and near misses print them."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.fx as fx

_TORCH_DIR = re.compile(r"[/\\]torch[/\\](nn|_dynamo|fx|_tensor|functional)")


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)\n\s*(?P<code>[^\n]*)')


@dataclass
class Location:
    """Where in the user's code a node came from."""

    module: str = ""  # module path, e.g. model.layers.0.input_layernorm
    file: str = ""
    line: int = 0
    function: str = ""
    code: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.file else "<unknown source>"
        mod = f" [{self.module}]" if self.module else ""
        code = f"  `{self.code.strip()}`" if self.code else ""
        return f"{where}{mod}{code}"


# Containers Dynamo walks through on the way to a submodule or parameter: not part of the names
# `model.named_modules()` / `named_parameters()` give (nn.Module reserves these attribute names).
_CONTAINERS = frozenset({"__dict__", "_modules", "_parameters", "_buffers"})


_PART = re.compile(r"\['([^']*)'\]|\[(\d+)\]|\.?(\w+)")


def clean_module_path(path: str) -> str:
    """A Dynamo source path as the name `named_modules()` gives it.

    Dynamo spells paths as L['self'].model.layers[0].mlp, L['self']._modules['x'], and through a
    module that forwards attributes with its own `__getattr__` (PEFT) as
    L['self'].__dict__['_modules']['base_model'].__dict__['_modules']['model'].layers[0]; a
    forward wrapped by a decorator is reached through L['args'][0].
    """
    path = re.sub(r"^L\['[^']*'\](\[\d+\])*\.?", "", path)
    names = [a or b or c for a, b, c in _PART.findall(path)]
    return ".".join(n for n in names if n not in _CONTAINERS)


def locate(node: fx.Node) -> Location:
    loc = Location()
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        # The innermost module reached from the model (L[...]); a module held in a global (G[...],
        # as transformers' hub-kernel wrappers around functions are) is not in the model's tree,
        # and naming it would pull the nodes of every layer that calls it into one place.
        paths = [str(v[0]) for v in stack.values()]
        local = [p for p in paths if not p.startswith("G[")]
        loc.module = clean_module_path((local or paths)[-1])
    trace = node.meta.get("stack_trace") or ""
    frames = list(_FRAME.finditer(trace))
    # The innermost frame outside torch itself is the user's line (nn.RMSNorm's own code is not).
    user = [f for f in frames if not _TORCH_DIR.search(f["file"])]
    frames = user or frames
    if frames:
        f = frames[-1]
        loc.file, loc.line, loc.function, loc.code = (f["file"], int(f["line"]), f["func"],
                                                      f["code"])
    return loc
