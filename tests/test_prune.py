"""Structured MLP pruning, `ligerfx.prune_` (compress/prune.py, MLPs found by compress/channels.py).

What it promises: mlp=0 leaves the model bit-identical; the least-squares re-fit ("reconstruct")
reproduces the unpruned model on held-out inputs better than dropping the same number of
channels ("remove"); the re-fit is the ridge least-squares solution and the greedy OBS weight
updates land on it; producers lose rows (and bias entries), the consumer columns (bias kept);
an HF Llama's config follows so save_pretrained / from_pretrained round-trips, and any pruned
state_dict loads into a model pruned by the same call; a module that is not channel-wise
between its linears is refused with the reason; bad arguments raise clear errors.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ligerfx
from ligerfx.compress import channels
from ligerfx.compress.prune import obs_order, refit


class Gated(nn.Module):
    def __init__(self, d, h, bias=False):
        super().__init__()
        self.gate, self.up = nn.Linear(d, h, bias=bias), nn.Linear(d, h, bias=bias)
        self.down = nn.Linear(h, d, bias=bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Mixed(Gated):
    """Channels mixed between the linears (a roll along the hidden dim): not prunable."""

    def forward(self, x):
        return self.down(torch.roll(F.silu(self.gate(x)) * self.up(x), 1, dims=-1))


class Scaled(Gated):
    """Hidden channels scaled by a per-channel tensor from outside the linears: refused."""

    def __init__(self, d, h):
        super().__init__(d, h)
        self.scale = nn.Parameter(torch.rand(h) + 0.5)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x) * self.scale)


class Block(nn.Module):
    def __init__(self, d, h, kind):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        if kind == "plain":
            self.mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
        else:
            self.mlp = {"gated": Gated, "mixed": Mixed, "scaled": Scaled}[kind](d, h)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Stack(nn.Module):
    def __init__(self, d=16, h=64, n=3, kinds=("gated",) * 3, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, h, k) for k in kinds[:n])
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return Stack(**kw).eval()


def _batches(seed, n=8, shape=(4, 32), vocab=50):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, shape, generator=g) for _ in range(n)]


def _out(model, batches):
    with torch.no_grad():
        return torch.cat([model(b) for b in batches])


def test_mlp_zero_is_exact():
    m = _model(1)
    ref = copy.deepcopy(m)
    skipped = ligerfx.prune_(m, mlp=0.0, calibration=_batches(1))
    assert skipped == {}
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    held = _batches(99, n=2)
    assert torch.equal(_out(m, held), _out(ref, held))


@pytest.mark.parametrize("kinds", [("gated",) * 3, ("plain",) * 3])
def test_reconstruct_beats_remove_held_out(kinds):
    base = _model(2, kinds=kinds)
    cal, held = _batches(3), _batches(4, n=4)
    ref = _out(base, held)
    err = {}
    for method in ("reconstruct", "remove"):
        m = copy.deepcopy(base)
        assert ligerfx.prune_(m, mlp=0.5, calibration=cal, method=method) == {}
        for b in m.blocks:
            lins = [x for x in b.mlp.modules() if isinstance(x, nn.Linear)]
            assert [x.weight.shape for x in lins][-1] == (16, 32)
            assert all(x.weight.shape == (32, 16) for x in lins[:-1])
        err[method] = (_out(m, held) - ref).pow(2).mean().item()
    assert 0 < err["reconstruct"] < 0.7 * err["remove"], err


def test_plain_mlp_biases_follow_channels():
    m = _model(5, kinds=("plain",) * 3)
    old = copy.deepcopy(m.blocks[0].mlp)
    ligerfx.prune_(m, mlp=0.25, calibration=_batches(5), method="remove")
    new = m.blocks[0].mlp
    assert new[0].weight.shape == (48, 16) and new[0].bias.shape == (48,)
    assert new[2].weight.shape == (16, 48) and torch.equal(new[2].bias, old[2].bias)
    # The kept rows are rows of the old producer, with their own bias entries, and the consumer's
    # columns (no re-fit with "remove") are the same channels.
    rows = [int((old[0].weight == r).all(1).nonzero()) for r in new[0].weight]
    assert rows == sorted(rows)
    assert torch.equal(new[0].bias, old[0].bias[rows])
    assert torch.equal(new[2].weight, old[2].weight[:, rows])


def test_refit_is_ridge_least_squares_and_obs_lands_on_it():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(400, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    W = torch.randn(10, 24, generator=g, dtype=torch.float64)
    H = X.t() @ X
    keep = torch.tensor([0, 3, 4, 9, 11, 17, 20, 23])
    damp = 1e-3
    lam = damp * float(torch.diagonal(H[keep][:, keep]).mean())
    Xs = X[:, keep]
    # Reference: argmin ||X W^T - Xs V^T||^2 + lam ||V||^2, from the normal equations.
    V = torch.linalg.lstsq(torch.cat([Xs, lam ** 0.5 * torch.eye(len(keep), dtype=X.dtype)]),
                           torch.cat([X @ W.t(), torch.zeros(len(keep), 10, dtype=X.dtype)])).solution.t()
    torch.testing.assert_close(refit(W, H, keep, damp), V, rtol=1e-9, atol=1e-9)
    # Greedy OBS never drops a channel twice and prefers what the re-fit can replace: its error
    # after re-fitting is no worse than keeping the highest-energy channels.
    drop = obs_order(W, H, 16, 1e-9)
    assert len(set(drop.tolist())) == 16
    k_obs = torch.tensor(sorted(set(range(24)) - set(drop.tolist())))
    k_en = torch.argsort((W.pow(2).sum(0) * torch.diagonal(H)), descending=True)[:8].sort().values

    def fit_err(k):
        Wk = refit(W, H, k, 1e-9)
        return (X @ W.t() - X[:, k] @ Wk.t()).pow(2).sum().item()

    assert fit_err(k_obs) <= fit_err(k_en) * 1.0001


def test_refuses_channel_mixing_with_reason():
    m = _model(8, kinds=("mixed", "scaled", "gated"))
    before = copy.deepcopy(m)
    skipped = ligerfx.prune_(m, mlp=0.5, calibration=_batches(8))
    assert "roll" in skipped["blocks.0.mlp"] and "not elementwise" in skipped["blocks.0.mlp"]
    assert "mixes the hidden channels" in skipped["blocks.1.mlp"]
    assert set(skipped) == {"blocks.0.mlp", "blocks.1.mlp"}
    for i in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(m.blocks[i].state_dict().values(),
                                                     before.blocks[i].state_dict().values()))
    assert m.blocks[2].mlp.down.in_features == 32


def test_finder_refuses_shared_and_returned_hidden():
    class Leaky(Gated):
        def forward(self, x):
            h = F.silu(self.gate(x)) * self.up(x)
            return self.down(h), h

    found, refused = channels.find(nn.ModuleDict({"a": Leaky(8, 16)}))
    assert not found and "returned" in refused["a"]
    shared = Gated(8, 16)
    found, refused = channels.find(nn.ModuleList([shared, shared, Gated(8, 16)]))
    assert list(found) == ["2"]


def test_bad_arguments():
    m, cal = _model(9), _batches(9, n=1)
    for bad in (1.0, -0.1, "half", True):
        with pytest.raises(ValueError, match="mlp is the fraction"):
            ligerfx.prune_(m, mlp=bad, calibration=cal)
    with pytest.raises(NotImplementedError, match="attention heads"):
        ligerfx.prune_(m, mlp=0.5, heads=0.25, calibration=cal)
    with pytest.raises(ValueError, match="method must be one of"):
        ligerfx.prune_(m, mlp=0.5, calibration=cal, method="magnitude")
    with pytest.raises(ValueError, match="calibration=batches"):
        ligerfx.prune_(m, mlp=0.5)
    with pytest.raises(ValueError, match="wrap a single batch"):
        ligerfx.prune_(m, mlp=0.5, calibration=cal[0])
    assert m.blocks[0].mlp.down.in_features == 64  # nothing was changed by the refusals


def test_hf_llama_config_save_load_round_trip(tmp_path):
    pytest.importorskip("transformers")
    import transformers

    from tests.models.hf import build

    model, _ = build("llama")
    model.eval()
    cal = _batches(10, n=4, shape=(2, 32), vocab=model.config.vocab_size)
    held = _batches(11, n=2, shape=(2, 32), vocab=model.config.vocab_size)
    skipped = ligerfx.prune_(model, mlp=0.5, calibration=cal)
    assert all("attn" in k for k in skipped)  # attention modules are not MLPs; every MLP pruned
    assert model.config.intermediate_size == 64
    for layer in model.model.layers:
        assert layer.mlp.down_proj.weight.shape == (64, 64) and layer.mlp.gate_proj.out_features == 64
    with torch.no_grad():
        want = [model(b).logits for b in held]
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        for b, w in zip(held, want):
            torch.testing.assert_close(again(b).logits, w, rtol=0, atol=0)


def test_state_dict_loads_into_model_pruned_by_same_call():
    a, b = _model(12), _model(12)
    cal = _batches(12)
    ligerfx.prune_(a, mlp=0.5, calibration=cal)
    ligerfx.prune_(b, mlp=0.5, calibration=cal)
    with torch.no_grad():  # a's weights change after pruning (as fine-tuning would)
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    b.load_state_dict(a.state_dict())
    held = _batches(13, n=2)
    assert torch.equal(_out(a, held), _out(b, held))
