"""MLP activations with recompute in backward: `liger::gated_act`, y = act(gate) * up (SwiGLU,
GeGLU, squared-ReLU GLU), `liger::act`, y = act(x) (the non-gated relu² MLP of Nemotron), and
`liger::clamped_glu`, GPT-OSS's (clamp(up) + c) * g * sigmoid(alpha g), g = clamp(gate), every op
rounded as eager's (its section below says how).

activation is "silu", "gelu" (exact, erf), "gelu_tanh" (tanh approximation) or "relu_sq"
(relu(x)**2, eager's `torch.square(F.relu(x))`) or "silu_product" (SiLU written `g * sigmoid(g)`:
sigmoid rounded, then the product, and autograd's backward of those two ops, rounding as they do)
or "gelu_erf" (exact gelu written out, `g * 0.5 * (1 + erf(g / sqrt(2)))`: those ops in that
order and autograd's backward of them.  It is not F.gelu: at +inf the formula gives +inf where CPU
eager's F.gelu gives NaN in fp32/bf16, its gradient is NaN at +inf (erf's exp(-t^2) = 0 times an
inf), and it rounds differently elsewhere).  The non-gated op is the same family as the
gated one: the same activation code, the same loads and roundings with one operand fewer (up is
1), so it lives here rather than in a file of its own.  gate and up may be
strided views, e.g. the two halves of one fused projection (`proj.chunk(2, -1)`): rows are read
through their row stride, so no copy is made as long as the last dim is contiguous.

Roundings mirror eager `act(gate) * up` in bf16/fp16: act is computed in fp32 and rounded to the
input dtype, then multiplied by up in fp32 and rounded again.  The backward rounds as eager's
autograd does: the multiply's gradient dy * up is rounded to the input dtype before the
activation's derivative multiplies it (one more rounding than computing dy * up * act' at once).
relu²: relu is exact and r * r of two bf16/fp16 values is exact in fp32, so one rounding of the
fp32 square is eager's `square`/`pow(2)`/`r * r`; its gradient is dz * (2 r) where r > 0 (eager's
pow backward then relu's threshold backward: 0 at r <= 0, NaN kept).  The `r * r` spelling sums
two rounded dz * r instead: equal unless dz * r is subnormal.  The backward recomputes act(gate)
from gate (only gate and up are saved), which is where the memory saving over eager comes from:
eager keeps act(gate) alive for the multiply's backward.

Kernel layout: 2-D grid (row, column block), a pure streaming elementwise kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ligerfx.kernels.rounding import cast_rne, round_to
from ligerfx.kernels.runtime import cpu_decomposition, next_pow2, use_triton
from ligerfx.kernels.triton_math import silu, silu_grad

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu_sq": 3, "silu_product": 4, "gelu_erf": 5}
_MAX_BLOCK = 2048

_SQRT1_2 = 0.7071067811865476  # 1/sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1/sqrt(2*pi)
_SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2/pi)
_GELU_C = 0.044715
_SQRT2 = 1.4142135623730951  # the divisor of the written-out erf gelu (the pattern binds it exactly)
_TWO_OVER_SQRT_PI = 1.1283791670955126  # erf'(t) = 2/sqrt(pi) * exp(-t^2), autograd's formula


@triton.jit
def _act(g, ACT: tl.constexpr):
    """act(g) in fp32: the one formula of each activation, for the forward and the backward's
    recomputed value (eager's backward multiplies by the value its forward computed)."""
    if ACT == 0:
        return silu(g)
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACT == 2:
        # 0.5 * (1 + tanh(z)) == sigmoid(2z): no cancellation in the negative tail.
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g / (1.0 + tl.exp(-2.0 * z))
    elif ACT == 3:
        r = _relu(g)
        return r * r
    elif ACT == 5:
        return (g * 0.5) * (1.0 + tl.math.erf(g / 1.4142135623730951))
    else:
        return g * _sigmoid(g)


@triton.jit
def _sigmoid(g):
    return 1.0 / (1.0 + tl.exp(-g))


@triton.jit
def _act_eager(g, ACT: tl.constexpr, INF_NAN: tl.constexpr):
    """act(g) with eager's value at +inf: INF_NAN when eager on this device gives NaN there (see
    _eager_nan_at_inf) where the formula gives +inf."""
    a = _act(g, ACT)
    if INF_NAN:
        a = tl.where(g > 3.4028234663852886e38, g * 0.0, a)  # only +inf exceeds fp32's max
    return a


@triton.jit
def _relu(g):
    # torch.relu keeps NaN (a NaN compares false), as tl.maximum does not promise to
    return tl.where(g < 0.0, 0.0, g)


@triton.jit
def _act_grad(g, ACT: tl.constexpr):
    """act'(g) in fp32."""
    if ACT == 0:
        return silu_grad(g)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * g * g)
        return cdf + g * pdf
    elif ACT == 2:
        # With s = sigmoid(2z) = (1 + tanh z) / 2:  act = g s,  act' = s + 2 g s (1 - s) z'.
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        s = 1.0 / (1.0 + tl.exp(-2.0 * z))
        dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        return s + 2.0 * g * s * (1.0 - s) * dz
    else:
        # eager: threshold_backward(r <= 0 -> 0) of pow's 2 r (a NaN r passes through as NaN)
        r = _relu(g)
        return tl.where(r <= 0.0, 0.0, 2.0 * r)


@triton.jit
def _grad_times(dz, g, ACT: tl.constexpr):
    """dz * act'(g) in fp32, in the order eager's autograd applies it.  relu²: pow's backward
    dz * 2r first, then relu's threshold backward replaces it by 0 where r <= 0, so an inf dz
    there gives 0 (eager), not 0 * inf = NaN."""
    if ACT == 3:
        r = _relu(g)
        return tl.where(r <= 0.0, 0.0, dz * (2.0 * r))
    elif ACT == 4:
        # g * s: the product's two gradients, the sigmoid's (ds * (1 - s)) * s, then their sum
        s = _sigmoid(g)
        return dz * s + ((dz * g) * (1.0 - s)) * s
    elif ACT == 5:
        # (g * 0.5) * e, e = 1 + erf(t), t = g / sqrt2: autograd's two paths, each as it computes
        # it: (dz * e) * 0.5 through the scale, and erf's (2/sqrt(pi) * exp(-t^2)) * (dz * h)
        # divided by sqrt2 through t (NaN at +inf: 0 * inf, as eager's)
        t = g / 1.4142135623730951
        d_scale = (dz * (1.0 + tl.math.erf(t))) * 0.5
        d_erf = (1.1283791670955126 * tl.exp(-(t * t))) * (dz * (g * 0.5))
        return d_scale + d_erf / 1.4142135623730951
    else:
        return dz * _act_grad(g, ACT)


@triton.jit
def _block(N, BLOCK: tl.constexpr):
    """This program's row, its column block and their mask (grid: row, column block)."""
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return tl.program_id(0).to(tl.int64), cols, cols < N


@triton.jit
def _load(ptr, row, stride, cols, mask):
    return tl.load(ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, row, stride, cols, v, mask):
    """v rounded (to nearest even) to ptr's dtype."""
    tl.store(ptr + row * stride + cols, cast_rne(v, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_fwd_kernel(g_ptr, u_ptr, y_ptr, g_stride, u_stride, y_stride, N,
                      ACT: tl.constexpr, INF_NAN: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, mask = _block(N, BLOCK)
    g = _load(g_ptr, row, g_stride, cols, mask)
    u = _load(u_ptr, row, u_stride, cols, mask)
    # Round act(g) to the input dtype before the multiply, as eager does.
    a = cast_rne(_act_eager(g, ACT, INF_NAN), g_ptr.dtype.element_ty).to(tl.float32)
    _store(y_ptr, row, y_stride, cols, a * u, mask)


@triton.jit
def _gated_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr,
                      dy_stride, g_stride, u_stride, dg_stride, du_stride, N,
                      ACT: tl.constexpr, INF_NAN: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, mask = _block(N, BLOCK)
    dy = _load(dy_ptr, row, dy_stride, cols, mask)
    g = _load(g_ptr, row, g_stride, cols, mask)
    u = _load(u_ptr, row, u_stride, cols, mask)
    # dup uses the rounded act(g) the forward multiplied by.
    a = cast_rne(_act_eager(g, ACT, INF_NAN), g_ptr.dtype.element_ty).to(tl.float32)
    _store(du_ptr, row, du_stride, cols, dy * a, mask)
    # eager rounds the product's gradient dy * up (act(gate)'s dtype) before act' multiplies it
    dz = round_to(dy * u, g_ptr.dtype.element_ty)
    _store(dg_ptr, row, dg_stride, cols, _grad_times(dz, g, ACT), mask)


@triton.jit
def _act_fwd_kernel(x_ptr, y_ptr, x_stride, y_stride, N, ACT: tl.constexpr, INF_NAN: tl.constexpr,
                    BLOCK: tl.constexpr):
    row, cols, mask = _block(N, BLOCK)
    _store(y_ptr, row, y_stride, cols, _act_eager(_load(x_ptr, row, x_stride, cols, mask), ACT, INF_NAN),
           mask)


@triton.jit
def _act_bwd_kernel(dy_ptr, x_ptr, dx_ptr, dy_stride, x_stride, dx_stride, N,
                    ACT: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, mask = _block(N, BLOCK)
    dy = _load(dy_ptr, row, dy_stride, cols, mask)
    x = _load(x_ptr, row, x_stride, cols, mask)
    _store(dx_ptr, row, dx_stride, cols, _grad_times(dy, x, ACT), mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, n] with unit column stride, as a view whenever possible."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _grid_and_meta(rows: int, n: int):
    block = min(next_pow2(n), _MAX_BLOCK)
    return (rows, triton.cdiv(n, block)), dict(BLOCK=block, num_warps=8 if block >= 2048 else 4 if block >= 512 else 2)


def _activation_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"gated_act: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def launch_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor, activation: str) -> None:
    """Write act(gate) * up into out (same shape; out must be contiguous)."""
    g2, u2, y2 = _rows(gate), _rows(up), out.view(-1, out.shape[-1])
    rows, n = g2.shape
    if rows == 0 or n == 0:
        return
    grid, meta = _grid_and_meta(rows, n)
    _gated_fwd_kernel[grid](g2, u2, y2, g2.stride(0), u2.stride(0), y2.stride(0), n,
                            ACT=_activation_code(activation),
                            INF_NAN=_eager_nan_at_inf(activation, gate.dtype, gate.device), **meta)


def launch_backward(dy, gate, up, dgate, dup, activation: str) -> None:
    """Write the gradients of act(gate) * up into dgate, dup (contiguous, gate's shape)."""
    d2, g2, u2 = _rows(dy), _rows(gate), _rows(up)
    dg2, du2 = dgate.view(-1, dgate.shape[-1]), dup.view(-1, dup.shape[-1])
    rows, n = g2.shape
    if rows == 0 or n == 0:
        return
    grid, meta = _grid_and_meta(rows, n)
    _gated_bwd_kernel[grid](d2, g2, u2, dg2, du2,
                            d2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0), n,
                            ACT=_activation_code(activation),
                            INF_NAN=_eager_nan_at_inf(activation, gate.dtype, gate.device), **meta)


def launch_act_forward(x: torch.Tensor, out: torch.Tensor, activation: str) -> None:
    """Write act(x) into out (same shape; out must be contiguous)."""
    x2, y2 = _rows(x), out.view(-1, out.shape[-1])
    rows, n = x2.shape
    if rows == 0 or n == 0:
        return
    grid, meta = _grid_and_meta(rows, n)
    _act_fwd_kernel[grid](x2, y2, x2.stride(0), y2.stride(0), n, ACT=_activation_code(activation),
                          INF_NAN=_eager_nan_at_inf(activation, x.dtype, x.device), **meta)


def launch_act_backward(dy, x, dx, activation: str) -> None:
    """Write the gradient of act(x) into dx (contiguous, x's shape)."""
    d2, x2, dx2 = _rows(dy), _rows(x), dx.view(-1, dx.shape[-1])
    rows, n = x2.shape
    if rows == 0 or n == 0:
        return
    grid, meta = _grid_and_meta(rows, n)
    _act_bwd_kernel[grid](d2, x2, dx2, d2.stride(0), x2.stride(0), dx2.stride(0), n,
                          ACT=_activation_code(activation), **meta)


# ----------------------------------------------------------------------------- torch reference


_AT_INF: dict = {}  # (activation, dtype) -> CPU eager's act(+inf) (filled below _act_torch)


def _eager_at_inf(activation: str, dtype: torch.dtype, device: torch.device) -> float:
    """Eager's act(+inf) for inputs of `dtype` on `device`'s type.  Eager is not one function
    here: CPU's vectorized exact gelu gives NaN in fp32/bf16 (inf * 0 inside its erf) where its
    fp16 and fp64 kernels and CUDA give +inf, so CPU eager is asked (at import, outside any
    tracing: a vector of +inf long enough for the vectorized loop) rather than assumed."""
    if torch.device(device).type != "cpu":
        return float("inf")  # CUDA's kernels compute each formula as written: +inf
    return _AT_INF.get((activation, dtype), float("inf"))


def _eager_nan_at_inf(activation: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether eager gives NaN at +inf where the kernels' formulas give +inf."""
    import math

    return math.isnan(_eager_at_inf(activation, dtype, device))


def _act_as_eager(g: torch.Tensor, activation: str, dtype: torch.dtype) -> torch.Tensor:
    """act(g) computed in g's (wider) dtype, with eager's value at +inf for inputs of `dtype`."""
    a = _act_torch(g, activation)
    want = _eager_at_inf(activation, dtype, g.device)
    got = _eager_at_inf(activation, g.dtype, g.device)
    if not (want == got or (want != want and got != got)):
        a = torch.where(g == float("inf"), want, a)
    return a


def _act_torch(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(g)
    if activation == "relu_sq":
        return torch.square(torch.relu(g))
    if activation == "silu_product":
        return g * torch.sigmoid(g)
    if activation == "gelu_erf":
        return g * 0.5 * (1.0 + torch.erf(g / _SQRT2))
    return F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")


with torch.no_grad():
    for _a in ACTIVATIONS:
        for _dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            _AT_INF[(_a, _dt)] = float(_act_torch(torch.full((64,), float("inf"), dtype=_dt), _a)[0])


def _act_grad_torch(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        s = torch.sigmoid(g)
        return s * (1 + g * (1 - s))
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(g * _SQRT1_2)) + g * _INV_SQRT_2PI * torch.exp(-0.5 * g * g)
    if activation == "relu_sq":
        r = torch.relu(g)
        return torch.where(r <= 0, 0.0, 2 * r)
    th = torch.tanh(_SQRT_2_OVER_PI * (g + _GELU_C * g ** 3))
    return 0.5 * (1 + th) + 0.5 * g * (1 - th * th) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_C * g * g)


def _grad_times_torch(dz: torch.Tensor, g: torch.Tensor, activation: str) -> torch.Tensor:
    """dz * act'(g), in eager's order (relu²: the threshold after the product, see _grad_times)."""
    if activation == "relu_sq":
        r = torch.relu(g)
        return torch.where(r <= 0, 0.0, dz * (2 * r))
    if activation == "silu_product":
        s = torch.sigmoid(g)
        return dz * s + ((dz * g) * (1 - s)) * s
    if activation == "gelu_erf":
        t = g / _SQRT2
        d_scale = (dz * (1.0 + torch.erf(t))) * 0.5
        d_erf = (_TWO_OVER_SQRT_PI * torch.exp(-(t * t))) * (dz * (g * 0.5))
        return d_scale + d_erf / _SQRT2
    return dz * _act_grad_torch(g, activation)


def gated_act_reference(gate, up, activation: str) -> torch.Tensor:
    cdt = torch.promote_types(gate.dtype, torch.float32)
    a = _act_as_eager(gate.to(cdt), activation, gate.dtype).to(gate.dtype).to(cdt)
    return (a * up.to(cdt)).to(gate.dtype).contiguous()


def gated_act_backward_reference(dy, gate, up, activation: str):
    cdt = torch.promote_types(gate.dtype, torch.float32)
    g, u, d = gate.to(cdt), up.to(cdt), dy.to(cdt)
    a = _act_as_eager(g, activation, gate.dtype).to(gate.dtype).to(cdt)
    dz = (d * u).to(gate.dtype).to(cdt)  # eager rounds the product's gradient first
    dgate = _grad_times_torch(dz, g, activation).to(gate.dtype).contiguous()
    dup = (d * a).to(up.dtype).contiguous()
    return dgate, dup


def act_reference(x, activation: str) -> torch.Tensor:
    cdt = torch.promote_types(x.dtype, torch.float32)
    return _act_as_eager(x.to(cdt), activation, x.dtype).to(x.dtype).contiguous()


def act_backward_reference(dy, x, activation: str) -> torch.Tensor:
    cdt = torch.promote_types(x.dtype, torch.float32)
    return _grad_times_torch(dy.to(cdt), x.to(cdt), activation).to(x.dtype).contiguous()


# ----------------------------------------------------------------------------- torch ops


def _check(gate, up, activation):
    _activation_code(activation)
    torch._check(gate.dim() >= 1, lambda: "gated_act: gate must have at least one dim")
    torch._check(gate.shape == up.shape, lambda: f"gated_act: gate {gate.shape} and up {up.shape} differ")
    torch._check(gate.dtype == up.dtype, lambda: "gated_act: gate and up dtypes differ")


@torch.library.custom_op("liger::gated_act", mutates_args=())
def gated_act_op(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    _check(gate, up, activation)
    if use_triton(gate, up):
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        launch_forward(gate, up, out, activation)
        return out
    return _gated_act_torch(gate, up, activation)


def _gated_act_torch(gate, up, activation):
    _check(gate, up, activation)
    return gated_act_reference(gate, up, activation)


@gated_act_op.register_fake
def _(gate, up, activation):
    _check(gate, up, activation)
    return gate.new_empty(gate.shape)


@torch.library.custom_op("liger::gated_act_backward", mutates_args=())
def gated_act_backward_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                          activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check(gate, up, activation)
    if use_triton(dy, gate, up):
        dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
        launch_backward(dy, gate, up, dgate, dup, activation)
        return dgate, dup
    return _gated_act_backward_torch(dy, gate, up, activation)


def _gated_act_backward_torch(dy, gate, up, activation):
    _check(gate, up, activation)
    return gated_act_backward_reference(dy, gate, up, activation)


@gated_act_backward_op.register_fake
def _(dy, gate, up, activation):
    _check(gate, up, activation)
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = torch.ops.liger.gated_act_backward(dy, gate, up, ctx.activation)
    return dgate, dup, None


gated_act_op.register_autograd(_backward, setup_context=_setup_context)
# On CPU, inductor fuses the torch path better than it runs as separate aten calls (runtime.py).
cpu_decomposition(torch.ops.liger.gated_act)(_gated_act_torch)
cpu_decomposition(torch.ops.liger.gated_act_backward)(_gated_act_backward_torch)


def _check_act(x, activation):
    _activation_code(activation)
    torch._check(x.dim() >= 1, lambda: "act: x must have at least one dim")


@torch.library.custom_op("liger::act", mutates_args=())
def act_op(x: torch.Tensor, activation: str) -> torch.Tensor:
    """act(x) alone (the non-gated MLP); the backward recomputes act' from x."""
    _check_act(x, activation)
    if use_triton(x):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        launch_act_forward(x, out, activation)
        return out
    return _act_torch_path(x, activation)


def _act_torch_path(x, activation):
    _check_act(x, activation)
    return act_reference(x, activation)


@act_op.register_fake
def _(x, activation):
    _check_act(x, activation)
    return x.new_empty(x.shape)


@torch.library.custom_op("liger::act_backward", mutates_args=())
def act_backward_op(dy: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    _check_act(x, activation)
    if use_triton(dy, x):
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        launch_act_backward(dy, x, dx, activation)
        return dx
    return _act_backward_torch_path(dy, x, activation)


def _act_backward_torch_path(dy, x, activation):
    _check_act(x, activation)
    return act_backward_reference(dy, x, activation)


@act_backward_op.register_fake
def _(dy, x, activation):
    _check_act(x, activation)
    return x.new_empty(x.shape)


def _act_setup_context(ctx, inputs, output):
    x, activation = inputs
    ctx.save_for_backward(x)
    ctx.activation = activation


def _act_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return torch.ops.liger.act_backward(dy, x, ctx.activation), None


act_op.register_autograd(_act_backward, setup_context=_act_setup_context)
cpu_decomposition(torch.ops.liger.act)(_act_torch_path)
cpu_decomposition(torch.ops.liger.act_backward)(_act_backward_torch_path)


def gated_act(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    return torch.ops.liger.gated_act(gate, up, activation)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return torch.ops.liger.gated_act(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(gate, approximate) * up, approximate in {"none", "tanh"} as in F.gelu."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return torch.ops.liger.gated_act(gate, up, "gelu" if approximate == "none" else "gelu_tanh")


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x) ** 2 (Nemotron's relu2)."""
    return torch.ops.liger.act(x, "relu_sq")


def act(x: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.ops.liger.act(x, activation)


# ----------------------------------------------------------------------------- clamped GLU
#
# `liger::clamped_glu`: y = (clamp(up) + c) * (gc * sigmoid(alpha * gc)), gc = clamp(gate)
# (GPT-OSS's experts: alpha 1.702, gate clamped above at 7, up to [-7, 7], c = 1).  Every op
# rounds to the inputs' dtype as eager's does in fp16/bf16 (gc * alpha, the sigmoid, gc * s,
# up + c, the product), and the backward replays autograd's ops with their roundings:
# dv = dy * glu, dglu = dy * v, dglu * s, ds = dglu * gc, sigmoid_backward (ds * (1 - s)) * s in
# fp32 then rounded, dt * alpha, the two gate branches summed, then clamp's backward (the gradient
# passes where lo <= x <= hi: 0 at NaN).  Forward clamp: NaN stays NaN, ±inf goes to the bound.
# gate and up are read in place through a row and a column stride (the stride-2 halves
# `gate_up[..., ::2]` / `[..., 1::2]` need no copy); only gate and up are saved for backward.


@triton.jit
def _clamp(x, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """torch.clamp: NaN compares false and stays NaN, ±inf goes to the bound."""
    if HAS_LO:
        x = tl.where(x < lo, lo, x)
    if HAS_HI:
        x = tl.where(x > hi, hi, x)
    return x


@triton.jit
def _clamp_grad(d, x, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """torch's clamp_backward: d where lo <= x <= hi, else 0 (a NaN x fails both)."""
    if HAS_LO:
        d = tl.where(x >= lo, d, 0.0)
    if HAS_HI:
        d = tl.where(x <= hi, d, 0.0)
    return d


@triton.jit
def _load2(ptr, row, rstride, cstride, cols, mask):
    return tl.load(ptr + row * rstride + cols * cstride, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _cglu_gate(gc, alpha, DT: tl.constexpr):
    """(s, glu) of the clamped gate, each op rounded to DT as eager rounds it."""
    t = round_to(gc * alpha, DT)
    s = round_to(_sigmoid(t), DT)
    return s, round_to(gc * s, DT)


@triton.jit
def _cglu_fwd_kernel(g_ptr, u_ptr, y_ptr, g_rs, g_cs, u_rs, u_cs, y_stride, N,
                     alpha, g_lo, g_hi, u_lo, u_hi, c,
                     G_LO: tl.constexpr, G_HI: tl.constexpr, U_LO: tl.constexpr,
                     U_HI: tl.constexpr, HAS_C: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, mask = _block(N, BLOCK)
    DT: tl.constexpr = y_ptr.dtype.element_ty
    gc = _clamp(_load2(g_ptr, row, g_rs, g_cs, cols, mask), g_lo, g_hi, G_LO, G_HI)
    v = _clamp(_load2(u_ptr, row, u_rs, u_cs, cols, mask), u_lo, u_hi, U_LO, U_HI)
    if HAS_C:
        v = round_to(v + c, DT)
    s, glu = _cglu_gate(gc, alpha, DT)
    _store(y_ptr, row, y_stride, cols, v * glu, mask)


@triton.jit
def _cglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, dy_stride, g_rs, g_cs, u_rs, u_cs,
                     dg_stride, du_stride, N, alpha, g_lo, g_hi, u_lo, u_hi, c,
                     G_LO: tl.constexpr, G_HI: tl.constexpr, U_LO: tl.constexpr,
                     U_HI: tl.constexpr, HAS_C: tl.constexpr, SIG_STEPS: tl.constexpr,
                     BLOCK: tl.constexpr):
    row, cols, mask = _block(N, BLOCK)
    DT: tl.constexpr = dg_ptr.dtype.element_ty
    dy = _load(dy_ptr, row, dy_stride, cols, mask)
    g = _load2(g_ptr, row, g_rs, g_cs, cols, mask)
    u = _load2(u_ptr, row, u_rs, u_cs, cols, mask)
    gc = _clamp(g, g_lo, g_hi, G_LO, G_HI)
    v = _clamp(u, u_lo, u_hi, U_LO, U_HI)
    if HAS_C:
        v = round_to(v + c, DT)
    s, glu = _cglu_gate(gc, alpha, DT)
    # the product's gradients, each rounded; `+ c` passes its gradient through
    du = round_to(dy * glu, DT)
    _store(du_ptr, row, du_stride, cols, _clamp_grad(du, u, u_lo, u_hi, U_LO, U_HI), mask)
    dglu = round_to(dy * v, DT)
    d1 = round_to(dglu * s, DT)  # gc * s, gradient of gc
    ds = round_to(dglu * gc, DT)  # gradient of s
    if SIG_STEPS:  # CPU eager's fp16 sigmoid_backward rounds each of its ops
        dt = round_to(round_to(ds * round_to(1.0 - s, DT), DT) * s, DT)
    else:  # fp32 opmath, one rounding
        dt = round_to((ds * (1.0 - s)) * s, DT)
    d2 = round_to(dt * alpha, DT)  # gc * alpha, gradient of gc
    _store(dg_ptr, row, dg_stride, cols, _clamp_grad(d1 + d2, g, g_lo, g_hi, G_LO, G_HI), mask)


def _probe_sigmoid_backward_steps(dt: torch.dtype) -> bool:
    """Whether CPU eager's sigmoid_backward in `dt` rounds after each of its ops ((ds * (1 - s))
    * s, each product and the difference rounded: fp16 in torch 2.13) rather than computing in
    fp32 and rounding once (bf16, and CUDA's opmath kernel).  Asked of eager at import, outside any
    tracing, on values where the two differ, rather than assumed."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        ds = (torch.randn(4096, generator=gen) * 3).to(dt)
        s = torch.rand(4096, generator=gen).to(dt)
        got = torch.ops.aten.sigmoid_backward(ds, s)
        steps = (ds * (1 - s)) * s  # dt ops: each rounded
        once = ((ds.float() * (1 - s.float())) * s.float()).to(dt)
        if torch.equal(got, once):
            return False
        if torch.equal(got, steps):
            return True
    raise RuntimeError(f"clamped_glu: CPU sigmoid_backward in {dt} rounds neither way modelled")


_SIG_STEPS = {dt: _probe_sigmoid_backward_steps(dt) for dt in (torch.bfloat16, torch.float16)}


def sigmoid_backward_steps(dt: torch.dtype, device) -> bool:
    """Whether eager's sigmoid_backward rounds per op for `dt` on `device`'s type (CPU probed;
    CUDA computes in fp32 opmath and rounds once)."""
    return torch.device(device).type == "cpu" and _SIG_STEPS.get(dt, False)


def _strided_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, n], a view whenever the leading dims merge (any column stride)."""
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


# eager rounds every product before the sum that reads it (fp32 too: the two gate branches are
# each rounded, then added); a fused multiply-add would skip that rounding
_NO_FMA = dict(enable_fp_fusion=False)


def _cglu_meta(bounds):
    """Kernel scalars and flags for (gate_min, gate_max, up_min, up_max, up_add)."""
    vals = [0.0 if b is None else float(b) for b in bounds]
    flags = dict(zip(("G_LO", "G_HI", "U_LO", "U_HI", "HAS_C"), (b is not None for b in bounds)))
    return vals, flags


def launch_clamped_glu_forward(gate, up, out, alpha, bounds) -> None:
    """Write the clamped GLU of gate, up into out (contiguous, gate's shape)."""
    g2, u2, y2 = _strided_rows(gate), _strided_rows(up), out.view(-1, out.shape[-1])
    rows, n = g2.shape
    if rows == 0 or n == 0:
        return
    grid, meta = _grid_and_meta(rows, n)
    vals, flags = _cglu_meta(bounds)
    _cglu_fwd_kernel[grid](g2, u2, y2, g2.stride(0), g2.stride(1), u2.stride(0), u2.stride(1),
                           y2.stride(0), n, float(alpha), *vals, **flags, **meta, **_NO_FMA)


def launch_clamped_glu_backward(dy, gate, up, dgate, dup, alpha, bounds) -> None:
    """Write the clamped GLU's gradients into dgate, dup (contiguous, gate's shape)."""
    d2, g2, u2 = _rows(dy), _strided_rows(gate), _strided_rows(up)
    dg2, du2 = dgate.view(-1, dgate.shape[-1]), dup.view(-1, dup.shape[-1])
    rows, n = g2.shape
    if rows == 0 or n == 0:
        return
    grid, meta = _grid_and_meta(rows, n)
    vals, flags = _cglu_meta(bounds)
    _cglu_bwd_kernel[grid](d2, g2, u2, dg2, du2, d2.stride(0), g2.stride(0), g2.stride(1),
                           u2.stride(0), u2.stride(1), dg2.stride(0), du2.stride(0), n,
                           float(alpha), *vals, **flags,
                           SIG_STEPS=sigmoid_backward_steps(gate.dtype, gate.device), **meta,
                           **_NO_FMA)


def _r(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """x rounded to dt and back (eager's rounding after an op computed in opmath)."""
    return x if x.dtype == dt else x.to(dt).to(x.dtype)


def _clamp_t(x, lo, hi):
    return x if lo is None and hi is None else torch.clamp(x, lo, hi)


def _clamp_grad_t(d, x, lo, hi):
    if lo is not None:
        d = torch.where(x >= lo, d, 0.0)
    if hi is not None:
        d = torch.where(x <= hi, d, 0.0)
    return d


def _cglu_forward_parts(g, u, alpha, bounds, dt):
    """(gc, s, glu, v) in g's (compute) dtype, each op rounded to dt."""
    g_lo, g_hi, u_lo, u_hi, c = bounds
    gc = _clamp_t(g, g_lo, g_hi)
    s = _r(torch.sigmoid(_r(gc * alpha, dt)), dt)
    glu = _r(gc * s, dt)
    v = _clamp_t(u, u_lo, u_hi)
    if c is not None:
        v = _r(v + c, dt)
    return gc, s, glu, v


def clamped_glu_reference(gate, up, alpha, bounds) -> torch.Tensor:
    """Eager's ops replayed in fp32 (fp64 for fp64) with eager's roundings to gate's dtype."""
    cdt = torch.promote_types(gate.dtype, torch.float32)
    _, _, glu, v = _cglu_forward_parts(gate.to(cdt), up.to(cdt), alpha, bounds, gate.dtype)
    return (v * glu).to(gate.dtype).contiguous()


def clamped_glu_backward_reference(dy, gate, up, alpha, bounds):
    """Autograd's backward of the eager ops, each op rounded as eager's (recomputes forward)."""
    dt, cdt = gate.dtype, torch.promote_types(gate.dtype, torch.float32)
    g, u, d = gate.to(cdt), up.to(cdt), dy.to(cdt)
    gc, s, glu, v = _cglu_forward_parts(g, u, alpha, bounds, dt)
    g_lo, g_hi, u_lo, u_hi, _ = bounds
    dup = _clamp_grad_t(_r(d * glu, dt), u, u_lo, u_hi)
    dglu = _r(d * v, dt)
    d1, ds = _r(dglu * s, dt), _r(dglu * gc, dt)
    if sigmoid_backward_steps(dt, gate.device):
        d_t = _r(_r(ds * _r(1 - s, dt), dt) * s, dt)
    else:
        d_t = _r((ds * (1 - s)) * s, dt)
    d2 = _r(d_t * alpha, dt)
    dgate = _clamp_grad_t(d1 + d2, g, g_lo, g_hi)
    return dgate.to(dt).contiguous(), dup.to(dt).contiguous()


def _check_cglu(gate, up, bounds):
    torch._check(gate.dim() >= 1, lambda: "clamped_glu: gate must have at least one dim")
    torch._check(gate.shape == up.shape, lambda: f"clamped_glu: gate {gate.shape} and up {up.shape} differ")
    torch._check(gate.dtype == up.dtype, lambda: "clamped_glu: gate and up dtypes differ")
    for lo, hi in (bounds[0:2], bounds[2:4]):
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"clamped_glu: min {lo} > max {hi}")


@torch.library.custom_op("liger::clamped_glu", mutates_args=())
def clamped_glu_op(gate: torch.Tensor, up: torch.Tensor, alpha: float, gate_min: float | None,
                   gate_max: float | None, up_min: float | None, up_max: float | None,
                   up_add: float | None) -> torch.Tensor:
    """(clamp(up, up_min, up_max) + up_add) * gc * sigmoid(alpha * gc), gc = clamp(gate, gate_min,
    gate_max); a None bound or up_add is absent (no clamp side, no add)."""
    bounds = (gate_min, gate_max, up_min, up_max, up_add)
    _check_cglu(gate, up, bounds)
    if use_triton(gate, up):
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        launch_clamped_glu_forward(gate, up, out, alpha, bounds)
        return out
    return clamped_glu_reference(gate, up, alpha, bounds)


def _clamped_glu_torch(gate, up, alpha, gate_min, gate_max, up_min, up_max, up_add):
    bounds = (gate_min, gate_max, up_min, up_max, up_add)
    _check_cglu(gate, up, bounds)
    return clamped_glu_reference(gate, up, alpha, bounds)


@clamped_glu_op.register_fake
def _(gate, up, alpha, gate_min, gate_max, up_min, up_max, up_add):
    _check_cglu(gate, up, (gate_min, gate_max, up_min, up_max, up_add))
    return gate.new_empty(gate.shape)


@torch.library.custom_op("liger::clamped_glu_backward", mutates_args=())
def clamped_glu_backward_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, alpha: float,
                            gate_min: float | None, gate_max: float | None, up_min: float | None,
                            up_max: float | None, up_add: float | None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    bounds = (gate_min, gate_max, up_min, up_max, up_add)
    _check_cglu(gate, up, bounds)
    if use_triton(dy, gate, up):
        dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
        launch_clamped_glu_backward(dy, gate, up, dgate, dup, alpha, bounds)
        return dgate, dup
    return clamped_glu_backward_reference(dy, gate, up, alpha, bounds)


def _clamped_glu_backward_torch(dy, gate, up, alpha, gate_min, gate_max, up_min, up_max, up_add):
    bounds = (gate_min, gate_max, up_min, up_max, up_add)
    _check_cglu(gate, up, bounds)
    return clamped_glu_backward_reference(dy, gate, up, alpha, bounds)


@clamped_glu_backward_op.register_fake
def _(dy, gate, up, alpha, gate_min, gate_max, up_min, up_max, up_add):
    _check_cglu(gate, up, (gate_min, gate_max, up_min, up_max, up_add))
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _cglu_setup_context(ctx, inputs, output):
    gate, up, *scalars = inputs
    ctx.save_for_backward(gate, up)  # recompute in backward: nothing else is kept
    ctx.scalars = scalars


def _cglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = torch.ops.liger.clamped_glu_backward(dy, gate, up, *ctx.scalars)
    return (dgate, dup) + (None,) * len(ctx.scalars)


clamped_glu_op.register_autograd(_cglu_backward, setup_context=_cglu_setup_context)
# No CPU decomposition (runtime.cpu_decomposition): inductor computes an fp16/bf16 chain in fp32
# and drops the `.to(dt).to(fp32)` roundings in between (unless its emulate_precision_casts is
# set), which are every rounding this op exists to keep, and an op cannot be inlined for some
# dtypes only (its backward, in a graph the backend does not see, would be inlined or kept for
# all).  Under inductor on the CPU the op runs its own implementation: eager's ops, bit for bit.


def clamped_glu(gate: torch.Tensor, up: torch.Tensor, alpha: float = 1.702,
                gate_min: float | None = None, gate_max: float | None = 7.0,
                up_min: float | None = -7.0, up_max: float | None = 7.0,
                up_add: float | None = 1.0) -> torch.Tensor:
    """GPT-OSS's clamped GLU by default: (up.clamp(-7, 7) + 1) * g * sigmoid(1.702 g),
    g = gate.clamp(max=7)."""
    return torch.ops.liger.clamped_glu(gate, up, alpha, gate_min, gate_max, up_min, up_max, up_add)
