"""The CUDA suite (`pytest -m cuda`): every test here needs a CUDA device and skips without one.

Kernel tests run at model sizes and in fp16 too (the tests in tests/kernels run on CUDA through
their `kernel_path`/`triton_path` fixtures' "cuda" value); model tests compile with
inner="inductor" on the GPU.  CUDA is the default device inside each test.
"""

import pytest
import torch

import ligerfx.kernels.rms_norm as _rms


def pytest_collection_modifyitems(config, items):
    here = str(config.rootpath / "tests" / "cuda")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(autouse=True)
def _on_cuda(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (the cuda tests run with `pytest -m cuda` on a GPU)")
    if type(_rms._rms_fwd_fused_kernel).__name__ == "InterpretedFunction":
        pytest.skip("triton was imported with TRITON_INTERPRET=1; run `pytest -m cuda` without it")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.set_default_device("cuda")
    yield
    torch.set_default_device(None)
