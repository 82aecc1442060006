"""Higher-order ops whose operands include a graph (a body): which bodies the pattern pass rewrites.

Dynamo traces `torch.utils.checkpoint.checkpoint(layer, ...)` (when it can: see
docs/usage.md, "Activation checkpointing") into one call of
`torch.ops.higher_order.tag_activation_checkpoint(body, *operands, **kwargs)` whose `body` is a
GraphModule held by the graph (a `get_attr` node).  The layer's code lives only in that body, so
a pass that reads the outer graph alone would miss every norm, RoPE and MLP of a checkpointed
decoder layer.

A body is rewritten in place only where the op's meaning is "call this graph on these operands"
(what the body computes is what the op returns, and AOTAutograd traces the body like any other
code, so the `liger::` ops inside keep their own autograd; activation checkpointing then re-runs
the body, fused ops included, in the backward, as it re-runs any op).  Those ops are `RUN_BODY`.
Every other higher-order op with a graph operand (cond, while_loop, map, scan, flex attention's
score/mask functions, invoke_subgraph, autograd.Function bodies, ...) gives its body another
meaning (run on a branch, on each slice, on scalars inside an attention kernel, shared between
call sites and cached by identity): its body is searched on a copy, and anything the patterns
would have rewritten there is reported as a near miss naming the op, never rewritten.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx


def _hops(*names: str) -> tuple:
    """The higher-order ops of these names that this torch has (2.11 and 2.13 differ)."""
    found = []
    for name in names:
        try:
            found.append(getattr(torch.ops.higher_order, name))
        except (AttributeError, RuntimeError):
            continue
    return tuple(found)


# "Call this graph": tag_activation_checkpoint (torch.utils.checkpoint under Dynamo) and wrap
# (Dynamo's plain wrapper around a traced region).  Both return the body's outputs as they are.
RUN_BODY = _hops("tag_activation_checkpoint", "wrap")


def hop_name(node: fx.Node) -> str | None:
    """`torch.ops.higher_order.<name>` for a call of a higher-order op, else None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
        return None
    return f"torch.ops.higher_order.{node.target.__name__}"


def bodies(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, fx.GraphModule]]:
    """The graph operands of a higher-order op call: (attribute path in `gm`, GraphModule)."""
    out = []
    seen: set = set()

    def visit(a):
        if isinstance(a, fx.Node) and a.op == "get_attr" and a.target not in seen:
            obj = gm
            try:
                for part in a.target.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                return a
            if isinstance(obj, fx.GraphModule):
                seen.add(a.target)
                out.append((a.target, obj))
        return a

    fx.node.map_arg((node.args, node.kwargs), visit)
    return out


def runs_body(node: fx.Node) -> bool:
    """Whether `node` calls a higher-order op whose body the pattern pass may rewrite in place."""
    return node.op == "call_function" and any(node.target is h for h in RUN_BODY)


def operands(node: fx.Node, body_target: str) -> list | None:
    """The values a RUN_BODY call passes to its body's placeholders, in order (the arguments after
    the body), or None when the body is not the first argument."""
    if not node.args or not isinstance(node.args[0], fx.Node) \
            or node.args[0].target != body_target:
        return None
    return list(node.args[1:])


def inlined(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict, dict] | None:
    """A copy of `gm` with every RUN_BODY call replaced by its body's nodes (bodies within bodies
    too): (copy, {copy node name: the body path it came from, "" for the outer graph},
    {body path: the name of the outer call that runs it}).  None when `gm` has no such call.

    The copy is for looking only (the pattern pass searches it for rewrites that a body's
    boundary cuts in two); nothing runs it.  Node metadata (values, source lines) is kept."""
    if not any(runs_body(n) for n in gm.graph.nodes):
        return None
    graph = fx.Graph()
    root = torch.nn.Module()
    origin: dict[str, str] = {}
    calls: dict[str, str] = {}
    counter = iter(range(1 << 30))

    def attr(owner: fx.GraphModule, n: fx.Node) -> str:
        obj = owner
        for part in n.target.split("."):
            obj = getattr(obj, part)
        name = f"_probe_attr_{next(counter)}"
        setattr(root, name, obj)
        return name

    def copy(owner: fx.GraphModule, src: fx.Graph, env: dict, path: str, call: str):
        for n in src.nodes:
            if n.op == "placeholder" and n in env:
                continue
            if n.op == "output":
                value = fx.node.map_arg(n.args[0], lambda a: env[a])
                if not path:  # the outer graph's own output
                    graph.output(value)
                return value
            if n.op == "call_function" and n.target is operator.getitem \
                    and isinstance(env.get(n.args[0]), (tuple, list)):
                env[n] = env[n.args[0]][n.args[1]]
                continue
            subs = bodies(owner, n) if runs_body(n) else []
            ops = operands(n, subs[0][0]) if len(subs) == 1 else None
            if ops is not None:
                target, sub = subs[0]
                sub_path = f"{path}.{target}" if path else target
                calls.setdefault(sub_path, call or n.name)
                placeholders = [p for p in sub.graph.nodes if p.op == "placeholder"]
                if len(placeholders) != len(ops):
                    raise ValueError(f"{target}: {len(placeholders)} placeholders, "
                                     f"{len(ops)} operands")
                inner = {p: fx.node.map_arg(o, lambda a: env[a]) for p, o in zip(placeholders, ops)}
                env[n] = copy(sub, sub.graph, inner, sub_path, call or n.name)
                continue
            new = graph.node_copy(n, lambda a: env[a])
            if n.op in ("get_attr", "call_module"):
                new.target = attr(owner, n)
            env[n] = new
            origin[new.name] = path
        return None

    try:
        copy(gm, gm.graph, {}, "", "")
        return fx.GraphModule(root, graph), origin, calls
    except Exception:  # noqa: BLE001 - a body this copy cannot take: no probe, nothing reported
        return None
