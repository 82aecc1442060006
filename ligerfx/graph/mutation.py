"""Writes and aliases in an FX graph: which nodes write tensor memory, and which values share it.

A rewrite replaces a subgraph by one op that reads its inputs at a single point of the program.
That is only the same program when no memory the subgraph reads is written while it runs, nor
between it and where the replacement is inserted.  Two facts decide that:

- alias sets come from the nodes' example values: two values alias when their (fake) tensors share
  a storage (views, slices, transposes, `view_as_real`, pieces of `chunk`/`split`), the same rule
  torch's own FX passes use.  A node without an example value may alias any tensor it reads.
- a node writes memory when its target says so in any spelling Dynamo produces: in-place methods
  (`x.mul_`, also `torch.Tensor.mul_(x, ..)`), `torch.*_` functions, `operator.iadd` and friends
  (`x += y`), `operator.setitem`, `out=` and `inplace=True` arguments, ops whose schema marks an
  argument as written, a few functions that update state (`batch_norm` running stats, `embedding`
  with `max_norm`) and every callable this module cannot vouch for (it may write its tensor
  arguments).  Known-pure torch functions (`F.linear`, `F.scaled_dot_product_attention`, ...) are
  not writes.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

from . import grad_mode
from .nodes import node_value
from .source import locate

# `x += y` and friends: Dynamo keeps them as the operator module's in-place functions.
_INPLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.setitem, operator.delitem,
})
# In-place dunders of Tensor (called as `torch.Tensor.__setitem__(x, i, v)` or as methods).
_INPLACE_DUNDERS = frozenset({
    "__setitem__", "__delitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
    "__ifloordiv__", "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__",
    "__ilshift__", "__irshift__",
})
# Trailing-underscore methods that change a tensor's autograd metadata, not its values.
_METADATA_ONLY = frozenset({"requires_grad_", "retain_grad_", "share_memory_"})
# Higher-order ops whose subgraphs Dynamo traced without side effects on their inputs.
_PURE_HOPS = frozenset({"tag_activation_checkpoint", "wrap", "autograd_function_apply",
                        "flex_attention", "flex_attention_backward"})
# Modules whose functions are pure unless their name or arguments say otherwise.
_PURE_MODULES = ("torch", "_operator", "operator", "builtins", "math")


def _state_writes(target: Any, args: tuple, kwargs: dict) -> list | None:
    """Arguments that functions which look pure update in place (running stats, renormed rows)."""
    if target is F.batch_norm or target is torch.batch_norm:
        b = _bind(target, args, kwargs)
        if b is not None and b.get("training"):
            return [b.get("running_mean"), b.get("running_var")]
    if target is F.instance_norm:
        b = _bind(target, args, kwargs)
        if b is not None and b.get("use_input_stats", True):
            return [b.get("running_mean"), b.get("running_var")]
    if target is F.embedding:
        b = _bind(target, args, kwargs)
        if b is not None and b.get("max_norm") is not None:
            return [b.get("weight")]
    return None


def _bind(target: Any, args: tuple, kwargs: dict) -> dict | None:
    try:
        sig = inspect.signature(target)
        b = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    b.apply_defaults()
    return dict(b.arguments)


def _schema_writes(target: Any, args: tuple, kwargs: dict) -> list:
    """Arguments an OpOverload's schema marks as written (any overload, for a packet)."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        schemas = [getattr(target, o)._schema for o in target.overloads()]
    else:
        schemas = [target._schema]
    out, seen = [], set()
    for schema in schemas:
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write and i not in seen:
                seen.add(i)
                out.append(args[i] if i < len(args) else kwargs.get(a.name))
    return out


def _tensor_args(node: fx.Node) -> list:
    return list(node.all_input_nodes)


_INPLACE_INDEX: dict = {}  # target -> position of its `inplace` parameter (None: it has none)


def _inplace_flag(target: Any, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("inplace") is True:
        return True
    if "inplace" in kwargs:
        return False
    try:
        i = _INPLACE_INDEX[target]
    except KeyError:
        try:
            params = list(inspect.signature(target).parameters)
        except (TypeError, ValueError):
            params = []
        i = _INPLACE_INDEX[target] = params.index("inplace") if "inplace" in params else None
    except TypeError:  # unhashable target
        return False
    return i is not None and i < len(args) and args[i] is True


def written_args(node: fx.Node) -> list:
    """The argument values `node` may write (fx nodes, or anything for nodes that are unknown)."""
    args, kwargs = tuple(node.args), dict(node.kwargs)
    outs = kwargs.get("out")
    out = list(outs) if isinstance(outs, (tuple, list)) else ([outs] if outs is not None else [])
    if node.op == "call_method":
        name = str(node.target)
        if name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__")
                                        and name not in _METADATA_ONLY):
            return [args[0]] + out
        return out
    if node.op == "call_module":
        return _tensor_args(node)  # a module may do anything to its inputs
    if node.op != "call_function":
        return []
    t = node.target
    if t in _INPLACE_OPERATORS:
        return [args[0]]
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return _schema_writes(t, args, kwargs) + out
    if isinstance(t, torch._ops.HigherOrderOperator):
        # Dynamo refuses bodies of these that write their inputs; any other (a user Triton
        # kernel's wrapper, ...) may write what it is given.
        return [] if t.name() in _PURE_HOPS else _tensor_args(node)
    name = getattr(t, "__name__", "")
    owner = getattr(t, "__objclass__", None)
    if owner is not None and issubclass(owner, torch._C.TensorBase):  # torch.Tensor.add_(x, y)
        if name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__")
                                        and name not in _METADATA_ONLY):
            return [args[0]] + out
        return out
    module = getattr(t, "__module__", None) or ""
    if module.split(".")[0] in _PURE_MODULES:
        if name.endswith("_") and not name.endswith("__"):  # torch.relu_, F.relu_, torch._foreach_add_
            return [args[0]] + out if args else out
        state = _state_writes(t, args, kwargs)
        if state is not None:
            return state + out
        if _inplace_flag(t, args, kwargs):
            return [args[0]] + out
        return out
    return _tensor_args(node)  # an unknown callable: it may write any tensor it is given


def _flat_nodes(values: list) -> list[fx.Node]:
    out: list = []
    fx.node.map_aggregate(values, lambda a: out.append(a) if isinstance(a, fx.Node) else None)
    return out


def _storages(value: Any) -> set | None:
    """Storages of a value (tensor, or tuple of tensors); None when the value is unknown."""
    if isinstance(value, torch.Tensor):
        try:
            return {StorageWeakRef(value.untyped_storage())}
        except Exception:  # noqa: BLE001 - e.g. a tensor subclass without storage: unknown
            return None
    if isinstance(value, (tuple, list)):
        acc: set = set()
        for v in value:
            s = _storages(v)
            if s is None:
                return None
            acc |= s
        return acc
    if value is None or isinstance(value, (int, float, bool, torch.SymInt, torch.SymFloat,
                                           torch.SymBool, torch.dtype, torch.device, str)):
        return set()
    return None


@dataclass
class Write:
    node: fx.Node  # the node that writes
    target: fx.Node  # the argument it writes
    keys: frozenset  # memory it writes


class Memory:
    """Alias sets and the writes of one graph (a snapshot: rebuild it after the graph changes)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.pos = {n: i for i, n in enumerate(graph.nodes)}
        self._keys: dict[fx.Node, frozenset] = {}
        self.writes: list[Write] = []
        for n in graph.nodes:
            for a in _flat_nodes(written_args(n)):
                self.writes.append(Write(n, a, self.keys(a)))

    def keys(self, node: fx.Node) -> frozenset:
        """The memory a node's value may live in: its storages, or, when its example value is
        unknown, the node itself and whatever its inputs may live in."""
        k = self._keys.get(node)
        if k is None:
            s = _storages(node_value(node)) if node.op != "output" else set()
            if s is None:
                s = {node}
                for a in node.all_input_nodes:
                    s |= self.keys(a)
            k = self._keys[node] = frozenset(s)
        return k

    def first_write(self, reads, lo: int, hi: int, skip=frozenset(), starts=None):
        """The first write strictly between positions lo and hi to memory one of `reads` lives in,
        as (write, the read it hits), or None.  `starts`: per read, a later lower bound than lo
        (a write before it precedes every read of that value)."""
        if not self.writes:
            return None
        wanted: dict = {}
        for r in reads:
            s = max(lo, starts.get(r, lo)) if starts else lo
            for k in self.keys(r):
                if k not in wanted or s < wanted[k][1]:
                    wanted[k] = (r, s)
        for w in self.writes:
            p = self.pos.get(w.node, -1)
            if lo < p < hi and w.node not in skip:
                for k in w.keys:
                    if k in wanted and p > wanted[k][1]:
                        return w, wanted[k][0]
        return None


def rewritten_before(nodes, until: int, memory: Memory) -> str | None:
    """Why a fact a constraint proved about `nodes` from the ops that computed them (their values
    come in equal pairs, ...) may no longer hold when read at position `until`: a write after a
    node runs and before `until` to memory it lives in (the values were changed in place since the
    proof's op made them); None when no such write exists."""
    for n in nodes:
        if n not in memory.pos:
            continue
        hit = memory.first_write({n}, memory.pos[n], until)
        if hit is not None:
            w, r = hit
            return f"{describe(w, r)} after it is computed"
    return None


def has_writes(graph: fx.Graph) -> bool:
    return any(_flat_nodes(written_args(n)) for n in graph.nodes)


def _line(node: fx.Node) -> str:

    loc = locate(node)
    return f" (line {loc.line})" if loc.line else ""


def describe(w: Write, read: fx.Node) -> str:
    what = f"`{w.target.name}`" if isinstance(w.target, fx.Node) else "its argument"
    if read is not w.target:
        what += f", which shares memory with `{read.name}`"
    return f"`{w.node.name}`{_line(w.node)} writes {what}"


def _bridges(covered: set, bound: set, limit: int = 8) -> set:
    """Nodes between a bound input and the covered nodes that read it (casts the matcher looked
    through stay in the graph, so their reads happen where they sit, before the match)."""
    found: set = set()
    memo: dict = {}

    def reaches(n: fx.Node, depth: int) -> bool:
        if n in bound:
            return True
        if depth == 0 or n.op in ("placeholder", "get_attr") or n in covered:
            return False
        v = node_value(n)
        if v is not None and not isinstance(v, torch.Tensor):  # a size: reads no memory
            return False
        if n not in memo:
            memo[n] = False
            hit = [a for a in n.all_input_nodes if reaches(a, depth - 1)]
            memo[n] = bool(hit)
            if hit:
                found.add(n)
        return memo[n]

    for c in covered:
        for a in c.all_input_nodes:
            if a not in covered:
                reaches(a, limit)
    return found


def match_problem(match, where: fx.Node | None, memory: Memory) -> str | None:
    """Why a write or an alias makes replacing `match` (inserted before `where`) change the
    program, or None."""
    covered = set(match.covered)
    bound = {b for b in match.bindings.values() if isinstance(b, fx.Node)}
    for n in match.covered:
        for a in _flat_nodes(written_args(n)):
            return (f"`{n.name}`{_line(n)} writes `{getattr(a, 'name', a)}` inside the pattern "
                    "(an in-place operation)")
    bridges = _bridges(covered, bound)
    reads = bound | covered | bridges | {a for c in covered for a in c.all_input_nodes}
    reads = {r for r in reads if r.op != "output"}
    pos = memory.pos
    spots = [pos[n] for n in covered | bridges if n in pos]
    if where is not None and where in pos:
        spots.append(pos[where] - 0.5)  # the replacement runs just before `where`
    if spots:
        # A value is read from its first read inside the match on (and by the replacement at
        # `where`): a write to it before both precedes every read, in the original and in the
        # rewrite alike (TRL writes `labels[labels == -100] = 0` after the lm head, before the
        # gather).  Values no covered node reads keep the whole window.
        first: dict = {}
        for n in covered | bridges:
            if n in pos:
                for a in (n, *n.all_input_nodes):
                    first[a] = min(first.get(a, pos[n]), pos[n])
        if where is not None and where in pos:
            first = {a: min(p, pos[where] - 0.5) for a, p in first.items()}
        hit = memory.first_write(reads, min(spots), max(spots), skip=covered, starts=first)
        if hit is not None:
            w, r = hit
            return f"{describe(w, r)}, which the pattern reads between its uses"
    # `torch.no_grad()` blocks inside the match (ligerfx/graph/grad_mode.py): the fused op runs in one
    # autograd mode, so what ran with autograd off must read only inputs it can pass detached.
    problem = grad_mode.plan(match, where)[0]
    if problem:
        return problem
    # The replacement returns new tensors: an output that was a view of an input (or of another
    # output) would stop sharing its memory.
    # (a binding a pattern's constraints absorbed into the match is no input of the replacement)
    inputs = [b for b in bound - covered if isinstance(node_value(b), torch.Tensor)]
    seen: dict = {}
    for o in match.outputs:
        ok = memory.keys(o)
        for b in inputs:
            if ok & memory.keys(b):
                return (f"output `{o.name}` shares memory with input `{b.name}` (a view of it); "
                        "the fused op would return a new tensor")
        for k in ok:
            if k in seen and seen[k] is not o:
                return (f"outputs `{seen[k].name}` and `{o.name}` share memory; the fused op "
                        "would return separate tensors")
            seen[k] = o
    return None


def cse_blocked(memory: Memory | None, a: fx.Node, b: fx.Node) -> bool:
    """Whether two nodes computing the same expression may see different values: something their
    inputs' memory lives in is written between them."""
    if memory is None or a not in memory.pos or b not in memory.pos:
        return False
    lo, hi = sorted((memory.pos[a], memory.pos[b]))
    return memory.first_write(set(a.all_input_nodes) | set(b.all_input_nodes), lo, hi) is not None

