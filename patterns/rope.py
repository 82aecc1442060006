"""`rope`: rotary position embeddings of q and k -> one `liger::rope` launch per attention layer.

Forms (each is the math, whatever the code's names):
- rotate_half (Hugging Face): `x * cos + cat(-x[..., h:], x[..., :h]) * sin`, with
  rotate_half spelled by slicing or `chunk(2, -1)`;
- partial rotary (GPT-NeoX, Phi, StableLM): the same on `x[..., :r]`, then `cat((rot, x[..., r:]))`;
- complex (Meta's Llama reference, torchtitan): `view_as_real(view_as_complex(x.float() as pairs)
  * freqs_cis).flatten(-2)`, usually `.type_as(x)` after: the interleaved convention;
- pairs as a trailing dim of 2 (gpt-fast): `x.reshape(.., -1, 2)`, `stack([x0*c - x1*s,
  x1*c + x0*s], -1).flatten(3)` with c, s one angle per pair;
- interleaved pairs in real arithmetic (GPT-J, Cohere, GLM, also partial): `x * cos +
  stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2) * sin`, exact for the kernel's interleaved
  mode only when each pair (2i, 2i+1) of cos/sin holds one angle, which `check` proves from how
  the tables were built (a `repeat_interleave(.., 2, -1)` under elementwise ops).
- halves combined by hand (GPT-OSS: `a, b = chunk(x, 2, -1)`; DeepSeek-V3's
  `apply_rotary_pos_emb_interleave`: `a, b = x[..., 0::2], x[..., 1::2]`), then
  `cat((a * cos - b * sin, b * cos + a * sin))` with tables of one angle per pair (head_dim / 2);
  the even/odd form writes its result de-interleaved, which the kernel's `halves_out` does.
- pairs through `x.reshape(.., -1, 2).unbind(-1)` (`xr*cos - xi*sin`, `xr*sin + xi*cos`, stacked
  back): the canonical view reads `unbind(-1)[i]` of an unflatten as `x[..., i::2]`, so it is the
  gpt-fast form above;
- halves with the sine's sign inside a product (`x1*cos + x2*sin`, `x1*(-sin) + x2*cos`): the view
  reads `p + a*(-b)` as `p - a*b` (bit for bit), so it is the chunked-halves form by -theta;
- complex halves: `view_as_real(view_as_complex(stack(chunk(x, 2, -1), -1)) * freqs_cis)` put back
  with `cat(chunk(.., 2, -1), -2)` and the trailing 1 dropped: pair (i, h + i), real parts first,
  rotate_half's layout (kernel halves mode, freqs' cos/sin repeated); written back as interleaved
  (real, imag) pairs (`.flatten(-2)`) it is a look-alike refused with the reason;
- complex pairs to halves: the complex form's interleaved pairs put back with
  `cat(chunk(.., 2, -1), -2)` (real parts first): interleaved mode with `halves_out`.
Signs.  Each form is written with the sign of each sine term spelled out (`cat((-x2, x1))` or
`cat((x2, -x1))`; `a*cos - b*sin` or `a*cos + b*sin`), every combination a variant.  `check`
derives the rotation from the signs: opposite signs are a rotation by +theta (Hugging Face) or
-theta (nanochat's `cat((x2, -x1))`), which is the same kernel with the sine table negated
(negation is exact, and x * -s rounds as -(x * s) does); equal signs are not a rotation and are
refused with the reason.
q and k rotated by the same tables form one `rope` match (two outputs, one launch).  A rotation
left over (q and k with different tables, or only one of them rotated) is rewritten alone by
`rope_single`.

cos/sin are bound where they multiply x, so any way of building them works: [t, d] or [b, t, d]
tables (position ids) unsqueezed for [b, h, t, d] or [b, t, h, d], GQA (k with fewer heads).
`check` proves from the shapes alone (symbolically, no guards) that the tables broadcast the way
the kernel indexes them and picks seq_dim; casts around the rotation are replayed exactly (an fp32
upcast inside a bf16 model costs nothing: the kernel computes in fp32 anyway).
Dtypes (patterns/rope_dtypes.py): both products must compute in one dtype (tables of mixed dtypes,
where type promotion rounds one product to bf16 and not the other, are refused); with a low-precision
q and wider tables the backward rounds each branch's gradient to q's dtype and sums them there, as
eager's autograd does (liger::rope's grad_dtype).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import ligerfx.kernels.rope  # noqa: F401 - defines torch.ops.liger.rope
from ligerfx.graph import mutation
from ligerfx.graph.nodes import CAST_METHODS, node_value
from ligerfx.compiler.pattern import register
from ligerfx.patterns import rope_dtypes
from ligerfx.patterns.gated_act import (_FLOATS, _LOW, apply_chain, dtype_of,
                                        internal_casts, trailing_chain, widens)
from ligerfx.patterns.rope_dtypes import short, use_chain
from ligerfx.graph.symbolic import known_equal, known_int

# ---------------------------------------------------------------------------------------------
# Patterns.  Slices are written with scalar inputs (half, rot_end, pass_start) so one pattern
# fits every head size; `check` proves they split the rotary dims in the middle.


def _rotate_half(x, half):
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _signed(t, sign):
    return t if sign > 0 else -t


def _rot(x, cos, sin, half):
    return x * cos + _rotate_half(x, half) * sin


def _partial(x, cos, sin, half, rot_end, pass_start):
    return torch.cat((_rot(x[..., :rot_end], cos, sin, half), x[..., pass_start:]), dim=-1)


def _rot_pairs(x, cos, sin):
    return x * cos + torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2) * sin


def _partial_pairs(x, cos, sin, rot_end, pass_start):
    return torch.cat((_rot_pairs(x[..., :rot_end], cos, sin), x[..., pass_start:]), dim=-1)


def _stack_pairs(x, cos, sin):
    # gpt-fast: pairs as a trailing dim of 2, rotated with real arithmetic, stacked back
    xs = x.unflatten(-1, (-1, 2))
    x0, x1 = xs[..., 0], xs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-2)


def _complex(x, freqs):
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs).flatten(-2)


def _complex_halves(x, freqs, half):
    # the halves (x[i], x[h + i]) as complex numbers (`stack(chunk(x, 2, -1), -1)`), rotated, the
    # real parts written back as the first half and the imaginary parts as the second
    # (`cat(chunk(r, 2, -1), -2)`, a trailing dim of 1 dropped): rotate_half's layout
    xc = torch.view_as_complex(torch.stack((x.float()[..., :half], x.float()[..., half:]), dim=-1))
    r = torch.view_as_real(xc * freqs)
    return torch.cat((r[..., :1], r[..., 1:]), dim=-2).squeeze(-1)


def rope_complex_halves(q, k, freqs, half):
    """RoPE, complex form on the halves: complex(q[..., :h], q[..., h:]) * freqs_cis, real and
    imaginary parts concatenated (and k)."""
    return _complex_halves(q, freqs, half), _complex_halves(k, freqs, half)


def rope_single_complex_halves(q, freqs, half):
    return _complex_halves(q, freqs, half)


def _complex_to_halves(x, freqs):
    # interleaved pairs as complex numbers, written back as halves (real parts first): the
    # kernel's interleaved mode with halves_out
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    r = torch.view_as_real(xc * freqs)
    return torch.cat((r[..., :1], r[..., 1:]), dim=-2).squeeze(-1)


def rope_complex_to_halves(q, k, freqs):
    return _complex_to_halves(q, freqs), _complex_to_halves(k, freqs)


def rope_single_complex_to_halves(q, freqs):
    return _complex_to_halves(q, freqs)


def _complex_halves_to_pairs(x, freqs, half):
    xc = torch.view_as_complex(torch.stack((x.float()[..., :half], x.float()[..., half:]), dim=-1))
    return torch.view_as_real(xc * freqs).flatten(-2)


def lookalike_complex_halves_to_pairs(q, k, freqs, half):
    return _complex_halves_to_pairs(q, freqs, half), _complex_halves_to_pairs(k, freqs, half)


def lookalike_single_complex_halves_to_pairs(q, freqs, half):
    return _complex_halves_to_pairs(q, freqs, half)


_HALVES_TO_PAIRS = ("rotates the halves (x[i], x[h + i]) as complex numbers but writes the result "
                    "as interleaved (real, imaginary) pairs; liger::rope writes a rotation of "
                    "halves as halves (and of pairs as pairs or halves), not this mix")


def rope_partial(q, k, cos, sin, half, rot_end, pass_start):
    """Partial rotary: rotate_half RoPE on the first rotary_dim channels, the rest passed on."""
    return (_partial(q, cos, sin, half, rot_end, pass_start),
            _partial(k, cos, sin, half, rot_end, pass_start))


def rope_rotate_half(q, k, cos, sin, half):
    """RoPE, rotate_half form: q * cos + rotate_half(q) * sin (and k)."""
    return _rot(q, cos, sin, half), _rot(k, cos, sin, half)


def rope_pairs_partial(q, k, cos, sin, rot_end, pass_start):
    return (_partial_pairs(q, cos, sin, rot_end, pass_start),
            _partial_pairs(k, cos, sin, rot_end, pass_start))


def rope_pairs(q, k, cos, sin):
    """RoPE on interleaved pairs in real arithmetic (GPT-J's rotate_every_two, Cohere)."""
    return _rot_pairs(q, cos, sin), _rot_pairs(k, cos, sin)


# The stacked form's tables are half as wide as the others' (one angle per pair), so they take
# their own names (and example inputs); `check` renames them to cos/sin.
def rope_stack(q, k, cos2, sin2):
    """RoPE on pairs (x[2i], x[2i+1]) stacked back after a real rotation (gpt-fast)."""
    return _stack_pairs(q, cos2, sin2), _stack_pairs(k, cos2, sin2)


def rope_single_stack(q, cos2, sin2):
    return _stack_pairs(q, cos2, sin2)


def rope_complex(q, k, freqs):
    """RoPE, complex form: view_as_real(view_as_complex(q pairs) * freqs_cis) (and k)."""
    return _complex(q, freqs), _complex(k, freqs)


def rope_single_partial(q, cos, sin, half, rot_end, pass_start):
    return _partial(q, cos, sin, half, rot_end, pass_start)


def rope_single_rotate_half(q, cos, sin, half):
    """RoPE of one tensor (its partner, if any, uses other tables)."""
    return _rot(q, cos, sin, half)


def rope_single_pairs_partial(q, cos, sin, rot_end, pass_start):
    return _partial_pairs(q, cos, sin, rot_end, pass_start)


def rope_single_pairs(q, cos, sin):
    return _rot_pairs(q, cos, sin)


def rope_single_complex(q, freqs):
    return _complex(q, freqs)


# -- the sign of each sine term spelled out: every combination is a variant (`_SIGNS`) -----------
# (a, b): the sign of the x[..., h:] (the b * sin) term in the first half and of the x[..., :h]
# (a * sin) term in the second; (-1, +1) is Hugging Face's rotation by +theta.
_SIGN_PAIRS = ((-1, 1), (1, -1), (1, 1), (-1, -1))
_SIGNS: dict = {}  # variant fn -> (sign a, sign b)


def _rot_signed(x, cos, sin, half, sa, sb):
    rh = torch.cat((_signed(x[..., half:], sa), _signed(x[..., :half], sb)), dim=-1)
    return x * cos + rh * sin


def _halves(a, b, cos, sin, sa, sb):
    # `a * cos - b * sin` (sa = -1) or `+`, and `b * cos + a * sin` (sb = +1) or `-`
    first = a * cos - b * sin if sa < 0 else a * cos + b * sin
    second = b * cos + a * sin if sb > 0 else b * cos - a * sin
    return torch.cat((first, second), dim=-1)


def _chunk_halves(x, cos2, sin2, half, sa, sb):
    return _halves(x[..., :half], x[..., half:], cos2, sin2, sa, sb)


def _even_odd(x, cos2, sin2, sa, sb):
    return _halves(x[..., 0::2], x[..., 1::2], cos2, sin2, sa, sb)


def _named(fn, name, signs):
    fn.__name__ = fn.__qualname__ = name
    _SIGNS[fn] = signs
    return fn


def _partial_signed(x, cos, sin, half, rot_end, pass_start, sa, sb):
    return torch.cat((_rot_signed(x[..., :rot_end], cos, sin, half, sa, sb), x[..., pass_start:]),
                     dim=-1)


# One factory per form (fx traces a function's own parameters, so each spells them out).
def _rot_pair(sa, sb):
    def fn(q, k, cos, sin, half):
        return _rot_signed(q, cos, sin, half, sa, sb), _rot_signed(k, cos, sin, half, sa, sb)
    return fn


def _rot_one(sa, sb):
    def fn(q, cos, sin, half):
        return _rot_signed(q, cos, sin, half, sa, sb)
    return fn


def _partial_pair(sa, sb):
    def fn(q, k, cos, sin, half, rot_end, pass_start):
        return (_partial_signed(q, cos, sin, half, rot_end, pass_start, sa, sb),
                _partial_signed(k, cos, sin, half, rot_end, pass_start, sa, sb))
    return fn


def _partial_one(sa, sb):
    def fn(q, cos, sin, half, rot_end, pass_start):
        return _partial_signed(q, cos, sin, half, rot_end, pass_start, sa, sb)
    return fn


def _chunk_pair(sa, sb):
    def fn(q, k, cos2, sin2, half):
        return _chunk_halves(q, cos2, sin2, half, sa, sb), _chunk_halves(k, cos2, sin2, half, sa, sb)
    return fn


def _chunk_one(sa, sb):
    def fn(q, cos2, sin2, half):
        return _chunk_halves(q, cos2, sin2, half, sa, sb)
    return fn


def _even_odd_pair(sa, sb):
    def fn(q, k, cos2, sin2):
        return _even_odd(q, cos2, sin2, sa, sb), _even_odd(k, cos2, sin2, sa, sb)
    return fn


def _even_odd_one(sa, sb):
    def fn(q, cos2, sin2):
        return _even_odd(q, cos2, sin2, sa, sb)
    return fn


def _family(name, factory):
    """One variant per sign combination, Hugging Face's (-1, +1) first."""
    sign = {-1: "m", 1: "p"}
    return [_named(factory(a, b), f"{name}_{sign[a]}{sign[b]}", (a, b)) for a, b in _SIGN_PAIRS]


# Hugging Face's own sign is `_rot` / `_partial` above; the other three combinations:
_ROT_SIGNED = _family("rope_rotate_half", _rot_pair)[1:]
_ROT_SIGNED_SINGLE = _family("rope_single_rotate_half", _rot_one)[1:]
_PARTIAL_SIGNED = _family("rope_partial", _partial_pair)[1:]
_PARTIAL_SIGNED_SINGLE = _family("rope_single_partial", _partial_one)[1:]
_CHUNK = _family("rope_chunk", _chunk_pair)
_CHUNK_SINGLE = _family("rope_single_chunk", _chunk_one)
_EVEN_ODD = _family("rope_even_odd", _even_odd_pair)
_EVEN_ODD_SINGLE = _family("rope_single_even_odd", _even_odd_one)
for _f in (rope_rotate_half, rope_single_rotate_half, rope_partial, rope_single_partial):
    _SIGNS[_f] = (-1, 1)
_HALVES = tuple(_CHUNK + _CHUNK_SINGLE + _EVEN_ODD + _EVEN_ODD_SINGLE)
_EVEN_ODD_FNS = tuple(_EVEN_ODD + _EVEN_ODD_SINGLE)

_COMPLEX_HALVES = (rope_complex_halves, rope_single_complex_halves)
_COMPLEX_TO_HALVES = (rope_complex_to_halves, rope_single_complex_to_halves)
_COMPLEX = (rope_complex, rope_single_complex, *_COMPLEX_HALVES, *_COMPLEX_TO_HALVES)
# cos/sin hold one angle per pair already ([.., rotary_dim / 2]), as for the complex form
_STACK = (rope_stack, rope_single_stack)
_HALF_TABLES = _STACK + _HALVES  # tables of one angle per pair, named cos2/sin2
_PAIRS = (rope_pairs, rope_pairs_partial, rope_single_pairs, rope_single_pairs_partial)
_PARTIAL = (rope_partial, rope_single_partial, rope_pairs_partial, rope_single_pairs_partial,
            *_PARTIAL_SIGNED, *_PARTIAL_SIGNED_SINGLE)


# ---------------------------------------------------------------------------------------------
# Checks.


def _layout(table, x, what: str):
    """(seq_dim, dim of `table` to squeeze or None) such that `table` broadcast against the 4-D
    `x` is what liger::rope reads: one row per (batch or none, position), shared by all heads."""
    shape = tuple(table.shape)
    if not 2 <= len(shape) <= 4:
        return f"{what} is {len(shape)}-D; it must broadcast as [t, r] or [b, t, r] over the heads"
    padded = (1,) * (4 - len(shape)) + shape
    for seq_dim in (2, 1):
        heads = 3 - seq_dim
        if known_int(padded[heads]) != 1 or not known_equal(padded[seq_dim], x.shape[seq_dim]):
            continue
        if not (known_int(padded[0]) == 1 or known_equal(padded[0], x.shape[0])):
            continue
        sq = heads - (4 - len(shape))
        return seq_dim, (sq if sq >= 0 else None)
    return (f"{what} of shape {shape} does not broadcast over q {tuple(x.shape)} as one row per "
            "(batch, position) shared by all heads")


def _plan(match, name: str, i: int, tables):
    """How to feed tensor `name` (match output i) to the kernel so it reproduces eager's dtypes,
    forward and backward (patterns/rope_dtypes.py): (in_chain, out_chain, grad_dtype, note), or a
    reason."""
    x = match.value(name)
    chain = use_chain(match, name)
    if isinstance(chain, str):
        return chain
    use = chain[-1] if chain else x.dtype
    cdt = dtype_of(match.tops[i])
    out = trailing_chain(match, i)
    if cdt not in _FLOATS or use not in _FLOATS:
        return f"rotates in {cdt}, not a floating dtype the kernel handles"
    problem = rope_dtypes.product_problem(match, tables, cdt)
    if problem:
        return problem
    if cdt in _LOW:
        if use != cdt:
            return f"`{name}` enters the rotation as {use} but the rotation computes in {cdt}"
        # eager rounds each product and the sum to cdt, and so does their backward: the kernel's
        # round_steps does the same
        return chain, out, None, f"; {short(cdt)} rounded per op"
    # the rotation computes in cdt (fp32 / fp64) and rounds once; the backward rounds each
    # branch's gradient where autograd casts it back and sums them there
    if not chain and x.dtype == cdt:
        # no cast on the way in and the products compute in x's own dtype: both branches'
        # gradients are in that dtype and autograd sums them there, as the kernel does
        g = cdt
    else:
        g = rope_dtypes.grad_sum_dtype(match, name, tables, cdt)
    if isinstance(g, str):
        if getattr(x, "requires_grad", True):
            return g
        g = cdt  # no gradient: the backward is never run
    grad_dtype = g if g != cdt else None
    note = f"; {short(cdt)} math, gradient summed in {short(g)}" if grad_dtype else ""
    exact_in = all(widens(a, b) for a, b in zip([x.dtype] + chain, chain))
    if cdt == torch.float32 and exact_in and x.dtype in _FLOATS:
        if x.dtype == torch.float32:
            return [], out, grad_dtype, note
        if out and out[0] == x.dtype:
            # x.float() ... .to(x.dtype): the kernel computes in fp32 and rounds once, the same
            return [], out[1:], grad_dtype, f"; fp32 math, {short(x.dtype)} in/out" + note
    return chain + ([cdt] if use != cdt else []), out, grad_dtype, note


_ELEMENTWISE_FNS = {operator.mul, operator.add, operator.sub, operator.truediv, operator.neg,
                    torch.mul, torch.add, torch.sub, torch.div, torch.neg, torch.cos, torch.sin}
_ELEMENTWISE_METHODS = {"mul", "add", "sub", "div", "neg", "cos", "sin"} | CAST_METHODS


def _pairs_equal(n, depth: int = 12, used: list | None = None) -> bool:
    """Whether the values of `n` along its last dim come in equal pairs (2i, 2i+1), proved from
    the ops that built it: `repeat_interleave(t, 2, dim=-1)` under elementwise ops, casts,
    broadcasts of a size-1 last dim, unsqueezes and indexing that leave the last dim whole.
    `used` collects the nodes the proof relies on (a write to one of them after it ran, e.g.
    `sin[..., 0] = 0.5`, breaks the pairs: `check` looks for one)."""
    v = node_value(n) if isinstance(n, fx.Node) else None
    if depth == 0 or not isinstance(v, torch.Tensor) or v.dim() == 0:
        return False
    if used is not None:
        used.append(n)
    rank = v.dim()
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", None)
    args = list(n.args) + list(n.kwargs.values())
    if name == "repeat_interleave" and n.op in ("call_method", "call_function"):
        reps = n.args[1] if len(n.args) > 1 else n.kwargs.get("repeats")
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
        return reps == 2 and dim in (-1, rank - 1) and "output_size" not in n.kwargs
    if (n.op == "call_function" and n.target in _ELEMENTWISE_FNS) or (
            n.op == "call_method" and n.target in _ELEMENTWISE_METHODS):
        if n.op == "call_method" and n.target == "type_as":
            args = args[:1]
        for a in args:
            if isinstance(a, fx.Node):
                av = node_value(a)
                if not isinstance(av, torch.Tensor):
                    return False
                if (av.dim() == 0 or known_int(av.shape[-1]) == 1) and av.dim() <= rank:
                    continue  # broadcast along the last dim
                if not _pairs_equal(a, depth - 1, used):
                    return False
            elif not isinstance(a, (int, float, torch.dtype, torch.device, type(None))):
                return False
        return True
    if name == "unsqueeze" and len(n.args) == 2 and isinstance(n.args[1], int):
        if n.args[1] in (-1, rank - 1):
            return False
        return _pairs_equal(n.args[0], depth - 1, used)
    if name == "getitem" and isinstance(n.args[0], fx.Node):
        src, idx = n.args
        sv = node_value(src)
        items = idx if isinstance(idx, tuple) else (idx,)
        if isinstance(sv, torch.Tensor) and _keeps_last_dim(items, sv.dim()):
            return _pairs_equal(src, depth - 1, used)
    return False


def _keeps_last_dim(items, rank: int) -> bool:
    """Whether indexing by `items` leaves the last dim of a rank-`rank` value as the result's last
    dim, whole: fewer indices than dims (no Ellipsis), or only new dims (None), whole slices and an
    Ellipsis, with no None after the last dim's own index (`t[None, :, None, :]`,
    `t[:, None]`, `t[..., None, :]`)."""
    if all(i is not Ellipsis and i is not None for i in items) and len(items) < rank:
        return True
    if not all(i is None or i is Ellipsis or (isinstance(i, slice) and i.start is None
                                              and i.stop is None and i.step in (None, 1))
               for i in items) or sum(i is Ellipsis for i in items) > 1:
        return False
    real = [k for k, i in enumerate(items) if i is not None]
    if Ellipsis not in items and len(real) < rank:
        return True  # the trailing dims, the last one among them, are not indexed
    # the last dim is indexed by the last non-None item (a whole slice or the Ellipsis): no new
    # dim may follow it
    return bool(real) and len(real) <= rank + (Ellipsis in items) and all(
        i is not None for i in items[real[-1]:])


def check(match):
    fn = match.variant.fn
    if match.variant.refuse is not None:
        return None  # a look-alike: refused with its own reason
    if fn in _HALF_TABLES:
        match.bindings["cos"] = match.bindings.pop("cos2")
        match.bindings["sin"] = match.bindings.pop("sin2")
    pair = "k" in match.bindings
    q = match.value("q")
    names = ["q", "k"] if pair else ["q"]
    for n in names:
        v = match.value(n)
        if v.dim() != 4:
            return (f"`{n}` is {v.dim()}-D; liger::rope takes 4-D [b, h, t, d] or [b, t, h, d] "
                    "tensors")
    d = q.shape[3]
    complex_form = fn in _COMPLEX
    tables = ["freqs"] if complex_form else ["cos", "sin"]
    for t in tables:
        if getattr(match.value(t), "requires_grad", False):
            return (f"`{t}` requires grad (learned rotary tables); liger::rope gives cos/sin no "
                    "gradient")
    table = match.value(tables[0])
    if complex_form:
        if table.dtype not in (torch.complex64, torch.complex128):
            return f"freqs_cis is {table.dtype}, not complex"
        rot = table.shape[-1] * 2
        if fn in _COMPLEX_HALVES and not known_equal(match.value("half") * 2, d):
            return f"chunks q at {match.value('half')}, not into two halves of its {d} channels"
    else:
        cos, sin = match.value("cos"), match.value("sin")
        if cos.dim() != sin.dim() or not all(known_equal(a, b) for a, b in zip(cos.shape, sin.shape)):
            return f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape"
        rot = cos.shape[-1] * (2 if fn in _HALF_TABLES else 1)
        if fn in _HALVES:
            half = match.value("half") if fn not in _EVEN_ODD_FNS else d // 2
            if not known_equal(half * 2, d):
                return f"chunks q at {half}, not into two halves of its {d} channels"
            if not known_equal(cos.shape[-1] * 2, d):
                return (f"cos/sin have {cos.shape[-1]} channels where the halves have {half}: "
                        "not one angle per rotated pair")
        elif fn in _STACK:
            pass
        elif fn in _PAIRS:
            used: list = []
            if not (_pairs_equal(match["cos"], used=used) and _pairs_equal(match["sin"], used=used)):
                return ("rotates interleaved pairs, but cos/sin are not provably one angle per "
                        "pair (2i, 2i+1) (built by repeat_interleave(.., 2, -1)), which the "
                        "kernel's interleaved form needs")
            memory = mutation.Memory(match.graph)
            last = max((memory.pos[c] for c in match.covered if c in memory.pos), default=0)
            written = mutation.rewritten_before(used, last, memory)
            if written:
                return ("rotates interleaved pairs; cos/sin were built one angle per pair, but "
                        f"{written}, so their pairs may differ where the rotation reads them")
        else:
            half = match.value("half")
            if half is None or not known_equal(half * 2, rot):
                return (f"rotate_half splits at {half}, not in the middle of the {rot} rotary "
                        "channels")
    layout = _layout(table, q, tables[0] if complex_form else "cos")
    if isinstance(layout, str):
        return layout
    seq_dim, squeeze = layout
    if fn in _PARTIAL:
        end, start = match.value("rot_end"), match.value("pass_start")
        if not (known_equal(start, rot) and (end is None and known_equal(rot, d)
                                             or end is not None and known_equal(end, rot))):
            return (f"slices q at [:{end}] and [{start}:] but cos/sin rotate {rot} channels")
    elif not known_equal(rot, d):
        return f"rotates {rot} channels of a head of {d}"
    if pair:
        k = match.value("k")
        qg, kg = (bool(getattr(v, "requires_grad", False)) for v in (q, k))
        if qg != kg:
            # one op's outputs all require grad when any input does: eager's rotation of the
            # tensor without a gradient (e.g. cast through an integer type) would gain one
            return (f"`{'q' if qg else 'k'}` requires grad and `{'k' if qg else 'q'}` does not: "
                    "one liger::rope launch would give both rotations a gradient; rotated apart")
        for i in (0, seq_dim, 3):
            if not known_equal(k.shape[i], q.shape[i]):
                return (f"q {tuple(q.shape)} and k {tuple(k.shape)} differ outside the heads "
                        "dim")
    sign = _rotation_sign(fn)
    if isinstance(sign, str):
        return sign
    plans = []
    for i, n in enumerate(names):
        p = _plan(match, n, i, tables)
        if isinstance(p, str):
            return p
        plans.append(p)
    if pair and (dtype_of(match["q"]) != dtype_of(match["k"]) or plans[0] != plans[1]):
        return "q and k are rotated in different dtypes"
    if internal_casts(match):
        return "casts inside the rotation, which the kernel does not reproduce"
    chains = {}
    for t in tables:
        c = use_chain(match, t)
        if isinstance(c, str):
            return c
        chains[t] = c
    in_chain, out_chain, grad_dtype, note = plans[0]
    match.params.update(seq_dim=seq_dim, squeeze=squeeze,
                        interleaved=(complex_form and fn not in _COMPLEX_HALVES) or fn in _PAIRS
                        or fn in _STACK or fn in _EVEN_ODD_FNS,
                        halves_out=fn in _EVEN_ODD_FNS or fn in _COMPLEX_TO_HALVES,
                        neg_sin=sign < 0,
                        one_angle_per_pair=fn in _HALF_TABLES or complex_form,
                        in_chain=in_chain, out_chain=out_chain, table_chains=chains,
                        grad_dtype=grad_dtype,
                        round_steps=dtype_of(match.tops[0]) in _LOW)
    layout_name = "[b, h, t, d]" if seq_dim == 2 else "[b, t, h, d]"
    form = ("complex halves" if fn in _COMPLEX_HALVES else "complex pairs to halves"
            if fn in _COMPLEX_TO_HALVES else "complex" if complex_form else "pairs" if fn in _PAIRS else
            "stacked pairs" if fn in _STACK else "even/odd pairs to halves" if fn in _EVEN_ODD_FNS
            else "chunked halves" if fn in _HALVES else "rotate_half")
    form = f"partial {form}" if fn in _PARTIAL else form
    form += " by -theta (sin negated)" if sign < 0 else ""
    match.detail = f"{form}{'' if pair else ' alone'}, {layout_name}{note}"
    if not pair:
        match.detail += f"; {_why_alone(match)}"
    return None


def _rotation_sign(fn):
    """+1 / -1 for a rotation by +theta / -theta, from the signs the variant spells; a reason
    when they make no rotation: [[c, -s], [s, c]] and [[c, s], [-s, c]] are rotations, equal
    signs give [[c, s], [s, c]] (or its negated-sine twin), which is not."""
    sa, sb = _SIGNS.get(fn, (-1, 1))
    if sa == sb:
        terms = ("second * sin", "first * sin") if fn in _HALVES else ("x2", "x1")
        return (f"both sine terms have the sign {'+' if sa > 0 else '-'} ({terms[0]} and "
                f"{terms[1]}): that is not a rotation (a rotation negates exactly one of them), "
                "so liger::rope does not compute it")
    return sb


def _why_alone(match) -> str:
    """Why this rotation is rewritten alone: the refused pairing's reason, else no partner."""
    refused = [m.reason for m in match.earlier_misses if m.pattern == "rope"]
    if refused:
        return f"not paired with another rotation: {refused[0]}"
    return ("not paired: no other rotation by the same cos/sin in this graph could join it "
            "(a table equal in value but computed differently, or in another graph, is not "
            "the same table)")


# ---------------------------------------------------------------------------------------------
# Replacement.


def _table(t, chain, squeeze):
    t = apply_chain(t, chain)
    return t if squeeze is None else torch.squeeze(t, squeeze)


def _run(q, k, cos, sin, p):
    """liger::rope on (q, k) per the plan; k None rotates q alone (with a zero-head k)."""
    qi = apply_chain(q, p["in_chain"])
    ki = apply_chain(k, p["in_chain"]) if k is not None else torch.narrow(qi, 3 - p["seq_dim"], 0, 0)
    out = torch.ops.liger.rope(qi, ki, cos, sin, p["seq_dim"], p["interleaved"],
                               p["round_steps"], p["halves_out"], p.get("grad_dtype"))
    res = []
    for i, x in enumerate([q] if k is None else [q, k]):
        like = node_value(x.node)  # the kernel's output looks like its (cast) input
        for dt in p["in_chain"]:
            like = like.to(dt)
        res.append(apply_chain(out[i], p["out_chain"], like))
    return res


def _plain(q, k, cos, sin, interleaved):
    """The registration-time check: plain tensors, [t, r] tables, [b, h, t, d] layout."""
    single = k is None
    kk = q[:, :0] if single else k
    qo, ko = torch.ops.liger.rope(q, kk, cos, sin, 2, interleaved)
    return qo if single else (qo, ko)


def replace(q, k=None, cos=None, sin=None, freqs=None, cos2=None, sin2=None, half=None, *,
            match=None):
    if cos2 is not None:  # registration check of the stacked form
        cos, sin = cos2, sin2
    if freqs is not None:
        cos, sin = None, None
    if match is None:  # registration check: its tables have no pair structure, shapes only
        if freqs is not None:
            cos, sin = torch.real(freqs).contiguous(), torch.imag(freqs).contiguous()
        return _plain(q, k, cos, sin, freqs is not None or cos.shape[-1] * 2 == q.shape[-1])
    p = match.params
    if freqs is not None:
        f = _table(freqs, p["table_chains"]["freqs"], p["squeeze"])
        cos, sin = torch.real(f), torch.imag(f)
    else:
        cos = _table(cos, p["table_chains"]["cos"], p["squeeze"])
        sin = _table(sin, p["table_chains"]["sin"], p["squeeze"])
        if p["interleaved"] and not p["one_angle_per_pair"]:  # one angle per pair: the even channels
            cos, sin = cos[..., ::2], sin[..., ::2]
    if not p["interleaved"] and p["one_angle_per_pair"]:
        # chunked / complex halves: pair (i, h + i) has angle i; the kernel's halves form reads both
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    if p["neg_sin"]:  # rotation by -theta: exact, x * -s is -(x * s)
        sin = torch.neg(sin)
    res = _run(q, k, cos, sin, p)
    return tuple(res) if k is not None else res[0]


_EXAMPLES = {"q": torch.randn(2, 4, 5, 8), "k": torch.randn(2, 2, 5, 8), "cos": torch.randn(5, 8),
             "sin": torch.randn(5, 8), "half": 4, "rot_end": 8, "pass_start": 8,
             "cos2": torch.randn(5, 4), "sin2": torch.randn(5, 4),
             "freqs": torch.polar(torch.ones(5, 4), torch.randn(5, 4))}

register(
    "rope", [rope_partial, *_PARTIAL_SIGNED, rope_pairs_partial, rope_rotate_half, *_ROT_SIGNED,
             rope_pairs, rope_complex, rope_complex_halves, rope_complex_to_halves, rope_stack,
             *_CHUNK, *_EVEN_ODD],
    replace, _EXAMPLES,
    # before the norms (10-11): a q/k norm applied after the rotation (HunYuan) must not take the
    # rotation's final `x*cos + rot(x)*sin` add for a residual add
    constraints=check, priority=15, allow_casts=True, builtin=True,
    look_alikes={lookalike_complex_halves_to_pairs: _HALVES_TO_PAIRS},
    description="RoPE of q and k (rotate_half, partial rotary, complex) -> one liger::rope launch",
)
register(
    "rope_single", [rope_single_partial, *_PARTIAL_SIGNED_SINGLE, rope_single_pairs_partial,
                    rope_single_rotate_half, *_ROT_SIGNED_SINGLE, rope_single_pairs,
                    rope_single_complex, rope_single_complex_halves,
                    rope_single_complex_to_halves, rope_single_stack,
                    *_CHUNK_SINGLE, *_EVEN_ODD_SINGLE],
    replace, _EXAMPLES, constraints=check, priority=14, allow_casts=True, builtin=True,
    look_alikes={lookalike_single_complex_halves_to_pairs: _HALVES_TO_PAIRS},
    description="RoPE of one tensor (tables not shared with another) -> liger::rope",
)
