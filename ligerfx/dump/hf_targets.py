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


# Any other size a default config carries, shrunk only where the config has that key (so a key
# never switches a feature on): experts, MLA ranks, linear-attention and Mamba widths.
_TINY = dict(
    head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    shared_experts_intermediate_size=32, moe_shared_expert_intermediate_size=32,
    shared_intermediate_size=32, intermediate_size_mlp=128, dense_intermediate_size=128,
    expert_ffn_hidden_size=32, ffn_hidden_size=128, num_experts=4, num_local_experts=4,
    n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    q_lora_rank=16, kv_lora_rank=16, o_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
    qk_head_dim=16, v_head_dim=16, index_n_heads=2, index_head_dim=16, index_topk=8,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_head_dim=16, linear_num_heads=4,
    mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_headdim=16, mamba_head_dim=16,
    mamba_num_heads=4, mamba_d_state=16, mamba_chunk_size=16, mamba_dt_rank=8, chunk_size=16,
    ssm_state_size=16, state_size=16, time_step_rank=8, attention_chunk_size=16,
    sliding_window=8, query_pre_attn_scalar=16, rotary_dim=8, kv_channels=16,
    attention_head_dim=16, swa_head_dim=16, swa_num_attention_heads=4, num_kv_heads=2,
    laurel_rank=8, hidden_size_per_layer_input=16, vocab_size_per_layer_input=256,
    # the same sizes under other names (GPT-2 / BART / OPT style configs)
    d_model=64, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_ctx=64, num_layers=2,
    num_heads=4, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4,
    encoder_attention_heads=4, decoder_ffn_dim=128, encoder_ffn_dim=128, ffn_dim=128,
    word_embed_proj_dim=64, embedding_size=64,
)
# Per-layer lists: keep num_hidden_layers entries that cover the distinct kinds where possible.
_PER_LAYER = ("layer_types", "mlp_layer_types", "no_rope_layers", "layers_block_type",
              "indexer_types", "layer_rope_theta", "attn_layers", "attention_layers")


def _covering(values: list, n: int) -> list:
    """n entries of a per-layer list, each distinct value of it at least once while n allows."""
    firsts = [i for i, v in enumerate(values) if v not in values[:i]]
    rest = [i for i in range(len(values)) if i not in firsts]
    keep = sorted(firsts[:n] + rest[:max(0, n - len(firsts))])
    return [values[i] for i in keep[:n]]


def tiny_config_kwargs(model_type: str) -> dict:
    """`small_config_kwargs` plus every other size key this type's default config has, shrunk.

    For the census of every causal LM type (tools/census.py) and the family tests: a type's
    default config may hold 512 experts or 256-wide heads, which `small_config_kwargs` leaves.
    """
    kw = small_config_kwargs(model_type)
    default = _transformers().AutoConfig.for_model(model_type).to_dict()
    for key, value in _TINY.items():
        # head_dim=None means hidden / heads, which some families then fail to compute
        present = isinstance(default.get(key), int) or key == "head_dim" and key in default
        if present and key not in kw:
            kw[key] = value
    for key, value in default.items():  # dropout would make a compiled step differ from eager
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key or "layerdrop" in key) and key not in kw:
            kw[key] = 0.0
    if "kv_lora_rank" in default and default.get("num_key_value_heads") == default.get("num_attention_heads"):
        # multi-head latent attention expands one latent KV to every query head: its configs
        # have as many KV heads as heads, and some attentions (AXK-2's) fail with fewer
        kw["num_key_value_heads"] = kw.get("num_attention_heads", default.get("num_attention_heads"))
    if "qk_rope_head_dim" in kw and default.get("head_dim") == default.get("qk_rope_head_dim"):
        # the rotary tables of such configs are sized by head_dim: keep it the rotated width
        kw["head_dim"] = kw["qk_rope_head_dim"]
    layers = kw["num_hidden_layers"]
    for key in _PER_LAYER:
        if isinstance(default.get(key), list) and len(default[key]) >= layers:
            kw[key] = _covering(default[key], layers)
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
