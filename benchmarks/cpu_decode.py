"""CPU decode benchmark: greedy generation with the KV cache, fp32 vs packed int8 / int4 models.

    python benchmarks/cpu_decode.py                       # the real model (about 15 minutes on 2 cores)
    python benchmarks/cpu_decode.py --layers 4 --rounds 3 # a truncated model: quicker
    python benchmarks/cpu_decode.py --variants fp32 int4-g64
    python benchmarks/cpu_decode.py --ops                 # per-op decode times of the linears

Variants: the real model (benchmarks/real_model.py, fp32) eager and compiled in place
(`ligerfx.compile_in_place`), and the same model packed by `ligerfx.quantize_` as int8, int4
group 64 and int4 group 128 (128 does not divide hidden 576: the last group is partial), each
eager and compiled in place.  Batch 1: a prompt of --prompt tokens (prefill), then --new tokens
chosen greedily one at a time, each step feeding the model's own KV cache.

Every variant first runs one full prefill + decode as warm-up (compiles, and the recompile for
the growing cache), which is not timed.  Then the variants take turns, round by round (fp32
eager, fp32 compiled, int8 eager, ...), so a load change on a shared machine hits all of them
alike; the figures are medians over rounds, and the ratios are paired (median over rounds of
this variant's rate / fp32 eager's in the same round).  The steal time of the machine during the
timed rounds is printed: above a few percent the figures are noisy.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cpu_step import cpu_jiffies  # noqa: E402

VARIANTS = ("fp32", "int8", "int4-g64", "int4-g128")


def _next_token(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1:].argmax(-1)


def greedy(model, prompt_ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """(the new token ids [B, new_tokens], seconds spent decoding them after the prefill)."""
    with torch.no_grad():
        out = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)
        cache, tok = out.cache, _next_token(out.logits)
        toks = [tok]
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1)
            cache, tok = out.cache, _next_token(out.logits)
            toks.append(tok)
        dt = time.perf_counter() - t0
    return torch.cat(toks, dim=1), dt


def decode_tokens_per_s(model, prompt_ids: torch.Tensor, new_tokens: int) -> float:
    """Tokens per second of greedy decoding after the prompt (the prefill not counted): one run,
    the caller warms up and repeats."""
    if new_tokens < 2:
        raise ValueError("decode_tokens_per_s: new_tokens must be at least 2 (the first token "
                         "comes from the prefill)")
    _, dt = greedy(model, prompt_ids, new_tokens)
    return prompt_ids.shape[0] * (new_tokens - 1) / dt


def prefill_tokens_per_s(model, ids: torch.Tensor) -> float:
    """Prompt tokens per second of one forward over `ids` that fills a fresh KV cache."""
    with torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        dt = time.perf_counter() - t0
    return ids.numel() / dt


def op_us(N: int, K: int, copies: int = 16, rounds: int = 5, reps: int = 10) -> dict:
    """Microseconds per call of one decode row (x [1, K]) through an [N, K] linear, eager: fp32
    F.linear and the int8 / int4 ops (their CPU loop, compiled once per shape).  Each variant
    cycles through `copies` distinct weights (fp32: 16 x 1536 x 576 x 4 B = 57 MB) so they are
    read from memory, as in a model, not from cache; {variant: (wall, CPU time)} medians over
    interleaved rounds.  On a loaded machine the wall time mostly measures waiting for a core;
    the process's CPU time (all threads) does not, so with one thread it is the steadier figure."""
    import torch.nn.functional as F

    from ligerfx.compress.quantize import linear, pack

    x = torch.randn(1, K)
    weights = [torch.randn(N, K) for _ in range(copies)]
    variants = {"fp32": [(lambda w=w: F.linear(x, w)) for w in weights]}
    for scheme, g in (("int8", 0), ("int4", 64), ("int4", 128)):
        packs = [pack(w, scheme, g or 128) for w in weights]
        variants[scheme + (f"-g{g}" if g else "")] = [(lambda p=p, s=scheme: linear(s, x, p, None))
                                                      for p in packs]
    times = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    with torch.no_grad():
        for calls in variants.values():  # warm-up (compiles the loops)
            for c in calls:
                c()
        for _ in range(rounds):
            for k, calls in variants.items():
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(reps):
                    for c in calls:
                        c()
                n = reps * len(calls)
                times[k].append((time.perf_counter() - t0) / n * 1e6)
                cpu[k].append((time.process_time() - c0) / n * 1e6)
    return {k: (statistics.median(times[k]), statistics.median(cpu[k])) for k in variants}


def build_variants(base, names, compiled: bool = True) -> dict:
    """{label: model}: for each scheme name an eager copy and, with `compiled`, a copy compiled in
    place; the copies share nothing with `base`."""
    import ligerfx

    out = {}
    for name in names:
        for mode in ("eager", "compiled") if compiled else ("eager",):
            m = copy.deepcopy(base)
            if name != "fp32":
                scheme, _, g = name.partition("-g")
                ligerfx.quantize_(m, scheme, group_size=int(g) if g else 128)
            if mode == "compiled":
                ligerfx.compile_in_place(m, log_report=False)
            out[f"{name} {mode}"] = m
    return out


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--no-compile", action="store_true", help="eager variants only")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N layers (0: all)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=32, help="tokens generated per timed run")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ops", action="store_true",
                   help="only the per-op decode times (eager, the real model's linear shapes)")
    return p.parse_args(argv)


def main(argv=None, log=print) -> dict:
    args = parse(argv)
    from benchmarks import real_model as R

    torch.set_num_threads(args.threads)
    if args.ops:
        out = {}
        for N, K in ((576, 576), (192, 576), (1536, 576), (576, 1536)):
            out[(N, K)] = r = op_us(N, K)
            log(f"op {N}x{K} wall (CPU) us: " + ", ".join(
                f"{k} {w:.0f} ({c:.0f}) {r['fp32'][1] / c:.2f}x" for k, (w, c) in r.items()))
        return out
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    base, _ = R.load()
    if args.layers:
        base.model.layers = base.model.layers[:args.layers]
        base.config.num_hidden_layers = args.layers
    names = ["fp32"] + [v for v in args.variants if v != "fp32"]
    models = build_variants(base, names, compiled=not args.no_compile)
    ids = R.eval_windows(1, length=args.prompt)[0]  # [1, prompt]
    log(f"cpu_decode: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{len(base.model.layers)} layers; prompt {args.prompt} tokens, {args.new} new, greedy, "
        f"batch 1; {args.rounds} interleaved rounds")
    ref = None
    for label, m in models.items():  # warm-up: compiles (prefill, decode, growing cache)
        t0 = time.perf_counter()
        toks, _ = greedy(m, ids, args.new)
        prefill_tokens_per_s(m, ids)
        same = "" if ref is None else f", {(toks == ref).float().mean().item():.0%} tokens = fp32 eager's"
        ref = toks if ref is None else ref
        log(f"  {label:20s} warm-up {time.perf_counter() - t0:6.1f} s{same}")
    rates = {k: {"decode": [], "prefill": [], "cpu_ms": []} for k in models}
    steal0, total0 = cpu_jiffies()
    for _ in range(args.rounds):
        for label, m in models.items():
            c0 = time.process_time()
            rates[label]["decode"].append(decode_tokens_per_s(m, ids, args.new))
            # CPU time per token (prefill included, all threads): robust to waiting for a core
            rates[label]["cpu_ms"].append((time.process_time() - c0) * 1e3 / args.new)
            rates[label]["prefill"].append(prefill_tokens_per_s(m, ids))
    steal1, total1 = cpu_jiffies()
    steal = (steal1 - steal0) / (total1 - total0) if total1 > total0 else float("nan")
    base_label = "fp32 eager"
    out = {}
    log(f"{'variant':20s} {'decode tok/s':>12s} {'x fp32 eager':>12s} {'prefill tok/s':>13s} "
        f"{'x fp32 eager':>12s} {'CPU ms/tok':>10s} {'x':>6s}")
    for label, r in rates.items():
        row = {"cpu_ms": statistics.median(r["cpu_ms"]),
               "cpu_x": statistics.median(b / a for a, b in zip(r["cpu_ms"], rates[base_label]["cpu_ms"]))}
        for kind in ("decode", "prefill"):
            row[kind] = statistics.median(r[kind])
            row[kind + "_x"] = statistics.median(a / b for a, b in zip(r[kind], rates[base_label][kind]))
        out[label] = row
        log(f"{label:20s} {row['decode']:12.2f} {row['decode_x']:11.2f}x {row['prefill']:13.1f} "
            f"{row['prefill_x']:11.2f}x {row['cpu_ms']:10.1f} {row['cpu_x']:5.2f}x")
    log(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; steal time "
        f"{100 * steal:.1f}% during the timed rounds")
    out["steal"] = steal
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
