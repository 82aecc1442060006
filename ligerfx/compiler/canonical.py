"""A canonical view of an FX graph: one spelling for each piece of math.

Dynamo's graphs keep the user's spelling (`x.pow(2)`, `x * x`, `torch.square(x)`; `torch.rsqrt(v)`,
`1 / torch.sqrt(v)`, `a / v.sqrt()`; `.float()`, `.to(torch.float32)`, `.type_as(y)`; `dim=-1` and
`dim=2`).  Rather than writing every pattern in every spelling, both the patterns and the graph
are read through this view, where each value is a `CNode` with a canonical op name and canonical
arguments.  The view never changes the graph: it only maps it, so code that is not rewritten keeps
its exact numerics.

Rules (each is an identity of real arithmetic, so a match means the same math):
- function, method and operator forms share one name (`operator.mul`, `torch.mul`, `Tensor.mul`);
- `pow(x, 2)` and `x * x` are `square(x)`; `pow(x, .5)` is `sqrt`, `pow(x, -.5)` is `rsqrt`;
- `1 / y` is `reciprocal(y)`; `reciprocal(sqrt(v))` is `rsqrt(v)`; `a / sqrt(v)` is `a * rsqrt(v)`;
- reductions carry a sorted tuple of negative dims and a bool keepdim; `var` carries a correction;
  a reduction over one dim with keepdim=False then unsqueezed at that dim (`.unsqueeze(-1)`,
  `[..., None]`) is the keepdim=True reduction;
- every dtype conversion is `cast`; a cast that changes nothing (and `contiguous`) is an identity
  cast, which the matcher always looks through; other casts only for patterns that allow them;
- arithmetic that is the identity for every input (`x * 1`, `x / 1`, `x - 0`, `x + -0.0`, with a
  Python number, keeping dtype and shape) is an identity cast too (see `noop_source`);
- pure nodes with equal ops and arguments are merged (common subexpressions), so code that writes
  `(x - mu)` twice matches a pattern that names it once, and q and k indexing or expanding one
  table each in their own nodes (`freqs[:, :, None, :]`, `cos.repeat_interleave(2, -1)`) share
  it; an op the view has no form for is pure when its aten schema writes nothing but `out=` and
  is not random (`schema_pure`);
- a basic slice along one dim (`x[..., a:b]`, `x[:, :, a:b]`, `narrow`, and a piece of `chunk` /
  `split` of a static size) is `slice(x, dim, start, end, step)`: a missing start is 0, a missing
  step 1, and an end at or past a static dim size is None (so `chunk(2)[1]` is `x[..., h:]`);
- `cat`, `stack` and `flatten` carry negative dims; a `view` / `reshape` / `unflatten` that splits one dim
  in two with a static inner size is `unflatten(x, dim, inner)`; a `view` / `reshape` / `flatten`
  that only drops a trailing dim of static size 1 is `squeeze(x, -1)`;
- one integer index (`x[..., i]`, `x.select(d, i)`, piece i of `x.unbind(d)`) is `select(x, d, i)`
  (negative dim, index in [0, size)); a bare `x[i]` keeps its `getitem` form; selecting the inner
  dim of an `unflatten(src, d, k)` is the strided slice `slice(src, d, i, None, k)`
  (`x.unflatten(-1, (-1, 2))[..., 1]` is `x[..., 1::2]`);
- negation moves out of a sum: `p + (-q)` and `(-q) + p` are `p - q`, `p + a * (-b)` is
  `p - a * b` (exact: negation is, and rounding is symmetric);
- `clamp` / `clip` / `clamp_min` / `clamp_max` (function or method, bounds by position or keyword)
  are `clamp(x, min, max)`, None for a side without a bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ligerfx.graph.nodes import (CONVERT_METHODS, FUNCTIONS, IDENTITY_METHODS, METHOD_ALIASES,
                                 NOOP_OPS, node_pure, node_value, noop_source, target_name)

CAST = "cast"
INPUT = "input"
COMMUTATIVE = frozenset({"add", "mul"})


# Signatures (after `self`/`input`) used to put positional and keyword arguments in one order.
# "name=default" gives a default; ops absent here keep their raw args.
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "add": ("other", "alpha=1"), "sub": ("other", "alpha=1"), "mul": ("other",),
    "div": ("other", "rounding_mode=None"), "pow": ("exponent",),
    "mean": ("dim=None", "keepdim=False", "dtype=None"),
    "sum": ("dim=None", "keepdim=False", "dtype=None"),
    "var": ("dim=None", "unbiased=None", "keepdim=False", "correction=None"),
    "silu": ("inplace=False",), "gelu": ("approximate='none'",), "relu": ("inplace=False",),
    "rms_norm": ("normalized_shape", "weight=None", "eps=None"),
    "layer_norm": ("normalized_shape", "weight=None", "bias=None", "eps=1e-05"),
    "linear": ("weight", "bias=None"),
    "softmax": ("dim", "dtype=None"), "log_softmax": ("dim", "dtype=None"),
    "transpose": ("dim0", "dim1"), "unsqueeze": ("dim",),
    "cross_entropy": ("target", "weight=None", "size_average=None", "ignore_index=-100",
                      "reduce=None", "reduction='mean'", "label_smoothing=0.0"),
    "nll_loss": ("target", "weight=None", "size_average=None", "ignore_index=-100",
                 "reduce=None", "reduction='mean'"),
    "cat": ("dim=0",), "stack": ("dim=0",), "flatten": ("start_dim=0", "end_dim=-1"),
    "gather": ("dim", "index", "sparse_grad=False"), "squeeze": ("dim=None",),
    "logsumexp": ("dim", "keepdim=False"),
    "clamp": ("min=None", "max=None"), "clamp_min": ("min",), "clamp_max": ("max",),
}
_UNARY = {"neg", "square", "sqrt", "rsqrt", "reciprocal", "exp", "log", "erf", "tanh", "sigmoid",
          "abs", "relu", "view_as_complex", "view_as_real"}
_REDUCTIONS = {"mean", "sum", "var", "logsumexp"}
# Ops whose canonical nodes may be merged when their arguments are equal (no randomness, no state).
_PURE = _UNARY | _REDUCTIONS | {"add", "sub", "mul", "div", "pow", CAST, "silu", "gelu",
                                "rms_norm", "layer_norm", "linear", "matmul", "getitem",
                                "transpose", "unsqueeze", "slice", "unflatten", "cat",
                                "stack", "flatten", "view", "reshape", "expand", "permute",
                                "squeeze", "select", "clamp"}

_NO_DEFAULT = object()
_FLOAT_WIDE = (torch.float32, torch.float64)


@dataclass(eq=False)
class CNode:
    """One canonical value.

    `nodes`: the fx nodes that compute exactly this value (several after merging duplicates; none
    for a value the view synthesised, such as the `rsqrt` in `a / sqrt(v)`).
    `folded`: fx nodes computing intermediate values that this canonical node absorbed.
    `identity`: for casts, the cast changes neither dtype nor device.
    """

    op: str
    args: tuple = ()
    nodes: list = field(default_factory=list)
    folded: list = field(default_factory=list)
    identity: bool = False
    meta_node: fx.Node | None = None

    @property
    def node(self) -> fx.Node | None:
        return self.nodes[0] if self.nodes else self.meta_node

    @property
    def value(self) -> Any:
        return node_value(self.node) if self.node is not None else None

    @property
    def covers(self) -> list:
        return self.nodes + self.folded

    def __repr__(self) -> str:
        name = self.node.name if self.node is not None else "?"
        return f"CNode({self.op}:{name})"




def _rank(v: Any) -> int | None:
    if isinstance(v, torch.Tensor):
        return v.dim()
    shape = getattr(v, "shape", None)
    return len(shape) if shape is not None else None


def _dtype(v: Any):
    return getattr(v, "dtype", None)


def _norm_dims(dim: Any, rank: int | None):
    """Dims as a sorted tuple of negative ints; None if they cannot be normalised."""
    if dim is None:
        return tuple(range(-rank, 0)) if rank is not None else None
    dims = tuple(dim) if isinstance(dim, (list, tuple, torch.Size)) else (dim,)
    if not all(isinstance(d, int) for d in dims):
        return None
    if rank is None:
        return tuple(sorted(dims)) if all(d < 0 for d in dims) else None
    return tuple(sorted(d - rank if d >= 0 else d for d in dims))


def _bind(op: str, args: tuple, kwargs: dict):
    """Arrange (self, *args, **kwargs) in signature order; None if a keyword is unknown."""
    sig = _SIGNATURES.get(op)
    if sig is None:
        return None
    first, rest = args[0], list(args[1:])
    # `_stacklevel` (F.softmax / log_softmax, as fx records them) only sets a warning's frame
    kwargs = {k: v for k, v in kwargs.items() if k != "_stacklevel"}
    out = [first]
    names = []
    for spec in sig:
        name, _, default = spec.partition("=")
        names.append(name)
        if rest:
            out.append(rest.pop(0))
        elif name in kwargs:
            out.append(kwargs[name])
        elif default:
            out.append(eval(default))  # noqa: S307 - literals from the table above
        else:
            return None
    if rest or any(k not in names for k in kwargs):
        return None
    return out


def _is_one(c: Any) -> bool:
    return isinstance(c, (int, float)) and not isinstance(c, bool) and c == 1


class View:
    """The canonical view of one graph: `view[fx_node] -> CNode`."""

    def __init__(self, graph: fx.Graph, *, strip_casts: bool = False):
        # strip_casts: used for pattern graphs, which are dtype-agnostic.
        self.graph = graph
        self.strip_casts = strip_casts
        self._of: dict[fx.Node, CNode] = {}
        self._memo: dict[tuple, CNode] = {}
        # Equal expressions are one value only when nothing they read is written between them;
        # the writes are looked up only in graphs that have some.  (Imported here: mutation reads
        # node values from this module.)
        from ligerfx.graph import mutation

        self._memory = mutation.Memory(graph) if mutation.has_writes(graph) else None
        for node in graph.nodes:
            if node.op != "output":
                self._of[node] = self._build(node)

    def __getitem__(self, node: fx.Node) -> CNode:
        return self._of[node]

    def __contains__(self, node) -> bool:
        return node in self._of

    def cnodes(self):
        seen = set()
        for c in self._of.values():
            if id(c) not in seen:
                seen.add(id(c))
                yield c

    def users(self) -> dict:
        """id(canonical node) -> the canonical nodes that read it (each reader once), for
        walking down the data flow."""
        out: dict = {}
        for c in self.cnodes():
            for a in arg_cnodes(c.args):
                readers = out.setdefault(id(a), [])
                if not readers or readers[-1] is not c:
                    readers.append(c)
        return out

    # -- construction -------------------------------------------------------------------------
    def _arg(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self._of[a]
        if isinstance(a, (list, tuple)):
            return tuple(self._arg(x) for x in a)
        if isinstance(a, torch.Size):
            return tuple(a)
        return a

    def _leaf(self, node: fx.Node) -> CNode:
        return CNode(INPUT, (node.name,), nodes=[node])

    def _opaque(self, node: fx.Node, name: str) -> CNode:
        args = tuple(self._arg(a) for a in node.args)
        kw = tuple(sorted((k, self._arg(v)) for k, v in node.kwargs.items()))
        # Pure ops merge even when the view has no canonical form for them (`x[..., 0]` twice,
        # `cos.repeat_interleave(2, -1)` once per rotated tensor).
        c = CNode(name, args + ((("kwargs", kw),) if kw else ()), nodes=[node])
        return self._intern(c, pure=name in _PURE or node_pure(node))

    def _build(self, node: fx.Node) -> CNode:
        if node.op in ("placeholder", "get_attr"):
            return self._leaf(node)
        if node.op == "call_method":
            name = METHOD_ALIASES.get(node.target, node.target)
        elif node.op == "call_function":
            name = FUNCTIONS.get(node.target)
            if name is None:
                return self._opaque(node, target_name(node.target))
        else:  # call_module (only in hand-built graphs)
            return self._leaf(node)

        if name in CONVERT_METHODS or name in IDENTITY_METHODS:
            return self._cast(node)
        if name in NOOP_OPS:
            src = noop_source(node)
            if src is not None:
                if self.strip_casts:
                    return self._of[src]
                return self._intern(CNode(CAST, (self._of[src], _dtype(node_value(node))),
                                          nodes=[node], identity=True))
        shaped = self._shape_op(node, name)
        if shaped is not None:
            return shaped
        bound = _bind(name, tuple(node.args), dict(node.kwargs))
        if bound is None:
            if name in _UNARY and len(node.args) == 1 and not node.kwargs:
                bound = [node.args[0]]
            else:
                return self._opaque(node, name)
        args = [self._arg(a) for a in bound]
        c = self._canonical(node, name, args)
        if c is None:
            return self._opaque(node, name)
        return c

    def _cast(self, node: fx.Node) -> CNode:
        src = node.args[0]
        if not isinstance(src, fx.Node):
            return self._leaf(node)
        inp = self._of[src]
        vin, vout = node_value(src), node_value(node)
        din, dout = _dtype(vin), _dtype(vout)
        if self.strip_casts or node.target in IDENTITY_METHODS:
            same = True
        else:
            if din is None or dout is None:
                return self._opaque(node, "cast?")
            dev_in, dev_out = getattr(vin, "device", None), getattr(vout, "device", None)
            if dev_in != dev_out:
                return self._opaque(node, "to_device")
            same = din == dout
        if same and self.strip_casts:
            # Pattern graphs are dtype-agnostic: a cast in a pattern is simply its input.
            return inp
        return self._intern(CNode(CAST, (inp, dout), nodes=[node], identity=same))

    def _canonical(self, node: fx.Node, name: str, a: list):
        x = a[0]
        rank = _rank(x.value) if isinstance(x, CNode) else None
        if name in ("add", "sub"):
            if not _is_one(a[2]):
                return None
            if name == "add":
                signed = self._add_negated(x, a[1], node)
                if signed is not None:
                    return signed
            return self._mk(name, (x, a[1]), node)
        if name == "div":
            if a[2] is not None:
                return None
            num, den = x, a[1]
            if _is_one(num) and isinstance(den, CNode):
                return self._unary("reciprocal", den, node)
            if isinstance(den, CNode) and den.op == "sqrt" and den.nodes:
                r = self._synth("rsqrt", (den.args[0],), den)
                return self._mk("mul", (num, r), node)
            return self._mk("div", (num, den), node)
        if name == "mul":
            if isinstance(x, CNode) and x is a[1]:
                return self._mk("square", (x,), node)
            return self._mk("mul", (x, a[1]), node)
        if name == "pow":
            e = a[1]
            alias = {2: "square", 0.5: "sqrt", -0.5: "rsqrt", -1: "reciprocal"}
            if isinstance(e, (int, float)) and not isinstance(e, bool) and e in alias:
                return self._mk(alias[e], (x,), node)
            return self._mk("pow", (x, e), node)
        if name in ("clamp_min", "clamp_max"):  # one side of clamp(x, min, max)
            lo, hi = (a[1], None) if name == "clamp_min" else (None, a[1])
            return self._mk("clamp", (x, lo, hi), node)
        if name == "relu":  # F.relu(x, inplace=True) writes x: not this value (opaque)
            return None if a[1] else self._mk("relu", (x,), node)
        if name in _UNARY:
            return self._unary(name, x, node)
        if name in ("mean", "sum"):
            if a[3] is not None:
                return None
            dims = a[1] if isinstance(a[1], CNode) else _norm_dims(a[1], rank)
            if dims is None:
                return None
            return self._mk(name, (x, dims, bool(a[2])), node)
        if name == "logsumexp":
            dims = _norm_dims(a[1], rank)
            return None if dims is None else self._mk(name, (x, dims, bool(a[2])), node)
        if name == "var":
            dim, unbiased, keepdim, correction = a[1], a[2], a[3], a[4]
            if correction is None:
                correction = 0 if unbiased is False else 1
            dims = dim if isinstance(dim, CNode) else _norm_dims(dim, rank)
            if dims is None:
                return None
            return self._mk("var", (x, dims, correction, bool(keepdim)), node)
        if name == "silu":
            return None if a[1] else self._mk("silu", (x,), node)
        if name == "gelu":
            return self._mk("gelu", (x, a[1]), node)
        if name in ("softmax", "log_softmax"):
            if a[2] is not None and not (name == "log_softmax" and a[2] in _FLOAT_WIDE):
                return None
            # log_softmax(x, d, dtype=fp32/fp64) casts x first; its form drops the cast, so a
            # pattern over it must check the node's own output dtype (the loss patterns do)
            d = _norm_dims(a[1], rank)
            return None if d is None else self._mk(name, (x, d[0]), node)
        if name in ("gather", "squeeze") and len(a) >= 2 and isinstance(a[1], int) \
                and rank is not None and rank > 0:
            # one negative dim, as for reductions (`squeeze(2)` of a rank-3 value is squeeze(-1))
            d = a[1] - rank if a[1] >= 0 else a[1]
            return self._mk(name, (x, d) + tuple(a[2:]), node)
        if name == "unsqueeze":
            d = a[1]
            if isinstance(d, int) and d >= 0 and rank is not None:
                d = d - (rank + 1)
            return self._unsqueeze(x, d, node)
        if name in ("cat", "stack"):
            parts = a[0] if isinstance(a[0], tuple) else None
            r = _rank(parts[0].value) if parts and isinstance(parts[0], CNode) else None
            d = _norm_dims(a[1], None if r is None else r + (name == "stack"))
            return None if parts is None or d is None else self._mk(name, (parts, d[0]), node)
        if name == "flatten":
            if rank is None or not all(isinstance(d, int) for d in a[1:3]):
                return None
            start, end = (d - max(rank, 1) if d >= 0 else d for d in a[1:3])
            return self._mk(name, (x, start, end), node)
        if name == "transpose":
            d0, d1 = a[1], a[2]
            if rank is not None and isinstance(d0, int) and isinstance(d1, int):
                d0, d1 = sorted((d0 - rank if d0 >= 0 else d0, d1 - rank if d1 >= 0 else d1))
            return self._mk(name, (x, d0, d1), node)
        return self._mk(name, tuple(a), node)

    # -- slices and reshapes ------------------------------------------------------------------
    def _shape_op(self, node: fx.Node, name: str) -> CNode | None:
        """`slice` / `unflatten` canonical forms of indexing and reshaping nodes, or None."""
        if name == "getitem" and len(node.args) == 2 and not node.kwargs:
            src, idx = node.args
            if not isinstance(src, fx.Node):
                return None
            if isinstance(idx, int) and not isinstance(idx, bool):
                along = _unbind_dim(src)
                if along is not None:  # `x.unbind(d)[i]` is `x.select(d, i)`
                    return self._select(node, src.args[0], along, idx)
                piece = _split_piece(src, idx)
                return None if piece is None else self._slice(node, *piece)
            return self._index_slice(node, src, idx)
        if name == "narrow" and len(node.args) == 4 and not node.kwargs:
            x, dim, start, length = node.args
            if isinstance(x, fx.Node) and all(isinstance(v, int) for v in (dim, start, length)):
                size = _static_size(x, dim)
                end = start + length
                if start >= 0 and size is not None and end >= size:
                    end = None
                return self._slice(node, x, dim, start, end, 1)
            return None
        if name == "select":
            args = list(node.args) + [node.kwargs.get(k) for k in ("dim", "index") if k in node.kwargs]
            if len(args) == 3 and isinstance(args[0], fx.Node):
                return self._select(node, *args)
            return None
        if name in ("view", "reshape", "unflatten"):
            return self._unflatten(node) or self._drop_unit_dim(node)
        if name == "flatten":
            return self._drop_unit_dim(node)
        return None

    def _select(self, node, x, dim, i) -> CNode | None:
        """`select(x, dim, i)` with a negative dim and, where the size is static, an index in
        [0, size); on a dim of static size 1 it is `squeeze` (the same values)."""
        rank = _rank(node_value(x))
        if (rank is None or not isinstance(dim, int) or not -rank <= dim < rank
                or not isinstance(i, int) or isinstance(i, bool)):
            return None
        size = _static_size(x, dim)
        dim = dim - rank if dim >= 0 else dim
        if size is not None:
            if not -size <= i < size:
                return None
            i = i + size if i < 0 else i
            if size == 1:
                return self._mk("squeeze", (self._of[x], dim), node)
            u = self._of[x]
            if u.op == "unflatten" and u.nodes and u.args[1] == dim and u.args[2] == size:
                # element i of each group of `size` along a dim split by unflatten: the strided
                # slice `src[..., i::size]` of the dim before the split (the unflatten is folded)
                c = self._mk("slice", (u.args[0], dim, i, None, size), node)
                c.folded.extend(n for n in u.covers if n not in c.folded and n not in c.nodes)
                return c
        return self._mk("select", (self._of[x], dim, i), node)

    def _drop_unit_dim(self, node: fx.Node) -> CNode | None:
        # A view / reshape / flatten that only removes a trailing dim of static size 1: `squeeze`
        # of it.  Trailing only: a leading or middle dim of size 1 is usually a batch or head
        # count of 1 (`x.view(-1, d)` at batch 1), which must keep the spelling its pattern has.
        shapes = _view_shapes(node)
        if shapes is None:
            return None
        src, si, so = shapes
        if len(so) != len(si) - 1:
            return None
        from ligerfx.graph.symbolic import known_equal, known_int

        if known_int(si[-1]) == 1 and all(known_equal(a, b) for a, b in zip(si[:-1], so)):
            return self._mk("squeeze", (self._of[src], -1), node)
        return None

    def _slice(self, node, x, dim, start, end, step) -> CNode | None:
        rank = _rank(node_value(x))
        if rank is None or not isinstance(dim, int) or not -rank <= dim < rank:
            return None
        return self._mk("slice", (self._of[x], dim - rank if dim >= 0 else dim,
                                  self._arg(start), self._arg(end), self._arg(step)), node)

    def _index_slice(self, node, src, idx) -> CNode | None:
        # Only basic slicing along one dim: slices and at most one Ellipsis, every other dim whole.
        items = idx if isinstance(idx, tuple) else (idx,)
        rank = _rank(node_value(src))
        if rank is not None and any(i is None for i in items):
            return self._index_unsqueeze(node, src, items, rank)
        if rank is not None and sum(isinstance(i, int) and not isinstance(i, bool)
                                    for i in items) == 1:
            return self._index_squeeze(node, src, items, rank)
        if rank is None or not all(isinstance(i, slice) or i is Ellipsis for i in items):
            return None
        n_ell = sum(i is Ellipsis for i in items)
        if n_ell > 1 or len(items) - n_ell > rank:
            return None
        if n_ell:
            at = items.index(Ellipsis)
            fill = (slice(None),) * (rank - (len(items) - 1))
            items = items[:at] + fill + items[at + 1:]
        cut = [(d, s) for d, s in enumerate(items) if not _whole(s)]
        if len(cut) != 1:
            return None
        d, s = cut[0]
        start = 0 if s.start is None else s.start
        step = 1 if s.step is None else s.step
        end = s.stop
        size = _static_size(src, d)
        if isinstance(end, int) and size is not None and end >= size:
            end = None
        return self._slice(node, src, d, start, end, step)

    def _index_squeeze(self, node, src, items, rank) -> CNode | None:
        # `x[..., i]`, nothing else cut: select (squeeze on a dim of static size 1).
        if sum(i is Ellipsis for i in items) > 1 or len(items) - (Ellipsis in items) > rank:
            return None
        if not all((isinstance(i, int) and not isinstance(i, bool)) or i is Ellipsis
                   or (isinstance(i, slice) and _whole(i))
                   for i in items):
            return None
        at = items.index(Ellipsis) if Ellipsis in items else len(items)
        fill = (slice(None),) * (rank - (len(items) - (Ellipsis in items)))
        items = items[:at] + fill + items[at + (Ellipsis in items):]
        d = next(k for k, i in enumerate(items) if isinstance(i, int))
        return self._select(node, src, d, items[d])

    def _index_unsqueeze(self, node, src, items, rank) -> CNode | None:
        # `x[..., None]`, `x[:, None]`: one new dim of size 1 and nothing cut is unsqueeze.
        ell = [k for k, i in enumerate(items) if i is Ellipsis]
        if sum(i is None for i in items) != 1 or len(ell) > 1:
            return None
        if not all(i is None or i is Ellipsis or (isinstance(i, slice) and _whole(i)) for i in items):
            return None
        fill = rank - (len(items) - 1 - len(ell))
        if fill < 0:
            return None
        at = ell[0] if ell else len(items)
        items = items[:at] + (slice(None),) * fill + items[at + 1:] if ell else items + (slice(None),) * fill
        return self._unsqueeze(self._of[src], items.index(None) - (rank + 1), node)

    def _unsqueeze(self, x: Any, d: Any, node: fx.Node) -> CNode:
        # mean/sum/var over one dim with keepdim=False, the dim put back where it was: the same
        # values as keepdim=True (dims are negative, so the reduced dim -k and the new dim -k are
        # the same position); the reduction node is folded into the keepdim=True value.
        if (isinstance(x, CNode) and x.op in _REDUCTIONS and x.nodes and isinstance(d, int)
                and x.args[-1] is False and isinstance(x.args[1], tuple)
                and x.args[1] == (d,)):
            c = self._mk(x.op, x.args[:-1] + (True,), node)
            c.folded.extend(n for n in x.covers if n not in c.folded and n not in c.nodes)
            return c
        return self._mk("unsqueeze", (x, d), node)

    def _unflatten(self, node: fx.Node) -> CNode | None:
        # A reshape that splits exactly one dim into (outer, inner) with a static inner size.
        shapes = _view_shapes(node)
        if shapes is None:
            return None
        src, si, so = shapes
        if len(so) != len(si) + 1:
            return None
        from ligerfx.graph.symbolic import known_equal, known_int

        for d in range(len(si)):
            if (all(known_equal(a, b) for a, b in zip(si[:d], so[:d]))
                    and all(known_equal(a, b) for a, b in zip(si[d + 1:], so[d + 2:]))):
                inner = known_int(so[d + 1])
                if inner is not None and known_equal(so[d] * inner, si[d]):
                    return self._mk("unflatten", (self._of[src], d - len(si), inner), node)
        return None

    def _add_negated(self, x: Any, y: Any, node: fx.Node) -> CNode | None:
        """`p + (-q)`, `(-q) + p`, `p + a * (-b)`, `p + (-a) * b` as `p - q` / `p - a * b`.
        IEEE negation is exact and rounding is symmetric, so `a * (-b)` rounds to `-(a * b)` and
        `p + (-q)` is `p - q` bit for bit, in every floating dtype (type promotion ignores the
        sign); the negation nodes are folded into the subtraction.  Only a floating negation:
        an integer one wraps (`-INT_MIN` is INT_MIN, `-uint8(200)` is 56), so with a float
        operand `p + a * (-b)` is not `p - a * b`."""
        def floating(c):
            v = c.value
            return isinstance(v, torch.Tensor) and v.is_floating_point()

        for p, q in ((x, y), (y, x)):
            if not isinstance(p, CNode) or not isinstance(q, CNode) or not q.nodes:
                continue
            if q.op == "neg" and floating(q):
                c = self._mk("sub", (p, q.args[0]), node)
                c.folded.extend(n for n in q.covers if n not in c.folded)
                return c
            if q.op == "mul" and len(q.args) == 2:
                m0, m1 = q.args
                negs = [i for i, m in enumerate((m0, m1))
                        if isinstance(m, CNode) and m.op == "neg" and m.nodes and floating(m)]
                if len(negs) != 1:
                    continue
                i = negs[0]
                inner = q.args[i].args[0]
                prod = CNode("mul", (inner, m1) if i == 0 else (m0, inner), nodes=[],
                             folded=list(q.covers) + list(q.args[i].covers), meta_node=q.node)
                return self._mk("sub", (p, prod), node)
        return None

    def _unary(self, name: str, x: Any, node: fx.Node) -> CNode:
        if name == "reciprocal" and isinstance(x, CNode) and x.op == "sqrt" and x.nodes:
            # 1 / sqrt(v): the sqrt node is folded into one rsqrt value.
            c = self._mk("rsqrt", (x.args[0],), node)
            if not any(n in c.folded for n in x.nodes):
                c.folded.extend(x.nodes)
            return c
        return self._mk(name, (x,), node)

    def _synth(self, name: str, args: tuple, folded_from: CNode) -> CNode:
        return CNode(name, args, nodes=[], folded=list(folded_from.covers),
                     meta_node=folded_from.node)

    def _mk(self, name: str, args: tuple, node: fx.Node) -> CNode:
        return self._intern(CNode(name, tuple(args), nodes=[node]))

    def _intern(self, c: CNode, pure: bool | None = None) -> CNode:
        if not (c.op in _PURE if pure is None else pure) or not c.nodes:
            return c
        key = (c.op, tuple(_key(a) for a in c.args))
        try:
            hash(key)
        except TypeError:
            return c
        old = self._memo.get(key)
        if old is None:
            self._memo[key] = c
            return c
        if self._memory is not None:
            from ligerfx.graph.mutation import cse_blocked

            if any(cse_blocked(self._memory, a, b) for a in old.nodes for b in c.nodes):
                return c
        old.nodes.extend(n for n in c.nodes if n not in old.nodes)
        old.folded.extend(n for n in c.folded if n not in old.folded)
        return old








def _whole(s: Any) -> bool:
    return isinstance(s, slice) and s.start in (None, 0) and s.stop is None and s.step in (None, 1)


def _static_size(x: fx.Node, dim: int) -> int | None:
    from ligerfx.graph.symbolic import known_int

    v = node_value(x)
    if not isinstance(v, torch.Tensor) or not -v.dim() <= dim < v.dim():
        return None
    return known_int(v.shape[dim])


_CHUNK = {torch.chunk: "chunk", torch.split: "split"}


def _unbind_dim(src: fx.Node) -> int | None:
    """The dim of an `unbind` node (method or function), or None."""
    if not ((src.op == "call_method" and src.target == "unbind")
            or (src.op == "call_function" and src.target is torch.unbind)):
        return None
    args = list(src.args[1:]) + ([src.kwargs["dim"]] if "dim" in src.kwargs else [])
    if len(src.args) < 1 or not isinstance(src.args[0], fx.Node) or len(args) > 1:
        return None
    dim = args[0] if args else 0
    return dim if isinstance(dim, int) and not isinstance(dim, bool) else None


def _split_piece(src: fx.Node, i: int):
    """(input, dim, start, end, 1) of piece i of a `chunk` / `split` node with static sizes."""
    if src.op == "call_method" and src.target in ("chunk", "split"):
        kind = src.target
    elif src.op == "call_function" and src.target in _CHUNK:
        kind = _CHUNK[src.target]
    else:
        return None
    args, kw = list(src.args), dict(src.kwargs)
    x = args.pop(0) if args else kw.pop("input", kw.pop("tensor", None))
    how = args.pop(0) if args else kw.pop("chunks", kw.pop("split_size", kw.pop(
        "split_size_or_sections", None)))
    dim = args.pop(0) if args else kw.pop("dim", 0)
    if args or kw or not isinstance(x, fx.Node) or not isinstance(dim, int) or i < 0:
        return None
    size = _static_size(x, dim)
    if not size:
        return None
    if isinstance(how, int) and not isinstance(how, bool) and how > 0:
        step = -(-size // how) if kind == "chunk" else how
        bounds = [(s, min(s + step, size)) for s in range(0, size, step)]
    elif kind == "split" and isinstance(how, (list, tuple)) and all(isinstance(h, int) for h in how):
        if sum(how) != size:
            return None
        starts = [sum(how[:j]) for j in range(len(how))]
        bounds = [(s, s + h) for s, h in zip(starts, how)]
    else:
        return None
    if i >= len(bounds):
        return None
    start, end = bounds[i]
    return x, dim, start, (None if end >= size else end), 1


def _key(a: Any):
    if isinstance(a, CNode):
        return ("n", id(a))
    if isinstance(a, tuple):
        return ("t",) + tuple(_key(x) for x in a)
    if isinstance(a, slice):
        # slices are unhashable before Python 3.12: without this, two `t[:, :, None, :]` nodes
        # could never be merged
        return ("sl", _key(a.start), _key(a.stop), _key(a.step))
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("s", id(a))
    return ("c", type(a).__name__, a)


def arg_cnodes(args):
    """The canonical nodes among a node's args, those inside tuples (cat's list) included."""
    for a in args:
        if isinstance(a, CNode):
            yield a
        elif isinstance(a, tuple):
            yield from arg_cnodes(a)


def _view_shapes(node: fx.Node):
    """(source node, its shape, the view's shape) of a view-like node over a tensor, else None."""
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node):
        return None
    vin, vout = node_value(src), node_value(node)
    if not isinstance(vin, torch.Tensor) or not isinstance(vout, torch.Tensor):
        return None
    return src, tuple(vin.shape), tuple(vout.shape)
