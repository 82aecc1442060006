"""End-to-end benchmarks: one training step (forward, backward, AdamW) of HF causal LMs.

Models are shaped like Llama-3-8B, Qwen2-7B and Gemma-7B (full hidden size and vocabulary, bf16),
cut to a few decoder layers so one fits a single GPU with optimizer state.  Variants, side by side
in one process, each on a freshly built model with the same seed:

    eager         the HF model as is
    inductor      torch.compile(model)
    liger         torch.compile(model, backend="liger")  (inner inductor; aot_eager in --smoke)
    liger_kernel  Liger-Kernel's apply_liger_kernel_to_<family>(model=...), when installed

Metrics: tokens/s (median of timed steps after warm-up), step time, peak memory (CUDA allocator,
whole step incl. weights and optimizer state), compile time (first step minus a steady step), and
the floor ratios of the issue for the liger variant (see FLOORS).  Also a bf16 convergence check:
losses of eager and liger over training steps on a tiny model, with the largest relative gap.

Used by benchmarks/run.py (`--e2e`); `--smoke` uses tiny configs on the CPU.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time

import torch

import common

# Shapes of the released models; `layers` is cut by the caller.
FULL = {
    "llama3_8b": dict(family="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "qwen2_7b": dict(family="qwen2", hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0),
    "gemma_7b": dict(family="gemma", hidden_size=3072, intermediate_size=24576, num_attention_heads=16,
                     num_key_value_heads=16, head_dim=256, vocab_size=256000,
                     hidden_act="gelu_pytorch_tanh"),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256)
FULL_SEQS = (2048, 4096, 8192)
SMOKE_SEQS = (16, 32)
CLASSES = {"llama": "Llama", "qwen2": "Qwen2", "gemma": "Gemma"}

# The floors for the 8B-shaped training step (checked on a GPU; printed everywhere).
FLOORS = [
    ("speedup_vs_eager", ">=", 1.2),
    ("speedup_vs_inductor", ">=", 1.0),
    ("memory_vs_eager", "<=", 0.6),
    ("speedup_vs_liger_kernel", ">=", 1.0),
    ("memory_vs_liger_kernel", "<=", 1.0),
]


def build(name: str, layers: int, smoke: bool, device, dtype, seed: int = 0):
    import transformers

    spec = dict(FULL[name])
    family = spec.pop("family")
    if smoke:
        spec = dict(TINY, **({"head_dim": 16, "hidden_act": "gelu_pytorch_tanh"} if family == "gemma" else {}))
    cfg = getattr(transformers, CLASSES[family] + "Config")(
        **spec, num_hidden_layers=layers, max_position_embeddings=max(FULL_SEQS) * 2, use_cache=False,
        attn_implementation="sdpa", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(transformers, CLASSES[family] + "ForCausalLM")(cfg)
    finally:
        torch.set_default_dtype(old)
    model.train()
    return model, family, cfg.vocab_size


def batch(vocab: int, seq: int, device, batch_size: int = 1, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, seq), generator=gen).to(device)
    return dict(input_ids=ids, labels=ids.clone())


@contextlib.contextmanager
def _restored(family: str):
    """Liger-Kernel patches module-level names of modeling_<family>; undo that afterwards."""
    import importlib

    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    saved = dict(vars(mod))
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(mod, k, v)


def prepare(variant: str, model, family: str, smoke: bool):
    """The callable a training step runs for this variant (None when unavailable)."""
    torch._dynamo.reset()
    if variant == "eager":
        return model
    if variant == "inductor":
        return torch.compile(model)
    if variant == "liger":
        inner = "aot_eager" if smoke else "inductor"
        return torch.compile(model, backend="liger", options={"inner": inner, "log_report": False})
    if variant == "liger_kernel":
        try:
            import liger_kernel.transformers as lkt
        except Exception:
            return None
        getattr(lkt, f"apply_liger_kernel_to_{family}")(model=model)
        return model
    raise ValueError(variant)


def liger_kernel_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True


def train_step(fn, model, opt, inputs):
    loss = fn(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def measure_variant(name, variant, seq, layers, smoke, device, dtype, warmup, reps):
    """Metrics of one variant at one sequence length, or None when the variant is unavailable."""
    model, family, vocab = build(name, layers, smoke, device, dtype)
    inputs = batch(vocab, seq, device)
    ctx = _restored(family) if variant == "liger_kernel" else contextlib.nullcontext()
    with ctx:
        fn = prepare(variant, model, family, smoke)
        if fn is None:
            return None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
        common.sync(device)
        t0 = time.perf_counter()
        loss0 = train_step(fn, model, opt, inputs).float().item()
        common.sync(device)
        first_s = time.perf_counter() - t0
        step_ms = common.time_ms(lambda: train_step(fn, model, opt, inputs), device, warmup, reps,
                                 flush_l2=False)
        peak = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            train_step(fn, model, opt, inputs)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
    del model, opt, fn
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tokens = inputs["input_ids"].numel()
    return dict(tokens_per_s=tokens / (step_ms * 1e-3), step_time=step_ms, peak_memory=peak,
                compile_time=max(first_s - step_ms * 1e-3, 0.0), first_loss=loss0)


UNITS = dict(tokens_per_s="tokens/s", step_time="ms", peak_memory="MiB", compile_time="s", first_loss="nats")


def ratios(by_variant: dict) -> dict:
    """The floor ratios of the liger variant against the others that ran."""
    lg = by_variant.get("liger")
    out = {}
    if not lg:
        return out
    for other in ("eager", "inductor", "liger_kernel"):
        o = by_variant.get(other)
        if not o:
            continue
        out[f"speedup_vs_{other}"] = lg["tokens_per_s"] / o["tokens_per_s"]
        if lg["peak_memory"] is not None and o["peak_memory"]:
            out[f"memory_vs_{other}"] = lg["peak_memory"] / o["peak_memory"]
    return out


def check_floors(r: dict) -> list:
    """(metric, value, op, bound, passed) for each floor whose ratio was measured."""
    out = []
    for metric, op, bound in FLOORS:
        if metric in r:
            v = r[metric]
            out.append((metric, v, op, bound, v >= bound if op == ">=" else v <= bound))
    return out


def run(models, smoke: bool, device, env: dict, layers: int = 2, seqs=None, warmup: int = 3, reps: int = 10,
        variants=None, log=print) -> list:
    """All e2e benchmarks; returns records."""
    dtype = torch.float32 if smoke else torch.bfloat16
    seqs = seqs or (SMOKE_SEQS if smoke else FULL_SEQS)
    variants = list(variants or (("eager", "liger") if smoke else ("eager", "inductor", "liger", "liger_kernel")))
    if "liger_kernel" in variants and not liger_kernel_available():
        log("e2e: liger-kernel is not installed; its variant is skipped")
        variants.remove("liger_kernel")
    # liger_kernel last: its patches are undone afterwards, but run it after the others anyway.
    variants.sort(key=lambda v: v == "liger_kernel")
    records = []
    for name in models:
        bench = f"e2e_{name}"
        if smoke and name != models[0]:
            seqs_m = seqs[:1]  # two sizes on one model are enough to prove the size sweep
        else:
            seqs_m = seqs
        results = {seq: {} for seq in seqs_m}
        for variant in variants:
            for seq in seqs_m:
                shape = f"L{layers}_b1_t{seq}"
                try:
                    m = measure_variant(name, variant, seq, layers, smoke, device, dtype, warmup, reps)
                except torch.OutOfMemoryError:
                    log(f"  {bench:16s} {variant:13s} {shape:16s} OOM")
                    records.append(_rec(bench, variant, shape, seq, "oom", 1, "bool", env))
                    torch.cuda.empty_cache()
                    continue
                except Exception as e:
                    log(f"  {bench:16s} {variant:13s} {shape:16s} FAILED: {type(e).__name__}: {e}")
                    records.append(_rec(bench, variant, shape, seq, "failed", 1, "bool", env))
                    continue
                if m is None:
                    continue
                results[seq][variant] = m
                for metric, value in m.items():
                    if value is not None:
                        records.append(_rec(bench, variant, shape, seq, metric, value, UNITS[metric], env))
                mem = f"{m['peak_memory']:9.0f} MiB" if m["peak_memory"] is not None else "      n/a"
                log(f"  {bench:16s} {variant:13s} {shape:16s} {m['tokens_per_s']:10.0f} tokens/s | step "
                    f"{m['step_time']:9.2f} ms | peak {mem} | compile {m['compile_time']:6.1f} s | "
                    f"loss {m['first_loss']:.4f}")
        for seq in seqs_m:
            shape = f"L{layers}_b1_t{seq}"
            r = ratios(results[seq])
            for metric, value in r.items():
                records.append(_rec(bench, "liger", shape, seq, metric, value, "ratio", env))
            floors = check_floors(r)
            if floors:
                binding = name == "llama3_8b" and device.type == "cuda" and not smoke
                tag = "" if binding else "  (informational: floors apply to llama3_8b on a GPU)"
                log(f"  floors {bench} {shape}:{tag}")
                for metric, v, op, bound, ok in floors:
                    log(f"    {metric:26s} {v:7.3f} {op} {bound:<4} {'PASS' if ok else 'FAIL'}")
                    if binding:
                        records.append(_rec(bench, "liger", shape, seq, f"floor_{metric}", int(ok), "bool", env))
    return records


def convergence(device, env: dict, smoke: bool, steps: int = 30, log=print) -> list:
    """Loss of eager vs liger over `steps` AdamW steps of a tiny Llama on one fixed batch."""
    dtype = torch.float32 if smoke else torch.bfloat16
    steps = 3 if smoke else steps
    losses = {}
    for variant in ("eager", "liger"):
        model, family, vocab = build("llama3_8b", 2, True, device, dtype)
        inputs = batch(vocab, 64, device, batch_size=2)
        fn = prepare(variant, model, family, smoke)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[variant] = [train_step(fn, model, opt, inputs).float().item() for _ in range(steps)]
    gaps = [abs(a - b) / abs(a) for a, b in zip(losses["eager"], losses["liger"])]
    worst = max(gaps)
    finite = all(math.isfinite(v) for v in losses["liger"])
    log(f"  convergence tiny llama {dtype}: {steps} steps, loss {losses['eager'][0]:.4f} -> "
        f"{losses['eager'][-1]:.4f}, max relative gap liger vs eager {worst:.2e}")
    shape = f"tiny_llama_{str(dtype).replace('torch.', '')}_{steps}steps"
    recs = [_rec("convergence", "liger", shape, steps, "max_relative_loss_gap", worst if finite else float("inf"),
                 "ratio", env),
            _rec("convergence", "liger", shape, steps, "median_relative_loss_gap", statistics.median(gaps),
                 "ratio", env)]
    for i, (a, b) in enumerate(zip(losses["eager"], losses["liger"])):
        recs.append(_rec("convergence_curve", "eager", shape, i, "loss", a, "nats", env))
        recs.append(_rec("convergence_curve", "liger", shape, i, "loss", b, "nats", env))
    return recs


def _rec(bench, variant, shape, size, metric, value, unit, env):
    r = common.record(bench, variant, shape, metric, value, unit, env)
    r["size"] = size
    r["size_name"] = "step" if bench.startswith("convergence") else "tokens"
    r["kind"] = "convergence" if bench.startswith("convergence") else "e2e"
    return r


if __name__ == "__main__":
    sys.exit("run the end-to-end benchmarks through benchmarks/run.py --e2e ...")
