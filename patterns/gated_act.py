"""`swiglu` / `geglu` / `relu_sq_glu`: a gated MLP's `act(gate) * up` -> `liger::gated_act`, and
`relu_sq`: a non-gated MLP's `relu(x) ** 2` (Nemotron's relu2) -> `liger::act`.

The patterns are the math: `silu(gate) * up` (also spelled `gate * sigmoid(gate) * up`) and
`gelu(gate) * up`, exact or tanh-approximated (transformers' `gelu_pytorch_tanh` is `F.gelu(x,
approximate="tanh")` once Dynamo inlines it; its `gelu_new` is the tanh formula written out, a
variant here).  gate and up are whatever feeds them: two linears, or the two halves of one fused
projection (`chunk` / `split` / slices, as Phi3 and grouped-expert MoEs do), which the canonical
view spells as slices the kernel reads in place.

The kernel computes act(gate) in fp32, rounds it to the input dtype and multiplies by up in fp32,
exactly as eager `act(gate) * up` does in any one dtype.  Explicit casts are replayed outside the
kernel when that reproduces eager's roundings (`check` works out how), otherwise the match is a
near miss.  relu² is two graph nodes (`relu`, then a square in any spelling the canonical view
folds: `** 2`, `pow(2)`, `square`, `r * r`); relu is exact, so the square is its one rounding and
bf16/fp16 code is reproduced, provided no cast sits between the two.  This module also holds the
cast helpers the RoPE patterns share.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.proxy import Proxy

import ligerfx.kernels.gated_act  # defines torch.ops.liger.gated_act; its +inf rule is read here
from ligerfx.graph.nodes import CAST_METHODS, node_value
from ligerfx.compiler.pattern import register
from ligerfx.graph.precision import is_free_cast
from ligerfx.graph.symbolic import known_equal

# ---------------------------------------------------------------------------------------------
# Cast helpers (shared with patterns/rope.py).

_LOW = (torch.bfloat16, torch.float16)
_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def dtype_of(n):
    return getattr(node_value(n), "dtype", None) if isinstance(n, fx.Node) else None


def _is_cast(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target in CAST_METHODS


def cast_chain(use, bound) -> list | None:
    """dtypes of the real casts from `bound` to `use` in program order; None if `use` is not
    `bound` behind casts."""
    steps = []
    while use is not bound:
        if not _is_cast(use):
            return None
        steps.append(use)
        use = use.args[0]
    chain, prev = [], dtype_of(bound)
    for n in reversed(steps):
        dt = dtype_of(n)
        if dt != prev:
            chain.append(dt)
            prev = dt
    return chain


def use_chain(match, name: str) -> list | str:
    """The cast chain between a bound input and every use of it inside the match, or a reason
    when its uses see it cast differently."""
    bound = match[name]
    inside = set(match.covered)
    chains = []
    for n in match.covered:
        # a cast's other arguments (`type_as(x)`) only give it a dtype
        data = n.args[:1] if _is_cast(n) else n.all_input_nodes
        for a in data:
            if not isinstance(a, fx.Node) or a in inside:
                continue
            c = cast_chain(a, bound)
            if c is not None and c not in chains:
                chains.append(c)
    if len(chains) > 1:
        return f"`{name}` is cast differently at its uses ({chains})"
    return chains[0] if chains else []


def trailing_chain(match, i: int = 0) -> list:
    """dtypes of the casts after output i that the match absorbed (program order)."""
    return cast_chain(match.outputs[i], match.tops[i])


def internal_casts(match) -> list:
    """Real casts inside the match, not counting the trailing ones."""
    trailing = set()
    for top, out in zip(match.tops, match.outputs):
        n = out
        while n is not top:
            trailing.add(n)
            n = n.args[0]
    return [c for c in match.casts if c not in trailing]


widens = is_free_cast  # every value of dtype a is exactly a value of dtype b (precision.py)


def to_dtype(x, dt, value=None):
    """x.to(dt) for a tensor or an fx Proxy.  A Proxy's new node gets its example value (the
    rewriter fills them in only for call_function nodes), from x's or the given `value`."""
    if dt is None:
        return x
    y = x.to(dt)
    if isinstance(y, Proxy):
        v = value if value is not None else node_value(x.node)
        if v is not None:
            y.node.meta["example_value"] = v.to(dt)
    return y


def apply_chain(x, chain, value=None):
    for dt in chain:
        x = to_dtype(x, dt, value)
        value = None if value is None else value.to(dt)
    return x


# ---------------------------------------------------------------------------------------------
# Patterns.

_GELU_C = math.sqrt(2.0 / math.pi)


def swiglu(gate, up):
    """SwiGLU: silu(gate) * up."""
    return F.silu(gate) * up


def swiglu_sigmoid(gate, up):
    return gate * torch.sigmoid(gate) * up


def geglu(gate, up, approximate):
    """GeGLU: gelu(gate) * up, exact or tanh-approximated."""
    return F.gelu(gate, approximate=approximate) * up


def geglu_new(gate, up, tanh_form):
    # transformers' NewGELUActivation ("gelu_new"), i.e. the tanh approximation written out.
    # `tanh_form` is never bound by a match; its example value tells the replacement which gelu
    # this spelling is when it runs on plain tensors (registration and check_pattern).
    return 0.5 * gate * (1.0 + torch.tanh(_GELU_C * (gate + 0.044715 * torch.pow(gate, 3.0)))) * up


def geglu_erf(gate, up):
    # transformers' GELUActivation(use_gelu_python=True): exact gelu written with erf
    return gate * 0.5 * (1.0 + torch.erf(gate / math.sqrt(2.0))) * up


def relu_sq_glu(gate, up):
    """Squared-ReLU GLU: relu(gate) ** 2 * up."""
    return torch.square(F.relu(gate)) * up


def relu_sq(x):
    """Squared ReLU: relu(x) ** 2 (also `square(relu(x))`, `relu(x) * relu(x)`)."""
    return torch.square(F.relu(x))


# variants whose activation rounds once, at this graph node (relu² is exact up to its square)
_ACT_OP = {swiglu: "silu", geglu: "gelu", relu_sq_glu: "square"}


def _activation(match) -> str:
    fn = match.variant.fn
    if fn is swiglu:
        return "silu"
    if fn is swiglu_sigmoid:
        # computed as written: sigmoid rounded, then the product (F.silu's x / (1 + exp(-x)) and
        # its one-formula gradient round differently)
        return "silu_product"
    if fn is geglu_erf:
        # computed as written (F.gelu is another function: NaN at +inf on CPU in fp32/bf16 where
        # the formula gives +inf, and its own roundings and gradient formula)
        return "gelu_erf"
    if fn is geglu_new:
        return "gelu_tanh"
    if fn in (relu_sq_glu, relu_sq):
        return "relu_sq"
    return "gelu_tanh" if match["approximate"] == "tanh" else "gelu"


def _act_side_dtype(match, act: fx.Node):
    """dtype of act(gate) where it enters the final multiply (after any casts in between)."""
    top = match.tops[0]
    for a in top.all_input_nodes:
        if cast_chain(a, act) is not None:
            return dtype_of(a)
    return None


def _act_side_chain(match, act: fx.Node) -> list:
    """The casts between act(gate) and the final multiply (dtypes, program order)."""
    for a in match.tops[0].all_input_nodes:
        c = cast_chain(a, act)
        if c is not None:
            return c
    return []


def check(match):
    gate, up = match.value("gate"), match.value("up")
    if "approximate" in match.bindings and match["approximate"] not in ("none", "tanh"):
        return f"gelu approximate={match['approximate']!r} is not 'none' or 'tanh'"
    if gate.dim() != up.dim() or not all(known_equal(a, b) for a, b in zip(gate.shape, up.shape)):
        return (f"gate {tuple(gate.shape)} and up {tuple(up.shape)} do not have the same shape "
                "(the product broadcasts)")
    g_chain, u_chain = use_chain(match, "gate"), use_chain(match, "up")
    for c in (g_chain, u_chain):
        if isinstance(c, str):
            return c
    problem = _relu_square_problem(match)
    if problem:
        return problem
    g_use = g_chain[-1] if g_chain else gate.dtype
    u_use = u_chain[-1] if u_chain else up.dtype
    prod = getattr(node_value(match.tops[0]), "dtype", None)
    if prod not in _FLOATS or g_use not in _FLOATS:
        return f"computes in {prod}, not a floating dtype the kernel handles"
    if not widens(u_use, prod):
        return f"up enters the product as {u_use} but the product is {prod}"
    act_op = _ACT_OP.get(match.variant.fn)
    note = ""
    if act_op is None:
        # act written out op by op: no cast may sit inside it
        if internal_casts(match):
            return "casts inside the written-out activation, which the kernel does not reproduce"
        if g_use != prod:
            return f"the activation computes in {g_use} but the product in {prod}"
        if prod in _LOW:
            # eager rounds after every op of the written-out activation; the kernel computes the
            # activation in fp32 and rounds once: not the same values
            return (f"the written-out activation computes in {str(prod).replace('torch.', '')}, "
                    "where eager rounds each op; the kernel rounds once (not reproduced)")
        gate_in = ("chain", g_chain)
    else:
        act_node = match.nodes_of(act_op)[0]
        a_dt = _act_side_dtype(match, act_node)
        a_chain = _act_side_chain(match, act_node)
        lossy = [d for d in a_chain if d not in _FLOATS or not widens(prod, d)]
        if lossy:
            # the kernel rounds act(gate) once, to the product dtype; a cast to a narrower or
            # integer dtype in between rounds (or truncates, cutting the gradient) where it does not
            return (f"act(gate) is cast through {lossy[0]} before the product "
                    f"({str(prod).replace('torch.', '')}); the kernel does not reproduce that cast")
        if g_use == prod and a_dt == prod:
            gate_in = ("chain", g_chain)  # act in the product dtype: eager's roundings exactly
        elif (a_dt == prod and g_use == torch.float32 and gate.dtype == prod
              and all(widens(a, b) for a, b in zip([gate.dtype] + g_chain, g_chain))):
            # act(gate.float()).to(prod): the kernel's fp32 act rounded to prod is the same,
            # except where eager's fp32 act differs from prod's at +inf (CPU's vectorized exact
            # gelu gives NaN in fp32 where its fp16 kernel, and the op for a prod gate, give +inf)
            name = _activation(match)
            at32, atp = (ligerfx.kernels.gated_act._eager_at_inf(name, d, gate.device)
                         for d in (torch.float32, prod))
            if not (at32 == atp or (at32 != at32 and atp != atp)):
                return (f"act(gate) is computed in float32, where eager gives {at32} at +inf on "
                        f"{gate.device.type}, and the op for a {str(prod).replace('torch.', '')} "
                        f"gate gives {atp} (the kernel rounds act(gate) to the product dtype)")
            gate_in = ("chain", [])
            note = "; fp32 activation"
        else:
            return (f"act(gate) is computed in {g_use} and enters the product as {a_dt}, the "
                    f"product is {prod}: the kernel rounds act(gate) to the product dtype")
    match.params.update(gate_chain=gate_in[1], up_chain=u_chain, dtype=prod,
                        out_chain=trailing_chain(match), activation=_activation(match))
    act = match.params["activation"]
    if act == "silu_product":
        act, note = "silu", note + "; g * sigmoid(g) as written"
    elif act == "gelu_erf":
        act, note = "gelu", note + "; erf formula as written"
    match.detail = f"{act}, {str(prod).replace('torch.', '')}{note}"
    return None


def _relu_square_problem(match):
    """relu² is reproduced only when relu's value is squared as computed: a cast in between would
    round (or widen) it where the kernel does not."""
    if "relu" not in {pc.op for pc in match.variant.view.cnodes()}:
        return None
    relu, sq = match.nodes_of("relu")[0], match.nodes_of("square")[0]
    chain = cast_chain(sq.args[0], relu)
    if chain:
        return (f"relu's value is cast to {chain[-1]} before it is squared; the kernel squares "
                "it in the dtype relu computes in")
    return None


def check_relu_sq(match):
    """The non-gated relu²: the kernel computes in the dtype the square computes in."""
    x = match.value("x")
    chain = use_chain(match, "x")
    if isinstance(chain, str):
        return chain
    problem = _relu_square_problem(match)
    if problem:
        return problem
    dt = dtype_of(match.tops[0])
    if dt not in _FLOATS:
        return f"computes in {dt}, not a floating dtype the kernel handles"
    if (chain[-1] if chain else x.dtype) != dt:
        return f"relu reads {chain[-1] if chain else x.dtype} but the square computes in {dt}"
    match.params.update(x_chain=chain, out_chain=trailing_chain(match))
    match.detail = f"relu_sq, {str(dt).replace('torch.', '')}"
    return None


def replace_relu_sq(x, *, match=None):
    if match is None:
        return torch.ops.liger.act(x, "relu_sq")
    p = match.params
    y = torch.ops.liger.act(apply_chain(x, p["x_chain"]), "relu_sq")
    return apply_chain(y, p["out_chain"], node_value(match.tops[0]))


def _replace_relu_sq_glu(gate, up, *, match=None):
    if match is None:
        return torch.ops.liger.gated_act(gate, up, "relu_sq")
    return replace(gate, up, match=match)


def replace(gate, up, approximate="none", tanh_form=False, *, match=None):
    if match is None:  # registration check on plain tensors
        act = "gelu_tanh" if approximate == "tanh" or tanh_form else "gelu"
        return torch.ops.liger.gated_act(gate, up, act)
    p = match.params
    g = apply_chain(gate, p["gate_chain"])
    if dtype_of(g.node) != p["dtype"]:
        g = to_dtype(g, p["dtype"])
    u = apply_chain(up, p["up_chain"])
    if dtype_of(u.node) != p["dtype"]:
        u = to_dtype(u, p["dtype"])
    y = torch.ops.liger.gated_act(g, u, p["activation"])
    return apply_chain(y, p["out_chain"], node_value(g.node))


def _replace_silu(gate, up, *, match=None):
    if match is None:  # the registration check runs the replacement on plain tensors
        return torch.ops.liger.gated_act(gate, up, "silu")
    return replace(gate, up, match=match)


_EXAMPLES = {"gate": torch.randn(2, 3, 8), "up": torch.randn(2, 3, 8), "approximate": "none",
             "tanh_form": True}

register(
    "swiglu", [swiglu, swiglu_sigmoid], _replace_silu, _EXAMPLES,
    constraints=check, priority=5, allow_casts=True, builtin=True,
    description="SwiGLU silu(gate) * up (two linears or one fused gate_up) -> liger::gated_act",
)
register(
    "geglu", [geglu, geglu_new, geglu_erf], replace, _EXAMPLES,
    constraints=check, priority=5, allow_casts=True, builtin=True,
    description="GeGLU gelu(gate) * up (exact, tanh, gelu_new) -> liger::gated_act",
)
register(
    "relu_sq_glu", [relu_sq_glu], _replace_relu_sq_glu, _EXAMPLES,
    constraints=check, priority=5, allow_casts=True, builtin=True,
    description="squared-ReLU GLU relu(gate)**2 * up -> liger::gated_act",
)
# below the gated form: a relu² that feeds `* up` is the gated pattern's
register(
    "relu_sq", [relu_sq], replace_relu_sq, {"x": torch.randn(2, 3, 8)},
    constraints=check_relu_sq, priority=4, allow_casts=True, builtin=True,
    description="squared ReLU relu(x)**2 of a non-gated MLP (Nemotron relu2) -> liger::act",
)
