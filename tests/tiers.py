"""The quick tier: which tests `pytest -m "not slow"` leaves out (tests/slow_tests.txt).

`load()` reads the list for tests/conftest.py, which marks the listed tests `slow`.  Run as a script
on the output of a full run with `--durations=0` to choose the list again:

    python -m pytest -q -n 2 --dist loadfile --durations=0 > full.log
    python tests/tiers.py full.log [--budget 300] > tests/slow_tests.txt.new

It marks the slowest tests until the rest take about `--budget` seconds of test time, keeping the
cheapest test of every file (so the quick tier still imports and runs every module; a test that
shares work with others of its file, a module-scoped fixture or a cached helper, is slow with
them), and writes a test's id without its parameters when every parametrization of it is slow.
"""

from __future__ import annotations

import ast
import collections
import os
import re
import sys
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
LIST = os.path.join(HERE, "slow_tests.txt")
_DURATION = re.compile(r"^([0-9.]+)s (?:call|setup|teardown)\s+(\S+)")


def _func(nodeid: str) -> str:
    """The test function a node id names: `tests/x.py::test_y[p]` -> `test_y`."""
    return nodeid.split("::")[-1].split("[", 1)[0]


def _file(nodeid: str) -> str:
    return nodeid.split("::")[0]


def load(path: str = LIST) -> frozenset[str]:
    with open(path, encoding="utf-8") as f:
        return frozenset(line.strip() for line in f if line.strip() and not line.startswith("#"))


def is_slow(nodeid: str, listed: frozenset[str]) -> bool:
    return nodeid in listed or nodeid.split("[", 1)[0] in listed


class Facts(NamedTuple):
    marked_slow: bool  # its own source marks it slow (decorator, class or module `pytestmark`)
    shares_work: bool  # it requests a module-scoped fixture or calls a cached module helper


def read_tests(path: str) -> dict[str, Facts]:
    """Test function (or `Class::method`) of a file -> what its source says of it.

    Sharing work: keeping such a test in the quick tier keeps the work (a module-scoped fixture's
    set-up, a `functools.lru_cache` / `cache` helper's first call), whichever test paid for it in
    the full run."""
    try:
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
    except OSError:
        return {}

    def slow_mark(node: ast.AST) -> bool:
        text = ast.unparse(node)
        return "slow" in text and "mark" in text

    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    fixtures = {n.name for n in defs if any("fixture" in ast.unparse(d) and "module" in
                                            ast.unparse(d) for d in n.decorator_list)}
    cached = {n.name for n in defs if any("cache" in ast.unparse(d) for d in n.decorator_list)}
    module_slow = any(isinstance(n, ast.Assign) and slow_mark(n.value)
                      and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                      for n in tree.body)

    def facts(fn: ast.FunctionDef, marks: list) -> Facts:
        called = {x.id for x in ast.walk(fn) if isinstance(x, ast.Name)}
        return Facts(module_slow or any(map(slow_mark, marks + fn.decorator_list)),
                         bool(fixtures & {a.arg for a in fn.args.args} or cached & called))

    out = {}
    for n in tree.body:
        if isinstance(n, ast.FunctionDef) and n.name.startswith("test"):
            out[n.name] = facts(n, [])
        elif isinstance(n, ast.ClassDef) and n.name.startswith("Test"):
            out.update({f"{n.name}::{m.name}": facts(m, n.decorator_list) for m in n.body
                        if isinstance(m, ast.FunctionDef) and m.name.startswith("test")})
    return out


def choose(log_lines, budget: float) -> list[str]:
    times: collections.Counter = collections.Counter()
    setups: collections.Counter = collections.Counter()
    for line in log_lines:
        m = _DURATION.match(line)
        if m:
            times[m.group(2)] += float(m.group(1))
            if " setup " in line:
                f = _file(m.group(2))
                setups[f] = max(setups[f], float(m.group(1)))
    by_file = collections.defaultdict(list)
    for nid in times:
        by_file[_file(nid)].append(nid)
    keep, sharing = set(), {}
    for f, ids in by_file.items():
        funcs = {name: t.shares_work for name, t in
                 read_tests(os.path.join(os.path.dirname(HERE), f)).items()}
        # a test too fast for --durations to list costs nothing (and is never marked)
        seen = {_func(nid) for nid in ids}
        candidates = list(ids) + [f"{f}::{name}" for name in funcs if name not in seen]

        # what a test that shares work pays when kept alone: the set-up of the file's fixtures,
        # or the dearest sharing test's time (it paid the cached helper's work)
        shared = max([setups[f]] + [times[n] for n in ids if funcs.get(_func(n))])

        def cost(nid, funcs=funcs, shared=shared):
            return times.get(nid, 0.0) + (shared if funcs.get(_func(nid)) else 0.0)

        kept = min(candidates, key=cost)
        keep.add(kept)
        if not funcs.get(_func(kept)):
            sharing[f] = {name for name, shares in funcs.items() if shares}
    remaining, slow = sum(times.values()), set()
    for nid, t in sorted(times.items(), key=lambda x: -x[1]):
        if remaining <= budget:
            break
        if nid not in keep:
            slow.add(nid)
            remaining -= t
    forced = set()  # whole test functions, parameters and all
    # where the kept test shares no work and a test that shares it is slow, every test sharing
    # it is: any of them left would pay for that work again
    for f, names in sharing.items():
        if any(_file(nid) == f and _func(nid) in names for nid in slow):
            slow = {nid for nid in slow if _file(nid) != f or _func(nid) not in names}
            forced |= {f"{f}::{name}" for name in names}
    params = collections.defaultdict(set)
    for nid in times:
        params[nid.split("[", 1)[0]].add(nid)
    out = set()
    for func, ids in params.items():
        mine = ids & slow
        out |= {func} if mine == ids and len(ids) > 1 else mine
    return sorted(out | forced)


def main(argv: list[str]) -> None:
    budget = float(argv[argv.index("--budget") + 1]) if "--budget" in argv else 300.0
    with open(argv[0], encoding="utf-8") as f:
        ids = choose(f, budget)
    with open(LIST, encoding="utf-8") as f:
        header = [line for line in f if line.startswith("#")]
    sys.stdout.write("".join(header) + "\n".join(ids) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
