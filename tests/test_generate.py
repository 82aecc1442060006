"""`generate()` with a KV cache through the liger backend: eager's tokens, no recompile per step.

`torch.compile(model)` returns a wrapper whose `generate` is the original module's method, so it
runs uncompiled (checked below, so the README's advice stays true).  The forms that compile what
`generate` calls: `model.compile(...)` / `ligerfx.compile_in_place(model)` (the module's call
compiled in place), and `model.forward = torch.compile(model.forward, ...)`.

Greedy decoding in fp32 from a one-layer tiny Llama with a dynamic KV cache gives eager's tokens exactly.
Compiles are counted with Dynamo's own counter: the prefill, then the decode step, which grows the
cache by one token per step.  With the default `dynamic=None` Dynamo compiles the first decode
step with static shapes and, when the cache length changes, once more with that length symbolic
(3 graphs in all); with `dynamic=True` the decode graph is symbolic from the start (2 graphs).
Either way the count does not grow with the number of tokens generated.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import ligerfx
import ligerfx.backend
from tests.models.hf import build

pytest.importorskip("transformers")

NEW_TOKENS = 12  # 11 decode steps
LAYERS = 1  # compile time grows with depth; one decoder layer has every pattern of decoding
# the first input norm reads the embeddings; the others follow a residual add
WANT = {"rms_norm": 1, "add_rms_norm": 2 * LAYERS, "rope": LAYERS, "swiglu": LAYERS}


def _model_and_prompt():
    model, _ = build("llama", use_cache=True, num_hidden_layers=LAYERS)
    model.eval()
    g = torch.Generator().manual_seed(11)
    return model, torch.randint(3, model.config.vocab_size, (2, 7), generator=g)


def _generate(model, prompt):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("form", ["compile_in_place", "forward"])
def test_generate_matches_eager_without_recompiling(form, torch_path):
    model, prompt = _model_and_prompt()
    ref = _generate(model, prompt)
    assert ref.shape[1] == prompt.shape[1] + NEW_TOKENS  # no early stop: every step was run
    counters.clear()
    ligerfx.backend.last_report = None
    if form == "compile_in_place":
        ligerfx.compile_in_place(model, inner="aot_eager")  # dynamic=None, torch's default
        max_graphs = 3
    else:
        model.forward = torch.compile(model.forward, backend="liger", dynamic=True,
                                      options={"inner": "aot_eager"})
        max_graphs = 2
    out = _generate(model, prompt)
    assert torch.equal(out, ref), (out, ref)
    n = _graphs()
    assert 0 < n <= max_graphs, f"{n} graphs compiled for {NEW_TOKENS} tokens: a recompile per step?"
    report = ligerfx.backend.last_report
    assert report is not None and {k: v for k, v in report.counts.items() if v} == WANT, report
    assert not report.near_misses, report
    # A second, longer generation from the same prompt length reuses the compiled graphs.
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=NEW_TOKENS + 4, do_sample=False, pad_token_id=0)
    assert _graphs() == n


def test_torch_compile_wrapper_generate_compiles_nothing(torch_path):
    """The pitfall the README warns about: the wrapper's generate is the module's, uncompiled."""
    model, prompt = _model_and_prompt()
    wrapped = torch.compile(model, backend="liger", options={"inner": "aot_eager"})
    counters.clear()
    with torch.no_grad():
        wrapped.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert _graphs() == 0
