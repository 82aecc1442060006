"""Hypothesis profile of the differential suite: derandomized (a fixed seed), a CI-sized example
count, no deadline (a compile takes a second).  LIGERFX_DIFF_EXAMPLES overrides the count."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ligerfx-differential",
    derandomize=True,
    max_examples=int(os.environ.get("LIGERFX_DIFF_EXAMPLES", "8")),
    deadline=None,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
settings.load_profile("ligerfx-differential")
