"""Compression outside the compiler: the eager `quantize_` / `sparsify_` / `prune_` APIs, the packed weight
formats and their cache, and the schemes both accept.  Imports the kernels, nothing of ligerfx."""
