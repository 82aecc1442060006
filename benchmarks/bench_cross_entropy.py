"""Benchmark the loss part of LM training: cross-entropy on given logits, and the fused
lm-head linear + cross-entropy.  Variants: eager (HF-style: logits.float() then F.cross_entropy),
torch.compile of the same, our liger:: ops, and Liger-Kernel when it is installed.

Metrics per variant and shape: forward+backward time (median, CUDA events) and the peak memory of
one forward+backward above what was allocated before it (inputs included in neither).  An
out-of-memory variant is reported as such and the others still run.

    python benchmarks/bench_cross_entropy.py             # CUDA; on a CPU-only machine: exits 0
    python benchmarks/bench_cross_entropy.py --smoke     # tiny sizes on CPU (interpreted kernels)

Records go to <out>/bench_cross_entropy.json as a list of
{benchmark, variant, shape, metric, value, unit, device, versions}.
"""

from __future__ import annotations

import argparse
import os
import sys

if "--smoke" in sys.argv[1:]:
    # Interpreted Triton kernels on CPU, so the smoke run covers the kernel path; triton reads
    # this when first imported (below, via ligerfx.kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from ligerfx.kernels.cross_entropy import cross_entropy  # noqa: E402
from ligerfx.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy  # noqa: E402

HIDDEN = 4096
VOCABS = (32768, 131072, 262144)
TOKENS = (4096, 8192, 16384, 32768)  # eager may run out of memory at the top: recorded as oom


def _peak_bytes(fn, device):
    # Records keep peak memory in bytes (common measures MiB).
    mib = common.peak_memory_mb(fn, device)
    return None if mib is None else round(mib * 2**20)


# ----------------------------------------------------------------------------- variants


def eager_ce(logits, target):
    return F.cross_entropy(logits.float(), target)


def eager_flce(hidden, weight, target):
    return F.cross_entropy((hidden @ weight.t()).float(), target)


def ours_ce(logits, target):
    return cross_entropy(logits, target)


def ours_flce(hidden, weight, target):
    return fused_linear_cross_entropy(hidden, weight, target)


def liger_kernel():
    try:
        from liger_kernel.transformers import (
            LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss,
        )
    except Exception:
        return None
    ce_mod, flce_mod = LigerCrossEntropyLoss(), LigerFusedLinearCrossEntropyLoss()
    return (lambda logits, target: ce_mod(logits, target),
            lambda hidden, weight, target: flce_mod(weight, hidden, target))


def variants(kind: str, smoke: bool):
    eager, ours = (eager_ce, ours_ce) if kind == "cross_entropy" else (eager_flce, ours_flce)
    v = {"eager": eager, "ours": ours}
    if not smoke:  # inductor on CPU needs a toolchain and minutes; --smoke only proves the script
        v["compile"] = torch.compile(eager)
    lk = liger_kernel()
    if lk is not None:
        v["liger_kernel"] = lk[0] if kind == "cross_entropy" else lk[1]
    return v


# ----------------------------------------------------------------------------- cases


def run(kind, n, vocab, hidden, device, dtype, args, records, meta):
    target = torch.randint(0, vocab, (n,), device=device)
    target[::17] = -100
    if kind == "cross_entropy":
        leaves = (torch.randn(n, vocab, device=device, dtype=dtype, requires_grad=True),)
        shape = f"n{n}_v{vocab}"
    else:
        leaves = (torch.randn(n, hidden, device=device, dtype=dtype, requires_grad=True),
                  (torch.randn(vocab, hidden, device=device, dtype=dtype) * hidden**-0.5)
                  .requires_grad_())
        shape = f"n{n}_v{vocab}_h{hidden}"
    for variant, fn in variants(kind, args.smoke).items():
        def fwd_bwd(fn=fn):
            loss = fn(*leaves, target)
            torch.autograd.grad(loss, leaves)

        try:
            # Without L2 flushes, as these numbers were always taken (keeps them comparable).
            t = common.time_ms(fwd_bwd, device, args.warmup, args.reps, flush_l2=False)
            peak = _peak_bytes(fwd_bwd, device)
        except torch.OutOfMemoryError:
            print(f"  {kind:26s} {variant:13s} {shape:22s} OOM")
            records.append(common.record(kind, variant, shape, "oom", 1, "bool", meta))
            continue
        except Exception as e:  # one broken variant should not lose the others' numbers
            print(f"  {kind:26s} {variant:13s} {shape:22s} FAILED: {type(e).__name__}: {e}")
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        peak_s = f"{peak / 2**20:10.1f} MiB" if peak is not None else "       n/a"
        print(f"  {kind:26s} {variant:13s} {shape:22s} fwd+bwd {t:9.3f} ms | peak {peak_s}")
        for metric, value, unit in (("fwd_bwd_time", t, "ms"),
                                    ("fwd_bwd_peak_memory", peak, "bytes")):
            if value is not None:
                records.append(common.record(kind, variant, shape, metric, value, unit, meta))
    del leaves


# ----------------------------------------------------------------------------- run.py registry
# benchmarks/run.py discovers OPS and measures them with benchmarks/harness.py.  Sizes are token
# counts at vocab 128256 (Llama-3); the CPU smoke uses vocab 1000, hidden 64.

from harness import Case, OpBench  # noqa: E402

RUN_VOCAB = 128256
RUN_TOKENS = (1024, 2048, 4096, 8192)


def _dims(device):
    return (1000, 64) if device.type == "cpu" else (RUN_VOCAB, HIDDEN)


def _target(n, vocab, device):
    target = torch.randint(0, vocab, (n,), device=device)
    target[::17] = -100
    return target


def _ce_case(n, device, dtype):
    vocab, _ = _dims(device)
    logits = torch.randn(n, vocab, device=device, dtype=dtype, requires_grad=True)
    elt = logits.element_size()
    # fwd reads the logits; bwd reads them again and writes their gradient.
    return Case(f"n{n}_v{vocab}", n, (logits, _target(n, vocab, device)), None,
                n * vocab * elt, 2 * n * vocab * elt)


def _flce_case(n, device, dtype):
    vocab, hidden = _dims(device)
    h = torch.randn(n, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype) * hidden**-0.5).requires_grad_()
    mm = 2 * n * vocab * hidden
    # fwd: the logits matmul; bwd: grad wrt hidden and wrt weight (two more matmuls of that size).
    return Case(f"n{n}_v{vocab}_h{hidden}", n, (h, w, _target(n, vocab, device)), None,
                fwd_flops=mm, bwd_flops=2 * mm)


def _lk(i):
    def make():
        lk = liger_kernel()
        return None if lk is None else lk[i]
    return make


OPS = [
    OpBench("cross_entropy", "cross_entropy", _ce_case, RUN_TOKENS, (64,), "tokens", eager=eager_ce,
            liger=ours_ce, liger_kernel=_lk(0)),
    OpBench("fused_linear_cross_entropy", "fused_linear_cross_entropy", _flce_case, RUN_TOKENS, (64,),
            "tokens", eager=eager_flce, liger=ours_flce, liger_kernel=_lk(1), bound="compute"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "local"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--vocab", type=int, nargs="*", default=list(VOCABS))
    p.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    p.add_argument("--bench", choices=("cross_entropy", "fused_linear_cross_entropy", "all"),
                   default="all")
    args = p.parse_args(argv)

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        vocabs, tokens, hidden = (1000,), (64,), 64
        args.warmup, args.reps = 1, 2
    elif not torch.cuda.is_available():
        print("bench_cross_entropy: CUDA is not available; nothing to measure "
              "(use --smoke for a CPU run at tiny sizes).")
        return 0
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        vocabs, tokens, hidden = args.vocab, args.tokens, HIDDEN

    import triton

    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                versions=dict(torch=torch.__version__, triton=triton.__version__))
    kinds = ("cross_entropy", "fused_linear_cross_entropy") if args.bench == "all" \
        else (args.bench,)
    records = []
    for kind in kinds:
        for vocab in vocabs:
            for n in tokens:
                torch.manual_seed(0)
                run(kind, n, vocab, hidden, device, dtype, args, records, meta)
    path = common.write_records(records, args.out, "bench_cross_entropy")
    print(f"wrote {len(records)} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
