"""Structured MLP pruning (`ligerfx.prune_`) on the real model: perplexity and parameter count
for each (mlp fraction, method, select) given on the command line.

    python benchmarks/prune_real.py --mlp 0.5 --method reconstruct remove --select obs energy
"""

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ligerfx
import real_model as R  # noqa: E402

import ligerfx  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mlp", type=float, nargs="+", default=[0.5])
    ap.add_argument("--method", nargs="+", default=["reconstruct", "remove"])
    ap.add_argument("--select", nargs="+", default=[None])
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base, _ = R.load()
    cal, ev = R.calibration_batches(a.calib), R.eval_windows(a.windows)
    n0 = sum(p.numel() for p in base.parameters())
    print(f"fp32: ppl {R.perplexity(base, ev):.2f}, params {n0 / 1e6:.1f}M", flush=True)
    for frac in a.mlp:
        for method in a.method:
            for select in a.select:
                m = copy.deepcopy(base)
                t = time.time()
                ligerfx.prune_(m, mlp=frac, calibration=cal, method=method, select=select, damp=a.damp)
                dt = time.time() - t
                n = sum(p.numel() for p in m.parameters())
                print(f"mlp={frac} {method:11s} {select:6s}: ppl {R.perplexity(m, ev):.2f}, params "
                      f"{n / 1e6:.1f}M ({n / n0:.0%}), prune {dt:.0f}s", flush=True)


if __name__ == "__main__":
    main()
