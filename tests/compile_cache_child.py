"""One process of tests/test_compile_cache.py: a liger-compiled training step and inference call.

Run as `python tests/compile_cache_child.py '<json spec>'` with PYTHONPATH set to the repository
root; the parent picks the mode through the environment (TRITON_INTERPRET, the shared
TORCHINDUCTOR_CACHE_DIR) and the spec:

    {"case": "logits" | "loss", "options": {...liger options...}}

"logits": the Hugging Face model's own output (loss and fp32 logits, so the fused lm head + loss
returns the logits: on the CPU torch path that is the logits-gradient mode). "loss": a wrapper
that returns the loss only (the op keeps no logits).

It builds a tiny Qwen3 (seeded, random weights and tokens), runs one training step (loss +
backward) and one no-grad forward, eager and compiled (backend "liger", inner inductor), and
prints one JSON line: the relative errors against eager, inductor's cache counters, where ligerfx
was imported from, and the error if the compiled run failed (a cache entry of another mode whose
op outputs do not match this one fails inside the compiled code).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback


def _rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _model(case: str):
    import torch
    import transformers

    from ligerfx.dump.hf_targets import small_config_kwargs

    kw = small_config_kwargs("qwen3")
    kw.update(num_hidden_layers=1)  # one layer has every rewrite; half the compile time
    config = transformers.Qwen3Config(**kw)
    torch.manual_seed(0)
    lm = transformers.Qwen3ForCausalLM(config).train()
    if case == "logits":
        return lm

    class LossOnly(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, labels):
            return self.lm(input_ids=input_ids, labels=labels).loss

    return LossOnly(lm)


def _inputs():
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (2, 16), generator=gen)
    labels = torch.randint(0, 256, (2, 16), generator=gen)
    labels[1, -4:] = -100  # ignored positions, as padding would give
    return dict(input_ids=ids, labels=labels)


def _outputs(out):
    """(loss, logits or None) of either case's output."""
    if hasattr(out, "loss"):
        return out.loss, out.logits
    return out, None


def run(spec: dict) -> dict:
    import torch
    from torch._dynamo.utils import counters

    import ligerfx

    result: dict = {"ligerfx": os.path.dirname(os.path.dirname(os.path.abspath(ligerfx.__file__))),
                    "interpret": os.environ.get("TRITON_INTERPRET")}
    ref = _model(spec["case"])
    test = copy.deepcopy(ref)
    inputs = _inputs()
    opts = {"inner": "inductor", "log_report": False, **spec.get("options", {})}
    compiled = torch.compile(test, backend="liger", options=opts)
    try:
        # training step
        loss_ref, logits_ref = _outputs(ref(**inputs))
        loss_ref.backward()
        loss, logits = _outputs(compiled(**inputs))
        loss.backward()
        errs = {"loss": _rel_err(loss, loss_ref)}
        if logits is not None:
            errs["logits"] = _rel_err(logits, logits_ref)
        for (name, p_ref), (_, p) in zip(ref.named_parameters(), test.named_parameters()):
            if p.grad is None:
                raise AssertionError(f"{name}: no gradient through the compiled model")
            errs[f"grad {name}"] = _rel_err(p.grad, p_ref.grad)
        # inference (a second graph: no autograd)
        with torch.no_grad():
            loss_ref, logits_ref = _outputs(ref(**inputs))
            loss, logits = _outputs(compiled(**inputs))
        errs["inference loss"] = _rel_err(loss, loss_ref)
        if logits is not None:
            errs["inference logits"] = _rel_err(logits, logits_ref)
        result["errors"] = errs
        import ligerfx.backend

        result["rewrites"] = ligerfx.backend.last_report.counts if ligerfx.backend.last_report \
            else {}
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the test
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-4000:]
    result["counters"] = {group: dict(counters[group]) for group in ("inductor", "aot_autograd")}
    return result


if __name__ == "__main__":
    out = run(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(out))
    sys.exit(1 if "error" in out else 0)
