"""Activation checkpointing that Dynamo could not trace: say so in the report.

When Dynamo cannot trace the code under `torch.utils.checkpoint.checkpoint` as one higher-order
op (transformers' decoder layers set the hub-kernel context variable there, a Python side effect
that eager checkpointing would replay in the backward's recompute), it breaks the graph and runs
the checkpointed code eagerly: no backend ever sees it, so no pattern can rewrite or report it.
The one trace of that is Dynamo's graph-break counters, keyed by the reason; a reason that names
checkpointing, new since the backend last looked, becomes a near miss of the graph compiled next
(where Dynamo compiles no graph at all after it, only compile_in_place's warning is left).

ligerfx does not set `torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint`
itself, although with it Dynamo traces such a layer as a checkpoint op whose body the pattern pass
rewrites (compiler/hop.py): the flag is process-wide, reaches every model compiled in the process
with any backend, and makes compiled checkpointing skip replaying the forward's Python side
effects in the backward, an accepted divergence from eager (harmless for transformers' context
variable, not for code whose recompute reads state the forward changed: a counter, a cache).
Changing what the user's program means is not ligerfx's to decide; the near miss names the flag.
"""

from __future__ import annotations

from .compiler.report import NearMiss
from .graph.source import Location

FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"
_seen = 0  # checkpoint graph breaks already reported (Dynamo's counter is process-wide)


def _count() -> int:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001 - a torch without the counters: nothing to say
        return 0
    # "graph_break": a break Dynamo resumed after (transformers' layers); "unimplemented": one
    # that made it skip the whole frame (a break inside a loop over the layers)
    return sum(n for kind in ("graph_break", "unimplemented")
               for reason, n in counters.get(kind, {}).items()
               if "checkpoint" in str(reason).lower())


def graph_break_misses() -> list:
    """A near miss when Dynamo broke the graph under torch.utils.checkpoint since the last call."""
    global _seen
    now = _count()
    new, _seen = now - _seen, now
    if new <= 0:  # none, or the counters were cleared
        return []
    import torch

    fix = (f"set `torch._dynamo.config.{FLAG} = True` before compiling (Dynamo then traces the "
           "checkpointed layer as one op and ligerfx rewrites inside it; the forward's Python "
           "side effects are then not replayed in the backward's recompute)"
           if hasattr(torch._dynamo.config, FLAG) else
           "turn gradient checkpointing off (this torch has no option to trace it)")
    return [NearMiss("activation_checkpointing", Location(), (
        "Dynamo could not trace code under torch.utils.checkpoint (a side effect or untraceable "
        "code in the checkpointed function; TORCH_LOGS=graph_breaks shows it): it broke the "
        "graph there or skipped the frame, so that code ran eagerly and no pattern "
        f"was searched in it; to fuse it, {fix}, or turn gradient checkpointing off"))]
