"""Built-in rewrite patterns (installed as ligerfx.patterns).

Each module registers one pattern family through `ligerfx.pattern.register`, the same path users'
patterns take.  Importing this package registers them all.
"""


from . import add_norm, cross_entropy, distillation, gated_act, layer_norm, rms_norm, rope  # noqa: F401
from . import gated_rms_norm  # noqa: F401 - after rms_norm, whose variants it extends
from . import logprob  # noqa: F401
