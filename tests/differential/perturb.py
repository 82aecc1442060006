"""Perturbations shared by every family: they change a generated `Src` so that a rewrite is no
longer safe (a write between uses, an escaping intermediate, a lossy cast) without the family
knowing how.  They work on the text: a temporary is any name the body assigns, its uses are the
lines after its definition that mention it.  Each returns a description, or None when the body
offers no place for it (the generator then draws another perturbation).
"""

from __future__ import annotations

import re

import torch

from hypothesis import strategies as st

# Every spelling of a write Dynamo may produce (issue 10 §1); `{n}` is the written tensor.
WRITES = (
    "{n}.mul_(2.0)",
    "{n} += 1.0",
    "{n}[..., 0] = 0.5",
    "{n}.view(-1)[:3].add_(1.0)",
    "torch.Tensor.add_({n}, 0.25)",
    "{n}.copy_({n} * 3.0)",
    "torch.mul({n}, 0.5, out={n})",
    "{n}.transpose(0, -1).sub_(0.125)",
)

# Casts that lose values: rounding to fp16 (overflow too when the values are large), through an
# integer, bf16 <-> fp16 (different range and precision).
LOSSY = ("torch.float16", "torch.int32", "torch.bfloat16")


def _assigned(body):
    """(line index, name) of each `name = ...` assignment of the body."""
    out = []
    for i, line in enumerate(body):
        m = re.match(r"^(\w+) = ", line)
        if m:
            out.append((i, m.group(1)))
    return out


def _uses(body, name, after):
    pat = re.compile(rf"\b{re.escape(name)}\b")
    uses = []
    for j in range(after + 1, len(body)):
        if re.match(rf"^{re.escape(name)} = ", body[j]):
            break  # rebound: later lines see another value
        if pat.search(body[j]):
            uses.append(j)
    return uses


def temporaries(src, min_uses=1):
    """Names the body defines and then uses at least `min_uses` times (before rebinding)."""
    return [(i, n, u) for i, n in _assigned(src.body) if len(u := _uses(src.body, n, i)) >= min_uses]


@st.composite
def write_between_uses(draw, src):
    """Write to a temporary after its first use, before its last."""
    cands = temporaries(src, min_uses=2)
    if not cands:
        return None
    _, name, uses = draw(st.sampled_from(cands))
    at = draw(st.sampled_from(uses[:-1]))
    write = draw(st.sampled_from(WRITES)).format(n=name)
    src.body.insert(at + 1, write)
    return f"write `{write}` between uses of {name}"


@st.composite
def escape(draw, src):
    """Return an intermediate too, or use it again after the pattern."""
    cands = [n for _, n, _ in temporaries(src, min_uses=1) if n not in src.returns]
    if not cands:
        return None
    name = draw(st.sampled_from(cands))
    if draw(st.booleans()):
        src.returns.append(name)
        return f"{name} returned"
    src.returns[0] = f"{src.returns[0]} + {name}.mean()"
    return f"{name} used again after the pattern"


@st.composite
def lossy_cast(draw, src, scale_choices=(1.0, 1000.0)):
    """Round-trip a temporary through a lossy dtype (`t.to(LOSSY).to(t.dtype)`)."""
    cands = temporaries(src, min_uses=1)
    if not cands:
        return None
    i, name, _ = draw(st.sampled_from(cands))
    lossy = draw(st.sampled_from(LOSSY))
    t = src.fresh("pre")
    src.body[i] = re.sub(rf"^{name} = ", f"{t} = ", src.body[i])
    src.body.insert(i + 1, f"{name} = {t}.to({lossy}).to({t}.dtype)")
    scale = draw(st.sampled_from(scale_choices))
    for inp in src.inputs:
        if inp.kind == "float":
            inp.scale = scale
    return f"{name} cast through {lossy} (inputs scaled by {scale})"


def tensor_constant(src, attr: str, value: float) -> str:
    """A constant held in a tensor buffer instead of a Python number; returns its expression."""
    src.init.append(f"self.register_buffer('{attr}', torch.tensor({value!r}))")
    return f"self.{attr}"


@st.composite
def tensor_eps(draw, src):
    """The placeholder EPS held in a tensor buffer instead of a Python number."""
    if not any("EPS" in line for line in src.body):
        return None
    expr = tensor_constant(src, "eps_t", draw(st.sampled_from((1e-6, 1e-5))))
    src.body = [line.replace("EPS", expr) for line in src.body]
    return "eps held in a tensor buffer"


SAFETY_PERTURBATIONS = (write_between_uses, escape, lossy_cast)


@st.composite
def safety(draw, src):
    """Apply one generic safety perturbation that fits the body; its description, or None."""
    for p in draw(st.permutations(SAFETY_PERTURBATIONS)):
        what = draw(p(src))
        if what:
            return what
    return None


@st.composite
def math_edit(draw, src, edits):
    """Apply one of a family's `(description, regex, replacement)` edits that changes the math
    (the first occurrence in the body); its description, or None when none applies."""
    fits = [e for e in edits if any(re.search(e[1], line) for line in src.body)]
    if not fits:
        return None
    what, pat, new = draw(st.sampled_from(fits))
    for i, line in enumerate(src.body):
        if re.search(pat, line):
            src.body[i] = re.sub(pat, new, line, count=1)
            break
    return what


@st.composite
def perturbed(draw, src, edits=(), extra_safety=()):
    """Draw the case's kind and apply its perturbation: (kind, description)."""
    from tests.differential.source import MATH, SAFETY, SPELLING

    kind = draw(st.sampled_from((SPELLING, SPELLING, SAFETY, SAFETY, MATH)))
    if kind == MATH:
        what = draw(math_edit(src, edits))
        return (MATH, what) if what else (SPELLING, "")
    if kind == SAFETY:
        options = [safety] + list(extra_safety)
        what = draw(draw(st.sampled_from(options))(src))
        return (SAFETY, what) if what else (SPELLING, "")
    if draw(st.sampled_from((False, False, False, True))):
        # the same code on values whose squares overflow fp16 (eager's overflow must be kept)
        for inp in src.inputs:
            if inp.kind == "float":
                inp.scale = 1000.0
        return SPELLING, "inputs scaled by 1000"
    return SPELLING, ""


# -- the values and shapes a rewrite must also get right (issue 22 §3) ------------------------------

def _floats(src, names):
    return [i for i in src.inputs if i.kind == "float" and i.name in names]


@st.composite
def extreme_values(draw, src, logits=(), labels=(), batch=True):
    """Values at IEEE's edges in the named inputs: a -inf masked vocabulary (the same last-dim
    columns of one or all `logits` inputs), a row range that underflows fp32's exp (> 104), every
    label ignored, or a zero-size batch (dim 0 of every input; the generated code must reshape
    with -1).  Returns the description, or None when none fits."""
    floats = _floats(src, logits)
    fits = []
    if floats:
        fits += ["-inf columns", "underflow"]
    if any(i.kind == "labels" and i.name in labels for i in src.inputs):
        fits.append("all ignored")
    if batch and src.inputs:
        fits.append("zero-size batch")
    if not fits:
        return None
    what = draw(st.sampled_from(fits))
    if what == "-inf columns":
        V = floats[0].shape[-1]
        cols = tuple(sorted(draw(st.sets(st.integers(0, V - 1), min_size=1, max_size=V // 3))))
        hit = floats if draw(st.booleans()) else [draw(st.sampled_from(floats))]
        for i in hit:
            i.neginf = cols
        return f"-inf at columns {cols} of {[i.name for i in hit]}"
    if what == "underflow":
        i = draw(st.sampled_from(floats))
        i.spread = draw(st.sampled_from((110.0, 200.0)))
        return f"{i.name}'s rows spread over {i.spread}"
    if what == "all ignored":
        for i in src.inputs:
            if i.kind == "labels" and i.name in labels:
                i.ignore = 1.0
        return "every label ignored"
    for i in src.inputs:
        i.shape = (0,) + tuple(i.shape[1:])
    return "zero-size batch"


@st.composite
def mixed_dtypes(draw, src, names):
    """Pin some of the named float inputs to a dtype other than the case's: eager's type promotion
    (and where it rounds) must be what the rewrite computes."""
    floats = _floats(src, names)
    if not floats:
        return None
    picked = draw(st.lists(st.sampled_from(floats), min_size=1, max_size=len(floats), unique_by=id))
    for i in picked:
        i.dtype = draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float16)))
    return "dtypes " + ", ".join(f"{i.name}: {str(i.dtype).replace('torch.', '')}" for i in picked)


@st.composite
def broadcast(draw, src, names):
    """One of the named inputs given a size-1 leading dim (or fewer dims) that broadcasts against
    the others in eager: a rewrite that compares shapes by their last dim or their numel breaks."""
    floats = [i for i in _floats(src, names) + [i for i in src.inputs if i.kind == "mask"
                                                 and i.name in names] if len(i.shape) >= 2]
    if not floats:
        return None
    i = draw(st.sampled_from(floats))
    how = draw(st.sampled_from(["drop"] + [f"dim {d}" for d in range(len(i.shape) - 1)]))
    old = i.shape
    i.shape = tuple(i.shape[1:]) if how == "drop" else tuple(
        1 if d == int(how.split()[1]) else n for d, n in enumerate(i.shape))
    return f"{i.name} broadcast: {old} -> {i.shape}"


@st.composite
def edges(draw, src, kind, what, logits=(), labels=(), shapes=(), batch=True):
    """After `perturbed`: maybe one edge of the above (extreme values of `logits` / `labels`,
    mixed dtypes of `logits`, `shapes` broadcast).  A broadcast changes what eager computes, so it
    makes the case a MATH one (rewritten only if equal).  Returns (kind, description)."""
    from tests.differential.source import MATH

    pick = draw(st.sampled_from(("none", "none", "values", "values", "dtypes", "broadcast")))
    extra = None
    if pick == "values":
        extra = draw(extreme_values(src, logits, labels, batch))
    elif pick == "dtypes":
        extra = draw(mixed_dtypes(src, logits))
    elif pick == "broadcast":
        extra = draw(broadcast(src, shapes))
        if extra:
            kind = MATH
    if not extra:
        return kind, what
    return kind, f"{what}; {extra}" if what else extra


def dynamic(draw) -> bool:
    """Compile with dynamic=True about one case in four (symbolic sizes and scalars)."""
    return draw(st.sampled_from((False, False, False, True)))
