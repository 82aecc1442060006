"""Model families of issue 13 §4 and the structural oracle of what each one should have rewritten.

`FAMILIES` names each family Liger-Kernel patches, as the installed transformers builds it from a
tiny config (2 layers, hidden 64, vocab 256: `ligerfx.dump.hf_targets.tiny_config_kwargs`, which
shrinks every size key the type's default config carries).  `find_sites(model, inputs)` runs one
eager forward and records, from the modules that actually run and the values that flow into them,
the sites a rewrite should cover:

- norms: every leaf norm module call (`nn.LayerNorm`, `nn.RMSNorm`, or a class named
  `...RMSNorm` / `...LayerNorm` / `...L2Norm`) that returns a tensor of its input's shape (not a
  statistic); *gated* when it is called with a second tensor
  (the gate); *add-fed* when its input is the result of a same-shape tensor + tensor add (the
  residual add of issue 13 §1);
- rotary: every call of a rotary function of its modeling file (`apply_rotary_pos_emb`,
  `apply_rotary_emb`, ...: a module-level `apply*rot*` / `apply*rope*` function, vision ones
  aside), by the innermost module call it ran in.  Tensors rotated by one launch make a `rope`
  site: a call returning two (q and k) or two calls of one module call with equal tables (equal
  values: the same angles, however computed) and tensors of one shape but the heads dim (the
  kernel's q and k).  Any other rotation is a `rope_single` site: it has no partner rotated by
  the same angles (DeepSeek-V4's compressor rotates only its compressed keys, at window
  positions; its indexer rotates keys at window positions and queries at token positions; its
  attention rotates the output back by (cos, -sin)), so one launch of its own is all it can get.
  Equal values are what the oracle asks for; two value-equal tables read from different buffers
  (which the compiler rightly does not pair: a buffer can change between calls) would fail the
  test, a prompt to look, never a silent pass;
- MLPs: every module call with an activation (`act_fn` / `activation_fn` / `act` /
  `activation`) and a gate (`gate_proj` or `gate_up_proj`: dense gated MLPs and expert blocks
  written as one gated product; or, whatever the projections are called, the module itself
  multiplies its activation's output by a same-shape tensor: JetMoE's experts chunk one
  `input_linear` into gate and up), by its activation; a non-gated MLP counts only when its
  activation is ReLU² (it has an op); every call of a module's `_apply_gate` when the module
  has a numeric `alpha` and `limit` (GPT-OSS's experts: the clamped GLU, once per grouped call or
  once per expert when the experts run one by one) is a `clamped_glu` site;
- the loss, when labels are given.

This is a test oracle: it reads module class names and Hugging Face's conventions, which the
compiler itself never does.  `unrewritten(counts, sites)` / `extra(...)` compare a report's
counts with the sites (one rule for every family); tests/test_families.py and tools/census.py
both use it.
"""

from __future__ import annotations

import collections
import inspect
import re
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

# family -> model_type and config overrides (on top of tiny_config_kwargs); "inner" is the
# backend the family's training step is compiled with when it is not aot_eager.
FAMILIES = {
    "llama3": dict(model_type="llama", rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16)),
    "mistral": dict(model_type="mistral"),
    "ministral": dict(model_type="ministral"),
    "ministral3": dict(model_type="ministral3"),
    "mixtral": dict(model_type="mixtral"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3"),
    "qwen3_moe": dict(model_type="qwen3_moe"),
    # Plain aot_eager cannot train these either (AOTAutograd's backward of the gated delta rule's
    # reference code fails with "view size is not compatible ..." without ligerfx): inner eager.
    "qwen3_next": dict(model_type="qwen3_next", inner="eager"),
    "qwen3_5": dict(model_type="qwen3_5_text", inner="eager"),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe_text", inner="eager"),
    "phi3": dict(model_type="phi3"),
    # Gemma 1's released config says hidden_act="gelu", which GemmaConfig maps to the tanh GELU;
    # Gemma 1.1 is the same architecture and config (new weights only), so one entry covers both.
    "gemma": dict(model_type="gemma", hidden_act="gelu"),
    "gemma2": dict(model_type="gemma2"),
    "gemma3": dict(model_type="gemma3_text", attn_implementation="eager"),
    "granite": dict(model_type="granite"),
    "olmo2": dict(model_type="olmo2"),
    "olmo3": dict(model_type="olmo3"),
    "glm4": dict(model_type="glm4"),
    "smollm3": dict(model_type="smollm3"),
    "falcon_h1": dict(model_type="falcon_h1"),
    "exaone4": dict(model_type="exaone4"),
    "hunyuan_v1_dense": dict(model_type="hunyuan_v1_dense"),
    # Two of four experts a token: with the default top-1 the routing weight is p / p = 1, so the
    # gate's gradient is zero in exact arithmetic (rounding noise, no relative error compares it)
    "hunyuan_v1_moe": dict(model_type="hunyuan_v1_moe", num_experts=4, moe_topk=2),
    "nemotron": dict(model_type="nemotron"),
    "gpt_oss": dict(model_type="gpt_oss", attn_implementation="eager"),
    "llama4": dict(model_type="llama4_text"),
    # Both MLP layers routed by score: a hash-routed layer's gate gets a gradient that is zero in
    # exact arithmetic (~1e-9 of rounding noise), which no relative error can compare.
    "deepseek_v4": dict(model_type="deepseek_v4", attn_implementation="eager",
                        mlp_layer_types=["moe", "moe"]),
}

# op names a site kind may be rewritten into (the residual-add forms fold the add into the norm)
NORM_OPS = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm")
ADD_NORM_OPS = ("add_rms_norm", "add_layer_norm")
GATED_NORM_OPS = ("gated_rms_norm",)
LOSS_OPS = ("fused_linear_cross_entropy", "cross_entropy")
MLP_OPS = ("swiglu", "geglu", "relu_sq", "clamped_glu")

_ACT_ATTRS = ("act_fn", "activation_fn", "act", "activation")
_NORM_CLASS = re.compile(r"(RMS|Layer|L2)Norm")
_ROTARY_FN = re.compile(r"^_?apply\w*(rot|rope)", re.I)


def build_tiny(model_type: str, seed: int = 0, **overrides):
    """(model, inputs) for the tiny causal LM of this model_type: seeded, fp32, train mode."""
    import transformers

    from ligerfx.dump.hf_targets import tiny_config_kwargs

    kw = tiny_config_kwargs(model_type)
    kw.update(overrides)
    config = transformers.AutoConfig.for_model(model_type, **kw)
    text = getattr(config, "text_config", None)
    if (text is not None and "text_config" not in kw and getattr(text, "model_type", None)
            and getattr(text, "hidden_size", None) not in (None, kw.get("hidden_size"))):
        # a composite config (Llama 4) keeps its text model at full size whatever the top-level
        # keys say: shrink the text config itself (full size needs > 16 GiB to build)
        kw["text_config"] = tiny_config_kwargs(text.model_type)
        config = transformers.AutoConfig.for_model(model_type, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = transformers.AutoModelForCausalLM.from_config(config)
        except ValueError as e:  # a family without SDPA support runs its eager attention
            if "attention implementation" not in str(e) or "attn_implementation" in overrides:
                raise
            torch.manual_seed(seed)
            config = transformers.AutoConfig.for_model(
                model_type, **dict(kw, attn_implementation="eager"))
            model = transformers.AutoModelForCausalLM.from_config(config)
    model.train()
    vocab = int(getattr(config, "vocab_size", None) or getattr(
        getattr(config, "text_config", None), "vocab_size", 256) or 256)
    gen = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(min(3, vocab - 1), vocab, (2, 16), generator=gen)
    labels = input_ids.clone()
    labels[0, -3:] = -100  # ignored positions, as padding would produce
    return model, dict(input_ids=input_ids, labels=labels)


def build_family(name: str, seed: int = 0):
    """(model, inputs, inner) for FAMILIES[name]."""
    spec = dict(FAMILIES[name])
    model_type, inner = spec.pop("model_type"), spec.pop("inner", "aot_eager")
    model, inputs = build_tiny(model_type, seed=seed, **spec)
    return model, inputs, inner


@dataclass
class Sites:
    """What one eager forward ran that a rewrite should cover (module names for the messages)."""

    norms: list = field(default_factory=list)  # (module, gated, add_fed)
    rope: list = field(default_factory=list)  # module of each paired rotation (q and k)
    rope_single: list = field(default_factory=list)  # module of each rotation without a partner
    mlps: list = field(default_factory=list)  # (module, kind): swiglu / geglu / relu_sq / other
    loss: int = 0

    def expected(self) -> dict:
        """Site kind -> how many rewrites it needs."""
        mlp = collections.Counter(kind for _, kind in self.mlps if kind in MLP_OPS)
        return dict(
            norm=sum(not g for _, g, _ in self.norms),
            gated_norm=sum(g for _, g, _ in self.norms),
            add_norm=sum(a and not g for _, g, a in self.norms),
            rope=len(self.rope), rope_single=len(self.rope_single), loss=self.loss, **mlp)


def _activation_kind(act) -> str:
    name = type(act).__name__.lower()
    if isinstance(act, nn.SiLU) or name in ("silu", "siluactivation"):
        return "silu"
    if "gelu" in name:
        return "gelu"
    if "relusquared" in name or "relu2" in name:
        return "relu_sq"
    return name


def _activation(m: nn.Module) -> nn.Module | None:
    return next((a for a in (getattr(m, n, None) for n in _ACT_ATTRS) if isinstance(a, nn.Module)),
                None)


def _gated_kind(kind: str) -> str:
    return {"silu": "swiglu", "gelu": "geglu"}.get(kind, f"gated {kind}")


def _mlp_kind(m: nn.Module) -> str | None:
    act = _activation(m)
    if act is None:
        return None
    kind = _activation_kind(act)
    gated = hasattr(m, "gate_proj") or hasattr(m, "gate_up_proj")
    if gated:
        return _gated_kind(kind)
    if kind == "relu_sq" and hasattr(m, "up_proj"):
        return "relu_sq"
    return None


def _is_norm(m: nn.Module) -> bool:
    if any(True for _ in m.children()):
        return False
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or bool(_NORM_CLASS.search(type(m).__name__))


class _Sums(TorchFunctionMode):
    """Keeps every same-shape tensor + tensor sum of the forward (alive, so ids stay unique), and
    sees every same-shape product with an activation's output (`acts`: output id -> the module
    whose activation made it; `gated(owner)` is called for each such product)."""

    _ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
    _MULS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}

    def __init__(self, gated=lambda owner: None):
        super().__init__()
        self.sums, self.ids = [], set()
        self.acts, self.kept, self.gated = {}, [], gated

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func in self._MULS and len(args) >= 2
                and all(isinstance(a, torch.Tensor) for a in args[:2])
                and args[0].shape == args[1].shape):
            owner = self.acts.get(id(args[0]), self.acts.get(id(args[1])))
            if owner is not None:
                self.gated(owner)
        if (func in self._ADDS and len(args) >= 2 and isinstance(out, torch.Tensor)
                and all(isinstance(a, torch.Tensor) for a in args[:2])
                and args[0].shape == args[1].shape):
            self.sums.append(out)
            self.ids.add(id(out))
        return out


def find_sites(model: nn.Module, inputs: dict) -> Sites:
    """One eager forward (no grad) with hooks recording the sites of `Sites`."""
    names = {id(m): n for n, m in model.named_modules()}
    sites, stack, calls = Sites(), [], collections.Counter()
    rotations = collections.defaultdict(list)  # module call -> [(rotated tensors, tables)]
    # activation module -> the module it is the activation of (no gate by name: see _mlp_kind)
    owners = {id(a): m for m in model.modules() if _mlp_kind(m) is None
              for a in (_activation(m),) if a is not None}
    counted_calls, norm_calls, dropped = set(), {}, set()

    def on_gated_product(owner):
        key = (id(owner), calls[id(owner)])  # one site per call of the owner, however many products
        if key not in counted_calls:
            counted_calls.add(key)
            sites.mlps.append((names[id(owner)], _gated_kind(_activation_kind(_activation(owner)))))

    sums = _Sums(on_gated_product)

    def pre(m, args, kwargs):
        calls[id(m)] += 1
        stack.append((id(m), calls[id(m)]))
        if _is_norm(m):
            x = args[0] if args else kwargs.get("hidden_states")
            rest = list(args[1:]) + [v for k, v in kwargs.items() if k != "hidden_states"]
            gated = any(isinstance(v, torch.Tensor) for v in rest)
            sites.norms.append((names[id(m)], gated, id(x) in sums.ids))
            norm_calls[(id(m), calls[id(m)])] = (len(sites.norms) - 1, getattr(x, "shape", None))
        kind = _mlp_kind(m)
        if kind:
            sites.mlps.append((names[id(m)], kind))

    def post(m, args, out):
        key = stack.pop()
        site = norm_calls.pop(key, None)
        if site is not None and site[1] is not None and isinstance(out, torch.Tensor) \
                and out.shape != site[1]:
            # a norm-named module that returns a statistic (HY-V4's "unweighted RMSNorm" is
            # rsqrt(mean(x²) + eps), [..., 1]), not the normalised x: nothing a norm op computes
            dropped.add(site[0])
        owner = owners.get(id(m))
        # the activation ran inside its owner's own call (not lent to another module)
        if owner is not None and isinstance(out, torch.Tensor) and stack and stack[-1][0] == id(owner):
            sums.acts[id(out)] = owner
            sums.kept.append(out)

    def count_gate(m):
        apply = m._apply_gate

        def counted(*a, **k):
            sites.mlps.append((names[id(m)], "clamped_glu"))
            return apply(*a, **k)
        return counted

    gates = [m for m in model.modules() if callable(getattr(m, "_apply_gate", None))
             and all(isinstance(getattr(m, n, None), (int, float)) for n in ("alpha", "limit"))]
    for m in gates:
        m._apply_gate = count_gate(m)  # an instance attribute shadows the class's method

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post))

    inside = []  # rotary calls in progress

    def wrap(fn):
        def counted(*a, **k):
            inside.append(fn)
            try:
                out = fn(*a, **k)
            finally:
                inside.pop()
            outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,))
                    if isinstance(t, torch.Tensor)]
            # the outermost rotary call counts (GPT-OSS's `apply_rotary_pos_emb(q, k, ..)`
            # calls `_apply_rotary_emb` once per tensor: the same rotations again)
            if stack and not inside:
                # the rotated tensors come first, the tables (cos/sin, freqs, positions) after
                tensors = [v for v in (*a, *k.values()) if isinstance(v, torch.Tensor)]
                rotations[stack[-1]].append((outs, tensors[len(outs):]))
            # a rotation's `x*cos + rot(x)*sin` is a sum but no residual add (HunYuan norms q/k
            # after rotating them)
            for t in outs:
                sums.ids.discard(id(t))
            return out
        return counted

    patched = []
    for modname in {type(m).__module__ for m in model.modules()}:
        mod = sys.modules.get(modname)
        if mod is None or not modname.startswith("transformers.models."):
            continue
        for fname, fn in list(vars(mod).items()):
            # a function, or (transformers >= 5.25 with Hugging Face's `kernels` installed) the
            # module object `use_kernel_forward_from_hub` turns it into: its forward is the function
            own = inspect.isfunction(fn) or (isinstance(fn, torch.nn.Module)
                                             and inspect.ismethod(getattr(fn, "forward", None)))
            if (own and fn.__module__ == modname and _ROTARY_FN.search(fname)
                    and "vision" not in fname):
                patched.append((mod, fname, fn))
                setattr(mod, fname, wrap(fn))
    try:
        with torch.no_grad(), sums:
            model(**inputs)
    finally:
        for mod, fname, fn in patched:
            setattr(mod, fname, fn)
        for h in handles:
            h.remove()
        for m in gates:
            del m._apply_gate
    sites.norms = [s for i, s in enumerate(sites.norms) if i not in dropped]
    by_id = {id(m): names[id(m)] for m in model.modules()}
    for (i, _), calls_here in rotations.items():
        pairs, alone = _rotation_sites(calls_here)
        sites.rope += [by_id[i]] * pairs
        sites.rope_single += [by_id[i]] * alone
    sites.rope.sort()
    sites.rope_single.sort()
    sites.loss = int(inputs.get("labels") is not None)
    return sites


def _same_tables(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def _partners(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether x and y can be liger::rope's q and k: one shape but (at most) the heads dim."""
    return (x.dim() == y.dim() and x.dtype == y.dtype
            and sum(p != q for p, q in zip(x.shape, y.shape)) <= 1)


def _rotation_sites(calls: list) -> tuple:
    """(pairs, lone rotations) among the rotary calls of one module call, in call order."""
    pairs, alone = 0, []
    for outs, tables in calls:
        if len(outs) >= 2:  # q and k rotated by one call
            pairs += 1
        elif outs:
            mate = next((j for j, (o, t) in enumerate(alone)
                         if _partners(o, outs[0]) and _same_tables(t, tables)), None)
            if mate is None:
                alone.append((outs[0], tables))
            else:
                alone.pop(mate)
                pairs += 1
    return pairs, len(alone)


def found(counts: dict) -> dict:
    """A report's counts grouped by site kind (the same keys as `Sites.expected`)."""
    c = collections.Counter(counts)
    out = dict(
        norm=sum(c[k] for k in NORM_OPS), gated_norm=sum(c[k] for k in GATED_NORM_OPS),
        add_norm=sum(c[k] for k in ADD_NORM_OPS), rope=c["rope"], rope_single=c["rope_single"],
        loss=sum(c[k] for k in LOSS_OPS))
    out.update({k: c[k] for k in MLP_OPS if c[k]})
    return out


def composed(matches: list, sites: Sites) -> int:
    """Gated norm sites rewritten as two exact ops inside their own module: the gate product
    (`swiglu`) and the norm.  Mamba-2's gated norm (Zamba2) multiplies by `silu(gate)` *before*
    the (grouped) norm, which the one `gated_rms_norm` op (gate after the norm) cannot compute;
    the composition is exact but writes the gated value and reads it back.  `unrewritten` /
    `extra` count such a site as covered (and the census row says so), not as a missing gated
    norm next to one norm and one swiglu too many."""
    gated = {name for name, g, _ in sites.norms if g}
    by_module = collections.defaultdict(set)
    for m in matches:
        if m.location.module in gated:
            by_module[m.location.module].add(m.pattern)
    return sum(1 for ps in by_module.values() if ps & set(NORM_OPS) and "swiglu" in ps)


def _found(counts: dict, n_composed: int) -> dict:
    got = found(counts)
    if n_composed:
        got["gated_norm"] += n_composed
        got["norm"] -= n_composed
        got["swiglu"] = got.get("swiglu", 0) - n_composed
    return got


def unrewritten(counts: dict, sites: Sites, *, add_norm: bool = True,
                n_composed: int = 0) -> dict:
    """Site kind -> (rewrites found, sites) for every kind with fewer rewrites than sites.

    `add_norm=False` leaves the residual add + norm fusion out of the comparison (the norms
    themselves are still counted, fused with their add or not).  `n_composed`: gated norm sites
    covered by a gate product + norm (`composed`).
    """
    want, got = sites.expected(), _found(counts, n_composed)
    return {k: (got.get(k, 0), n) for k, n in want.items()
            if got.get(k, 0) < n and (add_norm or k != "add_norm")}


def extra(counts: dict, sites: Sites, n_composed: int = 0) -> dict:
    """Site kind -> (rewrites found, sites) for every kind with more rewrites than sites.

    A gated product outside an MLP module (Mamba's `y * silu(z)` gate) is a correct `swiglu`
    the oracle does not count as a site; more norms or ropes than sites would be a wrong count.
    """
    want, got = sites.expected(), _found(counts, n_composed)
    return {k: (n, want.get(k, 0)) for k, n in got.items() if n > want.get(k, 0)}
