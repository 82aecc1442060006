"""Post-training code as TRL writes it, shared by the log-prob pattern and post-training tests."""

import torch
import torch.nn.functional as F


def entropy_from_logits(logits, chunk_size=16):
    """TRL trainer/utils.py: the entropy over chunks of the flattened rows, concatenated back."""
    flat = logits.reshape(-1, logits.shape[-1])
    ents = []
    for chunk in flat.split(chunk_size, dim=0):
        logps = F.log_softmax(chunk, dim=-1)
        ents.append(-(torch.exp(logps) * logps).sum(-1))
    return torch.cat(ents, dim=0).reshape(logits.shape[:-1])
