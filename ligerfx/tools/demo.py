"""`ligerfx demo`: the main job on the built-in example model.

Builds the small Llama-style model, shows what the liger backend rewrites (pattern, count, source
line), then trains two identical copies side by side for a few steps, one eager and one compiled
with the liger backend, printing both losses at each step.
"""

from __future__ import annotations

import copy
import time

import torch

from .example_model import make_example
from ligerfx.explain import explain


def _default_inner() -> str:
    # Inductor needs a C++/Triton build per graph (15-20 s on a small CPU); aot_eager runs the
    # same rewritten graph and autograd without that wait.  On a GPU the default is inductor.
    return "inductor" if torch.cuda.is_available() else "aot_eager"


def run(steps: int = 5, inner: str | None = None, device: str | None = None, lr: float = 1e-2,
        out=print) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    inner = inner or _default_inner()
    t0 = time.perf_counter()
    out(f"[1/3] building the example model on {device} ...")
    model, ids, labels = make_example(device=device)
    n_params = sum(p.numel() for p in model.parameters())
    out(f"      {type(model).__name__}: {model.cfg.n_layers} layers, dim {model.cfg.dim}, "
        f"vocab {model.cfg.vocab_size}, {n_params / 1e3:.1f}k parameters")

    out("[2/3] tracing and rewriting (ligerfx.explain) ...")
    report = explain(model, ids, labels, options={"inner": inner})
    counts = report.counts
    width = max([len(n) for n in counts] + [7])
    out(f"      {'pattern':<{width}}  count")
    for name in sorted(counts):
        out(f"      {name:<{width}}  {counts[name]:>5}")
    out("      where:")
    for m in report.matches:
        loc = m.location
        out(f"      - {m.pattern:<{width}}  {loc.module or '(top level)':<20} line {loc.line}: "
            f"{loc.code.strip()}")
    for miss in report.near_misses:
        out(f"      near miss: {miss}")
    if not counts:
        out("      (nothing rewritten)")

    out(f"[3/3] training {steps} steps: eager vs torch.compile(backend='liger', inner={inner!r})")
    eager = model
    liger = copy.deepcopy(model)
    compiled = torch.compile(liger, backend="liger", options={"inner": inner, "log_report": False})
    opt_e = torch.optim.AdamW(eager.parameters(), lr=lr)
    opt_l = torch.optim.AdamW(liger.parameters(), lr=lr)
    losses = []
    out("      step   eager loss    liger loss    rel. gap")
    for step in range(steps):
        le = eager(ids, labels)
        le.backward()
        opt_e.step()
        opt_e.zero_grad(set_to_none=True)
        ll = compiled(ids, labels)
        ll.backward()
        opt_l.step()
        opt_l.zero_grad(set_to_none=True)
        gap = abs(le.item() - ll.item()) / max(abs(le.item()), 1e-12)
        losses.append((le.item(), ll.item()))
        out(f"      {step:>4}   {le.item():.6f}     {ll.item():.6f}     {gap:.2e}")
    out(f"done in {time.perf_counter() - t0:.1f} s")
    return {"counts": counts, "losses": losses, "inner": inner}
