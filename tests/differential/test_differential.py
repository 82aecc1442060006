"""The differential suite: generated modules of every pattern family through the oracle.

CI runs a small fixed-seed sample per family (the profile in tests/differential/conftest.py);
a long run, e.g. 2000 examples per family:
    LIGERFX_DIFF_EXAMPLES=2000 python -m pytest tests/differential -p no:randomly
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.differential import gen_gated, gen_layer_norm, gen_loss, gen_rms_norm, gen_rope
from tests.differential.oracle import check

FAMILIES = {"rms_norm": gen_rms_norm, "layer_norm": gen_layer_norm, "rope": gen_rope,
            "gated": gen_gated, "loss": gen_loss}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family(family):
    @given(case=FAMILIES[family].cases(), seed=st.integers(0, 2**20))
    def run(case, seed):
        check(case, seed)

    run()
