"""Issue 23 §1: a silent miss is a bug.  Detectors recognise a family (RoPE, RMS norm, gated
activation) by its math, independently of the patterns; a look-alike no pattern rewrote or
reported becomes a near miss of the family saying what was seen and, where it can tell, why.

Each unmatched spelling below is one no pattern takes today (each test first asserts it is not
rewritten, so a pattern that learns it shows here as a failure to update, not as a silent pass).
Fully rewritten models and look-alikes that are not the family get no detector near miss.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ligerfx
import ligerfx.builtins  # noqa: F401 - registers the built-in patterns and detectors
from ligerfx.compiler.canonical import View
from ligerfx.compiler.detect import detectors, unregister_detector
from tests.models import HANDWRITTEN
from tests.models.extra_styles import EXTRA_STYLES
from tests.models.hf import tiny_causal_lm

EPS = 1e-6
PREFIX = {"rope": "looks like a rotary embedding but no rope pattern matched: ",
          "rms_norm": "looks like an RMS norm but no rms_norm pattern matched: ",
          "gated_act": "looks like a gated activation but no gated_act pattern matched: ",
          "layer_norm": "looks like a layer norm but no layer_norm pattern matched: "}


def _detected(report) -> list:
    return [m for m in report.near_misses if m.reason.startswith("looks like ")]


def _one_hit(model, *args, family: str, n: int = 1):
    """The report's near misses, after checking: nothing rewritten, `n` near misses, all the
    detector's for `family`."""
    report = ligerfx.explain(model, *args)
    assert not report.counts, f"now rewritten ({report.counts}): pick another unmatched spelling"
    misses = report.near_misses
    assert len(misses) == n, [str(m) for m in misses]
    for m in misses:
        assert m.pattern == family and m.reason.startswith(PREFIX[family]), str(m)
    return misses


# -- RoPE --------------------------------------------------------------------------------------


def _inv_freq(h):
    return 1.0 / 10000 ** (torch.arange(0, h).float() / h)


class RopeTwoTables(nn.Module):
    """Each half rotated with its own angles: no single rotation per pair."""

    def forward(self, x, pos):
        h = x.shape[-1] // 2
        ta, tb = pos[:, None] * _inv_freq(h), pos[:, None] * _inv_freq(h) * 0.5
        x1, x2 = x[..., :h], x[..., h:]
        return torch.cat([x1 * ta.cos() - x2 * ta.sin(), x2 * tb.cos() + x1 * tb.sin()], -1)


class RopeNonLastDim(nn.Module):
    """The rotation runs along dim -2 of a (B, D, T) tensor."""

    def forward(self, x, pos):
        h = x.shape[-2] // 2
        t = (pos[:, None] * _inv_freq(h)).T
        c, s = t.cos(), t.sin()
        x1, x2 = x[:, :h, :], x[:, h:, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-2)


class RopePolarHalves(nn.Module):
    """A complex number built by torch.complex from the halves, times a polar table, read back
    through .real / .imag."""

    def forward(self, x, pos):
        h = x.shape[-1] // 2
        f = torch.polar(torch.ones(pos.shape[0], h), pos[:, None] * _inv_freq(h))
        z = torch.complex(x[..., :h], x[..., h:]) * f
        return torch.cat([z.real, z.imag], -1)


def _rope_args(shape=(2, 3, 8, 16)):
    return torch.randn(*shape), torch.arange(8).float()


def test_rope_halves_with_two_angle_tables():
    (m,) = _one_hit(RopeTwoTables(), *_rope_args(), family="rope")
    assert "different angle tables" in m.reason and "`ta`" in m.reason and "`tb`" in m.reason
    assert "torch.cat" in m.location.code  # reported where the halves are recombined


def test_rope_on_a_non_last_dim():
    (m,) = _one_hit(RopeNonLastDim(), torch.randn(2, 16, 8), torch.arange(8).float(),
                    family="rope")
    assert "along dim -2, not the last dim" in m.reason, m.reason


def test_rope_complex_built_from_halves_by_torch_complex():
    (m,) = _one_hit(RopePolarHalves(), *_rope_args(), family="rope")
    assert "as complex numbers (complex() of two parts)" in m.reason and "`f`" in m.reason
    assert "read back as real numbers" in m.reason


def test_detector_off_when_its_patterns_are_off():
    report = ligerfx.explain(RopeTwoTables(), *_rope_args(),
                             options={"exclude": ["rope", "rope_single"]})
    assert not report.near_misses, [str(m) for m in report.near_misses]


# -- RMS norm ----------------------------------------------------------------------------------


class RMSClampEps(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16))

    def forward(self, x):
        return self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp_min(EPS)))


class RMSNoEps(RMSClampEps):
    def forward(self, x):
        return self.w * (x / x.pow(2).mean(-1, keepdim=True).sqrt())


class RMSTensorEps(RMSClampEps):
    def __init__(self):
        super().__init__()
        self.register_buffer("eps", torch.tensor(EPS))

    def forward(self, x):
        return self.w * x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps)


def test_rms_norm_with_eps_as_a_bound():
    (m,) = _one_hit(RMSClampEps(), torch.randn(2, 5, 16), family="rms_norm")
    assert "`clamp_min` instead of being added" in m.reason, m.reason


def test_rms_norm_without_eps():
    (m,) = _one_hit(RMSNoEps(), torch.randn(2, 5, 16), family="rms_norm")
    assert "no eps is added" in m.reason, m.reason


class LayerNormWritten(nn.Module):
    """A layer norm whose centred value is written in place between its variance and the product
    (the differential long run's silent miss): no layer norm, and the detector says why."""

    def __init__(self, where):
        super().__init__()
        self.proj = nn.Linear(32, 32, bias=False)
        self.bias = nn.Parameter(0.1 * torch.randn(32))
        self.where = where

    def forward(self, x):
        hf = self.proj(x).float()
        mu = hf.mean(-1, keepdim=True)
        if self.where == "input":
            hf += 1.0
        xc = hf - mu
        var = xc.var(-1, unbiased=False, keepdim=True)
        if self.where == "centred":
            xc += 1.0
        return xc * torch.rsqrt(var + 1e-5) + self.bias


@pytest.mark.parametrize("where", ["centred", "input"])
def test_layer_norm_written_between_its_uses(where):
    (m,) = _one_hit(LayerNormWritten(where), torch.randn(2, 5, 32), family="layer_norm")
    assert "written in place" in m.reason, m.reason


class CentringWritten(nn.Module):
    """`hf += 1` between the mean and the centring, the tail an RMS norm of the centred value
    (differential long run, seed 302): rms_norm rewrites the tail (right: it is an RMS norm of
    xc), and the layer norm the code looks like is reported; without a norm after it the written
    centring is no layer norm look-alike at all."""

    def __init__(self, normalised):
        super().__init__()
        self.proj = nn.Linear(32, 32, bias=False)
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(32))
        self.normalised = normalised

    def forward(self, x):
        hf = self.proj(x)
        mu = hf.mean(-1, keepdim=True)
        hf += 1.0
        xc = hf - mu
        if not self.normalised:
            return xc * self.weight
        return xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def test_layer_norm_written_centring_under_a_rewritten_rms_norm():
    report = ligerfx.explain(CentringWritten(True), torch.randn(2, 5, 32))
    assert report.counts == {"rms_norm": 1}, str(report)
    (m,) = _detected(report)
    assert m.pattern == "layer_norm" and m.reason.startswith(PREFIX["layer_norm"]), str(m)
    assert "written in place" in m.reason and "between its mean" in m.reason, m.reason


def test_written_centring_without_a_norm_is_not_reported():
    report = ligerfx.explain(CentringWritten(False), torch.randn(2, 5, 32))
    assert not report.counts and not report.near_misses, str(report)


def test_pattern_near_miss_is_not_repeated_by_the_detector():
    # the rms_norm pattern matches and refuses a tensor eps: its own near miss says why, and the
    # detector, seeing the same nodes, adds nothing
    report = ligerfx.explain(RMSTensorEps(), torch.randn(2, 5, 16))
    assert [m.pattern for m in report.near_misses] == ["rms_norm"], report.near_misses
    assert not _detected(report), str(report)


# -- gated activations -------------------------------------------------------------------------


class GatedMLP(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act
        self.gate = nn.Linear(16, 32, bias=False)
        self.up = nn.Linear(16, 32, bias=False)
        self.down = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class ClampedSwiGLU(nn.Module):
    """gpt-oss's gate: clamped halves of one fused projection, a scaled sigmoid, `up + 1`, with the
    slope written as a division (no pattern takes that)."""

    def __init__(self):
        super().__init__()
        self.gate_up = nn.Linear(16, 64)

        self.down = nn.Linear(32, 16)

    def forward(self, x):
        gu = self.gate_up(x)
        gate, up = gu[..., ::2].clamp(max=7.0), gu[..., 1::2].clamp(-7.0, 7.0)
        # the slope as a division (the clamped_glu pattern takes `gate * alpha`, not this)
        return self.down((up + 1) * (gate * torch.sigmoid(gate / 0.5875)))


@pytest.mark.parametrize("act, name", [(F.mish, "mish"), (torch.sigmoid, "sigmoid"),
                                       (F.softplus, "softplus")])
def test_gated_activation_no_kernel_computes(act, name):
    (m,) = _one_hit(GatedMLP(act), torch.randn(2, 5, 16), family="gated_act")
    assert m.reason.startswith(PREFIX["gated_act"] + f"{name} of `linear` times `linear_1`")
    assert "the gated kernels compute silu, gelu and relu² only" in m.reason


def test_gated_activation_with_extra_steps():
    (m,) = _one_hit(ClampedSwiGLU(), torch.randn(2, 5, 16), family="gated_act")
    assert "steps around it (add, clamp)" in m.reason, m.reason


# -- no false positives ------------------------------------------------------------------------


class Sinusoidal(nn.Module):
    """Absolute sinusoidal positions, added to x (not a rotation)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 16)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, 16, 2).float() * (-math.log(10000.0) / 16))
        return self.emb(ids) + torch.cat([torch.sin(pos * div), torch.cos(pos * div)], -1)


class MeanSquareLoss(nn.Module):
    """Means of squares used as losses (one of them an RMS error), never multiplying x."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x, y):
        d = self.lin(x) - y
        return (d * d).mean(-1).mean() + torch.sqrt(d.pow(2).mean(-1, keepdim=True)).mean()


class AlibiAttention(nn.Module):
    """q k^T softmax attention with an ALiBi bias, its output gated by sigmoid(q) (no second
    projection of the input: not a gated MLP), and a quick-gelu h * sigmoid(1.702 h)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(2, 8, 3, 2, 8).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        pos = torch.arange(8)
        bias = -(pos[None, :] - pos[:, None]).abs().float() * torch.tensor([0.5, 0.25])[:, None, None]
        h = (q @ k.transpose(-1, -2) / math.sqrt(8) + bias).softmax(-1) @ v * torch.sigmoid(q)
        return h * torch.sigmoid(1.702 * h)


class Bilinear(nn.Module):
    """A gate with no activation (bilinear GLU): not a gated activation."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(16, 32)

    def forward(self, x):
        return self.a(x) * self.b(x)


@pytest.mark.parametrize("model, args", [
    (Sinusoidal(), (torch.randint(0, 100, (2, 8)),)),
    (MeanSquareLoss(), (torch.randn(2, 5, 16), torch.randn(2, 5, 16))),
    (AlibiAttention(), (torch.randn(2, 8, 16),)),
    (Bilinear(), (torch.randn(2, 5, 16),)),
], ids=["sinusoidal_absolute", "mean_square_loss", "alibi_attention", "bilinear"])
def test_look_alikes_are_not_hits(model, args):
    report = ligerfx.explain(model, *args)
    assert not _detected(report), str(report)


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "phi3", "gemma"])
def test_fully_rewritten_hf_models_get_no_detector_near_miss(model_type):
    model, inputs = tiny_causal_lm(model_type)
    report = ligerfx.explain(model, **inputs)
    assert report.counts.get("rope") or report.counts.get("rope_single"), report.counts
    assert not _detected(report), str(report)
    assert not report.near_misses, str(report)


@pytest.mark.parametrize("name", ["llama_ref", "nanogpt", "rms_torchtitan", "rms_gemma",
                                  "rms_keepdim_false", "ln_manual"])
def test_rewritten_handwritten_models_get_no_detector_near_miss(name):
    model, args, _ = HANDWRITTEN[name]()
    report = ligerfx.explain(model, *args)
    assert report.counts, str(report)
    assert not _detected(report), str(report)


# -- the detectors are independent of the patterns ---------------------------------------------


def _hits_before_rewriting(model, *args, **kwargs) -> dict:
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(*args, **kwargs)
    assert ex.graph_count == 1
    view = View(ex.graphs[0].graph)
    return {d.family: len(list(d.fn(view))) for d in detectors()}


def _build(source, name):
    if source == "hf":
        model, inputs = tiny_causal_lm(name)
        return model, (), inputs
    model, batch, _ = EXTRA_STYLES[name]()
    return model, batch, {}


@pytest.mark.parametrize("source, name", [("hf", "llama"), ("hf", "phi3"), ("extra", "rope_gptj"),
                                          ("extra", "rope_posids_bthd"),
                                          ("extra", "mlp_fused_split"), ("extra", "mlp_gelu_new")])
def test_detectors_see_every_instance_the_patterns_rewrite(source, name):
    """On a model's graph before any rewrite, each detector finds every instance its family's
    patterns rewrite (one rope rewrite of q and k is two rotations)."""
    model, args, kwargs = _build(source, name)
    counts = collections.Counter(ligerfx.explain(model, *args, **kwargs).counts)
    hits = _hits_before_rewriting(model, *args, **kwargs)
    assert hits["rope"] == 2 * counts["rope"] + counts["rope_single"] > 0, (hits, counts)
    assert hits["rms_norm"] == counts["rms_norm"] + counts["add_rms_norm"], (hits, counts)
    assert hits["gated_act"] == counts["swiglu"] + counts["geglu"] > 0, (hits, counts)


# -- registration, reports, dump ---------------------------------------------------------------


class Doubler(nn.Module):
    def forward(self, x):
        return (x + x) * 3.0


def test_register_detector_public_api(caplog):
    def twice(view):
        for c in view.cnodes():
            if c.op == "add" and len(c.args) == 2 and c.args[0] is c.args[1]:
                yield c.nodes[0], c.nodes, "x + x seen"

    ligerfx.register_detector("doubling", twice, looks_like="a doubling")
    try:
        with pytest.raises(ValueError, match="already registered"):
            ligerfx.register_detector("doubling", twice)
        report = ligerfx.explain(Doubler(), torch.randn(4))
        (m,) = report.near_misses
        assert m.pattern == "doubling"
        assert m.reason == "looks like a doubling but no doubling pattern matched: x + x seen"
        assert "near miss: doubling at" in str(report)
        # a pattern name that is not enabled keeps the detector off
        ligerfx.register_detector("doubling", twice, patterns=("no_such_pattern",), replace=True)
        assert not ligerfx.explain(Doubler(), torch.randn(4)).near_misses

        @ligerfx.register_detector("doubling", replace=True)
        def broken(view):
            raise RuntimeError("detector bug")

        with caplog.at_level(logging.WARNING, logger="ligerfx"):
            report = ligerfx.explain(Doubler(), torch.randn(4))
        assert not report.near_misses
        assert "detector 'doubling' failed: RuntimeError: detector bug" in caplog.text
    finally:
        unregister_detector("doubling")


def test_dump_shows_detector_near_misses(tmp_path, capsys):
    from ligerfx.tools.cli import main

    path = tmp_path / "mish_model.py"
    path.write_text(textwrap.dedent("""
        import torch, torch.nn as nn, torch.nn.functional as F

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.g, self.u = nn.Linear(8, 16), nn.Linear(8, 16)

            def forward(self, x):
                return F.mish(self.g(x)) * self.u(x)  # the gated line

        def make():
            return M(), (torch.randn(2, 8),)
    """))
    out = tmp_path / "dump.json"
    assert main(["dump", f"{path}:make", "--format", "json", "-o", str(out)]) == 0
    (nm,) = json.loads(out.read_text())["near_misses"]
    assert nm["pattern"] == "gated_act" and nm["reason"].startswith(PREFIX["gated_act"])
    assert "the gated line" in nm["location"]["code"]
    assert main(["dump", f"{path}:make", "--format", "text"]) == 0
    assert "near miss: gated_act" in capsys.readouterr().out
