"""The package `ligerfx.patterns`: the built-in rewrite patterns.

This file is the package's __init__ under another name (ligerfx/_imports.py says why).

Each module registers one pattern family through `ligerfx.compiler.pattern.register`, the same path users'
patterns take.  Importing this package registers them all.
"""


from . import add_norm, cross_entropy, distillation, gated_act, layer_norm, rms_norm, rope  # noqa: F401
from . import gated_rms_norm  # noqa: F401 - after rms_norm, whose variants it extends
from . import logprob  # noqa: F401
from . import clamped_glu  # noqa: F401
# detectors: a subgraph of a family that no pattern above rewrote or reported (issue 23)
from . import gated_detect, logprob_detect, loss_detect, norm_detect, rope_detect  # noqa: F401
