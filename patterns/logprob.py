"""`fused_linear_logprob`: per-token log-probabilities of given ids from an lm head, unreduced.

Post-training losses (DPO, ORPO, SimPO, GRPO, PPO) start from `log p(id_t)` per token and feed
it to their own code.  The spellings found in users' and trainer libraries' code:

- `log_softmax(z, -1).gather(-1, index).squeeze(-1)` (`torch.gather`,
  `log_softmax(z, -1, dtype=torch.float32)`), the index any value of shape `rows + (1,)`: the
  ids with a trailing unit dim however spelled (`ids.unsqueeze(-1)`, `ids[:, 1:, None]`,
  `ids.view(B, T, 1)`);
- `z.gather(-1, ids[..., None]).squeeze(-1) - z.logsumexp(-1)`;
- `-F.cross_entropy(z.view(-1, V), ids.view(-1), reduction="none").view(B, T)` (the negation,
  after reshapes, is what makes the per-token NLL a log-prob; rows at ignore_index give -0.0,
  as eager);
- the memory-saving row loops of trainer libraries (TRL's `selective_log_softmax`), which Dynamo
  unrolls: `gather(z, ids) - stack([logsumexp(z[i], -1) for i in rows])`, and
  `stack([log_softmax(z[i], -1).gather(-1, ids[i, :, None])[..., 0] for i in rows])`;
- optionally the per-token entropy of the same logits, `-(softmax(z) * log_softmax(z)).sum(-1)`
  (or `exp(logp) * logp`, or `logsumexp(z) - (softmax(z) * z).sum(-1)`), computed in the same pass,
  also when assembled from pieces of `z` (TRL's row loops and `entropy_from_logits` chunks:
  `_entropy_of` carries row numbers to prove each row's entropy sits at its row's place).

Logits also used outside (returned, logged): `fused_linear_cross_entropy` writes them from its
pass for the spellings it reads, so those are left to it; the others are refused with the reason.

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

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

import ligerfx.kernels.fused_linear_logprob  # noqa: F401 - defines torch.ops.liger.fused_linear_logprob
from ligerfx.compiler.canonical import CAST, CNode, View
from ligerfx.graph.nodes import node_value, op_name
from ligerfx.compiler.matcher import match_at
from ligerfx.compiler.passes import Defer, Skip
from ligerfx.compiler.pattern import Pattern, register, trace_variant
from ligerfx.graph.symbolic import known_equal, known_int

from .cross_entropy import _check_labels, _linear, _step, lm_head_of

NAME = "fused_linear_logprob"


# -- the spellings -----------------------------------------------------------------------------

def logprob_log_softmax(logits, index):
    # `index` is any spelling of the ids with a trailing unit dim (`ids.unsqueeze(-1)`,
    # `ids[:, 1:, None]`, `ids.view(B, T, 1)`): its shape is checked (`_index_problem`), so
    # gather reads `logits[..., index[..., 0]]` whatever computed it
    return F.log_softmax(logits, -1).gather(-1, index).squeeze(-1)


def logprob_gather_lse(logits, index):
    return logits.gather(-1, index).squeeze(-1) - logits.logsumexp(-1)


def logprob_gather_rows_lse(logits, index, lse):
    # `lse` must be proved to be stack(logsumexp(logits[i], -1) for every row i) (_rows_lse)
    return logits.gather(-1, index).squeeze(-1) - lse


def lookalike_other_dim(logits, index):
    # a log-softmax over another dim than the gathered one is no log-prob: always refused
    return F.log_softmax(logits, -2).gather(-1, index).squeeze(-1)


def nll_cross_entropy(logits, ids, ignore_index):
    # the per-token NLL; ours only when the user negates it (through reshapes) into a log-prob
    # (`_negated`), which stays in the graph: the op's -0.0 at ignored rows negates back to eager's
    return F.cross_entropy(logits, ids, None, None, ignore_index, None, "none", 0.0)


_VARIANTS = [logprob_gather_lse, logprob_gather_rows_lse, logprob_log_softmax, nll_cross_entropy]
_LOOK_ALIKES = {lookalike_other_dim: "the log-softmax is over dim -2, not the vocabulary dim the "
                                     "ids index (-1): not a per-token log-prob"}
_GATHERED = (logprob_log_softmax, logprob_gather_lse, logprob_gather_rows_lse)

_EXAMPLE_LOGITS = torch.randn(6, 10)
_EXAMPLE_IDS = torch.randint(0, 10, (6,))
_EXAMPLES = {"logits": _EXAMPLE_LOGITS, "ids": _EXAMPLE_IDS, "index": _EXAMPLE_IDS[:, None],
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


def _unit_source(view: View, index: fx.Node):
    """`x` (a CNode) when the gather index is `x` with a trailing unit dim added in one of the
    ways the canonical view names (`unsqueeze(-1)`, `[..., None]`, a view/reshape adding a
    trailing 1), else None."""
    c = _plain(view[index]) if index in view else None
    if c is None or not isinstance(c.args[0] if c.args else None, CNode):
        return None
    if (c.op == "unsqueeze" and c.args[1] == -1) or (c.op == "unflatten" and c.args[1:] == (-1, 1)):
        return _plain(c.args[0])
    return None


def _row_ids(view: View, index: fx.Node):
    """(ids CNode, i) when the gather index is row i of the ids with a trailing unit dim
    (`ids[i].unsqueeze(-1)`, `ids[i][:, None]`, `ids[i, :, None]`), else None."""
    src = _unit_source(view, index)
    if src is not None:
        return _row_index(view, src.node) if src.node is not None else None
    if op_name(index) != "getitem" or len(index.args) != 2 or not isinstance(index.args[1], tuple):
        return None
    base, idx = index.args
    whole = all(i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in idx[1:-1])
    if (len(idx) < 2 or not isinstance(idx[0], int) or isinstance(idx[0], bool)
            or idx[-1] is not None or not whole or sum(i is Ellipsis for i in idx) > 1
            or base not in view):
        return None
    bv = _val(base)
    if Ellipsis not in idx and (not isinstance(bv, torch.Tensor) or len(idx) - 1 != bv.dim()):
        return None
    return _plain(view[base]), idx[0]


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
    if not isinstance(v, torch.Tensor) or v.dim() < 2:
        return None
    return known_int(v.shape[0])  # a SymInt Dynamo specialised (it unrolled a loop over it) too


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
    ir = _row_ids(view, match["index"])
    if zr is None or ir is None:
        return None
    out = match.outputs[0]
    users = list(out.users)
    if len(users) != 1 or _stack_parts(view, users[0]) is None:
        return "the per-row log-probs of a row loop are not stacked along dim 0 (only the stack is fused)"
    stack = users[0]
    parts = _stack_parts(view, stack)
    z, ids = zr[0], ir[0]
    if _rows_of(z) is None and isinstance(z.value, torch.Tensor) and z.value.dim() >= 2:
        return (f"the row loop stacks {len(parts)} rows of logits whose row count "
                f"{z.value.shape[0]} is symbolic (dynamic shapes): the stack is not provably "
                "every row, and the op would read them all")
    if _rows_of(z) != len(parts):
        return f"the row loop stacks {len(parts)} rows of logits with {_rows_of(z)} rows"
    covered = list(view[stack].covers)
    for i, p in enumerate(parts):
        found = None
        for m in match_at(match.pattern, match.variant, view, [_plain(p)]):
            a, b = _row_index(view, m["logits"]), _row_ids(view, m["index"])
            if a is not None and b is not None and a[0] is z and b[0] is ids and a[1] == b[1] == i:
                found = m
                break
        if found is None or found.outputs[0] is not found.tops[0]:
            return (f"part {i} of the stacked row loop is not the log-prob of row {i} of the same "
                    "logits and ids")
        # the ids rows stay (views, maybe read elsewhere); the logits rows read the lm head
        covered += found.covered + _plain(view[found["logits"]]).covers
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
        if u.args[0] is not node:  # read for its shape only (`x.view_as(nll)`): not a reshape of it
            return False
        if name == "neg":
            return True
        # `view_as` / `reshape_as` (`-nll.view_as(ids)`) reshape like `view(ids.shape)`
        if name not in ("view", "reshape", "view_as", "reshape_as", "flatten", "unflatten",
                        "squeeze", "unsqueeze"):
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


def _ce_spelling(view: View, index: fx.Node) -> bool:
    """Whether fused_linear_cross_entropy's gather variant reads this index: it is written with
    `ids.unsqueeze(-1)` (or `ids[..., None]`); other spellings stay ours even when reduced."""
    c = _plain(view[index]) if index in view else None
    return c is not None and c.op == "unsqueeze" and c.args[1] == -1 and bool(c.args[0].nodes)


def _cross_entropy_enabled(options) -> bool:
    if options is None:
        return True
    pats = getattr(options, "patterns", None)
    return (pats is None or "fused_linear_cross_entropy" in pats) and \
        "fused_linear_cross_entropy" not in (getattr(options, "exclude", None) or ())


def _entropy_at(view: View, c: CNode, is_logits):
    """The entropy match computing `c` whose logits satisfy `is_logits(CNode)`, or None."""
    for var in _ENTROPY.variants:
        for m in match_at(_ENTROPY, var, view, [c]):
            if is_logits(_plain(view[m["logits"]])):
                return m
    return None


def _static(shape) -> bool:
    return all(isinstance(d, int) for d in shape)


def _basic_index(ids: torch.Tensor, idx):
    """ids[idx] for an index of ints and slices within ids' dims, else None."""
    items = idx if isinstance(idx, tuple) else (idx,)
    ok = all((isinstance(i, int) and not isinstance(i, bool)) or (isinstance(i, slice) and all(
        isinstance(v, (int, type(None))) for v in (i.start, i.stop, i.step))) for i in items)
    return ids[items] if ok and len(items) <= ids.dim() else None


def _carry_rows(view: View, n: fx.Node, rows: dict, logits_side: bool):
    """The row numbers `n` holds when it only picks, splits, stacks or reshapes values whose row
    numbers are in `rows` (a tuple of them for split / chunk), else None.  On the logits side
    the vocabulary dim (last) must be left whole; `rows` have the value's shape without it."""
    if n in view and view[n].op == CAST and view[n].identity and n.args and n.args[0] in rows:
        return rows[n.args[0]]
    name, a = op_name(n), n.args
    x = a[0] if a else None
    vin, vout = _val(x) if isinstance(x, fx.Node) else None, _val(n)
    if name == "getitem" and len(a) == 2 and x in rows:
        if isinstance(rows[x], tuple):  # a piece of a split / chunk
            k, pieces = a[1], rows[x]
            return pieces[k] if isinstance(k, int) and -len(pieces) <= k < len(pieces) else None
        return _basic_index(rows[x], a[1])
    if name in ("split", "chunk") and x in rows and not isinstance(rows[x], tuple):
        dim = n.kwargs.get("dim", a[2] if len(a) > 2 else 0)
        size = a[1] if len(a) > 1 else n.kwargs.get("split_size_or_sections",
                                                    n.kwargs.get("chunks"))
        r = rows[x]
        if not (isinstance(dim, int) and isinstance(size, int) and isinstance(vin, torch.Tensor)):
            return None
        dim = dim + vin.dim() if dim < 0 else dim
        if dim >= r.dim():
            return None  # a split of the vocabulary dim
        return tuple(r.split(size, dim) if name == "split" else r.chunk(size, dim))
    if name in ("view", "reshape", "flatten", "unflatten") and x in rows \
            and isinstance(vout, torch.Tensor) and isinstance(vin, torch.Tensor):
        shape = tuple(vout.shape[:-1]) if logits_side else tuple(vout.shape)
        if logits_side and not known_equal(vin.shape[-1], vout.shape[-1]):
            return None
        return rows[x].reshape(shape) if _static(shape) else None
    if not logits_side and name in ("stack", "cat") and a and isinstance(a[0], (list, tuple)):
        parts = list(a[0])
        dim = n.kwargs.get("dim", a[1] if len(a) > 1 else 0)
        if not parts or not all(p in rows and not isinstance(rows[p], tuple) for p in parts):
            return None
        return (torch.stack if name == "stack" else torch.cat)([rows[p] for p in parts], dim)
    return None


def _row_aliases(z: fx.Node) -> list:
    """`z` and the values above it that hold the same logits row for row: each reshape that only
    flattens leading dims (`l2.reshape(-1, V)`, the form cross_entropy reads) and each cast that
    changes nothing, walked upward; the topmost last.  An entropy of any of them is the entropy
    of `z`'s rows (the `-cross_entropy(z.reshape(-1, V))` spelling with the entropy of `z`)."""
    out, cur = [z], z
    while True:
        s = _step(cur)
        if s is None:
            return out
        kind, info, src = s
        vin, vout = _val(src), _val(cur)
        if kind == "cast" and not (isinstance(vin, torch.Tensor) and vin.dtype == vout.dtype):
            return out
        if kind not in ("cast", "rows"):
            return out
        out.append(src)
        cur = src


def _entropy_of(view: View, z: fx.Node, lp_out: fx.Node):
    """The entropy of the logits `z` computed beside the log-probs: (output node, covered nodes,
    its shape: "ids" for the rows of `z` as the op gives them, "hidden" for the leading dims of
    the logits before any flattening, whether it is spelled `lse - E[z]`: `_lse_form`), a
    near-miss reason, or None.

    The entropy is row-wise, so a value assembled from entropies of pieces of the logits is the
    entropy of the logits exactly when it holds each of their rows at that row's place.  Row
    numbers are carried through the picks, splits, stacks and reshapes between `z` (or a value
    it only flattens, `_row_aliases`) and the entropies (TRL's row loops:
    `stack([entropy(z[i]) for i])`, `entropy_from_logits` over `z.reshape(-1, V).split(c)` with
    `cat(...).reshape(B, T)`, or `extend` then `stack`)."""
    target = _plain(view[z])
    zv, lv = _val(z), _val(lp_out)
    lead = tuple(zv.shape[:-1])
    aliases = _row_aliases(z)
    top = aliases[-1]
    top_lead = tuple(_val(top).shape[:-1])

    def same_grad(out):  # an entropy under no_grad, unlike the log-probs, is left alone
        return getattr(_val(out), "requires_grad", None) == getattr(lv, "requires_grad", None)

    if not _static(lead) or not _static(top_lead):
        # only the entropy of the logits themselves, or of their value before flattening
        tops = {id(_plain(view[top]))} if top in view else set()
        for c in list(view.cnodes()):
            if c.op in ("neg", "sub") and c.nodes:
                m = _entropy_at(view, c, lambda x: x is target or id(x) in tops)
                if m is not None and same_grad(m.outputs[0]):
                    x = _plain(view[m["logits"]])
                    return (m.outputs[0], m.covered, "ids" if x is target else "hidden",
                            _lse_form([m]))
        return None
    base = torch.arange(math.prod(lead)).reshape(lead)
    lrows, erows, leaves = {}, {}, {}
    lrows[z] = rows = base
    for a in aliases[1:]:  # up the flattening reshapes: the same rows, in their shapes
        rows = rows.reshape(tuple(_val(a).shape[:-1]))
        lrows[a] = rows
    seeded = set(lrows)
    for n in view.graph.nodes:
        if n.op == "output" or n in seeded:
            continue
        if n in view and _plain(view[n]) is target:
            lrows[n] = base
            seeded.add(n)
            continue
        r = _carry_rows(view, n, lrows, True)
        if r is not None:
            lrows[n] = r
            continue
        c = view[n] if n in view else None
        if c is not None and c.op in ("neg", "sub") and n in c.nodes:
            m = _entropy_at(view, c, lambda x: x.node in lrows)
            r = lrows.get(m["logits"]) if m is not None else None
            if isinstance(r, torch.Tensor) and m.outputs[0] is m.tops[0] and m.tops[0] is n:
                erows[n], leaves[n] = r, m
                continue
        r = _carry_rows(view, n, erows, False)
        if r is not None:
            erows[n] = r
    shapes = {top_lead: "hidden", lead: "ids"}  # the op's own shape where the two agree
    reordered = None
    for n, r in erows.items():
        if isinstance(r, tuple) or tuple(r.shape) not in shapes:
            continue
        if not torch.equal(r.flatten(), base.flatten()):
            if reordered is None and torch.equal(r.flatten().sort().values, base.flatten()):
                reordered = (n, r)
            continue
        if not same_grad(n):
            continue
        covered, todo, parts = [], [n], []
        while todo:  # everything between z (and what it flattens) and the entropy
            u = todo.pop()
            if u in covered or u in seeded:
                continue
            covered.append(u)
            if u in leaves:
                covered += leaves[u].covered
                parts.append(leaves[u])
                todo.append(leaves[u]["logits"])
                continue
            todo += [a for a in u.all_input_nodes if a in lrows or a in erows]
        form = _lse_form(parts)
        if form is None:
            return (f"`{n.name}` assembles entropies spelled both as lse - E[z] and as "
                    "-(p * logp).sum(): the op forms every row's entropy one way")
        return n, list(dict.fromkeys(covered)), shapes[tuple(r.shape)], form
    if reordered is not None:
        n, r = reordered
        k = int((r.flatten() != base.flatten()).nonzero()[0])
        return (f"`{n.name}` assembles the entropy of the logits' rows in another order: its "
                f"row {k} (counting over the leading dims {lead}) is the entropy of logits row "
                f"{int(r.flatten()[k])}")
    return None


def _lse_form(matches) -> bool | None:
    """Whether the entropy matches are spelled `logsumexp(z) - (softmax(z) * z).sum(-1)` (True)
    or as a sum of -p * logp (False); None when they mix the two.  The op forms the entropy as
    the spelling does: at large logits lse - E[z] cancels to eager's exact 0 (or its ulp-sized
    noise) where -(p * logp) gives the tiny true value (kernels/fused_linear_logprob.py)."""
    forms = {m.variant.fn is entropy_lse for m in matches}
    return None if len(forms) > 1 else forms.pop() if forms else False


def _escaping_logits(chain: list, covered: list, outputs: list) -> tuple | None:
    """(logits node, its outside user) when a value of the lm head's logits chain is read
    outside the match (returned, logged, another loss), else None."""
    inside, outs = set(covered), set(outputs)
    for n in chain:
        if n in outs:
            continue
        for u in n.users:
            if u not in inside:
                return n, u
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
    gathered = fn in _GATHERED
    z, ids, extra = match["logits"], match["index" if gathered else "ids"], []
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
    # Outside a row loop the op reads the ids under the gather index: the value the unit dim
    # was added to, when only the gather reads that index (then covered: the value's writes
    # window starts there, ligerfx/graph/mutation.py), else the index itself, its unit dim dropped.
    index = ids if gathered else None
    unit = gathered and rows is None
    src = _unit_source(view, index) if unit else None
    if src is not None and src.node is not None:
        adds = list(dict.fromkeys(view[index].covers + _plain(view[index]).covers))
        inside = set(match.covered) | set(adds)
        if all(u in inside for n in adds for u in n.users):
            ids, unit = src.node, False
            match.covered = list(dict.fromkeys(match.covered + adds))
    zv, iv = _val(z), _val(ids)
    if not isinstance(zv, torch.Tensor) or zv.dim() < 1:
        return "the log-softmax input is not a tensor with a vocabulary dim"
    if iv.dtype not in (torch.int64, torch.int32):
        return "the token ids are not int64/int32"
    if fn is nll_cross_entropy:
        if not _negated(match.outputs[0]):
            # a per-token NLL (read as a loss too, not only negated): fused_linear_cross_entropy's;
            # where that pattern does not take it, this is our near miss (passes.Defer)
            if _cross_entropy_enabled(match.options):
                raise Defer("fused_linear_cross_entropy",
                            f"the per-token NLL `{match.outputs[0].name}` is read as a loss too "
                            "(not only negated into log-probs): fused_linear_cross_entropy's")
            raise Skip
        if zv.dim() != 2 or iv.dim() != 1:
            return "cross_entropy's input is not 2-D [tokens, vocab] with 1-D ids"
        if not isinstance(match["ignore_index"], int):
            return "`ignore_index` is not a Python int"
    else:
        want = tuple(zv.shape[:-1]) + ((1,) if unit else ())  # (the index's shape, if unit)
        if iv.dim() != len(want) or not all(known_equal(a, b) for a, b in zip(iv.shape, want)):
            # gather reads a corner of the input for a smaller index (and a unit dim elsewhere
            # than last, `ids[:, None]`, gathers other rows); the op reads every row once
            return (f"the token ids have shape {tuple(iv.shape)}, not the logits' rows "
                    f"{want}" + (" (the ids with a trailing unit dim)" if unit else ""))
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
    entropy = _entropy_of(view, z, match.outputs[0])
    if isinstance(entropy, str):
        return entropy
    if (fn is logprob_log_softmax and rows is None and entropy is None
            and _cross_entropy_enabled(match.options) and _ce_spelling(view, index)
            and _reduced_to_scalar(match.outputs[0])):
        raise Skip  # a per-token NLL reduced to a loss: fused_linear_cross_entropy's
    chain = [top] + [n for n, _, _ in steps if n not in match.covered]
    chain += _identity_casts(view, z)
    match.covered = list(dict.fromkeys(match.covered + chain + extra))
    details = []
    if rows is not None:
        match.outputs, match.tops = [stack], [stack]
        details.append(f"row loop of {len(_stack_parts(view, stack))} rows")
    if entropy is not None:
        out, covered, ent_shape, ent_lse = entropy
        match.params.update(ent_shape=ent_shape, entropy_lse=ent_lse)
        match.covered = list(dict.fromkeys(match.covered + covered))
        match.outputs = [match.outputs[0], out]
        match.tops = [match.tops[0], out]
        details.append("entropy from the same pass" + (" (as lse - E[z])" if ent_lse else ""))
    match.detail = "; ".join(details)
    logits_chain = [top] + [n for n, _, _ in steps] + _identity_casts(view, z) + [z]
    escaping = _escaping_logits(logits_chain, match.covered, match.outputs)
    if escaping is not None:
        ce_reads = fn is nll_cross_entropy or (
            fn is logprob_log_softmax and _ce_spelling(view, index))
        e, u = escaping
        where = "a graph output" if u.op == "output" else f"`{u.name}`"
        if rows is None and entropy is None and _cross_entropy_enabled(match.options) and ce_reads:
            # fused_linear_cross_entropy reads these spellings too and writes the logits from
            # the same pass (return_logits): it takes them (docs/post_training.md counts bytes).
            # Where it does not, this is our near miss (passes.Defer).
            raise Defer("fused_linear_cross_entropy",
                        f"the lm head's logits `{e.name}` are also used by {where}, so the [N, V] "
                        "logits must exist anyway; liger::fused_linear_logprob does not write "
                        "them, so this is left to fused_linear_cross_entropy, which writes them "
                        "from its pass")
        return (f"the lm head's logits `{e.name}` are also used by {where}, so the [N, V] logits "
                "must exist anyway; liger::fused_linear_logprob does not write them (a rewrite "
                "would add a second lm-head matmul to keep them); only the "
                "log_softmax(z).gather(-1, ids.unsqueeze(-1)) and -cross_entropy(z, ids, "
                "reduction='none') spellings are rewritten then, by fused_linear_cross_entropy, "
                "which writes the logits from the same pass")
    temperature = _temperature(steps) if scale[1] == 0 else None
    match.params.update(logit_scale=scale[0] if temperature is None else temperature,
                        divide=temperature is not None, softcap=scale[1], slices=slices,
                        kinds=kinds, entropy=entropy is not None, ce=fn is nll_cross_entropy,
                        unit=unit, gather_lse=fn in (logprob_gather_lse, logprob_gather_rows_lse))
    match.bindings.update(hidden=hidden, lm_weight=weight, lm_bias=bias, token_ids=ids)
    return None


def _temperature(steps):
    """T when the only scaling of the logits is one division by a Python number (`z / T`), else
    None.  The op then divides as eager does: times the rounded 1/T is an ulp off, which the
    entropy of near one-hot rows amplifies (issue 22 survey: 3x eager's error at logits ~1000)."""
    scales = [n for n, kind, _ in steps if kind == "scale"]
    if len(scales) != 1:
        return None
    n = scales[0]
    div = n.target in (operator.truediv, torch.div) or (n.op == "call_method" and n.target == "div")
    if not div or len(n.args) != 2 or not isinstance(n.args[1], (int, float)) \
            or isinstance(n.args[1], bool):
        return None
    return float(n.args[1])


def _check_ids_or_ignored(ids, V: int, ignore_index: int):
    # cross_entropy raises for a target outside [0, V) that is not ignore_index; keep that error
    torch._assert_async(((ids == ignore_index) | ((ids >= 0) & (ids < V))).all(),
                        "cross_entropy(): a target is out of range [0, number of classes)")


def replace(logits, ids=None, ignore_index=-100, lse=None, index=None, hidden=None,
            lm_weight=None, lm_bias=None, token_ids=None, *, match=None):
    if match is None:
        # registration check on the example inputs: the op with the identity as its lm head
        ids = index.squeeze(-1) if ids is None else ids
        eye = torch.eye(logits.shape[-1], dtype=logits.dtype)
        return torch.ops.liger.fused_linear_logprob(logits, eye, None, ids, 1.0, 0.0, False,
                                                    ignore_index, 0)[0].to(logits.dtype)
    p = match.params
    V = match.value("lm_weight").shape[0]
    if p["unit"]:
        token_ids = token_ids.squeeze(-1)  # the gather index [..., 1] (shape checked)
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
        bool(p["entropy"]), ii, 0, bool(p.get("divide", False)), bool(p.get("entropy_lse", False)),
        bool(p.get("gather_lse", False)))
    if p["ce"]:
        lp = -lp  # the NLL cross_entropy gives; +0.0 at ignored rows, as eager
    lp = lp.to(match.out_dtype)
    if not p["entropy"]:
        return lp
    if p.get("ent_shape") == "hidden":  # the entropy of the logits before their flattening
        ent = ent.view(h.shape[:-1])
    return lp, ent.to(node_value(match.outputs[1]).dtype)


register(
    NAME, _VARIANTS, replace, example_inputs=_EXAMPLES, constraints=check, priority=35,
    description="lm head (+cast/temperature/softcap/shift) + per-token log-prob of given ids "
                "(+ entropy) -> chunked liger::fused_linear_logprob (no [N, V] logits)",
    builtin=True,
    look_alikes=_LOOK_ALIKES,
)
