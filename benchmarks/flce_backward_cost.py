"""One lm-head + cross-entropy step (forward + backward), liger::fused_linear_cross_entropy
against eager, per head dtype, on the CPU torch path with one thread: what an fp16/bf16 head's
backward recompute costs (docs/builtin_patterns.md, "The lm head's backward").

Run from a checkout's root (compare two checkouts by running it in each):
    python benchmarks/flce_backward_cost.py [N H V]
Prints the median of three timed steps (after one warm-up) of each.
"""

import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # the torch path (its import-time choice for triton too)
sys.path.insert(0, os.getcwd())

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ligerfx.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy  # noqa: E402


def step(h, w, b, t, fused):
    if fused:
        loss = fused_linear_cross_entropy(h, w, t, bias=b, reduction="sum")
    else:
        loss = F.cross_entropy(F.linear(h, w, b).float(), t, reduction="sum")
    (loss / t.numel()).backward()  # a scale that is no power of two, as a token count


def main(N=1024, H=128, V=8192):
    torch.set_num_threads(1)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        torch.manual_seed(0)
        h = torch.randn(N, H).to(dtype).requires_grad_()
        w = (torch.randn(V, H) * 0.05).to(dtype).requires_grad_()
        b = (torch.randn(V) * 0.05).to(dtype).requires_grad_()
        t = torch.randint(0, V, (N,))
        out = []
        for name, fused in (("liger", True), ("eager", False)):
            times = []
            for _ in range(4):
                h.grad = w.grad = b.grad = None
                t0 = time.perf_counter()
                step(h, w, b, t, fused)
                times.append(time.perf_counter() - t0)
            out.append(f"{name} {sorted(times[1:])[1] * 1e3:.0f} ms")
        print(f"{str(dtype):15s} N={N} H={H} V={V}: " + ", ".join(out), flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
