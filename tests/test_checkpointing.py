"""Activation checkpointing: the layers under torch.utils.checkpoint are rewritten, or reported.

Dynamo traces `checkpoint(layer, x, use_reentrant=False)` into one
`torch.ops.higher_order.tag_activation_checkpoint` call whose body holds the layer's code; the
pattern pass rewrites inside that body (compiler/hop.py), the fused ops keep their autograd, and
the backward still recomputes the layer.  Where Dynamo cannot trace the checkpoint (a Python side
effect in the layer: transformers' decoder layers) it runs the layer eagerly, and the report says
so (ligerfx/checkpointing.py).  Other higher-order ops' bodies are not rewritten: a near miss
names the op.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import ligerfx
import ligerfx.backend
from ligerfx.compiler.validate import within_eager_rounding

D, H, V = 32, 64, 96


class Block(nn.Module):
    """nanoGPT-style pre-norm block: hand-written RMSNorm, a projection, a SwiGLU MLP."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(1 + 0.1 * torch.randn(D))
        self.w2 = nn.Parameter(1 + 0.1 * torch.randn(D))
        self.proj = nn.Linear(D, D, bias=False)
        self.gate = nn.Linear(D, H, bias=False)
        self.up = nn.Linear(D, H, bias=False)
        self.down = nn.Linear(H, D, bias=False)

    @staticmethod
    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def forward(self, x):
        h = x + self.proj(self.norm(x, self.w1))
        n = self.norm(h, self.w2)
        return h + self.down(F.silu(self.gate(n)) * self.up(n))


class GPT(nn.Module):
    def __init__(self, layers=2, ckpt=True):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.wf = nn.Parameter(1 + 0.1 * torch.randn(D))
        self.head = nn.Linear(D, V, bias=False)
        self.ckpt = ckpt

    def forward(self, idx, targets):
        x = self.emb(idx)
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=False) if self.ckpt else b(x)
        logits = self.head(Block.norm(x, self.wf))
        return F.cross_entropy(logits.view(-1, V), targets.view(-1))


def _inputs():
    idx = torch.randint(0, V, (2, 12))
    return idx, torch.randint(0, V, (2, 12))


def _grads(model):
    return {k: p.grad for k, p in model.named_parameters()}


def _step(model, args):
    loss = model(*args)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_step_equal(model, compiled, args):
    """Loss and every gradient of `compiled` as close to float64 as eager fp32 is."""
    ref64 = copy.deepcopy(model).double()
    loss64, g64 = _step(ref64, args)
    loss, g = _step(model, args)
    got, gg = _step(compiled, args)
    problems = [within_eager_rounding("loss", got, loss, loss64, torch.float32)]
    problems += [within_eager_rounding(k, gg[k], g[k], g64[k], torch.float32) for k in g]
    assert not [p for p in problems if p], problems


def _compile(model, **options):
    ligerfx.backend.last_report = None
    ligerfx.compile_in_place(model, **options)
    return model


def _assert_boundary_misses(rep, n: int) -> None:
    """The report's near misses are `n` add + norm rewrites that a checkpointed body's boundary
    cut in two (the add in one graph, the norm in the next), each saying so."""
    assert len(rep.near_misses) == n, rep
    for miss in rep.near_misses:
        assert miss.pattern == "add_rms_norm", rep
        assert "both sides of a body's boundary" in miss.reason, rep
        assert "tag_activation_checkpoint" in miss.reason, rep


@pytest.mark.parametrize("inner", ["aot_eager", "eager"])
def test_rewrites_inside_checkpoint_bodies_and_the_step_equals_eager(kernel_path, inner):
    torch.manual_seed(1)
    model, args = GPT(), _inputs()
    compiled = _compile(copy.deepcopy(model), inner=inner, validate="raise")
    _assert_step_equal(model, compiled, args)
    rep = ligerfx.backend.last_report
    # the same rewrites as without checkpointing, each block's inside its checkpoint body
    plain = copy.deepcopy(model)
    plain.ckpt = False
    plain_rep = ligerfx.explain(plain, *args)
    # The same rewrites as without checkpointing, except that a block's last residual add and
    # the next block's first norm are in different bodies (or the body and the outer graph):
    # those norms are rms_norm, not add_rms_norm (the add stays unfused, the norm is not missed).
    def norms(c):
        c = dict(c)
        c["rms_norm"] = c.pop("rms_norm", 0) + c.pop("add_rms_norm", 0)
        return c

    assert norms(rep.counts) == norms(plain_rep.counts) and rep.graphs == 1, \
        (rep.counts, plain_rep.counts)
    in_blocks = [m for m in rep.matches if m.location.module.startswith("blocks.")]
    assert {m.location.module.split(".")[1] for m in in_blocks} == {"0", "1"}
    assert {m.pattern for m in in_blocks} >= {"rms_norm", "swiglu"}, rep
    # ... and each of those adds is reported (a near miss naming both sides of the boundary)
    _assert_boundary_misses(rep, 2)
    # translation validation checked the body rewrites on the body's real operands
    assert rep.validation and all(v.status == "equal" for v in rep.validation), rep
    assert len(rep.validation) == len([m for m in rep.matches if m.pattern != "int8_linear"])


def test_backward_recomputes_the_fused_layer(torch_path):
    # The point of checkpointing is kept: the fused ops of a checkpointed block run again in
    # the backward (recompute), and not at all in the backward without checkpointing; the
    # forward keeps less for the backward (a CPU stand-in for peak memory).
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "liger" and "backward" not in func.name():
                self.n += 1
            return func(*args, **(kwargs or {}))

    counts, saved = {}, {}
    for ckpt in (True, False):
        torch.manual_seed(1)
        model = _compile(GPT(layers=4, ckpt=ckpt), inner="aot_eager")
        args = (torch.randint(0, V, (4, 64)), torch.randint(0, V, (4, 64)))  # activations > weights
        model(*args).backward()  # the first call compiles (and validates): not the step measured
        stored = []  # what the forward keeps for the backward (the memory checkpointing saves)

        def pack(t):
            stored.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(*args)
        saved[ckpt] = sum(stored)
        with Count() as c:
            loss.backward()
        counts[ckpt] = c.n
        assert ligerfx.backend.last_report.counts.get("swiglu") == 4
    # per block: rms_norm, add_rms_norm, gated_act run again
    assert counts == {True: 12, False: 0}, counts
    assert saved[True] < 0.6 * saved[False], saved  # measured: 1.26 MB against 2.48 MB


_STATE: dict = {}


class SideEffectBlock(Block):
    def forward(self, x):
        _STATE["calls"] = _STATE.get("calls", 0) + 1  # a side effect Dynamo will not replay
        return super().forward(x)


def test_graph_break_under_checkpoint_is_a_near_miss(torch_path):
    torch.manual_seed(1)
    model = GPT()
    model.blocks = nn.ModuleList(SideEffectBlock() for _ in range(2))
    args = _inputs()
    ref = copy.deepcopy(model)
    compiled = _compile(model, inner="eager")
    assert torch.equal(compiled(*args), ref(*args))
    rep = ligerfx.backend.last_report
    misses = [n for n in rep.near_misses if n.pattern == "activation_checkpointing"]
    assert misses, rep
    assert "skip_fwd_side_effects_in_bwd_under_checkpoint" in misses[0].reason
    assert not any(m.location.module.startswith("blocks.") for m in rep.matches), rep


def test_cond_body_is_reported_not_rewritten(torch_path):
    # torch.cond's branches are bodies too, but the op is not "run this graph": a norm in a
    # branch is a near miss naming the op, and nothing is rewritten there.
    w = 1 + 0.1 * torch.randn(D)

    def branch(x):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def fn(x, p):
        return torch.cond(p, branch, lambda x: x * 2.0, (x,))

    x = torch.randn(4, D)
    ligerfx.backend.last_report = None
    out = ligerfx.compile(fn, inner="eager")(x, torch.tensor(True))
    assert torch.equal(out, fn(x, torch.tensor(True)))
    rep = ligerfx.backend.last_report
    assert not rep.matches, rep
    assert any(n.pattern == "rms_norm" and "torch.ops.higher_order.cond" in n.reason
               for n in rep.near_misses), rep


@pytest.mark.slow
def test_hf_llama_with_gradient_checkpointing_is_fused_when_dynamo_can_trace_it(kernel_path,
                                                                                monkeypatch):
    # transformers' decoder layer sets a context variable under the checkpoint; with Dynamo's
    # flag it traces the layer as a checkpoint op, and every layer pattern is rewritten inside.
    from tests.models.hf import build

    flag = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    if not hasattr(torch._dynamo.config, flag):
        pytest.skip(f"this torch has no torch._dynamo.config.{flag}")
    monkeypatch.setattr(torch._dynamo.config, flag, True)
    model, inputs = build("llama")
    model.gradient_checkpointing_enable()
    compiled = _compile(copy.deepcopy(model), inner="eager", validate="raise")
    ref64 = copy.deepcopy(model).double()

    def step(m):
        loss = m(**inputs).loss
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in m.named_parameters()}

    (loss64, g64), (loss, g), (got, gg) = step(ref64), step(model), step(compiled)
    problems = [within_eager_rounding("loss", got, loss, loss64, torch.float32)]
    problems += [within_eager_rounding(k, gg[k], g[k], g64[k], torch.float32) for k in g]
    assert not [p for p in problems if p], problems
    rep = ligerfx.backend.last_report
    assert rep.graphs == 1, rep
    # each layer's norms, rope and MLP inside its body; the layer-crossing residual adds stay,
    # each reported
    _assert_boundary_misses(rep, 2)
    assert rep.counts == {"rms_norm": 3, "add_rms_norm": 2, "rope": 2, "swiglu": 2,
                          "fused_linear_cross_entropy": 1}, rep.counts
    assert all(v.status == "equal" for v in rep.validation) and len(rep.validation) == 10, rep
