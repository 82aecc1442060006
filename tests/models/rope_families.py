"""Tiny Hugging Face models of the families whose RoPE is written in its own form (issue 13 §2).

`build(name)` returns (model, inputs dict, expected rope counts) for one family, built from a
config (no downloads), seeded, in train mode, its forward returning `.loss` (or a loss tensor):
- gpt_oss: `chunk(x, 2, -1)` halves, `a * cos - b * sin`, `b * cos + a * sin`, half-width tables;
- deepseek_v3, glm4_moe_lite: `apply_rotary_pos_emb_interleave` (even/odd lanes rotated, written
  as halves) on the rope part of MLA's q/k (split from q / the compressed kv, cat back after);
- nanochat: `rotate_half` as `cat((x2, -x1))`, a rotation by -theta;
- llama4_text: complex form with `freqs_cis[:, :, None, :]` indexed once per tensor;
- deepseek_v4: `repeat_interleave(2)` of half tables inside a function called per tensor (its
  attention output is rotated back by other tables: one `rope_single` per layer);
- qwen2_vl, qwen2_5_vl: the text model alone with 3-D (mrope) position ids: the table is
  assembled from `mrope_section` pieces of three position streams, then rotate_half.
`FAMILIES` lists them; for a family the installed transformers lacks `build` raises
`LookupError` (tests skip on it).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ligerfx.dump.hf_targets import small_config_kwargs

LAYERS = 2
_MLA = dict(qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, q_lora_rank=16,
            kv_lora_rank=16, n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
            first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4)
# model_type -> (config overrides, rope / rope_single per layer)
_CAUSAL = {
    "gpt_oss": (dict(num_local_experts=2, num_experts_per_tok=1, head_dim=16,
                     attn_implementation="eager", sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"]), (1, 0)),
    "deepseek_v3": (_MLA, (1, 0)),
    "glm4_moe_lite": (_MLA, (1, 0)),
    "nanochat": ({}, (1, 0)),
    "llama4_text": ({}, (1, 0)),
    "deepseek_v4": (dict(attn_implementation="eager", head_dim=16, q_lora_rank=16,
                         o_lora_rank=16, o_groups=2, n_routed_experts=2, num_experts_per_tok=1,
                         moe_intermediate_size=16, hc_mult=2, num_key_value_heads=1,
                         layer_types=["sliding_attention"], mlp_layer_types=["moe"],
                         index_n_heads=2, index_head_dim=16), (1, 1)),
}
_MROPE = {"qwen2_vl": ("qwen2_vl", "Qwen2VLTextModel"),
          "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLTextModel")}
FAMILIES = tuple(_CAUSAL) + tuple(_MROPE)
BATCH, SEQ = 2, 8


def _ids(vocab: int = 256, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(3, vocab, (BATCH, SEQ), generator=gen)


class TextLM(nn.Module):
    """A text model (no lm head of its own) with a linear head and a cross-entropy loss."""

    def __init__(self, model, hidden: int, vocab: int):
        super().__init__()
        self.model = model
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, position_ids, labels):
        h = self.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        return F.cross_entropy(self.head(h).flatten(0, 1).float(), labels.flatten())


def _mrope_positions():
    # three position streams (temporal, height, width) that differ, as for an image's tokens
    t = torch.arange(SEQ)
    return torch.stack([t, t // 2, t % 3])[:, None].expand(3, BATCH, SEQ).contiguous()


def build(name: str, seed: int = 0, layers: int = LAYERS):
    """(model, inputs, {"rope": n, "rope_single": m}) for the tiny model of family `name` with
    `layers` decoder layers."""
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name in _MROPE:
            module, cls = _MROPE[name]
            try:
                mod = __import__(f"transformers.models.{module}.modeling_{module}",
                                 fromlist=[cls])
            except ImportError as e:
                raise LookupError(f"transformers has no {name}") from e
            text_cfg = transformers.AutoConfig.for_model(module).text_config.__class__
            kw = small_config_kwargs("qwen2")
            kw.pop("attn_implementation")
            kw["num_hidden_layers"] = layers
            # head_dim 16: 8 angles, in sections of 2 (temporal), 3 (height), 3 (width)
            cfg = text_cfg(**kw, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                      mrope_section=[2, 3, 3]))
            cfg._attn_implementation = "sdpa"
            model = TextLM(getattr(mod, cls)(cfg), cfg.hidden_size, cfg.vocab_size)
            ids = _ids(cfg.vocab_size, seed)
            inputs = dict(input_ids=ids, position_ids=_mrope_positions(), labels=ids)
            per_layer = (1, 0)
        else:
            overrides, per_layer = _CAUSAL[name]
            kw = small_config_kwargs(name)
            kw.update(overrides, num_hidden_layers=layers)
            for key in ("layer_types", "mlp_layer_types"):  # one entry per layer
                if key in kw:
                    kw[key] = (list(kw[key]) * layers)[:layers]
            try:
                cfg = transformers.AutoConfig.for_model(name, **kw)
            except ValueError as e:
                raise LookupError(f"transformers has no {name}") from e
            model = transformers.AutoModelForCausalLM.from_config(cfg)
            ids = _ids(cfg.vocab_size, seed)
            inputs = dict(input_ids=ids, labels=ids)
    model.train()
    return model, inputs, {"rope": per_layer[0] * layers, "rope_single": per_layer[1] * layers}
