"""Hypothesis profile of the differential suite: derandomized (a fixed seed), a CI-sized example
count, no deadline (a compile takes a second).  LIGERFX_DIFF_EXAMPLES overrides the count
(a long run: LIGERFX_DIFF_EXAMPLES=2000 python -m pytest tests/differential -p no:randomly).
LIGERFX_DIFF_SEED=N draws another fixed sequence (a second long run then explores new examples
instead of replaying the first one's).

Every example compiles a module, so hypothesis' default shrinking budget (5 minutes per failure)
would dwarf the suite: it is capped at LIGERFX_DIFF_SHRINK_SECONDS (60) and the first bug found
per family is the one shrunk.  The failure message always holds the generated source."""

import os

from hypothesis import HealthCheck, settings

try:  # no public setting for the shrink time; harmless where the internal name is absent
    from hypothesis.internal.conjecture import engine as _engine

    _engine.MAX_SHRINKING_SECONDS = int(os.environ.get("LIGERFX_DIFF_SHRINK_SECONDS", "60"))
except ImportError:  # pragma: no cover
    pass

settings.register_profile(
    "ligerfx-differential",
    derandomize="LIGERFX_DIFF_SEED" not in os.environ,
    max_examples=int(os.environ.get("LIGERFX_DIFF_EXAMPLES", "8")),
    deadline=None,
    database=None,
    print_blob=False,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
settings.load_profile("ligerfx-differential")
