"""`fused_linear_logprob`: per-token log-probabilities of given ids from an lm head, unreduced.

Post-training losses (DPO, ORPO, SimPO, GRPO, PPO) start from `log p(id_t)` per token and feed
it to their own code.  The spellings found in users' and trainer libraries' code:

- `log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)` (`torch.gather`, `[..., None]`,
  `log_softmax(z, -1, dtype=torch.float32)`);
- `z.gather(-1, ids[..., None]).squeeze(-1) - z.logsumexp(-1)`;
- `-F.cross_entropy(z.view(-1, V), ids.view(-1), reduction="none").view(B, T)` (the negation,
  after reshapes, is what makes the per-token NLL a log-prob; rows at ignore_index give -0.0,
  as eager);
- the memory-saving row loops of trainer libraries (TRL's `selective_log_softmax`), which Dynamo
  unrolls: `gather(z, ids) - stack([logsumexp(z[i], -1) for i in rows])`, and
  `stack([log_softmax(z[i], -1).gather(-1, ids[i, :, None])[..., 0] for i in rows])`;
- optionally the per-token entropy of the same logits, `-(softmax(z) * log_softmax(z)).sum(-1)`
  (or `exp(logp) * logp`, or `logsumexp(z) - (softmax(z) * z).sum(-1)`), computed in the same pass.

`z` is the lm head's output after the row-wise chain the loss patterns read (casts, `/ T`,
softcap, the `[:, :-1]` shift; `patterns/cross_entropy.py` `_step`), so the whole thing becomes
one `liger::fused_linear_logprob` that never holds [N, V] logits.  The dtype rules are the loss
patterns' (`_cast_problem`): free casts only, the log-softmax computed in fp32 (a log-softmax in
bf16/fp16 only under upcast_statistics).

Sharing with `fused_linear_cross_entropy`: that pattern also reads the log_softmax + gather
spelling, as a per-token NLL that the user reduces to a loss.  The rule: when every use of the
gathered value only masks/negates it on the way to a full reduction (a scalar), it is a reduced
NLL and stays that pattern's; otherwise (per-sequence sums, ratios, logsigmoid, ...) it is ours.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

import ligerfx.kernels.fused_linear_logprob  # noqa: F401 - defines torch.ops.liger.fused_linear_logprob
from ligerfx.canonical import CAST, CNode, View, node_value, op_name
from ligerfx.matcher import match_at
from ligerfx.passes import Skip
from ligerfx.pattern import Pattern, register, trace_variant
from ligerfx.symbolic import known_equal

from .cross_entropy import _check_labels, _linear, _step, lm_head_of

NAME = "fused_linear_logprob"


# -- the spellings -----------------------------------------------------------------------------

def logprob_log_softmax(logits, ids):
    return F.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def logprob_gather_lse(logits, ids):
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def logprob_gather_rows_lse(logits, ids, lse):
    # `lse` must be proved to be stack(logsumexp(logits[i], -1) for every row i) (_rows_lse)
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse


def lookalike_other_dim(logits, ids):
    # a log-softmax over another dim than the gathered one is no log-prob: always refused
    return F.log_softmax(logits, -2).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def nll_cross_entropy(logits, ids, ignore_index):
    # the per-token NLL; ours only when the user negates it (through reshapes) into a log-prob
    # (`_negated`), which stays in the graph: the op's -0.0 at ignored rows negates back to eager's
    return F.cross_entropy(logits, ids, None, None, ignore_index, None, "none", 0.0)


_VARIANTS = [logprob_gather_lse, logprob_gather_rows_lse, logprob_log_softmax, nll_cross_entropy]
_LOOK_ALIKES = {lookalike_other_dim: "the log-softmax is over dim -2, not the vocabulary dim the "
                                     "ids index (-1): not a per-token log-prob"}
_GATHERED = (logprob_log_softmax, logprob_gather_lse, logprob_gather_rows_lse)

_EXAMPLE_LOGITS = torch.randn(6, 10)
_EXAMPLES = {"logits": _EXAMPLE_LOGITS, "ids": torch.randint(0, 10, (6,)),
             "lse": _EXAMPLE_LOGITS.logsumexp(-1), "ignore_index": -100}


def entropy_softmax(logits):
    return -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1)


def entropy_exp(logits):
    logp = F.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def entropy_lse(logits):
    return logits.logsumexp(-1) - (F.softmax(logits, -1) * logits).sum(-1)


# Matched with the same machinery as a pattern, near a log-prob match (never registered).
_ENTROPY = Pattern(f"{NAME}_entropy", [trace_variant(f, {"logits": _EXAMPLE_LOGITS}, NAME)
                                        for f in (entropy_softmax, entropy_exp, entropy_lse)],
                   replacement=lambda logits: None, example_inputs={"logits": _EXAMPLE_LOGITS})


# -- helpers -------------------------------------------------------------------------------------

def _val(n):
    return node_value(n) if isinstance(n, fx.Node) else n


def _plain(c):
    """A canonical value with identity casts looked through."""
    while isinstance(c, CNode) and c.op == CAST and c.identity:
        c = c.args[0]
    return c


def _same_value(view: View, a: fx.Node, b: fx.Node) -> bool:
    return a in view and b in view and _plain(view[a]) is _plain(view[b])


def _row_index(view: View, n: fx.Node):
    """(source CNode, i) when `n` is `source[i]` (an int index of the leading dim), else None."""
    c = _plain(view[n]) if n in view else None
    if c is None or c.op != "getitem" or len(c.args) != 2:
        return None
    src, i = c.args
    if not isinstance(src, CNode) or not isinstance(i, int) or isinstance(i, bool):
        return None
    return _plain(src), i


def _stack_parts(view: View, n: fx.Node):
    """The parts of `torch.stack(parts)` along dim 0 at `n`, else None."""
    c = _plain(view[n]) if n in view else None
    if c is None or c.op != "stack" or c.args[1] != -_rank(c):
        return None
    return list(c.args[0])


def _rank(c: CNode):
    v = c.value
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _rows_of(src: CNode):
    v = src.value
    if not isinstance(v, torch.Tensor) or v.dim() < 2 or not isinstance(v.shape[0], int):
        return None
    return v.shape[0]


def _rows_lse(match, view: View):
    """TRL's fp32 form: `lse` is stack(logsumexp(logits[i], -1) for i in rows), each row once,
    in order.  Returns (the nodes computing it, None), or (None, why not) when it is such a stack
    of rows in another order or number; raises Skip for any other subtrahend."""
    parts = _stack_parts(view, match["lse"])
    z = _plain(view[match["logits"]])
    if parts is None:
        raise Skip
    nodes, order = list(view[match["lse"]].covers), []
    for p in parts:
        p = _plain(p)
        ok = (isinstance(p, CNode) and p.op == "logsumexp" and len(p.args) == 3
              and p.args[1] == (-1,) and p.args[2] is False)
        row = _row_index(view, p.args[0].node) if ok and p.args[0].node is not None else None
        if row is None or row[0] is not z:
            raise Skip
        order.append(row[1])
        nodes += p.covers + _plain(p.args[0]).covers
    if order != list(range(_rows_of(z) or 0)):
        return None, (f"the stacked logsumexp takes rows {order} of the logits, not each of its "
                      f"{_rows_of(z)} rows once in order")
    return nodes, None


def _row_loop(match, view: View):
    """The per-row form: this match is row k of stack([logprob(z[i], ids[i]) for i in rows]).

    Returns (z node, ids node, stack node, covered nodes) or None when the match is not a row
    of such a loop; a string when it is one that cannot be fused."""
    zr = _row_index(view, match["logits"])
    ir = _row_index(view, match["ids"])
    if zr is None or ir is None:
        return None
    out = match.outputs[0]
    users = list(out.users)
    if len(users) != 1 or _stack_parts(view, users[0]) is None:
        return "the per-row log-probs of a row loop are not stacked along dim 0 (only the stack is fused)"
    stack = users[0]
    parts = _stack_parts(view, stack)
    z, ids = zr[0], ir[0]
    if _rows_of(z) != len(parts):
        return f"the row loop stacks {len(parts)} rows of logits with {_rows_of(z)} rows"
    covered = list(view[stack].covers)
    for i, p in enumerate(parts):
        found = None
        for m in match_at(match.pattern, match.variant, view, [_plain(p)]):
            a, b = _row_index(view, m["logits"]), _row_index(view, m["ids"])
            if a is not None and b is not None and a[0] is z and b[0] is ids and a[1] == b[1] == i:
                found = m
                break
        if found is None or found.outputs[0] is not found.tops[0]:
            return (f"part {i} of the stacked row loop is not the log-prob of row {i} of the same "
                    "logits and ids")
        covered += found.covered + _plain(view[found["logits"]]).covers \
            + _plain(view[found["ids"]]).covers
    if z.node is None or ids.node is None:
        return "the row loop's logits or ids have no graph node"
    return z.node, ids.node, stack, covered


def _walk_from(z: fx.Node, ls_node: fx.Node | None):
    """(top node, steps top-down) above the logits `z`; the log-softmax's own `dtype=` cast is
    the step nearest the result."""
    steps = []
    if ls_node is not None:
        vin, vout = _val(ls_node.args[0]), _val(ls_node)
        if isinstance(vin, torch.Tensor) and vin.dtype != vout.dtype:
            steps.append((ls_node, "cast", vout.dtype))
    cur = z
    while True:
        s = _step(cur)
        if s is None:
            break
        steps.append((cur, s[0], s[1]))
        cur = s[2]
    return cur, steps[::-1]


def _blocked_lm_head(top: fx.Node) -> str | None:
    """Why the chain above the logits stops short of an lm head that is right there (a tensor
    temperature, an op the kernel does not compute), or None when there is no lm head above."""
    if not isinstance(top, fx.Node) or top.op not in ("call_function", "call_method"):
        return None
    for a in top.args:
        if not isinstance(a, fx.Node):
            continue
        above, _ = _walk_from(a, None)
        if _linear(above) is None:
            continue
        name = op_name(top)
        others = [b for b in top.args if isinstance(b, fx.Node) and b is not a]
        if name in ("mul", "div") and others:
            return (f"the logits are scaled by a tensor (`{others[0].name}`) at `{top.name}`; the "
                    "fused kernel needs the temperature as a Python number (a float attribute)")
        return (f"the lm head's logits pass through `{top.name}` ({name}), which the fused "
                "log-prob kernel does not compute")
    return None


_PASS_THROUGH = {"neg", "mul", "div", "masked_fill", "torch.where", "where", "cast", "float",
                 "to", "view", "reshape", "flatten", "contiguous"}
_FULL = {"sum", "mean"}


def _reduced_to_scalar(node: fx.Node) -> bool:
    """Whether every use of `node` only masks / negates / reshapes it on its way to a sum or mean
    to a scalar (a reduced per-token NLL: the cross-entropy patterns' business)."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            name = op_name(u)
            v = _val(u)
            if name in _FULL and isinstance(v, torch.Tensor) and v.dim() == 0:
                continue
            boolean_index = (name == "getitem" and len(u.args) == 2 and isinstance(u.args[1], fx.Node)
                             and getattr(_val(u.args[1]), "dtype", None) == torch.bool)
            if name in _PASS_THROUGH or boolean_index:
                todo.append(u)
                continue
            return False
    return True


def _negated(node: fx.Node) -> bool:
    """Whether `node` is only used, through reshapes, by a negation."""
    while True:
        users = list(node.users)
        if len(users) != 1:
            return False
        (u,) = users
        name = op_name(u)
        if name == "neg":
            return True
        if name not in ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"):
            return False
        node = u


def _identity_casts(view: View, z: fx.Node) -> list:
    """Nodes that only repeat `z` (identity casts, `.contiguous()`), read by the match in its
    place; they must be covered with it."""
    out, todo = [], [z]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in view and view[u].op == CAST and view[u].identity and u not in out:
                out.append(u)
                todo.append(u)
    return out


def _cross_entropy_enabled(options) -> bool:
    if options is None:
        return True
    pats = getattr(options, "patterns", None)
    return (pats is None or "fused_linear_cross_entropy" in pats) and \
        "fused_linear_cross_entropy" not in (getattr(options, "exclude", None) or ())


def _entropy_of(view: View, z: fx.Node, lp_out: fx.Node):
    """(entropy output node, its covered nodes) of an entropy computed from the logits `z`."""
    target = _plain(view[z])
    for c in list(view.cnodes()):
        if c.op not in ("neg", "sub") or not c.nodes:
            continue
        for var in _ENTROPY.variants:
            for m in match_at(_ENTROPY, var, view, [c]):
                if _plain(view[m["logits"]]) is not target:
                    continue
                out = m.outputs[0]
                ev, lv = _val(out), _val(lp_out)
                if getattr(ev, "requires_grad", None) != getattr(lv, "requires_grad", None):
                    continue  # computed under no_grad, unlike the log-probs: left alone
                return out, m.covered
    return None


# -- constraint and replacement ----------------------------------------------------------------

def check(match):
    fn = match.variant.fn
    if fn is lookalike_other_dim:
        top, _ = _walk_from(match["logits"], None)
        if _linear(top) is None:
            raise Skip  # reported only where an lm head computes the logits
        return None
    view = View(match.graph)
    z, ids, extra = match["logits"], match["ids"], []
    rows = None
    if fn is logprob_log_softmax:
        rows = _row_loop(match, view)
        if isinstance(rows, str):
            return rows
        if rows is not None:
            z, ids, stack, extra = rows
    if fn is logprob_gather_rows_lse:
        extra, problem = _rows_lse(match, view)
        if problem:
            return problem
    zv, iv = _val(z), _val(ids)
    if not isinstance(zv, torch.Tensor) or zv.dim() < 1:
        return "the log-softmax input is not a tensor with a vocabulary dim"
    if iv.dtype not in (torch.int64, torch.int32):
        return "the token ids are not int64/int32"
    if fn is nll_cross_entropy:
        if not _negated(match.outputs[0]):
            raise Skip  # a per-token NLL: fused_linear_cross_entropy's
        if zv.dim() != 2 or iv.dim() != 1:
            return "cross_entropy's input is not 2-D [tokens, vocab] with 1-D ids"
        if not isinstance(match["ignore_index"], int):
            return "`ignore_index` is not a Python int"
    elif iv.dim() != zv.dim() - 1 or not all(
            known_equal(a, b) for a, b in zip(iv.shape, zv.shape[:-1])):
        # gather reads a corner of the input for a smaller index; the op reads every row
        return (f"the token ids have shape {tuple(iv.shape)}, not the logits' rows "
                f"{tuple(zv.shape[:-1])}")
    ls = match.nodes_of("log_softmax")
    top, steps = _walk_from(z, ls[0] if ls else None)
    head = lm_head_of(top, steps, match)
    if head is None:
        reason = _blocked_lm_head(top)
        if reason:
            return reason
        raise Skip  # no lm head: the plain cross_entropy pattern takes the log_softmax + gather
    if isinstance(head, str):
        return head
    hidden, weight, bias, scale, slices, kinds = head
    entropy = None if rows is not None else _entropy_of(view, z, match.outputs[0])
    if (fn is logprob_log_softmax and rows is None and entropy is None
            and _cross_entropy_enabled(match.options) and _reduced_to_scalar(match.outputs[0])):
        raise Skip  # a per-token NLL reduced to a loss: fused_linear_cross_entropy's
    chain = [top] + [n for n, _, _ in steps if n not in match.covered]
    chain += _identity_casts(view, z)
    match.covered = list(dict.fromkeys(match.covered + chain + extra))
    if rows is not None:
        match.outputs, match.tops = [stack], [stack]
        match.detail = f"row loop of {len(_stack_parts(view, stack))} rows"
    if entropy is not None:
        out, covered = entropy
        match.covered = list(dict.fromkeys(match.covered + covered))
        match.outputs = [match.outputs[0], out]
        match.tops = [match.tops[0], out]
        match.detail = "entropy from the same pass"
    match.params.update(logit_scale=scale[0], softcap=scale[1], slices=slices, kinds=kinds,
                        entropy=entropy is not None, ce=fn is nll_cross_entropy)
    match.bindings.update(hidden=hidden, lm_weight=weight, lm_bias=bias, token_ids=ids)
    return None


def _check_ids_or_ignored(ids, V: int, ignore_index: int):
    # cross_entropy raises for a target outside [0, V) that is not ignore_index; keep that error
    torch._assert_async(((ids == ignore_index) | ((ids >= 0) & (ids < V))).all(),
                        "cross_entropy(): a target is out of range [0, number of classes)")


def replace(logits, ids, ignore_index=-100, lse=None, hidden=None, lm_weight=None, lm_bias=None,
            token_ids=None, *, match=None):
    if match is None:
        # registration check on the example inputs: the op with the identity as its lm head
        eye = torch.eye(logits.shape[-1], dtype=logits.dtype)
        return torch.ops.liger.fused_linear_logprob(logits, eye, None, ids, 1.0, 0.0, False,
                                                    ignore_index, 0)[0].to(logits.dtype)
    p = match.params
    V = match.value("lm_weight").shape[0]
    if p["ce"]:
        _check_ids_or_ignored(token_ids, V, ignore_index)
        ii = int(ignore_index)
    else:
        _check_labels(token_ids, V)  # gather raises for an id outside [0, V), as eager
        ii = -1  # no id in [0, V) equals it
    h = hidden
    # Slices of the logits (all before any flattening, checked) are slices of the hidden states.
    for kind, info in zip(p["kinds"], p["slices"]):
        if kind == "slice":
            h = h[info]
    lp, ent, _ = torch.ops.liger.fused_linear_logprob(
        h, lm_weight, lm_bias, token_ids, float(p["logit_scale"]), float(p["softcap"]),
        bool(p["entropy"]), ii, 0)
    if p["ce"]:
        lp = -lp  # the NLL cross_entropy gives; +0.0 at ignored rows, as eager
    lp = lp.to(match.out_dtype)
    if not p["entropy"]:
        return lp
    return lp, ent.to(node_value(match.outputs[1]).dtype)


register(
    NAME, _VARIANTS, replace, example_inputs=_EXAMPLES, constraints=check, priority=35,
    description="lm head (+cast/temperature/softcap/shift) + per-token log-prob of given ids "
                "(+ entropy) -> chunked liger::fused_linear_logprob (no [N, V] logits)",
    builtin=True,
    look_alikes=_LOOK_ALIKES,
)
