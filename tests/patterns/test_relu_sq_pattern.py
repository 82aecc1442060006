"""relu_sq / relu_sq_glu patterns: every spelling counted and eager-equal (fp32 training step; bf16
and fp16 bit for bit), look-alikes refused with a reason, and transformers' Nemotron."""

import pytest
import torch
import torch.nn.functional as F

import ligerfx
from tests.compare import compare_training_step
from tests.models.act_norm import RELU_SQ

NAMES = ("relu_sq", "relu_sq_glu")
OPTS = {"patterns": list(NAMES)}


def _counts(report):
    return {k: v for k, v in report.counts.items() if k in NAMES}


def _interpreted(name):
    # the interpreted kernels once per op (the kernel tests cover them in depth), torch elsewhere
    return name in ("square", "gated_chunk")


@pytest.mark.parametrize("name", list(RELU_SQ))
def test_spellings_train_like_eager(name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if _interpreted(name) else "0")
    model, args, counts = RELU_SQ[name]()
    report = compare_training_step(model, args, options=OPTS)
    assert _counts(report) == counts
    assert not report.near_misses, [str(m) for m in report.near_misses]


@pytest.mark.parametrize("name", NAMES)
def test_replacement_matches_every_spelling(name):
    from ligerfx.testing import check_pattern

    assert check_pattern(name) == 2


def _mlp(x):
    return F.relu(x) ** 2


def _mlp_fp32_square(x):
    return (torch.square(F.relu(x.float()))).to(x.dtype)


def _glu(g, u):
    return torch.square(F.relu(g)) * u


def _glu_fp32_act(g, u):
    return torch.square(F.relu(g.float())).to(g.dtype) * u


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fn", [_mlp, _mlp_fp32_square, _glu, _glu_fp32_act], ids=lambda f: f.__name__)
def test_low_precision_bit_equal(fn, dtype, kernel_path):
    gen = torch.Generator().manual_seed(0)
    ins = [(torch.randn(3, 5, 40, generator=gen) * 3).to(dtype).requires_grad_()
           for _ in range(fn.__code__.co_argcount)]
    compiled = torch.compile(fn, backend="liger", options={"inner": "aot_eager", **OPTS})
    out, ref = compiled(*ins), fn(*ins)
    assert ligerfx.backend.last_report.counts.get("relu_sq" if len(ins) == 1 else "relu_sq_glu") == 1
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    cot = torch.randn(ref.shape, generator=gen).to(dtype)
    for a, b in zip(torch.autograd.grad(out, ins, cot), torch.autograd.grad(ref, ins, cot)):
        assert torch.equal(a, b)


def _cast_between(x):
    return F.relu(x).float() ** 2  # relu in bf16, squared in fp32: not the kernel's order


def _relu_escapes(x):
    r = F.relu(x)
    return r ** 2 + r


def _inplace_relu(x):
    h = x * 2.0
    return F.relu(h, inplace=True) ** 2


def _cube(x):
    return F.relu(x) ** 3


def test_look_alikes():
    x = torch.randn(3, 40).bfloat16()
    rep = ligerfx.explain(_cast_between, x)
    assert not rep.matches
    assert any("cast to torch.float32 before it is squared" in m.reason for m in rep.near_misses)
    rep = ligerfx.explain(_relu_escapes, x)
    assert not rep.matches and any("also used by" in m.reason for m in rep.near_misses)
    for fn in (_inplace_relu, _cube):  # not relu²: an in-place relu_ writes h, a cube is a cube
        rep = ligerfx.explain(fn, x)
        assert not rep.matches, fn.__name__


def test_nemotron(triton_path):
    transformers = pytest.importorskip("transformers")
    from ligerfx.dump.hf_targets import small_config_kwargs

    kw = small_config_kwargs("nemotron")
    kw.update(num_hidden_layers=1)
    try:
        config = transformers.AutoConfig.for_model("nemotron", **kw)
    except ValueError:
        pytest.skip("this transformers has no Nemotron")
    assert config.hidden_act == "relu2"  # transformers' ReLUSquaredActivation
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(3, 256, (2, 8))
    report = compare_training_step(model, dict(input_ids=ids, labels=ids))
    assert report.counts.get("relu_sq") == 1  # one non-gated MLP per layer
    assert not [m for m in report.near_misses if m.pattern in NAMES]
