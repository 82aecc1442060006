"""Round-to-nearest-even fp32 -> bf16/fp16 for Triton kernels, shared by every kernel family.

Triton's interpreter truncates fp32 -> bf16 casts, while CUDA (cvt.rn) and eager torch round to
nearest even.  Rounding bf16 with integer ops gives eager's bits on both CUDA and the interpreter,
so the kernels match eager bit for bit on either (on GPU it costs a few integer ops).
"""

import triton
import triton.language as tl


@triton.jit
def round_to(v, DT: tl.constexpr):
    """fp32 `v` rounded (to nearest even) to dtype DT, returned as fp32 (identity for fp32)."""
    if DT == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        out = b.to(tl.float32, bitcast=True)
    elif DT == tl.float16:
        out = v.to(tl.float16).to(tl.float32)
    else:
        out = v
    return out


@triton.jit
def cast_rne(x, DT: tl.constexpr):
    """fp32 `x` converted to dtype DT with round-to-nearest-even (the value to store)."""
    if DT == tl.bfloat16:
        out = round_to(x, DT).to(tl.bfloat16)  # exact: already a bf16 value
    else:
        out = x.to(DT)
    return out
