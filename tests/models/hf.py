"""Tiny Hugging Face causal LMs built from configs (no downloads), with their expected structure.

`build(name, **config_overrides)` returns a seeded fp32 model in train mode and its inputs
(input_ids [2, 16] and labels, so the forward returns `.loss`).  `HF_MODELS[name]["counts"]` says
how many of each rewritable structure one forward contains; the counts are derived from the
config by each architecture's rules (see `expected_counts`), not from tracing, and
tests/test_model_zoo.py checks them against the built modules and Dynamo's graph.

transformers is imported lazily so importing the registry is cheap.
"""

from __future__ import annotations

import torch

from ligerfx.dump.hf_targets import small_config_kwargs

# Every model: hidden 64, 2 layers, 4 heads of 16, intermediate 128, vocab 256, no KV cache.
# The configs are the package's own tiny ones (also behind `ligerfx dump hf:TYPE`), so the zoo
# and the CLI build the same models; the specs below add the family rules the tests check.

# family rules: norm kind and count per layer, gated-MLP kind, nn.Linear modules per layer;
# adds_per_layer: norms reading a residual add `h = x + residual` (add_rms_norm / add_layer_norm),
# per layer: 2 in a sequential pre-norm decoder (the MLP's pre-norm, and the next layer's input
# norm or the final norm; the first input norm reads the embeddings), 1 with a parallel residual.
_SPECS = {
    "llama": dict(cls="Llama", norm="rms", norms_per_layer=2, mlp="swiglu",
                  linears_per_layer=7),
    "mistral": dict(cls="Mistral", norm="rms",
                    norms_per_layer=2, mlp="swiglu", linears_per_layer=7),
    "qwen2": dict(cls="Qwen2", norm="rms", norms_per_layer=2, mlp="swiglu",
                  linears_per_layer=7, features=dict(qkv_bias=True)),
    "gemma": dict(cls="Gemma", norm="rms", norms_per_layer=2, mlp="geglu", linears_per_layer=7,
                  features=dict(rms_norm_offset=1.0, tied_embeddings=True, embed_scale=True)),
    # Gemma2 keeps its default softcapping (attn 50, final logits 30): both trace in one graph.
    # Softcapping rules out SDPA, so it runs eager attention.
    "gemma2": dict(cls="Gemma2",
                   norm="rms", norms_per_layer=4, mlp="geglu", linears_per_layer=7,
                   features=dict(rms_norm_offset=1.0, tied_embeddings=True, embed_scale=True,
                                 final_logit_softcapping=30.0, attn_logit_softcapping=50.0)),
    # Phi3: fused qkv_proj and gate_up_proj (gate, up = chunk(2)); full rotary.
    "phi3": dict(cls="Phi3", norm="rms", norms_per_layer=2, mlp="swiglu",
                 linears_per_layer=4, features=dict(fused_qkv=True, fused_gate_up=True)),
    # GPT-NeoX: LayerNorm, rotary on the first 25% of each head (4 of 16), parallel residual,
    # plain GELU MLP, no GQA.
    "gpt_neox": dict(cls="GPTNeoX", norm="layer",
                     norms_per_layer=2, mlp=None, linears_per_layer=4,
                     features=dict(partial_rotary_factor=0.25, parallel_residual=True,
                                   fused_qkv=True), adds_per_layer=1),
    # Mixtral: experts are 3-D parameters run through grouped_mm (transformers' default experts
    # implementation), so one act(gate) * up per layer covers all experts; the router uses
    # F.linear on a parameter, not an nn.Linear.
    "mixtral": dict(cls="Mixtral", norm="rms", norms_per_layer=2, mlp="swiglu", linears_per_layer=4,
                    features=dict(moe=True, fused_gate_up=True)),
    # StableLM: LayerNorm, rotary on the first 25% of each head, SwiGLU MLP.
    "stablelm": dict(cls="StableLm", norm="layer", norms_per_layer=2,
                     mlp="swiglu", linears_per_layer=7,
                     features=dict(partial_rotary_factor=0.25)),
}
_CLASS_PREFIX = {name: spec["cls"] for name, spec in _SPECS.items()}


def config_kwargs(name: str, **overrides) -> dict:
    kw = small_config_kwargs(name)
    kw.update(overrides)
    return kw


def expected_counts(name: str, **overrides) -> dict:
    """Occurrences of each pattern in one forward with labels, from the config."""
    spec = _SPECS[name]
    L = config_kwargs(name, **overrides)["num_hidden_layers"]
    norms = spec["norms_per_layer"] * L + 1  # + the final norm
    adds = spec.get("adds_per_layer", 2) * L
    counts = {
        "rms_norm": norms - adds if spec["norm"] == "rms" else 0,
        "layer_norm": norms - adds if spec["norm"] == "layer" else 0,
        "add_rms_norm": adds if spec["norm"] == "rms" else 0,
        "add_layer_norm": adds if spec["norm"] == "layer" else 0,
        "rope": L,  # one q/k rotary application per attention layer
        "swiglu": L if spec["mlp"] == "swiglu" else 0,
        "geglu": L if spec["mlp"] == "geglu" else 0,
        "cross_entropy": 1,
        "fused_linear_cross_entropy": 1,  # lm_head -> (softcap) -> float -> cross_entropy
        "linear": spec["linears_per_layer"] * L + 1,  # + lm_head
    }
    return counts


def _registry() -> dict:
    reg = {}
    for name, spec in _SPECS.items():
        kw = config_kwargs(name)
        reg[name] = dict(
            config_class=spec["cls"] + "Config",
            model_class=spec["cls"] + "ForCausalLM",
            config=kw,
            attn_implementation=kw["attn_implementation"],
            counts=expected_counts(name),
            features=dict(spec.get("features", {})),
        )
    return reg


HF_MODELS = _registry()
MAIN_HF_MODELS = ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "gpt_neox")


def make_inputs(vocab_size: int = 256, batch: int = 2, seq: int = 16, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(3, vocab_size, (batch, seq), generator=gen)
    labels = input_ids.clone()
    labels[0, -3:] = -100  # ignored positions, as padding would produce
    return dict(input_ids=input_ids, labels=labels)


def build(name: str, seed: int = 0, **overrides):
    """(model, inputs) for a tiny HF model; same seed, same weights and inputs."""
    import transformers

    meta = HF_MODELS[name]
    config = getattr(transformers, meta["config_class"])(**config_kwargs(name, **overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, meta["model_class"])(config)
    model.train()
    return model, make_inputs(config.vocab_size, seed=seed)


def tiny_causal_lm(model_type: str, **overrides):
    """(model in train mode, inputs with labels) of any transformers causal-LM type, built from
    `small_config_kwargs`; the test skips when this transformers lacks the type."""
    import pytest

    transformers = pytest.importorskip("transformers")
    kw = small_config_kwargs(model_type)
    kw.update(overrides)
    try:
        config = transformers.AutoConfig.for_model(model_type, **kw)
    except ValueError:
        pytest.skip(f"this transformers has no {model_type}")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(3, 256, (2, 8))
    return model, dict(input_ids=ids, labels=ids)
