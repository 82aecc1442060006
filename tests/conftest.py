"""Shared test set-up.

Triton decides at import time whether `@triton.jit` kernels run in its interpreter, so the whole
session imports triton with TRITON_INTERPRET=1 (CI has no GPU).  Which path an op takes on CPU is
decided per call (ligerfx.kernels.runtime.use_triton), so the `kernel_path` fixture switches
between the plain torch implementation and the interpreted Triton kernels inside one session.
"""

import os

import torch  # noqa: E402

# Interpreted kernels on a CPU-only machine; on a CUDA machine the kernels are compiled for the GPU
# (the `pytest -m cuda` suite; tests/kernels/conftest.py skips the interpreter path there).
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import importlib  # noqa: E402
import pkgutil  # noqa: E402

import pytest  # noqa: E402

import ligerfx.kernels  # noqa: E402

# Import every kernel module now, while TRITON_INTERPRET=1: a module first imported inside a test
# that switched to the torch path would decorate its kernels for a GPU driver that is not here.
for _m in pkgutil.iter_modules(ligerfx.kernels.__path__):
    importlib.import_module(f"ligerfx.kernels.{_m.name}")


from tests.tiers import is_slow, load  # noqa: E402

_SLOW = load()


def pytest_collection_modifyitems(config, items):
    """The quick tier: tests listed in tests/slow_tests.txt are `slow` too (tests/tiers.py)."""
    for item in items:
        if is_slow(item.nodeid, _SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=["torch", "triton"])
def kernel_path(request, monkeypatch):
    """Run the test once on the torch path and once on the interpreted Triton kernels."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "triton" else "0")
    return request.param


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "triton"


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    return "torch"


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield


@pytest.fixture
def names():
    """Names of patterns a test registers (it appends them); removed afterwards whatever happens."""
    from ligerfx.compiler.pattern import REGISTRY

    registered: list[str] = []
    yield registered
    for n in registered:
        REGISTRY.remove(n)
