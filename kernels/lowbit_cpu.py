"""CPU path of the int8 / int4 weight linears: fused dequantize-GEMV loops for decode rows.

On CPU the ops' torch path dequantized the whole weight into an fp32 [N, K] buffer and then
multiplied: 9 bytes of memory traffic per int8 weight (int4: 8.5) against 4 for an fp32 linear, so
the quantized model decoded slower than the fp32 one.  ATen's packed kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) take fp32 activations but measured 8-10x
slower than the fp32 GEMV on an AVX2 machine (docs/quantization.md, "CPU decode").

Instead, for few rows (decode) the product is written as torch expressions inductor's C++
backend turns into one vectorized loop that reads each packed byte once:

- int8 (`int8_rows`): the weight is read as int32 words, two per 8 fp32 lanes; lane i takes
  byte i % 4 of the word holding it (a broadcast load and a blend) and sign-extends it with a
  left then an arithmetic right shift.  y = (x . q) * scale.  (Reading the int8 bytes directly
  makes inductor load 8 of a 32-byte vector per step through a temporary: 3-4x slower.)
- int4 (`int4_rows`): one int32 word holds 8 consecutive levels; it is broadcast to the 8 lanes
  and lane i takes nibble i (shift by 4i, mask 15).  Per group the levels times x are summed per
  lane (no horizontal sum inside the loop); then y = sum_g scale * part_g + offset . (x summed
  per group).  A partial last group (G not dividing K) is served as groups of the largest
  power-of-two divisor of G that divides K, each repeating its group's scale and offset.

Many rows (prefill) dequantize and multiply (`dequant_rows`): the dequantization is amortised.

These run in two places: inlined by inductor as the ops' CPU decompositions (a model compiled
on CPU, see kernels/runtime.py), and from the ops' eager CPU implementation, which compiles the
same expression once per shape with inductor (`eager_kernel`) and calls that.
`fast_reason` says why a call cannot take the fused loop (it then takes `dequant_rows`).
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

import torch

DECODE_ROWS = 4  # up to this many rows the fused GEMV loop beats dequantize + matmul
LANES = 8  # levels per int32 word of packed int4, and int8 bytes per pair of words
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def rows_of(x: torch.Tensor):
    """Rows of x flattened to 2-D: an int, or a symbolic size in a dynamic-shape trace."""
    m = 1
    for d in x.shape[:-1]:
        m = m * d
    return m


def sub_group(K: int, G: int) -> Optional[int]:
    """The group size the int4 loop runs with: G when it divides K, else the largest power-of-two
    divisor of G (at least LANES) that divides K; None when none does."""
    g = G
    while g >= LANES and K % g:
        g //= 2
    return g if g >= LANES and g % LANES == 0 else None


def fast_reason(scheme: str, x: torch.Tensor, qweight: torch.Tensor, K: int,
                G: int = 0) -> Optional[str]:
    """Why the fused loop cannot serve this call (None: it can)."""
    if x.dtype not in FLOATS:
        return f"activations are {x.dtype} (the fused loop is for fp32/bf16/fp16)"
    if not isinstance(K, int) or K % LANES:
        return f"in_features={K} is not a multiple of {LANES} (the loop reads {LANES} weights per word)"
    if not qweight.is_contiguous():
        return "the packed weight is not contiguous (the loop reads it as int32 words)"
    if scheme == "int4" and sub_group(K, G) is None:
        return f"no group of at least {LANES} divides both group_size={G} and in_features={K}"
    return None


def decode_rows(x: torch.Tensor) -> bool:
    """Few enough rows, known when traced, for the fused loop."""
    m = rows_of(x)
    return isinstance(m, int) and m <= DECODE_ROWS


# ----------------------------------------------------------------------------- expressions


def int8_rows(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y[M, N] = x2 @ (qweight * scale)^T + bias, as one loop over the int8 bytes (fp32 math)."""
    M, K = x2.shape
    N = qweight.shape[0]
    words = qweight.view(torch.int32).view(N, K // LANES, 2)
    lane = torch.arange(LANES, dtype=torch.int32, device=x2.device)
    word = torch.where(lane < 4, words[..., 0:1], words[..., 1:2])  # the word holding byte lane
    q = ((word << (24 - 8 * (lane % 4))) >> 24).float()  # that byte, sign-extended
    acc = (x2.float().view(M, 1, K // LANES, LANES) * q).sum((-1, -2)) * scale.float()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x2.dtype)


def int4_rows(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
              bias: Optional[torch.Tensor], G: int) -> torch.Tensor:
    """y[M, N] = x2 @ W'^T + bias for the int4 weight (group size G), as one loop over the packed
    words (fp32 math)."""
    M, K = x2.shape
    N = packed.shape[0]
    g = sub_group(K, G)
    n = K // g
    s, z = scale.float(), offset.float()
    if g != G:  # groups of g, each with the scale and offset of the group of G holding it
        s, z = per_column(s, G // g, n), per_column(z, G // g, n)
    words = packed.view(torch.int32).view(N, n, g // LANES, 1)
    shift = 4 * torch.arange(LANES, dtype=torch.int32, device=x2.device)
    q = ((words >> shift) & 15).float()  # [N, n, g/8, 8]: level k = 8 * word + lane
    xf = x2.float()
    part = (xf.view(M, 1, n, g // LANES, LANES) * q).sum(-2)  # [M, N, n, 8]
    acc = (part * s.unsqueeze(-1)).sum((-1, -2)) + (xf.view(M, 1, n, g).sum(-1) * z).sum(-1)
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x2.dtype)


def per_column(t: torch.Tensor, repeat: int, width: int) -> torch.Tensor:
    """Each column of t [N, n] repeated `repeat` times, the first `width` columns kept."""
    N, n = t.shape
    return t.unsqueeze(-1).expand(N, n, repeat).reshape(N, n * repeat)[:, :width]


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, G: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """The dequantized int4 weight [N, K] in `dtype` (q * scale + offset, kernels/int4_matmul.py).

    The levels are padded to whole groups and sliced after: scales expanded over a partial last
    group (repeat_interleave, or an expanded view, then sliced to K) made inductor (torch 2.13)
    read garbage for the columns of that group once fused with the levels."""
    N, half = packed.shape
    K, n = 2 * half, scale.shape[1]
    q = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(N, K).to(dtype)
    q = torch.nn.functional.pad(q, (0, n * G - K)).view(N, n, G)
    w = q * scale.to(dtype).unsqueeze(-1) + offset.to(dtype).unsqueeze(-1)
    return w.reshape(N, n * G)[:, :K]


def dequant_rows(x2: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = (x2 @ weight^T) (* scale) (+ bias) in fp32 (float64 for float64 x), rounded once."""
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    y = x2.to(acc) @ weight.to(acc).t()
    if scale is not None:
        y = y * scale.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x2.dtype)


# ----------------------------------------------------------------------------- eager kernels

_kernels: dict = {}
_lock = threading.Lock()


def _tracing() -> bool:
    """Inside a compile (Dynamo, AOTAutograd or a backend pass running the graph): no nested
    inductor compile there."""
    from torch._guards import TracingContext

    return torch.compiler.is_compiling() or TracingContext.try_get() is not None


def kernel_key(*parts) -> tuple:
    """A cache key for `eager_kernel`: the caller's parts, each tensor as (shape, dtype), and the
    thread count (inductor fixes a kernel's OpenMP threads when it compiles it)."""
    return tuple((tuple(p.shape), p.dtype) if isinstance(p, torch.Tensor) else p for p in parts) \
        + (torch.get_num_threads(),)


def eager_kernel(fn: Callable, args: tuple, key: tuple) -> Optional[Callable]:
    """`fn(*args)` compiled by inductor for these shapes (cached per `key`), or None where it
    cannot be compiled now (inside a compile) or compiling failed."""
    k = _kernels.get(key)
    if k is not None or key in _kernels:
        return k
    if _tracing():
        return None
    with _lock:
        if key in _kernels:
            return _kernels[key]
        try:
            from torch.fx.experimental.proxy_tensor import make_fx

            with torch.no_grad():
                gm = make_fx(fn)(*args)
                compiled = torch._inductor.compile(gm, list(args))
        except Exception:  # noqa: BLE001 - no C++ compiler etc.: the dequantizing path
            compiled = None
        _kernels[key] = compiled
    return compiled


def call_eager(fn: Callable, args: tuple, key: tuple) -> Optional[torch.Tensor]:
    """Run the compiled loop for `fn(*args)`; None when there is none."""
    k = eager_kernel(fn, args, key)
    if k is None:
        return None
    out = k(*args)
    return out[0] if isinstance(out, (list, tuple)) else out
