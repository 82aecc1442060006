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
    """One forward argument: a float tensor (with gradient unless `grad=False`), a 0/1 float row
    mask, a bool mask, int labels, or int positions.

    Floats may carry non-finite and extreme values: whole last-dim columns at -inf (a masked
    vocabulary; give two inputs the same columns to mask both sides) and a ramp along the last
    dim (`spread`: a row's range, > 104 makes fp32 softmax underflow to 0).  `near` makes the
    input another one plus small noise (a teacher close to its student).  `dtype` pins the
    operand's dtype whatever the case's (mixed-dtype cases); the float64 reference still runs
    every operand in float64."""

    name: str
    shape: tuple
    kind: str = "float"  # "float" | "mask" (0/1 floats) | "bool" | "labels" | "positions"
    high: int = 0  # labels: number of classes; positions: table length
    ignore: bool | float = False  # labels: fraction set to -100 (True: 0.3, 1.0: every one)
    scale: float = 1.0  # floats: magnitude (large for overflow cases)
    grad: bool = True  # floats: a leaf that needs a gradient (False: teacher logits, no_grad data)
    dtype: torch.dtype | None = None  # floats / masks: a fixed dtype; None: the case's dtype
    neginf: tuple = ()  # floats: last-dim columns set to -inf in every row
    spread: float = 0.0  # floats: a ramp 0..spread added along the last dim
    near: str = ""  # floats: an earlier input of the same shape plus this one's noise (`scale`)


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
    dynamic: bool = False  # torch.compile(..., dynamic=True)
    options: dict = field(default_factory=dict)  # backend options beyond the oracle's own
    grad: bool = True  # False: inference (parameters frozen, everything run under no_grad)
    reported_as: tuple = ()  # further pattern names whose near miss (not rewrite) also counts
    # further pattern names whose rewrite (not near miss) also counts: another pattern that
    # claims some instances by design (log-probs with the logits also returned are
    # fused_linear_cross_entropy's); its result is still judged against eager
    rewritten_as: tuple = ()

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
        m = m.double() if reference else m.to(self.dtype)
        if not self.grad:
            m.requires_grad_(False)
        return m

    def input_dtype(self, i: Input, reference: bool) -> torch.dtype:
        return torch.float64 if reference else (i.dtype or self.dtype)

    def __repr__(self) -> str:  # hypothesis prints the falsifying example with this: the code
        inputs = [(i.name, i.shape, i.kind, i.scale) + tuple(
            f"{k}={getattr(i, k)}" for k in ("grad", "dtype", "neginf", "spread", "ignore", "near")
            if getattr(i, k) != Input.__dataclass_fields__[k].default) for i in self.src.inputs]
        flags = "".join(f"; {k}" for k, on in (("dynamic=True", self.dynamic),
                                               ("no_grad", not self.grad)) if on)
        return (f"[{self.kind}: {self.what}; dtype {self.dtype}; patterns {self.patterns}; "
                f"options {self.options}{flags}; inputs {inputs}]\n" + self.source)


def make_inputs(case: Case, seed: int):
    """Fresh random inputs (never zeros or ones): float64 masters and the case-dtype copies."""
    g = torch.Generator().manual_seed(seed)
    masters = []
    for i in case.src.inputs:
        if i.kind == "float":
            t = torch.randn(i.shape, generator=g, dtype=torch.float64) * i.scale
            base = [m for j, m in zip(case.src.inputs, masters) if j.name == i.near]
            if base and base[0].shape == t.shape:  # (a broadcast edge may have changed a shape)
                t = base[0] + t
            if i.spread and t.dim():
                t = t + torch.linspace(0.0, i.spread, t.shape[-1], dtype=torch.float64)
            if i.neginf and t.dim():
                t[..., list(i.neginf)] = float("-inf")
            masters.append(t)
        elif i.kind in ("mask", "bool"):  # about a third zeros, never all of them
            t = torch.rand(i.shape, generator=g) >= 0.35
            if t.numel():
                t.view(-1)[0] = True
            masters.append(t if i.kind == "bool" else t.double())
        elif i.kind == "labels":
            t = torch.randint(0, i.high, i.shape, generator=g)
            if i.ignore:
                frac = 0.3 if i.ignore is True else float(i.ignore)
                t[torch.rand(i.shape, generator=g) < frac] = -100
            masters.append(t)
        else:  # positions: a random permutation-ish set of table rows
            masters.append(torch.randint(0, i.high, i.shape, generator=g))
    return masters
