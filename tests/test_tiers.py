"""The quick tier stays honest: tests/slow_tests.txt names tests that exist, and every test file
keeps at least one test outside the slow tier, so `pytest -m "not slow"` still runs every module."""

from __future__ import annotations

import os

from tests.tiers import HERE, load, n_slices, read_tests

ROOT = os.path.dirname(HERE)


def _tests(path: str) -> dict[str, bool]:
    """Test function (or Class::method) -> whether its own source marks it slow."""
    return {name: t.marked_slow for name, t in read_tests(path).items()}


def _test_files() -> list[str]:
    files = []
    for dirpath, dirs, names in os.walk(HERE):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", "cuda")]  # cuda: GPU-only suite
        files += [os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/")
                  for f in names if f.startswith("test_") and f.endswith(".py")]
    return sorted(files)


def test_every_listed_test_exists():
    stale = []
    for entry in load():
        path, _, name = entry.split("[", 1)[0].partition("::")
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full) or name not in _tests(full):
            stale.append(entry)
    assert not stale, ("tests/slow_tests.txt names tests that no longer exist (rerun "
                       "tests/tiers.py):\n" + "\n".join(sorted(stale)))


def test_every_test_file_has_a_quick_test():
    listed = load()
    bare = [f for f in _test_files()
            if all(slow or f"{f}::{name}" in listed for name, slow in _tests(
                os.path.join(ROOT, f)).items())]
    assert not bare, "test files with no test left in the quick tier:\n" + "\n".join(bare)


def test_the_guards_see_a_problem(tmp_path):
    p = tmp_path / "test_x.py"
    p.write_text("import pytest\n\n@pytest.mark.slow\ndef test_a():\n    pass\n\n"
                 "def test_b():\n    pass\n\nclass TestC:\n    def test_d(self):\n        pass\n")
    assert _tests(str(p)) == {"test_a": True, "test_b": False, "TestC::test_d": False}


def test_work_shared_through_a_cached_helper_goes_slow_together():
    """test_families' two per-family tests share `_step` (lru_cache): in the full run the first
    pays for the step, the second looks cheap.  Marking only the first would leave the second to
    pay it in the quick tier, so both go, and the file keeps a test that shares nothing."""
    from tests.tiers import choose

    f = "tests/test_families.py"
    log = [f"10.00s call     {f}::test_family_rewritten_and_eager_equal[llama3]",
           f"0.10s call     {f}::test_family_residual_adds_fused[llama3]",
           f"0.02s call     {f}::test_site_rule_counts_what_is_missing_and_what_is_extra"]
    assert choose(log, budget=1.0)[0] == [f"{f}::test_family_residual_adds_fused",
                                       f"{f}::test_family_rewritten_and_eager_equal"]


def test_slices_are_dealt_evenly_and_parametrized_tests_spread_by_parameter(tmp_path):
    from tests.tiers import BY_PARAMETER, deal, load, slice_of

    f = "tests/test_x.py"
    times = {f"{f}::test_a": 9.0, f"{f}::test_b": 5.0, f"{f}::test_c": 4.0,
             f"{f}::test_p[1]": 1.0, f"{f}::test_p[2]": 1.0}
    where = deal([f"{f}::test_a", f"{f}::test_b", f"{f}::test_c", f"{f}::test_p"], times, 2)
    assert where[f"{f}::test_p"] == BY_PARAMETER
    assert where[f"{f}::test_b"] == where[f"{f}::test_c"] != where[f"{f}::test_a"]
    listed = tmp_path / "slow.txt"
    listed.write_text("# header\n[slice by parameter]\ntests/test_x.py::test_p\n"
                      "[slice 0]\ntests/test_x.py::test_a\n[slice 1]\ntests/test_x.py::test_b\n")
    got = load(str(listed))
    assert got == {f"{f}::test_p": BY_PARAMETER, f"{f}::test_a": 0, f"{f}::test_b": 1}
    assert slice_of(f"{f}::test_b", got) == 1 and slice_of(f"{f}::test_a", got) == 0
    # one parametrization of two functions of a file: the same slice (they may share its work)
    assert slice_of(f"{f}::test_p[7]", got) == slice_of(f"{f}::test_q[7]", got)
    assert {slice_of(f"{f}::test_p[{i}]", got) for i in range(20)} == {0, 1}


def test_a_run_without_m_keeps_one_slice():
    """`pytest --collect-only` with a slice keeps every quick test and only that slice's slow
    tests; `--slow-slice=all`, or files named with the default `auto`, keep them all."""
    import subprocess
    import sys

    def collected(*args):
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                              "-p", "no:randomly", "tests/test_tiers.py", "tests/test_families.py",
                              *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
        return {line for line in out.stdout.splitlines() if "::" in line}

    every = collected("--slow-slice=all")
    quick = collected("-m", "not slow")
    slices = [collected(f"--slow-slice={k}") for k in range(n_slices(load()))]
    assert quick < every and all(quick <= s <= every for s in slices)
    assert set().union(*slices) == every
    assert collected() == every  # files named on the command line: all their tests
    assert sum(len(s - quick) for s in slices) == len(every - quick)  # each slow test once


def test_a_test_marked_slow_in_its_file_is_not_the_files_quick_test():
    """The regression: test_soundness_rounding's cheapest test (XLM's, 4.8 s) is marked slow in
    its own file, so keeping it left the file with nothing in the quick tier."""
    from tests.tiers import choose

    f = "tests/test_soundness_rounding.py"
    log = [f"5.61s call     {f}::test_diffllama_lambda_gradients_are_fp32_rounding",
           f"4.81s call     {f}::test_xlm_key_bias_gradient_is_zero_in_exact_math"]
    assert choose(log, budget=0.0)[0] == [f"{f}::test_xlm_key_bias_gradient_is_zero_in_exact_math"]
