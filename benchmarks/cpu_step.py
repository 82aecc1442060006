"""CPU training-step benchmark: eager vs inductor vs backend="liger", interleaved in one process.

    python benchmarks/run.py --cpu                    # the issue's model (about 5 minutes on 2 cores)
    python benchmarks/run.py --cpu --steps 3 --layers 1 --seq 128   # quicker, smaller
    python benchmarks/run.py --cpu --profile          # also print each variant's top ops

The model is Hugging Face Llama, fp32: 4 layers, hidden 512, intermediate 1408, 8 heads
(head_dim 64), vocab 32000; batch 2 x 512 tokens; one step = forward with labels, backward,
AdamW.  Each variant trains its own copy built with the same seed.  After one compile step and one
warm-up step per variant, the variants take turns step by step (eager, inductor, liger, eager, ...)
so a load change on a shared machine hits all of them alike; the figures are medians, of the wall
time and of the process's CPU time (time.process_time: all threads), which waiting for a core
on a loaded machine does not inflate.  The ratios are also given paired: the median over rounds
of (other's step / liger's step) within one round, which cancels load that drifts between
rounds.  The machine's steal time (/proc/stat: CPU time the hypervisor gave other guests) during
the timed rounds is printed, as a share of the two cores' time: above a few percent the figures
are noisy and worth rerunning.

Peak memory: resident set size (RSS, /proc/self/statm) sampled every millisecond by a thread
during one extra step per variant, minus the RSS just before that step, so weights, gradients of
the previous step (freed with set_to_none) and optimizer state already allocated are excluded and
the figure is what the step itself adds.  glibc's mmap threshold is pinned at 128 KiB first, so
every tensor larger than that is its own mapping and returns to the OS when freed (otherwise the
heap keeps freed memory and RSS lags behind the live bytes).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time

import torch

VARIANTS = ("eager", "inductor", "liger")
MODEL = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=8,
             vocab_size=32000)


def pin_mmap_threshold(nbytes: int = 128 << 10) -> bool:
    """mallopt(M_MMAP_THRESHOLD, nbytes): big blocks become mappings released on free (glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, nbytes))  # M_MMAP_THRESHOLD = -3
    except Exception:
        return False


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager: the largest RSS seen while inside, above the RSS on entry (bytes)."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())
        self.extra = self.peak - self.base


def cpu_jiffies() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs so far, from /proc/stat ((0, 0) where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def build(layers: int, seed: int = 0):
    import transformers

    cfg = transformers.LlamaConfig(**MODEL, num_hidden_layers=layers, max_position_embeddings=4096,
                                   use_cache=False, attn_implementation="sdpa", bos_token_id=1,
                                   eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    model.train()
    return model


def prepare(variant: str, model):
    if variant == "eager":
        return model
    if variant == "inductor":
        return torch.compile(model)
    return torch.compile(model, backend="liger", options={"log_report": False})


def step(fn, model, opt, inputs) -> float:
    loss = fn(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)  # run.py's switch
    p.add_argument("--steps", type=int, default=7, help="timed steps per variant (median)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--profile", action="store_true", help="print each variant's top ops by CPU time")
    return p.parse_args(argv)


def main(argv=None, log=print) -> dict:
    args = parse(argv)
    pinned = pin_mmap_threshold()
    import ligerfx.kernels.runtime as rt

    if rt.interpreting():
        log("cpu_step: TRITON_INTERPRET=1 is set; the liger ops would run interpreted. Unset it.")
        return {}
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, MODEL["vocab_size"], (args.batch, args.seq), generator=gen)
    inputs = dict(input_ids=ids, labels=ids.clone())
    log(f"cpu_step: torch {torch.__version__}, {torch.get_num_threads()} threads; Llama fp32 "
        f"{args.layers} layers, hidden {MODEL['hidden_size']}, intermediate "
        f"{MODEL['intermediate_size']}, vocab {MODEL['vocab_size']}; batch {args.batch} x "
        f"{args.seq}; {args.steps} interleaved steps per variant")
    runs = {}
    for v in args.variants:
        model = build(args.layers)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
        fn = prepare(v, model)
        t0 = time.perf_counter()
        loss0 = step(fn, model, opt, inputs)
        first = time.perf_counter() - t0
        step(fn, model, opt, inputs)  # warm-up: optimizer state exists from here on
        runs[v] = dict(fn=fn, model=model, opt=opt, times=[], cpu=[], first=first, loss0=loss0)
        log(f"  {v:9s} first step (compile) {first:7.1f} s, loss {loss0:.4f}")
    steal0, total0 = cpu_jiffies()
    for _ in range(args.steps):
        for v, r in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step(r["fn"], r["model"], r["opt"], inputs)
            r["times"].append(time.perf_counter() - t0)
            r["cpu"].append(time.process_time() - c0)
    steal1, total1 = cpu_jiffies()
    steal = (steal1 - steal0) / (total1 - total0) if total1 > total0 else float("nan")
    for v, r in runs.items():
        with PeakRSS() as pk:
            step(r["fn"], r["model"], r["opt"], inputs)
        r["peak_mib"] = pk.extra / 2**20
        r["step_s"] = statistics.median(r["times"])
        r["cpu_s"] = statistics.median(r["cpu"])
    log(f"peak memory: RSS above the step's start, sampled every 1 ms"
        f"{'' if pinned else ' (mmap threshold NOT pinned: RSS may lag)'}")
    for v, r in runs.items():
        spread = f"{min(r['times']):.3f}-{max(r['times']):.3f}"
        log(f"  {v:9s} step {r['step_s']:7.3f} s (median; range {spread}), CPU time "
            f"{r['cpu_s']:7.3f} s | peak +{r['peak_mib']:7.0f} MiB")
    out = {v: dict(step_s=r["step_s"], cpu_s=r["cpu_s"], peak_mib=r["peak_mib"], first_s=r["first"])
           for v, r in runs.items()}
    log(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; steal time "
        f"{100 * steal:.1f}% during the timed rounds")
    out["steal"] = steal
    if "liger" in runs:
        lg = runs["liger"]
        parts = []
        for other in ("inductor", "eager"):
            if other in runs:
                o = runs[other]
                speed = o["step_s"] / lg["step_s"]
                paired = statistics.median(a / b for a, b in zip(o["times"], lg["times"]))
                out[f"paired_speedup_vs_{other}"] = paired
                mem = lg["peak_mib"] / o["peak_mib"] if o["peak_mib"] > 0 else float("nan")
                out[f"speedup_vs_{other}"] = speed
                out[f"cpu_speedup_vs_{other}"] = o["cpu_s"] / lg["cpu_s"]
                out[f"memory_vs_{other}"] = mem
                parts.append(f"vs {other}: speed {speed:.2f}x ({'PASS' if speed >= 1 else 'FAIL'} >= 1.0), "
                             f"paired {paired:.2f}x, CPU time {o['cpu_s'] / lg['cpu_s']:.2f}x, "
                             f"memory {mem:.2f}x")
        log("liger " + " | ".join(parts))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for v, r in runs.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(r["fn"], r["model"], r["opt"], inputs)
            log(f"--- {v}")
            log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
