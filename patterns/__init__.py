"""Built-in rewrite patterns (installed as ligerfx.patterns).

Each module registers one pattern family through `ligerfx.pattern.register`, the same path users'
patterns take.  Importing this package registers them all.
"""


from . import cross_entropy, gated_act, layer_norm, rms_norm, rope  # noqa: F401
from . import logprob  # noqa: F401
