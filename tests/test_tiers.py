"""The quick tier stays honest: tests/slow_tests.txt names tests that exist, and every test file
keeps at least one test outside the slow tier, so `pytest -m "not slow"` still runs every module."""

from __future__ import annotations

import os

from tests.tiers import HERE, load, read_tests

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
    assert choose(log, budget=1.0) == [f"{f}::test_family_residual_adds_fused",
                                       f"{f}::test_family_rewritten_and_eager_equal"]
