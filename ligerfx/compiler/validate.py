"""Translation validation: each rewrite checked against the code it replaced, on real values.

With `options={"validate": True}` the backend, before handing a rewritten graph to the inner
backend, runs the graph Dynamo gave (kept as a copy before the rewrite) on the example inputs of the
compile, which are the real inputs of the first call, and keeps the values every rewritten region
reads.  Each region is then run three ways on those same values:

- the original nodes it replaced, in the inputs' dtypes (what eager computes),
- the new nodes that replaced them (what the compiled graph computes),
- the original nodes again in float64 (every floating input widened, every floating dtype the
  code names read as float64): the reference,

forward, and backward from a random upstream gradient (fresh `randn`, the same for the three; the
real upstream gradient only exists after the whole model ran, long after the graph is compiled),
to every floating input that required grad in the program.  Each node runs in the autograd mode it
runs in in the program (`no_grad` blocks inside a region are kept).  `within_eager_rounding` is
the rule "equal": the same non-finite positions and values, and elsewhere no further from float64
than the original in its own dtype is (times 1.25, plus a floor of 2e-5 relative in fp32/fp64 and
5% of the format's eps in bf16/fp16): the rule of tests/differential/oracle.py.

A region that differs, or whose new nodes raise where the original did not, is reported by
`check`; the backend rewrites a fresh copy of the original graph without it (a near miss says why),
validates what that rewrite made, and compiles the result.  Where the validator itself cannot run
a region (the original code or the float64 reference raises here; the inputs are fake, as in DDP's
buckets) the rewrite is kept, reported as "not validated" with the reason, and a warning is given:
the validator's limits do not take a checked pattern's rewrite away.  The global random state is
saved and restored, and inputs the graph writes in place are cloned first, so validation changes
nothing the program sees.  Only the pattern pass's rewrites are checked: the quantization pass is
lossy by design.  An output a rewrite deliberately does not compute (`Match.dropped`: an option's
contract, skip_logits' empty logits) is not compared and no gradient is sent through it; the
Result's `not_compared` says so.  `running()` is True while the validator runs code (so counters
of kernel launches, e.g. in tests, can tell the validator's calls from the program's).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ligerfx.graph import grad_mode
from ligerfx.graph.mutation import Memory
from ligerfx.graph.nodes import node_value


class ValidationWarning(UserWarning):
    """A rewrite was dropped (or could not be checked) by translation validation."""


class ValidationError(RuntimeError):
    """validate="raise": a rewrite differs from the code it replaced."""


# Process-wide, not per thread: the autograd engine runs a CUDA backward on its own threads.
_depth = 0


def running() -> bool:
    """True while translation validation runs code (the original graph, a region's three runs,
    their backward): a kernel call made now is the validator's, not the program's."""
    return _depth > 0


@contextlib.contextmanager
def _running():
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


# -- the rule ----------------------------------------------------------------------------------

def _err(x, ref, mask) -> float:
    x, ref = x.double()[mask], ref.double()[mask]
    if ref.numel() == 0:
        return 0.0
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def within_eager_rounding(what: str, got, low, ref, dtype, factor: float = 1.25,
                          noise: float = 0.0) -> str | None:
    """None when `got` is as good as eager's `low` against the float64 `ref`, else the reason.

    `got` / `low` may be None (no gradient).  Equal: same shape and dtype; integers identical;
    the same non-finite positions and values; elsewhere a relative error (norm of the difference
    over the norm of the reference) at most 1.25 times eager's, plus 2e-5 in fp32/fp64 or 5% of
    the format's eps in fp16/bf16 (`dtype`: the values' dtype).  Where eager's own relative error
    is 1 or more (no correct digit: the value is rounding noise), the bound is NOISE_FACTOR times
    eager's error.  `factor` (1.25 here) is the differential suite's to widen for end-to-end
    comparisons in fp16 / bf16 (tests/differential/oracle.py says why); `noise` (absolute, 0
    here) the standard deviation of a reduced value's rounding noise, of which 3 are allowed on
    top (tests/differential/noise.py).  A gap of size alone is judged again on inputs an ulp
    away by the callers (`resample`)."""
    if low is None:
        if got is not None and got.abs().sum() != 0:
            return f"{what}: a gradient where eager has none"
        return None
    if got is None:
        return f"{what}: no gradient where eager has one"
    if got.shape != low.shape or got.dtype != low.dtype:
        return f"{what}: {tuple(got.shape)} {got.dtype}, eager gives {tuple(low.shape)} {low.dtype}"
    if not (got.is_floating_point() or got.is_complex()):
        return None if torch.equal(got, low) else f"{what}: integer values differ"
    fin_g, fin_l = torch.isfinite(got), torch.isfinite(low)
    if not torch.equal(fin_g, fin_l):
        return (f"{what}: {int((~fin_g).sum())} non-finite values, eager has "
                f"{int((~fin_l).sum())} (at other positions)")
    nonfin = ~fin_l
    same = (got[nonfin] == low[nonfin]) | (got[nonfin].isnan() & low[nonfin].isnan())
    if not same.all():
        return f"{what}: inf/nan values differ from eager's"
    mask = fin_l & torch.isfinite(ref)
    e_got, e_low = _err(got, ref, mask), _err(low, ref, mask)
    if low.is_floating_point() and torch.finfo(low.dtype).eps > torch.finfo(dtype).eps:
        dtype = low.dtype  # a half-precision value of a mixed-dtype computation: its own floor
    floor = 2e-5 if dtype in (torch.float32, torch.float64) else 0.05 * torch.finfo(dtype).eps
    bound = factor * e_low + floor
    if noise:
        bound += 3.0 * noise / max(float(ref.detach().double()[mask].norm()), 1e-30)
    if e_low >= 1.0:
        # Eager has no correct digit: the true value is below the rounding of the terms that
        # cancelled to make it (a saturated softmax's gradient, about 1e-300 in float64), so
        # both results are rounding noise, and how far one algorithm's noise lies from another's
        # depends on which of its roundings happen to cancel exactly.  Noise is allowed to be
        # NOISE_FACTOR times eager's; a result of the size of the real terms is still caught.
        bound = NOISE_FACTOR * e_low
    if e_got > bound:
        return f"{what}: {ROUNDING_GAP} {e_got:.3g} vs float64, eager {dtype} has {e_low:.3g}"
    return None


# -- resampling ----------------------------------------------------------------------------------
# A value whose error has few independent parts (a loss reduced to one number; the gradient of
# near-equal distributions, whose error is mostly each row's shared log-sum-exp rounding; a norm's
# weight gradient over a few rows) has an error that is one random draw, eager's and a rewrite's
# alike: one comparison of two draws fails a correct rewrite by chance (issue 22 long run: a
# close-rows KL at 1.31x eager's error, its gradient at 1.46x) and passes a wrong rounding by
# chance.  So where every difference found is one of size (never a non-finite value, a shape, a
# dtype or autograd's flag), eager, the rewrite and the float64 reference run again on RESAMPLES
# copies of the inputs, each floating element moved at random by up to one ulp (zeros, infinities,
# NaNs and signs kept), and a value differs when it fails the rule on most of the RESAMPLES + 1
# input sets: the rule is then a comparison of two error distributions, not of two draws.  A
# rewrite that rounds where eager does not (1.4x eager's error on every draw) still fails
# (tests/test_validate.py, tests/differential/test_regressions.py); any other difference on a
# moved input set (a non-finite value) fails at once.
RESAMPLES = 8
ROUNDING_GAP = "relative error"


def size_only(problems) -> bool:
    """True when there are problems and every one is an error's size (what resampling judges)."""
    problems = [p for p in problems if p]
    return bool(problems) and all(ROUNDING_GAP in p for p in problems)


def nudge(x, gen: torch.Generator, dtype=None):
    """`x` with each finite element moved at random by up to one ulp of `dtype` (its own by
    default: a relative move below half its eps, then rounded), in its own dtype and strides;
    anything else unchanged."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()):
        return x
    eps = torch.finfo(dtype or x.dtype).eps / 2
    r = torch.rand(x.shape, generator=gen, dtype=torch.float64).mul_(2).sub_(1).to(x.device)
    out = torch.empty_like(x, requires_grad=False)
    out.copy_(x.detach().double() * (1 + eps * r))
    return out


def resample(base: dict, sample, runs: int = RESAMPLES, seed: int = 0) -> dict:
    """The verdict after resampling.  `base`: {value: problem or None} on the real inputs, its
    problems all of size; `sample(gen)`: the same dict for every value on inputs nudged with
    `gen`.  A value keeps a problem when it fails on most of the runs + 1 input sets; a problem
    of another kind on any set is kept as found; a run that raises leaves `base` as it is."""
    gen = torch.Generator().manual_seed(seed + 2)
    fails = {k: int(p is not None) for k, p in base.items()}
    last = dict(base)
    for _ in range(runs):
        try:
            found = sample(gen)
        except Exception:  # noqa: BLE001 - the validator's limit: the plain verdict stands
            return base
        for k, p in found.items():
            if p is None:
                continue
            if ROUNDING_GAP not in p:
                return {**base, k: f"{p} (inputs moved by an ulp)"}
            fails[k] = fails.get(k, 0) + 1
            last[k] = last.get(k) or p
    n = runs + 1
    return {k: (f"{last[k]} (and on {fails[k] - (base.get(k) is not None)} of {runs} input sets "
                f"an ulp away)" if fails.get(k, 0) * 2 > n else None) for k in last}


# Where eager's own relative error is at least 1 (see within_eager_rounding); measured: a fused
# distillation gradient at logits of +-2000 is up to about 200 times eager's noise, both some 1e-9
# against terms of size 1.
NOISE_FACTOR = 1000.0


# -- results -----------------------------------------------------------------------------------

EQUAL, DROPPED, NOT_VALIDATED = "equal", "dropped", "not validated"


@dataclass
class Result:
    """The verdict on one rewrite: `record` is its MatchRecord, `status` EQUAL / DROPPED /
    NOT_VALIDATED, `detail` what differed (or why it could not be checked), `not_compared` the outputs the
    rewrite deliberately does not compute."""

    record: object
    status: str
    detail: str = ""
    not_compared: list = field(default_factory=list)  # "output i (`name`): why" (Match.dropped)

    @property
    def key(self) -> tuple:
        return region_key(self.record)


def region_key(record) -> tuple:
    """A rewrite's identity across rewrites of copies of one graph."""
    r = record.region
    return (record.pattern, r.get("body", ""), r["anchor"], tuple(r["covered"]),
            tuple(r["outputs"]))


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of `graph` with the same node names, node meta (shared, not copied) and the
    attributes Dynamo sets on nodes (a placeholder's `_dynamo_source`, which AOTAutograd reads)."""
    new = copy.deepcopy(graph)
    # in order, not by name: a body's output node may be named `output_1`, which the copy renames
    for n, m in zip(graph.nodes, new.nodes):
        for k, v in vars(n).items():
            if k not in vars(m):
                setattr(m, k, v)
    return new


# -- running nodes -----------------------------------------------------------------------------

class _Done(Exception):
    pass


def _concrete(x):
    """A symbolic int / float / bool's value on this call (no guard is added)."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        node = x.node
        hint = getattr(node, "hint", None)
        if hint is None:
            hint = node.shape_env.size_hint(node.expr)
        if isinstance(x, torch.SymInt):
            return int(hint)
        return float(hint) if isinstance(x, torch.SymFloat) else bool(hint)
    return x


class _Capture(fx.Interpreter):
    """Runs the original graph without autograd (values only) and keeps the values of `wanted`
    nodes; stops once it has them all.  Grad-mode switches are not executed (the values are the
    same in either mode; each region later runs each node in its own mode)."""

    def __init__(self, gm, wanted: set, written: set):
        super().__init__(gm)
        self.wanted, self.written, self.values = set(wanted), written, {}

    def run_node(self, n):
        if grad_mode._switch(n) in (True, False):
            value = None
        else:
            value = super().run_node(n)
        if n.name in self.wanted:
            # a later in-place write in the graph must not change the value a region read
            self.values[n.name] = value.clone() if n.name in self.written and isinstance(
                value, torch.Tensor) else value
            self.wanted.discard(n.name)
            if not self.wanted:
                raise _Done
        return value


def _written(graph: fx.Graph) -> set:
    """Names of the nodes whose memory the graph may write in place."""
    mem = Memory(graph)
    if not mem.writes:
        return set()
    keys = frozenset().union(*(w.keys for w in mem.writes))
    return {n.name for n in graph.nodes if n.op != "output" and mem.keys(n) & keys}


def _forked_rng(tensors):
    """torch.random.fork_rng over the CUDA devices of `tensors`: the validator's runs leave the
    program's random state as it was."""
    devices = sorted({x.device.index for x in tensors if isinstance(x, torch.Tensor)
                      and x.device.type == "cuda" and x.device.index is not None})
    return torch.random.fork_rng(devices=devices)


def _capture(gm: fx.GraphModule, inputs: list, wanted: set) -> dict:
    written = _written(gm.graph)
    args = [_concrete(x) for x in inputs]
    # inputs the graph writes in place are copied, so the program's tensors keep their values
    places = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    args = [x.detach().clone() if isinstance(x, torch.Tensor) and name in written else x
            for name, x in zip(places, args)]
    interp = _Capture(gm, wanted, written)
    try:
        with torch.no_grad():
            interp.run(*args)
    except _Done:
        pass
    return interp.values


_F64_METHODS = {"float": "double", "half": "double", "bfloat16": "double"}


def _wide(a):
    if isinstance(a, torch.dtype) and a.is_floating_point:
        return torch.float64
    if isinstance(a, torch.dtype) and a.is_complex:
        return torch.complex128
    return a


def _run_nodes(gm: fx.GraphModule, nodes: list, env: dict, modes: dict, ambient: bool,
               wide: bool = False) -> dict:
    """Run `nodes` (in order) reading `env` (node name -> value, extended in place), each in its
    autograd mode; `wide`: every floating dtype the code names is float64 (the reference)."""
    def val(a):
        return env[a.name]

    for n in nodes:
        # symbolic sizes a replacement baked into its arguments (`x.shape[-1]` under
        # dynamic=True) are read as this call's values
        args = fx.node.map_aggregate(fx.node.map_arg(n.args, val), _concrete)
        kwargs = fx.node.map_aggregate(fx.node.map_arg(n.kwargs, val), _concrete)
        target = n.target
        if wide:
            args = fx.node.map_aggregate(args, _wide)
            kwargs = fx.node.map_aggregate(kwargs, _wide)
            if n.op == "call_method":
                target = _F64_METHODS.get(target, target)
        mode = modes.get(n, grad_mode.AMBIENT)
        on = ambient if mode in (grad_mode.AMBIENT, grad_mode.UNKNOWN) else mode
        with torch.set_grad_enabled(on):
            if n.op == "call_function":
                env[n.name] = target(*args, **kwargs)
            elif n.op == "call_method":
                env[n.name] = getattr(args[0], target)(*args[1:], **kwargs)
            elif n.op == "call_module":
                env[n.name] = gm.get_submodule(target)(*args, **kwargs)
            elif n.op == "get_attr":
                obj = gm
                for part in target.split("."):
                    obj = getattr(obj, part)
                env[n.name] = obj
            else:
                raise RuntimeError(f"cannot run `{n.name}` ({n.op}) as part of a region")
    return env


# -- one region --------------------------------------------------------------------------------

def _reads(nodes: list) -> list:
    """The nodes outside `nodes` that they read, in first-read order."""
    inside, out = set(nodes), {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                out.setdefault(a, None)
    return list(out)


def _bridge(graph: fx.Graph, covered: list, start: set, limit: int = 6) -> list:
    """Nodes of the original graph (outside `covered`) on short paths from the values in `start`
    (what the new nodes read) to what the original nodes read instead (a cast the matcher looked
    through binds the value before it), so both sides are differentiated with respect to the
    same values (a cast's rounding of the gradient is then part of the check)."""
    inside = set(covered)
    targets = set(_reads(covered)) - start
    if not targets:
        return []
    down: dict = {n: 0 for n in start}
    frontier = list(start)
    for depth in range(1, limit + 1):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u not in inside and u not in down and u.op != "output":
                    down[u] = depth
                    nxt.append(u)
        frontier = nxt
    up, stack = set(), [t for t in targets if t in down]
    while stack:
        n = stack.pop()
        if n in up:
            continue
        up.add(n)
        stack.extend(a for a in n.all_input_nodes if a in down)
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted((n for n in up if n not in start), key=order.__getitem__)


def _same_computation(a: fx.Node, b: fx.Node) -> bool:
    """Whether `a` and `b` compute the same value the same way: one pure op of the same
    arguments (`gu[..., :k]` written twice).  The gradients sent to the two add up on the way to
    their common inputs, so a rewrite may read either one for both."""
    if a.op != b.op or a.op not in ("call_function", "call_method") or a.target != b.target:
        return False
    name = getattr(a.target, "__name__", str(a.target))
    if name.endswith("_") or "rand" in name or "dropout" in name or "bernoulli" in name:
        return False  # in place, or a fresh random draw each time
    return a.args == b.args and a.kwargs == b.kwargs


def _merge_duplicates(inputs: dict, read: set) -> dict:
    """{input name: name of the input the rewrite reads in its place} for the original region's
    inputs the rewrite does not read that repeat the computation of one it does read (a pattern
    binds both operands to one value: `gelu(g) * u` with `u` the same slice as `g`)."""
    merged = {}
    for k, n in inputs.items():
        if n in read:
            continue
        twin = next((r for r in inputs.values() if r in read and _same_computation(n, r)), None)
        if twin is not None:
            merged[k] = twin.name
    return merged


def _fold(grads: dict | None, merged: dict) -> dict | None:
    """The gradients with each merged input's added to its twin's (None: absent)."""
    if grads is None or not merged:
        return grads
    out = {k: v for k, v in grads.items() if k not in merged}
    for k, twin in merged.items():
        g = grads.get(k)
        if g is None or twin not in out:
            continue
        out[twin] = g if out[twin] is None else out[twin] + g
    return out


def _needs_grad(node: fx.Node, value) -> bool:
    if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
        return False
    meta = node_value(node)
    return bool(getattr(meta, "requires_grad", True))


def _leaf(value, grad: bool, wide: bool):
    if not isinstance(value, torch.Tensor):
        return value
    v = value.detach()
    if wide:
        v = v.to(_wide(v.dtype))
    return v.requires_grad_(True) if grad else v


def _forward_backward(gm, nodes, outs, inputs, values, needs, modes, ambient, cot, wide=False):
    """Run a region: its outputs, and the gradients of the inputs that need one (None when no
    output requires grad)."""
    env = {n.name: _leaf(values[k], needs[k], wide) for k, n in inputs.items()}
    leaves = {k: env[n.name] for k, n in inputs.items() if needs[k]}
    _run_nodes(gm, nodes, env, modes, ambient, wide)
    results = [env[o.name] if isinstance(o, fx.Node) else None for o in outs]
    diff = [(r, c) for r, c in zip(results, cot)
            if c is not None and isinstance(r, torch.Tensor) and r.requires_grad]
    grads = None
    if diff and leaves:
        gs = torch.autograd.grad([r for r, _ in diff],
                                 list(leaves.values()),
                                 [c.to(dtype=r.dtype, device=r.device) for r, c in diff],
                                 allow_unused=True)
        grads = dict(zip(leaves, gs))
    return [r.detach() if isinstance(r, torch.Tensor) else r for r in results], grads, \
        [r is not None and getattr(r, "requires_grad", False) for r in results]


def check_region(record, original: fx.GraphModule, rewritten: fx.GraphModule, values: dict,
                 new_to_old: dict, ambient: bool, seed: int = 0) -> Result:
    """Validate one rewrite (see the module docstring)."""
    reg = record.region
    og, ng = original.graph, rewritten.graph
    onodes = {n.name: n for n in og.nodes}
    nnodes = {n.name: n for n in ng.nodes}
    covered = [onodes[c] for c in reg["covered"]]
    order = {n: i for i, n in enumerate(og.nodes)}
    covered.sort(key=order.__getitem__)
    new_order = {n: i for i, n in enumerate(ng.nodes)}
    new = sorted((nnodes[x] for x in reg["new"] if x in nnodes), key=new_order.__getitem__)
    outs_old = [onodes[o] for o in reg["outputs"]]
    outs_new = [nnodes.get(r) if r is not None else None for r in reg["replacements"]]
    # outputs the rewrite does not compute on purpose (an option's contract): neither compared nor
    # differentiated through (their cotangent is None on all three sides)
    dropped = reg.get("dropped", {})
    skip = [i for i, o in enumerate(outs_old) if outs_new[i] is None or o.name in dropped]
    not_compared = [f"output {i} (`{outs_old[i].name}`): {dropped[outs_old[i].name]}"
                    for i in skip if outs_old[i].name in dropped]

    # what the new nodes read, as nodes of the original graph
    new_reads = {}
    for r in _reads(new):
        name = new_to_old.get(r.name, r.name)
        if name not in onodes:
            return Result(record, NOT_VALIDATED, f"the rewrite reads `{r.name}`, which is not a "
                          "value of the original graph")
        new_reads[r.name] = onodes[name]
    old_nodes = sorted(set(covered) | set(_bridge(og, covered, set(new_reads.values()))),
                       key=order.__getitem__)
    # one set of inputs for both sides, named by the original graph's nodes
    inputs = {n.name: n for n in _reads(old_nodes)}
    inputs.update({n.name: n for n in new_reads.values()})
    missing = [k for k in inputs if k not in values]
    if missing:
        return Result(record, NOT_VALIDATED, f"no value for `{missing[0]}`")
    needs = {k: _needs_grad(n, values[k]) for k, n in inputs.items()}
    # the new nodes read the same values under their own names
    new_inputs = {k: n for k, n in inputs.items()}
    new_env_names = {old.name: new_name for new_name, old in new_reads.items()}
    omodes, nmodes = grad_mode.modes(og), grad_mode.modes(ng)

    def run_new(cot, vals=values):
        env = {}
        leaves = {}
        for k in new_inputs:
            v = _leaf(vals[k], needs[k], False)
            env[new_env_names.get(k, k)] = v
            if needs[k]:
                leaves[k] = v
        _run_nodes(rewritten, new, env, nmodes, ambient)
        results = [env[o.name] if isinstance(o, fx.Node) else None for o in outs_new]
        diff = [(r, c) for r, c in zip(results, cot)
                if c is not None and isinstance(r, torch.Tensor) and r.requires_grad]
        grads = None
        if diff and leaves:
            gs = torch.autograd.grad([r for r, _ in diff], list(leaves.values()),
                                     [c.to(dtype=r.dtype, device=r.device) for r, c in diff],
                                     allow_unused=True)
            grads = dict(zip(leaves, gs))
        return [r.detach() if isinstance(r, torch.Tensor) else r for r in results], grads, \
            [r is not None and getattr(r, "requires_grad", False) for r in results]

    with _forked_rng(values.values()):
        # 1. the original region in its dtypes, forward only, to find the outputs to differentiate
        try:
            torch.manual_seed(seed)
            low, _, low_rg = _forward_backward(original, old_nodes, outs_old, inputs, values,
                                               needs, omodes, ambient, [None] * len(outs_old))
        except Exception as e:  # noqa: BLE001 - the validator's limit, not the rewrite's fault
            return Result(record, NOT_VALIDATED, f"the original region raised here: "
                          f"{type(e).__name__}: {str(e)[:300]}")
        g = torch.Generator().manual_seed(seed + 1)
        cot = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(r.dtype)
               if rg and (r.is_floating_point() or r.is_complex()) and i not in skip else None
               for i, (r, rg) in enumerate(zip(low, low_rg))]
        try:
            torch.manual_seed(seed)
            low, low_g, _ = _forward_backward(original, old_nodes, outs_old, inputs, values,
                                              needs, omodes, ambient, cot)
            torch.manual_seed(seed)
            ref, ref_g, _ = _forward_backward(original, old_nodes, outs_old, inputs, values,
                                              needs, omodes, ambient, cot, wide=True)
        except Exception as e:  # noqa: BLE001
            return Result(record, NOT_VALIDATED, f"the original region (or its float64 reference) "
                          f"raised here: {type(e).__name__}: {str(e)[:300]}")
        try:
            torch.manual_seed(seed)
            got, got_g, got_rg = run_new(cot)
        except Exception as e:  # noqa: BLE001 - the rewrite fails where the original does not
            return Result(record, DROPPED, f"the rewritten code raised where the original did "
                          f"not: {type(e).__name__}: {str(e)[:300]}")
    # an input the rewrite reads as its twin's value: both sides' gradients of the two, summed
    merged = _merge_duplicates(inputs, set(new_reads.values()))
    low_g, ref_g, got_g = (_fold(g, merged) for g in (low_g, ref_g, got_g))
    def judge(got, got_g, got_rg, low, low_g, ref, ref_g) -> dict:
        """{value: problem or None} for every output and gradient (and autograd's flags)."""
        verdict = {}
        for i, (o, a, b, c) in enumerate(zip(outs_old, got, low, ref)):
            if i in skip:
                continue  # the pattern replaced it by a value an option asked for (skip_logits)
            what = f"output {i} (`{o.name}`)"
            if isinstance(b, torch.Tensor):
                verdict[what] = within_eager_rounding(what, a, b, c, b.dtype) \
                    if isinstance(a, torch.Tensor) else \
                    f"{what}: {type(a).__name__} where the original gives a tensor"
            else:
                verdict[what] = None if a == b else f"{what}: {a!r} where the original gives {b!r}"
        for i, (o, a, b) in enumerate(zip(outs_old, got_rg, low_rg)):
            # autograd's flag is part of the value: an output that gains one where eager's has
            # none (one op over two tensors, one of them without a gradient) or loses one is a
            # different program, even where every number it gives is equal.  Compared where the
            # program ran with autograd (without it no output of the program requires grad,
            # whatever the new nodes' recorded modes say)
            if ambient and i not in skip and a != b:
                verdict[f"flag {i}"] = (f"output {i} (`{o.name}`) "
                                        + ("requires grad where the original's does not" if a
                                           else "does not require grad where the original's does"))
        if low_g is not None:
            for k in low_g:
                what = f"gradient of `{k}`"
                gg = got_g.get(k) if got_g is not None else None
                verdict[what] = within_eager_rounding(what, gg, low_g[k], ref_g.get(k),
                                                      values[k].dtype)
        return verdict

    def moved(gen):
        vals = dict(values)
        vals.update({k: nudge(values[k], gen) for k in inputs})
        torch.manual_seed(seed)
        lo, lo_g, _ = _forward_backward(original, old_nodes, outs_old, inputs, vals, needs,
                                        omodes, ambient, cot)
        torch.manual_seed(seed)
        rf, rf_g, _ = _forward_backward(original, old_nodes, outs_old, inputs, vals, needs,
                                        omodes, ambient, cot, wide=True)
        torch.manual_seed(seed)
        gt, gt_g, gt_rg = run_new(cot, vals)
        return judge(gt, _fold(gt_g, merged), gt_rg, lo, _fold(lo_g, merged), rf,
                     _fold(rf_g, merged))

    verdict = judge(got, got_g, got_rg, low, low_g, ref, ref_g)
    if size_only(verdict.values()):
        # two draws of rounding noise may differ by chance: judged on more (`resample`)
        with _forked_rng(values.values()):
            verdict = resample(verdict, moved, seed=seed)
    problems = [p for p in verdict.values() if p]
    if problems:
        return Result(record, DROPPED, "; ".join(problems), not_compared)
    return Result(record, EQUAL, not_compared=not_compared)


def save_bodies(gm: fx.GraphModule) -> dict:
    """Copies of the graphs of `gm`'s graph submodules (higher-order op bodies, which the pattern
    pass rewrites in place), by attribute path, shallowest first."""
    return {name: copy_graph(sub.graph) for name, sub in gm.named_modules()
            if name and isinstance(sub, fx.GraphModule)}


def original_module(gm: fx.GraphModule, saved: fx.Graph, bodies: dict) -> fx.GraphModule:
    """A module running the graph as Dynamo gave it (`saved`), bodies included, beside `gm`."""
    original = fx.GraphModule(gm, copy_graph(saved))
    for path, graph in bodies.items():
        parent_path, _, leaf = path.rpartition(".")
        parent = original.get_submodule(parent_path) if parent_path else original
        setattr(parent, leaf, fx.GraphModule(getattr(parent, leaf), copy_graph(graph)))
    return original


def restore(gm: fx.GraphModule, saved: fx.Graph, bodies: dict) -> None:
    """Put the graph as Dynamo gave it back into `gm`, bodies included (to rewrite it afresh)."""
    gm.graph = copy_graph(saved)
    gm.recompile()
    for path, graph in bodies.items():
        sub = gm.get_submodule(path)
        sub.graph = copy_graph(graph)
        sub.recompile()


def check(original: fx.GraphModule, rewritten: fx.GraphModule, records: list, inputs: list,
          done: dict) -> list[Result]:
    """Validate the rewrites in `records` (MatchRecords of `rewritten`, with regions) that are
    not in `done` (region_key -> Result, from an earlier round); returns their Results.  A rewrite
    inside an activation-checkpointing body is checked on the values the body is called with
    (captured from the original graph), against the original body."""
    with _running():
        return _check_all(original, rewritten, records, inputs, done)


def _check_all(original, rewritten, records: list, inputs: list, done: dict) -> list[Result]:
    records = [r for r in records if r.region is not None]
    in_bodies: dict = {}
    for r in records:
        if r.region.get("body"):
            in_bodies.setdefault(r.region["body"], []).append(r)
    out = [res for path, recs in in_bodies.items()
           if any(region_key(r) not in done for r in recs)
           for res in _check_body(original, rewritten, path, recs, inputs, done)]
    top = [r for r in records if not r.region.get("body")]
    return out + _check_graph(original, rewritten, top, inputs, done)


def _check_body(original, rewritten, path: str, records: list, inputs: list,
                done: dict) -> list[Result]:
    from .hop import operands, runs_body

    def none(why):
        return [Result(r, NOT_VALIDATED, why) for r in records if region_key(r) not in done]

    if "." in path:
        return none(f"inside `{path}`, a higher-order op body nested in another: the values it "
                    "is called with are not captured")
    call = next((n for n in original.graph.nodes if runs_body(n) and n.args
                 and getattr(n.args[0], "target", None) == path), None)
    ops = operands(call, path) if call is not None else None
    if ops is None:
        return none(f"the call of the body `{path}` was not found in the graph")
    if any(isinstance(x, torch._subclasses.FakeTensor) for x in inputs):
        return none("the backend was given fake inputs (e.g. a DDP bucket), not the call's values")
    wanted = {a.name for a in ops if isinstance(a, fx.Node)}
    try:
        with _forked_rng(inputs):
            values = _capture(original, inputs, wanted)
    except Exception as e:  # noqa: BLE001 - the validator's limit: keep the rewrites
        return none(f"the original graph raised here: {type(e).__name__}: {str(e)[:300]}")
    args = [values.get(a.name) if isinstance(a, fx.Node) else a for a in ops]
    return _check_graph(original.get_submodule(path), rewritten.get_submodule(path), records,
                        args, done)


def _check_graph(original: fx.GraphModule, rewritten: fx.GraphModule, records: list,
                 inputs: list, done: dict) -> list[Result]:
    """`check` for the rewrites of one graph (`records`, all of them: a later rewrite may read
    an earlier one's new nodes)."""
    todo = [r for r in records if region_key(r) not in done]
    if not todo:
        return []
    if any(isinstance(x, torch._subclasses.FakeTensor) for x in inputs):
        return [Result(r, NOT_VALIDATED, "the backend was given fake inputs (e.g. a DDP bucket), "
                       "not the call's values") for r in todo]
    # new node -> the original node whose value it computes, across all rewrites
    new_to_old = {}
    for r in records:
        if r.region is None:
            continue
        for old, new in zip(r.region["outputs"], r.region["replacements"]):
            if new is not None:
                new_to_old[new] = old
    wanted = set()
    onodes = {n.name: n for n in original.graph.nodes}
    nnodes = {n.name: n for n in rewritten.graph.nodes}
    for r in todo:
        covered = [onodes[c] for c in r.region["covered"] if c in onodes]
        wanted.update(n.name for n in _reads(covered))
        new = [nnodes[x] for x in r.region["new"] if x in nnodes]
        wanted.update(new_to_old.get(n.name, n.name) for n in _reads(new))
        # values the bridge may read (a cast's input): cheap to keep
        for n in _reads(covered):
            wanted.update(a.name for a in n.all_input_nodes)
    wanted &= set(onodes)
    # The program's autograd mode: where Dynamo recorded no value that requires grad (the call
    # ran under no_grad, or nothing needed a gradient), the regions run without autograd too
    # (the backend may be called with grad enabled whatever the caller's mode was).
    ambient = torch.is_grad_enabled() and any(
        getattr(node_value(n), "requires_grad", False) for n in original.graph.nodes)
    try:
        with _forked_rng(inputs):
            values = _capture(original, inputs, wanted)
    except Exception as e:  # noqa: BLE001 - the validator's limit: keep the rewrites
        return [Result(r, NOT_VALIDATED, f"the original graph raised here: {type(e).__name__}: "
                       f"{str(e)[:300]}") for r in todo]
    out = []
    for r in todo:
        try:
            out.append(check_region(r, original, rewritten, values, new_to_old, ambient))
        except Exception as e:  # noqa: BLE001 - a validator bug must not break the user's call
            out.append(Result(r, NOT_VALIDATED, f"validator error: {type(e).__name__}: {e}"))
    return out


def warn(result: Result) -> None:
    rec = result.record
    if result.status == DROPPED:
        msg = (f"ligerfx translation validation: the {rec.pattern} rewrite at {rec.location} "
               f"differs from the original code ({result.detail}); it is dropped and the graph "
               "is compiled without it")
    else:
        msg = (f"ligerfx translation validation: could not check the {rec.pattern} rewrite at "
               f"{rec.location} ({result.detail}); it is kept")
    warnings.warn(msg, ValidationWarning, stacklevel=2)
