"""Recovery by distillation: train a compressed SmolLM2-135M student from its fp32 teacher.

The student (benchmarks/kd_students.py: "2:4" pruned with a fixed mask, or "prune-mlp") is
trained on the calibration part of the text (`R.training_batches`, [2, 256] token batches) with
a distillation loss written in plain PyTorch on its lm-head logits (forward KL with a
temperature, reverse KL, or generalised JSD).  The KD step is compiled with
`torch.compile(step, backend="liger")`, so the student's lm head and the loss become one
`liger::fused_linear_distillation` (no [tokens, vocab] logits kept for backward); the script
prints the rewrites and exits with an error if the distillation rewrite did not happen.  Held-out
perplexity (`R.perplexity` on `R.eval_windows`) is printed at step 0 and every --eval-every
steps with the fraction of the gap to the teacher closed.  At the end a 2:4 student's mask is
checked and `ligerfx.sparsify_` packs it (lossless: its perplexity is printed again).

    python benchmarks/kd_recover.py --student 2:4 --steps 50 --eval-every 10 --lr 1e-4
    python benchmarks/kd_recover.py --memory     # peak memory of one KD step, eager vs compiled

The memory children (`python benchmarks/kd_recover.py eager|compiled`, run through
tests/memory_probe.py) measure one forward + backward of the KD step in a fresh process.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import ligerfx  # noqa: E402
import ligerfx.backend  # noqa: E402

LOSSES = ("kl", "rkl", "jsd")
DISTILL_REWRITES = ("fused_linear_distillation", "distillation_loss")


def distill_loss(kind: str, temperature: float = 1.0, beta: float = 0.5):
    """loss(s, t) on student / teacher logits [B, S, V], mean over tokens, in plain PyTorch."""
    T = float(temperature)

    def kl(s, t):  # forward KL(teacher || student), Hinton's T**2 scaling
        V = s.shape[-1]
        return F.kl_div(F.log_softmax(s / T, -1).reshape(-1, V),
                        F.log_softmax(t / T, -1).reshape(-1, V),
                        reduction="batchmean", log_target=True) * T**2

    def rkl(s, t):  # reverse KL(student || teacher): mode seeking
        ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
        return (ls.exp() * (ls - lt)).sum(-1).mean() * T**2

    def jsd(s, t):  # generalised JSD with mixture weight beta (GKD)
        ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
        m = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
        d = (beta * F.kl_div(m, lt, reduction="none", log_target=True)
             + (1 - beta) * F.kl_div(m, ls, reduction="none", log_target=True))
        return d.sum(-1).mean() * T**2

    if kind not in LOSSES:
        raise ValueError(f"unknown --loss {kind!r}: choose one of {', '.join(LOSSES)}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"--beta must be strictly between 0 and 1 for jsd, got {beta}")
    return {"kl": kl, "rkl": rkl, "jsd": jsd}[kind]


def body_and_head(model: nn.Module):
    """(decoder returning last_hidden_state, lm head linear) of a Hugging Face causal LM."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the lm head must be an nn.Linear for the fused distillation rewrite, got "
                        f"{type(head).__name__}")
    return model.base_model, head


def teacher_hidden(teacher: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return teacher.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


def make_step(student: nn.Module, teacher: nn.Module, loss_fn):
    """step(input_ids, teacher_hidden) -> loss: the student's body and lm head, the teacher's lm
    head under no_grad (fused into the same op), and the loss."""
    body, head = body_and_head(student)
    w_teacher = body_and_head(teacher)[1].weight.detach()

    def step(input_ids, h_teacher):
        s = head(body(input_ids=input_ids, use_cache=False).last_hidden_state)
        with torch.no_grad():
            t = F.linear(h_teacher, w_teacher)
        return loss_fn(s, t)

    return step


def compile_step(step, inner: str = "aot_eager"):
    return torch.compile(step, backend="liger", dynamic=False,
                         options={"inner": inner, "log_report": False})


def check_rewrites(report) -> int:
    """Print the rewrites of the compiled step; raise if no distillation rewrite happened."""
    counts = report.counts if report is not None else {}
    print("rewrites:", ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none",
          f"({report.graphs if report else 0} graph(s))", flush=True)
    n = sum(counts.get(k, 0) for k in DISTILL_REWRITES)
    if n == 0:
        misses = [str(m) for m in (report.near_misses if report else [])]
        raise SystemExit("FAILED: the distillation loss was not rewritten (no "
                         f"{' / '.join(DISTILL_REWRITES)}); near misses:\n  " + "\n  ".join(misses))
    return n


def gap_closed(ppl0: float, ppl: float, ppl_teacher: float) -> float:
    return (ppl0 - ppl) / (ppl0 - ppl_teacher) if ppl0 != ppl_teacher else float("nan")


def train(student, teacher, mask, batches, loss_fn, *, steps, lr, eval_every, evaluate,
          inner="aot_eager", weight_decay=0.0, log=print):
    """The KD loop: AdamW on the student's trainable parameters, the mask kept after each step.
    `evaluate()` -> held-out perplexity (or None to skip).  Returns (losses, [(step, ppl)],
    seconds per step after the first (compiling) one, the compiled step's rewrite count)."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    step = compile_step(make_step(student, teacher, loss_fn), inner)
    losses, curve, times, rewrites = [], [], [], 0
    ppl = evaluate()
    if ppl is not None:
        curve.append((0, ppl))
        log(f"step    0  held-out ppl {ppl:.2f}")
    for i in range(1, steps + 1):
        ids = batches[(i - 1) % len(batches)]
        t0 = time.perf_counter()
        loss = step(ids, teacher_hidden(teacher, ids))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mask is not None:
            mask.apply()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if i == 1:
            rewrites = check_rewrites(ligerfx.backend.last_report)
            log(f"step 1 (compiling): {times[0]:.1f} s")
        if i % eval_every == 0 or i == steps:
            ppl = evaluate()
            mean_loss = sum(losses[-eval_every:]) / len(losses[-eval_every:])
            msg = f"step {i:4d}  kd loss {mean_loss:.4f}  {sum(times[1:]) / max(1, len(times) - 1):.1f} s/step"
            if ppl is not None:
                curve.append((i, ppl))
                msg += f"  held-out ppl {ppl:.2f}"
            log(msg)
    per_step = sum(times[1:]) / max(1, len(times) - 1)
    return losses, curve, per_step, rewrites


# ----------------------------------------------------------------------------- memory


def memory_child(mode: str) -> None:
    """One KD step (forward + backward) of the 2:4 magnitude student, eager or compiled, measured
    by tests/memory_probe.py in this fresh process."""
    import real_model as R
    from kd_students import make_student
    from tests.memory_probe import measure

    torch.manual_seed(0)
    teacher, _ = R.load()
    student, _, _ = make_student("2:4", teacher)
    ids = R.training_batches(1)[0]
    ht = teacher_hidden(teacher, ids)
    fn = make_step(student, teacher, distill_loss("kl", 2.0))
    if mode == "compiled":
        fn = compile_step(fn)
    fn(ids, ht).backward()  # warm-up (and compilation) outside the measured window
    student.zero_grad(set_to_none=True)
    probe = next(p for p in student.parameters() if p.requires_grad and p.dim() == 2)

    def one():
        loss = fn(ids, ht)
        loss.backward()
        return loss

    measure(mode, one, dict(gw=probe))


def memory_report() -> dict:
    from tests.memory_probe import run_child

    eager, ours = run_child(__file__, "eager", 1800), run_child(__file__, "compiled", 1800)
    if not any(ours["counts"].get(k) for k in DISTILL_REWRITES):
        raise SystemExit(f"FAILED: the compiled memory child did not rewrite the loss: {ours['counts']}")
    print(f"peak memory of one KD step ([2, 256] tokens, vocab 49152, fp32, CPU): eager "
          f"{eager['increase_mib']:.0f} MiB, compiled {ours['increase_mib']:.0f} MiB "
          f"(one [512, 49152] fp32 tensor is 96 MiB); loss eager {eager['loss']:.5f} compiled "
          f"{ours['loss']:.5f}; step {eager['seconds']:.1f} s eager, {ours['seconds']:.1f} s compiled")
    return dict(eager=eager, compiled=ours)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    from kd_students import STUDENTS, StudentUnavailable, make_student

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", choices=STUDENTS, default="2:4")
    ap.add_argument("--prune-method", default=None,
                    help="sparsify_/prune_ method (sparsegpt, wanda, magnitude) when they take one")
    ap.add_argument("--calibrate", type=int, default=16,
                    help="calibration batches for sparsify_/prune_ when they take calibration= (0: none)")
    ap.add_argument("--mlp", type=float, default=0.5, help="prune-mlp: fraction of MLP width removed")
    ap.add_argument("--loss", choices=LOSSES, default="kl")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=0.5, help="jsd mixture weight")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--batches", type=int, default=512, help="distinct training batches (cycled)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inner", default="aot_eager", choices=("aot_eager", "inductor", "eager"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory", action="store_true", help="measure one KD step's peak memory, eager "
                    "vs compiled (two fresh processes), then exit")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory:
        memory_report()
        return

    import real_model as R

    torch.manual_seed(args.seed)
    loss_fn = distill_loss(args.loss, args.temperature, args.beta)
    teacher, _ = R.load()
    teacher.requires_grad_(False)
    windows = R.eval_windows(args.eval_windows)
    ppl_teacher = R.perplexity(teacher, windows)
    calibration = R.calibration_batches(args.calibrate) if args.calibrate else None
    try:
        student, mask, what = make_student(args.student, teacher, calibration, args.prune_method,
                                           args.mlp)
    except StudentUnavailable as e:
        raise SystemExit(f"{e}")
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    print(f"teacher fp32 held-out ppl {ppl_teacher:.2f} ({len(windows)} x 256 tokens); student: "
          f"{what}; {n_train / 1e6:.1f}M trainable parameters; loss {args.loss} T="
          f"{args.temperature}; AdamW lr {args.lr}", flush=True)

    def evaluate():
        student.eval()
        ppl = R.perplexity(student, windows)
        student.train()
        return ppl

    batches = R.training_batches(args.batches, seed=args.seed)

    def log(msg):
        print(msg, flush=True)

    losses, curve, per_step, rewrites = train(
        student, teacher, mask, batches, loss_fn, steps=args.steps, lr=args.lr,
        eval_every=args.eval_every, evaluate=evaluate, inner=args.inner,
        weight_decay=args.weight_decay, log=log)
    ppl0 = curve[0][1]
    print(f"held-out perplexity (teacher {ppl_teacher:.2f}; fraction of the gap to the teacher "
          "closed, in perplexity and in log-perplexity = nats/token):")
    for i, ppl in curve:
        print(f"  step {i:5d}: {ppl:9.2f}  {gap_closed(ppl0, ppl, ppl_teacher):7.1%}  "
              f"{gap_closed(math.log(ppl0), math.log(ppl), math.log(ppl_teacher)):7.1%}")
    print(f"{per_step:.1f} s/step ({args.threads} thread(s)); distillation rewrites: {rewrites}")
    if mask is not None:
        if not mask.kept():
            raise SystemExit("FAILED: the 2:4 zero pattern was not kept through training")
        student.eval()
        before = curve[-1][1]
        left = ligerfx.sparsify_(student, "2:4")
        after = R.perplexity(student, windows)
        print(f"2:4 mask kept; packed by ligerfx.sparsify_ (left dense: {len(left)}): held-out ppl "
              f"{before:.3f} trained, {after:.3f} packed")


if __name__ == "__main__":
    if sys.argv[1:] in (["eager"], ["compiled"]):
        memory_child(sys.argv[1])
    else:
        main()
