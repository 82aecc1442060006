"""`hf:` targets of `ligerfx dump`: a tiny Hugging Face causal LM built from a config, no download.

`hf:llama` builds the architecture of that `model_type` from a small config (hidden 64, 2 layers,
4 heads, vocab 256); `hf:path/to/config.json` builds it from the given config as written.  The
model is seeded, in train mode, and called with `input_ids` and `labels` so its loss is traced too.
transformers is imported only here, and only when such a target is asked for.
"""

from __future__ import annotations

import json
import os

import torch

# Small enough to trace in seconds on a CPU; the same shape every architecture accepts.
_COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=64, use_cache=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
_GQA = dict(num_key_value_heads=2)

# Per-architecture adjustments; a model_type not listed here gets _COMMON + _GQA and may still work.
_OVERRIDES = {
    "llama": _GQA,
    "mistral": dict(_GQA, sliding_window=None),
    "qwen2": _GQA,
    "qwen3": dict(_GQA, head_dim=16),
    "gemma": dict(_GQA, head_dim=16, hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(_GQA, head_dim=16, hidden_activation="gelu_pytorch_tanh",
                   query_pre_attn_scalar=16, sliding_window=64, attn_implementation="eager"),
    "phi3": _GQA,
    "gpt_neox": dict(rotary_pct=0.25),
    "mixtral": dict(_GQA, num_local_experts=4, num_experts_per_tok=2),
    "stablelm": _GQA,
}
KNOWN_TYPES = tuple(_OVERRIDES)


class HFTargetError(ValueError):
    """An hf: target cannot be built (the message says why, in one line)."""


def _transformers():
    try:
        import transformers
    except ImportError:
        raise HFTargetError("hf: targets need the `transformers` package "
                            "(pip install transformers)") from None
    return transformers


def small_config_kwargs(model_type: str) -> dict:
    """Config keyword arguments of a tiny model of this `model_type`."""
    kw = dict(_COMMON, attn_implementation="sdpa")
    kw.update(_OVERRIDES.get(model_type, _GQA))
    return kw


def _config_from_json(path: str):
    tf = _transformers()
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise HFTargetError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise HFTargetError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise HFTargetError(f"{path} has no \"model_type\" key; it is not a model config")
    data = dict(data)
    model_type = data.pop("model_type")
    data.setdefault("use_cache", False)
    try:
        return tf.AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as e:
        raise HFTargetError(f"{path}: {e}") from None


def _config_for_type(model_type: str):
    tf = _transformers()
    try:
        return tf.AutoConfig.for_model(model_type, **small_config_kwargs(model_type))
    except (ValueError, KeyError):
        raise HFTargetError(
            f"unknown Hugging Face model type {model_type!r} (tested: {', '.join(KNOWN_TYPES)}; "
            "or give hf:path/to/config.json)") from None


def build(spec: str, seed: int = 0, batch: int = 2, seq: int = 16):
    """(model, args, kwargs) for `hf:SPEC` (SPEC without the `hf:` prefix)."""
    tf = _transformers()
    if spec.endswith(".json") or os.sep in spec or "/" in spec:
        config = _config_from_json(spec)
    else:
        config = _config_for_type(spec)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = tf.AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - any failure here is the config's, said in one line
        raise HFTargetError(f"cannot build a causal LM for hf:{spec}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    model.train()
    vocab = int(getattr(config, "vocab_size", 256) or 256)
    gen = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(min(3, vocab - 1), vocab, (batch, seq), generator=gen)
    labels = input_ids.clone()
    labels[0, -3:] = -100  # ignored positions, as padding would produce
    return model, (), dict(input_ids=input_ids, labels=labels)
