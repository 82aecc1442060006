"""ligerfx: a torch.compile backend that rewrites LLM subgraphs into fused Triton kernels.

    model = torch.compile(model, backend="liger")          # the backend is an entry point
    model = ligerfx.compile(model, inner="aot_eager")       # same, options checked at once
    ligerfx.compile_in_place(model)                         # same, for Trainer / DDP / generate
    print(ligerfx.explain(model, input_ids))                # what it would rewrite, and why not
    ligerfx.register_pattern("my_op", pattern_fn, replacement_fn, example_inputs)  # your own
"""

from .api import register_pattern
from .backend import liger_backend
from .compiling import compile
from .explain import explain
from .integrations import compile_in_place
from .options import Options, OptionsError
from .pattern import PatternError
from .quantize import quantize_
from .report import Report
from .sparsify import sparsify_

__all__ = ["liger_backend", "compile", "compile_in_place", "explain", "Options", "OptionsError", "PatternError", "Report",
           "register_pattern", "quantize_", "sparsify_"]
__version__ = "0.1.0"
