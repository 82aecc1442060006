"""What the passes did to a model: rewrites, near misses and counts, readable and as JSON."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

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


def _clean_module_path(path: str) -> str:
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
        path = list(stack.values())[-1][0]
        loc.module = _clean_module_path(str(path))
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


@dataclass
class MatchRecord:
    pattern: str
    location: Location
    nodes: list  # names of the graph nodes replaced
    graph: int = 0  # which captured graph (a model with graph breaks has several)
    detail: str = ""  # e.g. the casting mode the rewrite chose
    position: int = field(default=-1, repr=False)  # node index in its graph, for ordering
    path: str = ""  # what runs, when the backend decided it (e.g. "CPU: decomposed for inductor")

    def __str__(self) -> str:
        d = f" ({self.detail})" if self.detail else ""
        p = f" [{self.path}]" if self.path else ""
        return f"{self.pattern}{d} at {self.location}: replaced {len(self.nodes)} nodes{p}"


@dataclass
class NearMiss:
    pattern: str
    location: Location
    reason: str
    graph: int = 0
    position: int = field(default=-1, repr=False)
    size: int = field(default=0, repr=False)  # nodes the refused match covered

    def __str__(self) -> str:
        return f"{self.pattern} at {self.location}: not rewritten: {self.reason}"


@dataclass
class Report:
    """The result of `ligerfx.explain` (and what the backend logs)."""

    matches: list = field(default_factory=list)
    near_misses: list = field(default_factory=list)
    graphs: int = 0
    notes: list = field(default_factory=list)  # statements the user must see (e.g. dropped outputs)
    graphs_before: list = field(default_factory=list)  # readable code of each graph, if recorded
    graphs_after: list = field(default_factory=list)

    @property
    def counts(self) -> dict:
        return dict(Counter(m.pattern for m in self.matches))

    def extend(self, other: "Report") -> None:
        base = self.graphs
        for m in other.matches:
            m.graph += base
            self.matches.append(m)
        for n in other.near_misses:
            n.graph += base
            self.near_misses.append(n)
        self.graphs += max(other.graphs, 1)
        self.notes.extend(x for x in other.notes if x not in self.notes)
        self.graphs_before.extend(other.graphs_before)
        self.graphs_after.extend(other.graphs_after)

    def to_dict(self) -> dict:
        return {
            "counts": self.counts,
            "graphs": self.graphs,
            "matches": [asdict(m) for m in self.matches],
            "near_misses": [asdict(n) for n in self.near_misses],
            "notes": list(self.notes),
            "graphs_before": list(self.graphs_before),
            "graphs_after": list(self.graphs_after),
        }

    def __str__(self) -> str:
        lines = [f"ligerfx: {len(self.matches)} rewrite(s) in {self.graphs} graph(s)"]
        if self.counts:
            lines.append("  counts: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())))
        for m in self.matches:
            lines.append(f"  rewrote {m}")
        for n in self.near_misses:
            lines.append(f"  near miss: {n}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)
