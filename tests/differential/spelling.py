"""Spelling pieces more than one family draws: dtypes, reduction dims, means, casts back."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

DTYPES = st.sampled_from((torch.float32, torch.bfloat16, torch.float16))


def last_dim(draw, rank: int) -> str:
    """The last dim written as -1, as its positive index, or as a keyword."""
    return draw(st.sampled_from(("-1", str(rank - 1), "dim=-1")))


def mean(draw, v: str, rank: int, keepdim: bool = True) -> str:
    """mean(v) over the last dim: method or function form, keepdim or unsqueeze."""
    d = last_dim(draw, rank)
    if not keepdim:
        return draw(st.sampled_from((f"{v}.mean({d}).unsqueeze(-1)", f"torch.mean({v}, {d})[..., None]")))
    return draw(st.sampled_from((f"{v}.mean({d}, keepdim=True)", f"torch.mean({v}, {d}, keepdim=True)")))


def square(draw, v: str) -> str:
    return draw(st.sampled_from((f"{v}.pow(2)", f"({v} * {v})", f"torch.square({v})", f"({v} ** 2)")))


def upcast(draw, v: str) -> str:
    return draw(st.sampled_from((f"{v}.to(torch.float32)", f"{v}.float()")))


def downcast(draw, v: str, like: str) -> str:
    return draw(st.sampled_from((f"{v}.to({like}.dtype)", f"{v}.type_as({like})")))


def rsqrt(draw, v: str) -> str:
    return draw(st.sampled_from((f"torch.rsqrt({v})", f"({v}).rsqrt()", f"(1.0 / torch.sqrt({v}))",
                                 f"torch.pow({v}, -0.5)")))
