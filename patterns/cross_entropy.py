"""`cross_entropy` and `fused_linear_cross_entropy`: the loss, and the lm head fused into it.

Both anchor on `F.cross_entropy(logits, target, ...)`.  Above the loss, the logits usually pass
through a short chain of row-wise steps: casts (`.float()`), reshapes that flatten the leading
dims (`.view(-1, V)`), slices along the sequence (`[:, :-1]`, the label shift), scaling
(`/ temperature`) and softcapping (`cap * tanh(x / cap)`, Gemma 2).  `_walk` reads that chain;
`_parse_scale` proves the elementwise part equals `softcap * tanh(z * logit_scale / softcap)` (or
`z * logit_scale`), which the kernels compute.

- When the chain starts at a linear layer (`F.linear`, or `@` with a transposed weight), the
  whole thing becomes `liger::fused_linear_cross_entropy`: the kernel walks the tokens in chunks,
  so the [N, V] logits never exist for the loss.  Slices in the chain are applied to the hidden
  states instead (a linear is row-wise).  If the model also returns the logits (Hugging Face
  does), the op writes them in the same pass and the steps up to the returned value are replayed
  on them; `skip_logits=True` drops them instead (they become an empty tensor: the report says so).
- Otherwise the loss alone becomes `liger::cross_entropy`.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

import ligerfx.kernels.cross_entropy  # noqa: F401 - defines torch.ops.liger.cross_entropy
import ligerfx.kernels.fused_linear_cross_entropy  # noqa: F401
from ligerfx.graph.nodes import CAST_METHODS, node_value
from ligerfx.kernels.fused_linear_cross_entropy import grads_from_logits
from ligerfx.kernels.cross_entropy import compute_dtype
from ligerfx.compiler.passes import Skip
from ligerfx.compiler.pattern import register
from ligerfx.graph.precision import LOW, chain_problem, short
from ligerfx.graph.symbolic import known_equal

_RESHAPES = {"view", "reshape", "flatten"}
_LINEARS = {F.linear, torch._C._nn.linear}


def ce(logits, target, ignore_index, reduction, label_smoothing):
    """Cross-entropy loss (F.cross_entropy / nn.CrossEntropyLoss), with its logits chain."""
    return F.cross_entropy(logits, target, None, None, ignore_index, None, reduction,
                           label_smoothing)


def ce_weighted(logits, target, weight, ignore_index, reduction, label_smoothing):
    return F.cross_entropy(logits, target, weight, None, ignore_index, None, reduction,
                           label_smoothing)


def nll_log_softmax(logits, target, ignore_index, reduction):
    # F.cross_entropy is exactly nll_loss(log_softmax(logits, class dim)) in torch
    return F.nll_loss(F.log_softmax(logits, -1), target, None, None, ignore_index, None, reduction)


def nll_log_softmax_weighted(logits, target, weight, ignore_index, reduction):
    return F.nll_loss(F.log_softmax(logits, -1), target, weight, None, ignore_index, None,
                      reduction)


def log_prob_gather(logits, target):
    # The per-token log-prob at the gathered label; its negation (the per-token NLL) is this
    # match with the user's `-` left in the graph (negation is exact).  The user's masking and
    # averaging stay in the graph too, so eager's arithmetic on ignored rows is kept.
    return F.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


_NLL = (nll_log_softmax, nll_log_softmax_weighted, log_prob_gather)
_GATHER = (log_prob_gather,)
_VARIANTS = [ce, ce_weighted, nll_log_softmax, nll_log_softmax_weighted, log_prob_gather]

_EXAMPLES = {"logits": torch.randn(6, 10), "target": torch.randint(0, 10, (6,)),
             "weight": torch.rand(10) + 0.5, "ignore_index": -100, "reduction": "mean",
             "label_smoothing": 0.0}


# -- reading the chain above the loss ------------------------------------------------------------

def _val(n):
    return node_value(n) if isinstance(n, fx.Node) else n


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _step(n: fx.Node):
    """(kind, info, input node) for a row-wise step, or None."""
    if not isinstance(n, fx.Node) or n.op not in ("call_method", "call_function"):
        return None
    t, a = n.target, n.args
    vin = _val(a[0]) if a else None
    vout = _val(n)
    if n.op == "call_method" and t in CAST_METHODS and isinstance(a[0], fx.Node):
        if getattr(vin, "device", None) != getattr(vout, "device", None):
            return None
        return "cast", vout.dtype, a[0]
    is_reshape = (n.op == "call_method" and t in _RESHAPES) or t in (torch.reshape, torch.flatten)
    if is_reshape and isinstance(a[0], fx.Node):
        if (isinstance(vin, torch.Tensor) and isinstance(vout, torch.Tensor) and vout.dim() == 2
                and vin.dim() >= 2 and known_equal(vin.shape[-1], vout.shape[-1])):
            return "rows", None, a[0]
        return None
    if t is operator.getitem and isinstance(a[0], fx.Node) and isinstance(vin, torch.Tensor):
        idx = a[1] if isinstance(a[1], tuple) else (a[1],)
        if not all(isinstance(i, slice) or i is Ellipsis for i in idx):
            return None
        if Ellipsis in idx or len(idx) >= vin.dim():
            last = idx[-1]
            if not (isinstance(last, slice) and last == slice(None)):
                return None
        if not all(isinstance(v, (int, type(None))) for i in idx if isinstance(i, slice)
                   for v in (i.start, i.stop, i.step)):
            return None
        return "slice", a[1], a[0]
    if t in (operator.mul, torch.mul, operator.truediv, torch.div) or (
            n.op == "call_method" and t in ("mul", "div")):
        if n.kwargs or len(a) != 2:
            return None
        x, c = a
        div = t in (operator.truediv, torch.div) or t == "div"
        if not div and _is_num(x) and isinstance(c, fx.Node):
            x, c = c, x
        if isinstance(x, fx.Node) and _is_num(c) and c != 0:
            return "scale", (1.0 / c if div else float(c)), x
        return None
    if (t is torch.tanh or (n.op == "call_method" and t == "tanh")) and not n.kwargs:
        return "tanh", None, a[0]
    return None


def _loss_input(match) -> fx.Node:
    """The logits the loss reads (the log-softmax's input for nll_loss(log_softmax(...)))."""
    n = match.nodes_of("log_softmax")[0] if match.variant.fn in _NLL else match.tops[0]
    return n.args[0]


def _dtype_cast(match):
    """(log_softmax node, "cast", dtype) when the log-softmax casts its input (`dtype=`)."""
    if match.variant.fn not in _NLL:
        return None
    ls = match.nodes_of("log_softmax")[0]
    vin, vout = _val(ls.args[0]), _val(ls)
    if not isinstance(vin, torch.Tensor) or vin.dtype == vout.dtype:
        return None
    return ls, "cast", vout.dtype


def _walk(match):
    """Steps from the loss's logits upward: (top node, [(node, kind, info)] from top down)."""
    steps = []
    cur = _loss_input(match)
    ls = _dtype_cast(match)
    if ls is not None:  # `log_softmax(x, dtype=...)`: its cast is the step nearest the loss
        steps.append(ls)
    while True:
        s = _step(cur)
        if s is None:
            break
        steps.append((cur, s[0], s[1]))
        cur = s[2]
    return cur, steps[::-1]


def _parse_scale(steps):
    """(logit_scale, softcap) such that the elementwise steps equal the kernels' transform."""
    k, c, seen_tanh = 1.0, 1.0, False
    for _, kind, info in steps:
        if kind == "scale":
            if seen_tanh:
                c *= info
            else:
                k *= info
        elif kind == "tanh":
            if seen_tanh:
                return None
            seen_tanh = True
    if not seen_tanh:
        return k, 0.0
    if c <= 0 or not math.isfinite(c) or not math.isfinite(k):
        return None
    return k * c, c  # c * tanh(k z) = softcap * tanh(z * logit_scale / softcap)


def _linear(top: fx.Node):
    """(hidden, weight, bias) when `top` is a linear layer, else None."""
    if top.op == "call_function" and top.target in _LINEARS:
        a = list(top.args) + [None] * (3 - len(top.args))
        bias = top.kwargs.get("bias", a[2])
        return a[0], a[1], bias
    if top.op == "call_function" and top.target in (operator.matmul, torch.matmul):
        h, wt = top.args
        if isinstance(wt, fx.Node) and wt.op in ("call_method", "call_function"):
            w = None
            if wt.target in ("t", torch.t) or (wt.target in ("transpose", torch.transpose)
                                                and set(wt.args[1:]) in ({0, 1}, {-1, -2})):
                w = wt.args[0]
            if w is not None and getattr(_val(w), "dim", lambda: 0)() == 2:
                return h, w, None
    return None


def _escaping(nodes, inside):
    return [n for n in nodes if any(u not in inside for u in n.users)]


def _gather_checks(match):
    """The gathered variant: the label tensor must index every row of the log-softmax once."""
    logits, target = match.value("logits"), match.value("target")
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        return "the log-softmax input is not a tensor with a class dim"
    if target.dtype not in (torch.int64, torch.int32):
        return "the gathered labels are not int64/int32"
    # gather accepts an index smaller than the input in the non-gathered dims (it then reads a
    # corner of it); the op reads every row, so the shapes must agree exactly.
    if target.dim() != logits.dim() - 1 or not all(
            known_equal(a, b) for a, b in zip(target.shape, logits.shape[:-1])):
        return (f"the gathered labels have shape {tuple(target.shape)}, not the log-softmax's "
                f"rows {tuple(logits.shape[:-1])}")
    return None


def _common_checks(match):
    if match.variant.fn in _GATHER:
        return _gather_checks(match)
    logits, target = match.value("logits"), match.value("target")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        return "the loss's input is not 2-D [tokens, classes] (class dim 1 of N-D input is not supported)"
    if target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
        return "the target is not a 1-D tensor of class indices (probability targets are not supported)"
    if not isinstance(match["reduction"], str) or match["reduction"] not in ("mean", "sum", "none"):
        return f"reduction {match['reduction']!r} is not mean, sum or none"
    for name in ("ignore_index", "label_smoothing"):
        v = match.bindings.get(name, 0.0)
        if not _is_num(v) and not isinstance(v, fx.Node):
            return f"`{name}` is not a number"
    return None


def _cast_problem(steps, start_dtype, match=None):
    """Why the kernels (which read the logits, upcast them to the compute dtype, then scale and
    softcap there) would not reproduce the chain's dtypes, or None.  Every cast must be free
    (value-preserving: `.to(int32)`, bf16 -> fp16 and narrowing casts are not), the scaling and
    softcap must compute in the compute dtype, and so must the loss itself (a loss on fp16/bf16
    logits rounds its log-softmax there).  Under option upcast_statistics the loss, with the
    scaling / softcap feeding it, may be computed in fp32 where the code uses fp16/bf16."""
    ct = compute_dtype(start_dtype)
    dts = [start_dtype] + [info for _, kind, info in steps if kind == "cast"]
    problem = chain_problem(dts, "the logits")
    if problem:
        return problem
    dt, lower = start_dtype, None
    for n, kind, info in steps:
        if kind == "cast":
            dt = info
        elif kind in ("scale", "tanh") and dt != ct:
            if dt not in LOW or ct != torch.float32:
                return (f"the logits are scaled/softcapped in {short(dt)} at `{n.name}`; the "
                        f"kernel does that in {short(ct)}")
            lower = lower or (f"scales/softcaps the logits in {short(dt)} at `{n.name}`")
    if dt != ct:
        if dt not in LOW or ct != torch.float32:
            return f"the loss reads {short(dt)} logits; the kernel computes in {short(ct)}"
        lower = lower or f"computes the loss on {short(dt)} logits"
    if lower is None:
        return None
    if not getattr(getattr(match, "options", None), "upcast_statistics", False):
        return (f"the code {lower} (eager rounds there); the kernel computes in {short(ct)}: "
                "set option upcast_statistics=True to accept that")
    note = (f"upcast_statistics: {match.pattern.name} at `{match.tops[0].name}` computes in "
            f"{short(ct)} where the code {lower} (not bit-equal)")
    if note not in match.notes:
        match.notes.append(note)
    return None


# -- fused_linear_cross_entropy -------------------------------------------------------------

def lm_head_of(top, steps, match):
    """The lm head under a logits chain `top -> steps` (`_walk`'s form), for every pattern that
    fuses a linear with what reads its logits: None when `top` is no linear, a near-miss reason
    when the chain cannot be fused, else (hidden, weight, bias, (scale, softcap), slices, kinds)."""
    lin = _linear(top)
    if lin is None:
        return None
    hidden, weight, bias = lin
    hv, wv = _val(hidden), _val(weight)
    if not isinstance(hv, torch.Tensor) or not isinstance(wv, torch.Tensor) or wv.dim() != 2:
        return "the linear's weight is not a 2-D tensor"
    if bias is not None and not isinstance(bias, fx.Node):
        return "the linear's bias is not a tensor"
    if not known_equal(wv.shape[1], hv.shape[-1]):
        return "the linear's weight does not match the hidden size"
    scale = _parse_scale(steps)
    if scale is None:
        return "the logits pass through elementwise steps other than scaling and softcapping"
    problem = _cast_problem(steps, _val(top).dtype, match)
    if problem:
        return problem
    slices = [info for _, kind, info in steps if kind in ("slice", "rows")]
    kinds = [kind for _, kind, _ in steps if kind in ("slice", "rows")]
    if "rows" in kinds and "slice" in kinds[kinds.index("rows"):]:
        return "the logits are sliced after being flattened to rows"
    return hidden, weight, bias, scale, slices, kinds


def check_fused(match):
    problem = _common_checks(match)
    if problem:
        return problem
    top, steps = _walk(match)
    head = lm_head_of(top, steps, match)
    if head is None:
        raise Skip  # no lm head in this graph: the plain cross_entropy pattern handles the loss
    if isinstance(head, str):
        return head
    hidden, weight, bias, scale, slices, kinds = head
    chain = [top] + [n for n, _, _ in steps]
    inside = set(chain) | set(match.covered)
    escaping = _escaping(chain, inside)
    if len(escaping) > 1:
        return (f"{len(escaping)} intermediate logits values are used outside the loss "
                f"({', '.join(n.name for n in escaping)}); at most one can be returned")
    skip_logits = bool(getattr(match.options, "skip_logits", False))
    if escaping and not skip_logits:
        problem = _escape_after_upcast(top, escaping[0])
        if problem:
            return problem
    match.covered = list(dict.fromkeys(match.covered + chain))
    match.params.update(logit_scale=scale[0], softcap=scale[1], slices=slices, kinds=kinds,
                        replay=[], escaping=None, skip_logits=skip_logits, linear=top)
    match.bindings.update(hidden=hidden, lm_weight=weight, lm_bias=bias)
    if escaping:
        e = escaping[0]
        match.params["escaping"] = e
        match.params["replay"] = chain[1:chain.index(e) + 1]
        match.outputs = [match.outputs[0], e]
        match.tops = [match.tops[0], e]
        match.detail = ("logits dropped (skip_logits=True): the returned logits are an empty tensor"
                        if skip_logits else "logits also returned, written by the same pass")
        if skip_logits:
            match.dropped[1] = "skip_logits=True: the logits are not materialised (an empty tensor)"
            match.notes.append("skip_logits=True: the logits output of the fused lm head + loss "
                               "is an empty tensor, not the logits")
    return None


def _escape_after_upcast(linear, e):
    """A reason when the logits read outside the loss (`e`) are the fp16 / bf16 head's output
    cast up: eager then adds that reader's gradient to the loss's in the wider dtype and rounds
    the sum to the head's dtype once, at the cast; the op returns the head's logits, so the two
    gradients would be rounded apart and added after (issue 22 logprob survey seed 311211: bias
    gradient 1.5x eager's error in bf16)."""
    low, wide = _val(linear), _val(e)
    if not isinstance(low, torch.Tensor) or not isinstance(wide, torch.Tensor):
        return None
    if low.dtype not in (torch.float16, torch.bfloat16) or wide.dtype == low.dtype:
        return None
    return (f"the logits `{e.name}` are also read outside the loss after the {low.dtype} lm "
            f"head's output `{linear.name}` is cast to {wide.dtype}: eager adds that reader's "
            f"gradient to the loss's in {wide.dtype} and rounds the sum once, where the fused op "
            f"would round the two apart; read the head's own output `{linear.name}` there, or "
            "compute the head in fp32")


def _gather_args(reduction, ignore_index):
    """(reduction, ignore_index) for the op; for the gathered variant (no reduction bound) the
    op computes every row ("none" with an ignore_index no label can equal, the labels being
    checked in [0, V) first, as eager's gather raises for them)."""
    if reduction is not None:
        return reduction, ignore_index
    return "none", -1


def _check_labels(target, V: int):
    # eager's gather raises for an out-of-range label; keep that error (an async assert: no host
    # sync on CUDA, where eager's gather fails with a device-side assert too)
    torch._assert_async(((target >= 0) & (target < V)).all(),
                        "gather(): a label is out of range [0, number of classes)")


def replace_fused(target, hidden, lm_weight, lm_bias=None, weight=None, ignore_index=-100,
                  reduction="mean", label_smoothing=0.0, *, match=None):
    p = match.params
    gathered = reduction is None
    reduction, ignore_index = _gather_args(reduction, ignore_index)
    if gathered:
        _check_labels(target, match.value("lm_weight").shape[0])
    h = hidden
    # Slices of the logits (all before any flattening, checked) are slices of the hidden states;
    # the op flattens leading dims itself, so the logits it returns keep the sliced shape.
    for kind, info in zip(p["kinds"], p["slices"]):
        if kind == "slice":
            h = h[info]
    hv, wv = match.value("hidden"), match.value("lm_weight")
    bias_grad = lm_bias is not None and bool(getattr(_val(match["lm_bias"]), "requires_grad", False))
    escaping = p["escaping"]
    ret_logits = escaping is not None and not p["skip_logits"]
    # The op's logits-gradient mode, decided now (the environment says whether this compile is
    # for the interpreter) and written into the graph: its outputs then depend on the graph
    # alone, not on the environment of the process that runs it (see the op's logits_mode).
    logits_mode = int(grads_from_logits(hv, wv, ret_logits, reduction))
    out = torch.ops.liger.fused_linear_cross_entropy(
        h, lm_weight, lm_bias, target, weight, ignore_index, reduction, float(label_smoothing),
        0.0, float(p["softcap"]), float(p["logit_scale"]), ret_logits,
        bool(hv.requires_grad), bool(wv.requires_grad), bias_grad, 0, logits_mode)
    loss = (-out[0] if gathered else out[0]).to(match.out_dtype)
    if escaping is None:
        return loss
    if p["skip_logits"]:
        ev = _val(escaping)
        return loss, torch.empty(0, dtype=ev.dtype, device=ev.device)
    logits = out[2]
    prev = p["linear"]
    for n in p["replay"]:  # the steps between the linear and the returned logits, on the op's logits
        if _step(n)[0] != "slice":  # slices were already applied to the hidden states
            args = tuple(logits if a is prev else a for a in n.args)
            logits = logits.tracer.create_proxy(n.op, n.target, args, dict(n.kwargs))
        prev = n
    return loss, logits


# -- cross_entropy (no lm head in reach) -----------------------------------------------------

def check_plain(match):
    problem = _common_checks(match)
    if problem:
        return problem
    _, steps = _walk(match)
    # Absorb the casts, flattening reshapes and scale/softcap steps right above the loss that
    # nothing else reads; stop at the first slice (the op reads whole rows of its input).
    absorbed = []
    inside = set(match.covered)
    for n, kind, info in reversed(steps):
        if kind == "slice" or any(u not in inside for u in n.users):
            break
        absorbed.append((n, kind, info))
        inside.add(n)
    absorbed.reverse()
    while absorbed and absorbed[0][1] == "rows":  # keep the op's input as the user's tensor
        absorbed.pop(0)
    scale = _parse_scale(absorbed)
    if scale is None:
        absorbed, scale = [], (1.0, 0.0)
    src = absorbed[0][0].args[0] if absorbed else _loss_input(match)
    problem = _cast_problem(absorbed, _val(src).dtype, match)
    if problem:
        # the steps stay in the graph; the op reads the loss's own input, which must then be in
        # the compute dtype itself
        absorbed, scale, src = [], (1.0, 0.0), _loss_input(match)
        ls = _dtype_cast(match)  # the log-softmax's own cast cannot stay behind: it is covered
        absorbed = [ls] if ls is not None else []
        problem = _cast_problem(absorbed, _val(src).dtype, match)
        if problem:
            return problem
    match.covered = list(dict.fromkeys(match.covered + [n for n, _, _ in absorbed]))
    match.bindings["source"] = src
    match.params.update(logit_scale=scale[0], softcap=scale[1])
    if scale[1]:
        match.detail = f"softcap {scale[1]:g} fused"
    return None


def replace_plain(logits, target, weight=None, ignore_index=-100, reduction=None,
                  label_smoothing=0.0, source=None, *, match=None):
    # reduction is bound by every variant but the gathered log-prob (see _gather_args)
    x = source if source is not None else logits
    gathered = reduction is None
    reduction, ignore_index = _gather_args(reduction, ignore_index)
    if gathered:
        _check_labels(target, logits.shape[-1])
    if match is None:  # registration check on the example inputs
        p, need_grad = {"logit_scale": 1.0, "softcap": 0.0}, True
    else:
        p, need_grad = match.params, bool(match.value("source").requires_grad)
    loss = torch.ops.liger.cross_entropy(
        x.flatten(0, -2) if x.dim() != 2 else x, target, weight, ignore_index,
        reduction, float(label_smoothing), 0.0, float(p["softcap"]), float(p["logit_scale"]),
        need_grad)[0]
    if gathered:
        loss = -loss  # the op gives -log p[label]
    out_dtype = match.out_dtype if match is not None else logits.dtype
    return loss.to(out_dtype)


def _replace_fused_check(logits, target, weight=None, ignore_index=-100, reduction=None,
                         label_smoothing=0.0, hidden=None, lm_weight=None, lm_bias=None,
                         *, match=None):
    if match is None:  # registration check on the example inputs: the plain op computes the same
        return replace_plain(logits, target, weight, ignore_index, reduction, label_smoothing)
    return replace_fused(target, hidden, lm_weight, lm_bias, weight, ignore_index, reduction,
                         label_smoothing, match=match)


register(
    "fused_linear_cross_entropy", _VARIANTS, _replace_fused_check,
    example_inputs=_EXAMPLES, constraints=check_fused, priority=30,
    description="lm-head linear (+cast/scale/softcap/shift) + cross-entropy -> chunked "
                "liger::fused_linear_cross_entropy (no [N, V] logits for the loss)",
    builtin=True,
)
register(
    "cross_entropy", _VARIANTS, replace_plain,
    example_inputs=_EXAMPLES, constraints=check_plain, priority=20,
    description="F.cross_entropy on [N, V] logits (+cast/scale/softcap) -> liger::cross_entropy",
    builtin=True,
)
