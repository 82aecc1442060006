"""Model zoo for the pattern tests: tiny Hugging Face models and hand-written models.

    model, inputs = hf_model("llama")            # loss = model(**inputs).loss
    model, args, counts = HANDWRITTEN["nanogpt"]()  # out = model(*args)

See README.md for what each model exercises and what tracing showed.
"""

from .handwritten import HANDWRITTEN, LN_VARIANTS, MODELS, NEGATIVE, RMS_VARIANTS
from .hf import HF_MODELS, MAIN_HF_MODELS, build, expected_counts


def hf_model(name: str, **overrides):
    """(model, inputs dict) for the tiny HF model `name`; overrides go to its config."""
    return build(name, **overrides)


__all__ = ["HANDWRITTEN", "HF_MODELS", "LN_VARIANTS", "MAIN_HF_MODELS", "MODELS", "NEGATIVE",
           "RMS_VARIANTS", "expected_counts", "hf_model"]
