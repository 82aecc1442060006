"""The model zoo itself: every model builds, trains a step eagerly, traces in one Dynamo graph,
and contains the structures its expected counts claim.  Also the built-in example model."""

from __future__ import annotations

import collections
import math

import pytest
import torch
import torch.nn as nn

from ligerfx.tools.example_model import ExampleConfig, make_example
from tests.models import (HANDWRITTEN, HF_MODELS, LN_VARIANTS, MODELS, RMS_VARIANTS,
                          hf_model)


def _one_graph(model, *args, **kwargs) -> torch.fx.GraphModule:
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(*args, **kwargs)
    assert ex.graph_break_count == 0, [str(r.reason) for r in ex.break_reasons]
    assert ex.graph_count == 1
    return ex.graphs[0]


def _targets(gm: torch.fx.GraphModule) -> collections.Counter:
    return collections.Counter(
        getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
        if n.op == "call_function")


def _train_step_ok(loss: torch.Tensor, model: nn.Module):
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------
# example model


def test_example_model_trains_and_traces():
    model, ids, labels = make_example()
    cfg = model.cfg
    assert ids.shape == labels.shape == (2, 32)
    assert model(ids).shape == (2, 32, cfg.vocab_size)
    loss = model(ids, labels)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1  # near-uniform at init
    _train_step_ok(loss, model)
    gm = _one_graph(model, ids, labels)
    t = _targets(gm)
    assert t["rsqrt"] == 2 * cfg.n_layers + 1
    assert t["silu"] == cfg.n_layers
    assert t["cross_entropy"] == 1


def test_example_model_deterministic():
    m1, ids1, y1 = make_example(seed=3)
    m2, ids2, y2 = make_example(seed=3)
    m3, ids3, _ = make_example(seed=4)
    assert torch.equal(ids1, ids2) and torch.equal(y1, y2) and not torch.equal(ids1, ids3)
    for (n, a), b, c in zip(m1.state_dict().items(), m2.state_dict().values(),
                            m3.state_dict().values()):
        assert torch.equal(a, b), n
    assert not torch.equal(m1.lm_head.weight, m3.lm_head.weight)


def test_example_model_matches_hf_llama():
    """Same weights in HF Llama give the same loss: checks RoPE layout, GQA and the loss shift."""
    import transformers

    model, ids, labels = make_example()
    cfg: ExampleConfig = model.cfg
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps, use_cache=False,
        max_position_embeddings=cfg.max_seq_len, attn_implementation="sdpa",
        rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_base)))
    names = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head",
             "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
             "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
             "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
             "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}
    state = {}
    for key, value in model.state_dict().items():
        prefix, rest = key.rsplit(".", 1)
        if prefix.startswith("layers."):
            _, i, sub = prefix.split(".", 2)
            prefix = f"model.layers.{i}.{names[sub]}"
        else:
            prefix = names[prefix]
        state[f"{prefix}.{rest}"] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf(input_ids=ids, labels=labels).loss, model(ids, labels))


# ---------------------------------------------------------------------------------------------
# Hugging Face models


def _module_counts(model: nn.Module) -> dict:
    mods = list(model.modules())
    return {
        "rms_norm": sum(type(m).__name__.endswith("RMSNorm") for m in mods),
        "layer_norm": sum(isinstance(m, nn.LayerNorm) for m in mods),
        "rope": sum(type(m).__name__.endswith("Attention") for m in mods),
        "gated": sum(hasattr(m, "gate_proj") or hasattr(m, "gate_up_proj") for m in mods),
        "linear": sum(isinstance(m, nn.Linear) for m in mods),
    }


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_model(name):
    meta = HF_MODELS[name]
    counts, features = meta["counts"], meta["features"]
    model, inputs = hf_model(name)
    cfg = model.config
    assert inputs["input_ids"].shape == inputs["labels"].shape == (2, 16)
    assert cfg._attn_implementation == meta["attn_implementation"]
    _train_step_ok(model(**inputs).loss, model)

    # structure, from the modules
    mc = _module_counts(model)
    for key in ("rms_norm", "layer_norm", "rope", "linear"):
        expected = counts[key] + counts.get(f"add_{key}", 0)  # the norms after a residual add too
        assert mc[key] == expected, (key, mc[key], expected)
    assert mc["gated"] == counts["swiglu"] + counts["geglu"]
    act = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
    if counts["swiglu"]:
        assert act == "silu"
    if counts["geglu"]:
        assert act.startswith("gelu")
    rope = cfg.rope_parameters
    assert rope.get("partial_rotary_factor", 1.0) == features.get("partial_rotary_factor", 1.0)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        assert getattr(cfg, key, None) == features.get(key)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert tied == features.get("tied_embeddings", False)

    # structure, from Dynamo's graph (one graph, no breaks)
    t = _targets(_one_graph(model, **inputs))
    layers = cfg.num_hidden_layers
    assert t["rsqrt"] == counts["rms_norm"] + counts["add_rms_norm"]
    assert t["layer_norm"] == counts["layer_norm"] + counts["add_layer_norm"]
    assert t["neg"] == 2 * counts["rope"]  # rotate_half on q and on k
    assert t["silu"] == counts["swiglu"]
    if counts["geglu"]:
        assert t["gelu"] == counts["geglu"]
    # Mixtral's router is an F.linear on a parameter, not an nn.Linear
    assert t["linear"] == counts["linear"] + (layers if features.get("moe") else 0)
    assert t["cross_entropy"] == counts["cross_entropy"]


def test_hf_build_is_seeded_and_overridable():
    m1, in1 = hf_model("llama")
    m2, in2 = hf_model("llama")
    assert torch.equal(in1["input_ids"], in2["input_ids"])
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    m3, _ = hf_model("llama", num_hidden_layers=3)
    assert len(m3.model.layers) == 3


# ---------------------------------------------------------------------------------------------
# hand-written models


@pytest.mark.parametrize("name", list(HANDWRITTEN))
def test_handwritten_model(name):
    model, args, counts = HANDWRITTEN[name]()
    assert counts and set(counts) <= {"rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm",
                                      "rope", "swiglu", "geglu",
                                      "cross_entropy", "fused_linear_cross_entropy"}
    out = model(*args)
    assert torch.isfinite(out).all()
    _train_step_ok(out if out.dim() == 0 else out.square().mean(), model)
    _one_graph(model, *args)
    # same factory, same model and inputs
    model2, args2, _ = HANDWRITTEN[name]()
    torch.testing.assert_close(model2(*args2), out.detach(), rtol=0, atol=0)


def test_handwritten_full_models_structure():
    _, _, counts = HANDWRITTEN["llama_ref"]()
    t = _targets(_one_graph(*_model_and_args("llama_ref")))
    assert t["rsqrt"] == counts["rms_norm"] + counts["add_rms_norm"]
    assert t["view_as_complex"] == 2 * counts["rope"]
    assert t["silu"] == counts["swiglu"]
    assert t["cross_entropy"] == 1
    for name in ("nanogpt", "nanogpt_nobias"):
        _, _, counts = HANDWRITTEN[name]()
        t = _targets(_one_graph(*_model_and_args(name)))
        assert t["layer_norm"] == counts["layer_norm"] + counts["add_layer_norm"]
        assert t["cross_entropy"] == 1
    assert set(MODELS) == {"nanogpt", "nanogpt_nobias", "llama_ref"}


def _model_and_args(name):
    model, args, _ = HANDWRITTEN[name]()
    return (model, *args)


def test_norm_variants_compute_the_same_function():
    """Each written form is the same math: same seed, same weights, same outputs (fp32)."""
    _, (x,), _ = HANDWRITTEN["rms_pow"]()
    ref = HANDWRITTEN["rms_pow"]()[0](x)
    for name in RMS_VARIANTS:
        if name != "rms_no_weight":
            torch.testing.assert_close(HANDWRITTEN[name]()[0](x), ref, msg=name)
    ref = HANDWRITTEN["ln_nn_module"]()[0](x)
    for name in LN_VARIANTS:
        if name not in ("ln_no_affine", "ln_no_bias"):
            torch.testing.assert_close(HANDWRITTEN[name]()[0](x), ref, msg=name)
