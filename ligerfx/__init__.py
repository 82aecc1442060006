"""ligerfx: a torch.compile backend that rewrites LLM subgraphs into fused Triton kernels.

    model = torch.compile(model, backend="liger")          # the backend is an entry point
    model = ligerfx.compile(model, inner="aot_eager")       # same, options checked at once
    ligerfx.compile_in_place(model)                         # same, for Trainer / DDP / generate
    print(ligerfx.explain(model, input_ids))                # what it would rewrite, and why not
    ligerfx.register_pattern("my_op", pattern_fn, replacement_fn, example_inputs)  # your own
"""

from . import _imports

_imports.install(__name__, __path__[0])  # before anything imports ligerfx.kernels / .patterns

from .api import register_detector, register_pattern  # noqa: E402
from .backend import liger_backend  # noqa: E402
from .compiler.pattern import PatternError  # noqa: E402
from .compiler.report import Report  # noqa: E402
from .compiling import compile, compile_in_place  # noqa: E402
from .compress.prune import prune_  # noqa: E402
from .compress.quantize import quantize_  # noqa: E402
from .compress.sparsify import sparsify_  # noqa: E402
from .explain import explain  # noqa: E402
from .options import Options, OptionsError  # noqa: E402

__all__ = ["liger_backend", "compile", "compile_in_place", "explain", "Options", "OptionsError", "PatternError", "Report",
           "register_pattern", "register_detector", "quantize_", "sparsify_",
           "prune_"]
__version__ = "0.1.0"
