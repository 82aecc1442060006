"""Architectures no pattern was written against: every norm, every attention's RoPE and the loss
are still found (by the math), and a training step still equals eager."""

import pytest
import torch.nn as nn

from ligerfx.dump.hf_targets import build
from tests.compare import compare_training_step

pytest.importorskip("transformers")


def _norm_modules(model) -> int:
    # Test oracle only (the compiler never looks at names): modules that are norms.
    return sum(1 for m in model.modules()
               if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith(
                   ("RMSNorm", "LayerNorm")) and not any(True for _ in m.children()))


@pytest.mark.parametrize("model_type", ["qwen3", "olmo2", "granite", "cohere", "starcoder2",
                                        "falcon", "phi", "glm"])
def test_unseen_architecture(model_type):
    model, _, inputs = build(model_type)
    n_norms = _norm_modules(model)
    layers = model.config.num_hidden_layers
    report = compare_training_step(model, inputs)
    counts = report.counts
    assert sum(counts.get(k, 0) for k in ("rms_norm", "layer_norm", "add_rms_norm",
                                          "add_layer_norm")) == n_norms, counts
    assert counts.get("rope", 0) == layers, counts
    assert counts.get("fused_linear_cross_entropy", 0) == 1, counts
    assert not report.near_misses, [str(m) for m in report.near_misses]


def test_gpt_fast_style(kernel_path):
    from tests.models.gpt_fast import make_gpt_fast

    model, args, expected = make_gpt_fast()
    report = compare_training_step(model, args)
    assert report.counts == expected
    assert not report.near_misses, [str(m) for m in report.near_misses]
