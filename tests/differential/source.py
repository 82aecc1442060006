"""A generated test case: the Python source of a small nn.Module, its inputs and what may happen.

Generators write a module as lines of source (`Src`), one operation per named temporary, so the
spelling under test is literally what Dynamo traces and a failing example prints as code.
`Case.build()` `exec`s the text (registered with `linecache`, so tracebacks and the report's
source locations show the generated lines).
"""

from __future__ import annotations

import itertools
import linecache
import re
import textwrap
from dataclasses import dataclass, field

import torch
import torch.nn as nn  # noqa: F401 - used by generated code
import torch.nn.functional as F  # noqa: F401 - used by generated code

# What a generated case promises, which decides the outcomes the oracle allows (see oracle.py).
SPELLING = "spelling"  # the pattern's math in some spelling: rewritten and equal, or a near miss
SAFETY = "safety"  # a write / escape / lossy cast / tensor eps: refused with a near miss, or equal
MATH = "math"  # no longer the pattern's math: not rewritten, unless still equal

_counter = itertools.count()


@dataclass
class Input:
    """One forward argument: a float tensor (with gradient), int labels, or int positions."""

    name: str
    shape: tuple
    kind: str = "float"  # "float" | "labels" | "positions"
    high: int = 0  # labels: number of classes; positions: table length
    ignore: bool = False  # labels: some positions set to -100
    scale: float = 1.0  # floats: magnitude (large for overflow cases)


@dataclass
class Src:
    """The pieces of a module's source: __init__ lines, forward args, body and returned names."""

    init: list = field(default_factory=list)
    inputs: list = field(default_factory=list)  # Input
    body: list = field(default_factory=list)
    returns: list = field(default_factory=list)

    def fresh(self, stem: str) -> str:
        """A temporary name not used in the body yet."""
        taken = set(re.findall(r"\b\w+\b", "\n".join(self.body)))
        for i in itertools.count():
            name = f"{stem}{i}" if i else stem
            if name not in taken:
                return name

    def text(self) -> str:
        args = ", ".join(["self"] + [i.name for i in self.inputs])
        init = "\n".join(f"        {line}" for line in self.init) or "        pass"
        body = "\n".join(f"        {line}" for line in self.body)
        ret = ", ".join(self.returns) + ("," if len(self.returns) == 1 else "")
        return ("class M(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                f"{init}\n\n    def forward({args}):\n{body}\n        return ({ret})\n")


@dataclass
class Written:
    """A module written out by hand (the regression tests), used where a generated `Src` is."""

    code: str  # the whole `class M(nn.Module)` text
    inputs: list  # Input

    def text(self) -> str:
        return textwrap.dedent(self.code).strip() + "\n"


@dataclass
class Case:
    """A module source plus the patterns it is about, its dtype and what kind of case it is."""

    src: Src | Written
    patterns: tuple  # pattern names that count as rewriting this case's subgraph
    kind: str = SPELLING
    dtype: torch.dtype = torch.float32
    what: str = ""  # the spelling / perturbation, for the failure message

    @property
    def source(self) -> str:
        return self.src.text()

    def build(self, reference: bool = False) -> nn.Module:
        """Instantiate the module (seeded).  The float64 reference runs the same code with its
        fp32 upcasts spelled as float64, so it is more precise than any dtype under test; casts
        to half formats and integers stay as written (they are the code's math)."""
        text = self.source
        if reference:
            text = text.replace("torch.float32", "torch.float64").replace(".float()", ".double()")
        name = f"<differential-{next(_counter)}>"
        linecache.cache[name] = (len(text), None, text.splitlines(True), name)
        ns = {"torch": torch, "nn": nn, "F": F}
        exec(compile(text, name, "exec"), ns)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            m = ns["M"]()
        return m.double() if reference else m.to(self.dtype)

    def __repr__(self) -> str:  # hypothesis prints the falsifying example with this: the code
        return (f"[{self.kind}: {self.what}; dtype {self.dtype}; patterns {self.patterns}; "
                f"inputs {[(i.name, i.shape, i.kind, i.scale) for i in self.src.inputs]}]\n"
                + self.source)


def make_inputs(case: Case, seed: int):
    """Fresh random inputs (never zeros or ones): float64 masters and the case-dtype copies."""
    g = torch.Generator().manual_seed(seed)
    masters = []
    for i in case.src.inputs:
        if i.kind == "float":
            masters.append(torch.randn(i.shape, generator=g, dtype=torch.float64) * i.scale)
        elif i.kind == "labels":
            t = torch.randint(0, i.high, i.shape, generator=g)
            if i.ignore:
                t[torch.rand(i.shape, generator=g) < 0.3] = -100
            masters.append(t)
        else:  # positions: a random permutation-ish set of table rows
            masters.append(torch.randint(0, i.high, i.shape, generator=g))
    return masters
