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

# Translation validation on for the whole suite (issue 22 §2): every rewrite any test makes is also
# run as the code it replaced, on the test's own values, on the first call; one that is not within
# eager's rounding fails the test (ValidationError) even where the test did not expect a rewrite.
# Tests of validation itself pass `validate=` explicitly.  LIGERFX_VALIDATE=0 turns it off (e.g. to
# time the suite without it); subprocesses the tests start inherit it.
os.environ.setdefault("LIGERFX_VALIDATE", "raise")

import importlib  # noqa: E402
import pkgutil  # noqa: E402

import pytest  # noqa: E402

import ligerfx.kernels  # noqa: E402

# Import every kernel module now, while TRITON_INTERPRET=1: a module first imported inside a test
# that switched to the torch path would decorate its kernels for a GPU driver that is not here.
for _m in pkgutil.iter_modules(ligerfx.kernels.__path__):
    importlib.import_module(f"ligerfx.kernels.{_m.name}")


from tests.tiers import is_slow, load, n_slices, slice_of  # noqa: E402

_SLOW = load()


def pytest_addoption(parser):
    parser.addoption(
        "--slow-slice", default="auto",
        help="which slow tests a run with no -m keeps: 'auto' (the default: with no paths "
             "given, the slice of tests/slow_tests.txt that the commit's hash picks, so each "
             "runs every few commits, also in a shallow clone; with paths given, all their "
             "tests), a number K, 'all' (the whole suite) or 'none' (the quick tier)")


def _commit_number() -> int:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=30, cwd=os.path.dirname(__file__))
        return int(out.stdout.strip()[:12], 16)
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0  # not a git checkout: the first slice


def _slice(config) -> int | None:
    """The slow slice this run keeps; None: all of them (or -m decides)."""
    want = config.getoption("--slow-slice")
    if config.getoption("-m") or want == "all":
        return None
    if want == "auto" and config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return None  # files or tests named on the command line: all of them
    n = n_slices(_SLOW)
    if want == "none":
        return -1
    if want == "auto":
        return _commit_number() % n
    if not want.isdigit() or int(want) >= n:
        raise pytest.UsageError(f"--slow-slice={want}: give auto, all, none or a slice 0..{n - 1}")
    return int(want)


def pytest_report_header(config):
    k, n = _slice(config), n_slices(_SLOW)
    if k is None:
        return None
    what = "none" if k < 0 else f"slice {k} of {n}"
    return (f"slow tests: {what} (tests/slow_tests.txt; --slow-slice=all runs the whole suite, "
            "-m 'not slow' the quick tier)")


def pytest_terminal_summary(terminalreporter, config):
    line = pytest_report_header(config)  # also under -q, so a CI log says which slice ran
    if line:
        terminalreporter.write_line(line)


def pytest_collection_modifyitems(config, items):
    """The tiers: tests listed in tests/slow_tests.txt are `slow` too, and a run with no -m keeps
    the quick tier plus one slice of the slow tests (tests/tiers.py)."""
    for item in items:
        if is_slow(item.nodeid, _SLOW):
            item.add_marker(pytest.mark.slow)
    k = _slice(config)
    if k is None:
        return
    keep, drop = [], []
    for item in items:
        slow = item.get_closest_marker("slow") is not None
        (drop if slow and slice_of(item.nodeid, _SLOW) != k else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


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
