"""Kernel tests also run on a CUDA device: `pytest -m cuda` (skipped where there is none).

The `kernel_path` and `triton_path` fixtures of tests/conftest.py gain a "cuda" value.  It makes
CUDA the default device for the test (`torch.set_default_device`), so the same test body, with its
float64 references and poisoned buffers, runs the compiled kernels on the GPU: one home for each
test.  On a machine with CUDA the session imports triton without the interpreter
(tests/conftest.py), so the interpreter values skip there.
"""

import pytest
import torch

from ligerfx.kernels import rms_norm as _any_kernel_module

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = type(_any_kernel_module._rms_fwd_fused_kernel).__name__ == "InterpretedFunction"
CUDA = pytest.param("cuda", marks=pytest.mark.cuda)


def _use(path, monkeypatch):
    if path == "cuda":
        if not HAS_CUDA:
            pytest.skip("no CUDA device (the cuda tests run with `pytest -m cuda` on a GPU)")
        if INTERPRETED:
            pytest.skip("triton was imported with TRITON_INTERPRET=1; run the cuda tests in a "
                        "session without it (`pytest -m cuda` sets nothing else)")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        torch.set_default_device("cuda")
        return
    if path == "triton" and not INTERPRETED:
        pytest.skip("this session compiles the kernels for the GPU; the interpreter path needs "
                    "TRITON_INTERPRET=1 before triton is imported")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "triton" else "0")


@pytest.fixture(params=["torch", "triton", CUDA])
def kernel_path(request, monkeypatch):
    """The torch path, the interpreted Triton kernels, and (with a GPU) the compiled kernels."""
    _use(request.param, monkeypatch)
    yield request.param
    torch.set_default_device(None)


@pytest.fixture(params=["triton", CUDA])
def triton_path(request, monkeypatch):
    """The Triton kernels: interpreted on the CPU, and compiled on a GPU when there is one."""
    _use(request.param, monkeypatch)
    yield "triton"
    torch.set_default_device(None)
