"""The canonical view's issue-23 identities: one integer index is `select` (the inner dim of an
unflatten a strided slice), a negation moves out of a sum as a subtraction, a reshape that drops a
trailing 1 is `squeeze`; and the values they claim equal are bit-equal in eager."""

import pytest
import torch
import torch.fx as fx

from ligerfx.compiler.canonical import View
from ligerfx.compiler.pattern import _run_with_meta


def _view_of(fn, *args):
    gm = fx.symbolic_trace(fn)
    _run_with_meta(gm, args)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return View(gm.graph), out


@pytest.mark.parametrize("f,i", [(lambda x: x.unbind(-1)[1], 1), (lambda x: x[..., 1], 1),
                                 (lambda x: x.select(3, 1), 1), (lambda x: torch.select(x, -1, -2), 3)])
def test_one_index_is_select(f, i):
    view, out = _view_of(f, torch.randn(2, 3, 4, 5))
    assert view[out].op == "select" and view[out].args[1:] == (-1, i)


def test_select_of_unflatten_is_strided_slice():
    x = torch.randn(2, 3, 8)
    view, out = _view_of(lambda x: x.unflatten(-1, (-1, 2)).unbind(-1)[1], x)
    c = view[out]
    assert c.op == "slice" and c.args[1:] == (-1, 1, None, 2)
    assert torch.equal(x.unflatten(-1, (-1, 2)).unbind(-1)[1], x[..., 1::2])


@pytest.mark.parametrize("f", [lambda p, a, b: p + a * (-b), lambda p, a, b: (-a) * b + p,
                               lambda p, a, b: p + torch.neg(a * b)])
def test_negation_out_of_a_sum_is_subtraction(f):
    view, out = _view_of(f, *[torch.randn(64) for _ in range(3)])
    assert view[out].op == "sub"


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_an_integer_negation_stays_a_negation(dtype):
    """Integer negation wraps (-INT_MIN is INT_MIN, -uint8(200) is 56): with a float operand
    `p + a * (-b)` differs from `p - a * b`, so the view keeps the sum."""
    b = torch.tensor([torch.iinfo(dtype).min if dtype == torch.int32 else 200], dtype=dtype)
    p, a = torch.zeros(1), torch.ones(1)
    assert not torch.equal(p + a * (-b), p - a * b)
    for f in (lambda p, a, b: p + a * (-b), lambda p, a, b: (-b) * a + p,
              lambda p, a, b: p + (-b)):
        view, out = _view_of(f, p, a, b)
        assert view[out].op == "add"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_negation_identities_are_bit_equal(dtype):
    g = torch.Generator().manual_seed(0)
    p, a, b = (torch.randn(4096, generator=g).mul(100).to(dtype) for _ in range(3))
    assert torch.equal(p + a * (-b), p - a * b)
    assert torch.equal((-a) * b + p, p - a * b)
    assert torch.equal(p + (-(a * b)), p - a * b)
    wide = b.float()  # promotion: the sign does not change the promoted dtype
    assert torch.equal(p + a * (-wide), p - a * wide)


def test_reshape_dropping_trailing_one_is_squeeze_only_trailing():
    view, out = _view_of(lambda x: x.reshape(2, 3, 4), torch.randn(2, 3, 4, 1))
    assert view[out].op == "squeeze" and view[out].args[1] == -1
    # a leading 1 (batch of one) keeps the reshape's own form
    view, out = _view_of(lambda x: x.reshape(3, 4), torch.randn(1, 3, 4))
    assert view[out].op != "squeeze"


@pytest.mark.parametrize("f,lo,hi", [
    (lambda x: x.clamp(min=None, max=7.0), None, 7.0), (lambda x: x.clamp(max=7.0), None, 7.0),
    (lambda x: torch.clamp_max(x, 7.0), None, 7.0), (lambda x: x.clamp_max(7.0), None, 7.0),
    (lambda x: torch.clamp(x, -7.0, 7.0), -7.0, 7.0), (lambda x: x.clip(-7.0, 7.0), -7.0, 7.0),
    (lambda x: torch.clip(x, min=-7.0, max=7.0), -7.0, 7.0),
    (lambda x: torch.clamp_min(x, -7.0), -7.0, None), (lambda x: x.clamp(-7.0), -7.0, None)])
def test_clamp_spellings_are_one_clamp(f, lo, hi):
    view, out = _view_of(f, torch.randn(64) * 10)
    c = view[out]
    assert c.op == "clamp" and c.args[1:] == (lo, hi)
