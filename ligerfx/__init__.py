"""ligerfx: a torch.compile backend that rewrites LLM subgraphs into fused Triton kernels."""
