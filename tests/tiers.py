"""The tiers: which tests `pytest -m "not slow"` leaves out, and the slices of those that each
CI run adds (tests/slow_tests.txt).

`load()` reads the list for tests/conftest.py, which marks the listed tests `slow` and, on a run
with no `-m`, keeps one slice of them (`--slow-slice`, by default the commit count modulo the
number of slices, so every slow test runs every few commits).  Run as a script on the output of a
full run with `--durations=0` to choose the list and its slices again:

    python -m pytest -q -n 2 --dist loadfile --slow-slice=all --durations=0 > full.log
    python tests/tiers.py full.log [--budget 900] [--slices 4] > tests/slow_tests.txt.new

It marks the slowest tests until the rest take about `--budget` seconds of test time, keeping the
cheapest test of every file (so the quick tier still imports and runs every module; a test that
shares work with others of its file, a module-scoped fixture or a cached helper, is slow with
them), writes a test's id without its parameters when every parametrization of it is slow, and
deals the slow tests into `--slices` slices of about equal time (dearest first, each to the
lightest slice; tests sharing a cached helper's work for one parameter go together).
"""

from __future__ import annotations

import ast
import collections
import zlib
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


_SLICE = re.compile(r"^\[slice (\d+|by parameter)\]$")
BY_PARAMETER = -1  # a whole parametrized test: each parametrization's slice is a hash of it


def load(path: str = LIST) -> dict[str, int]:
    """Listed test id -> its slice (0 for a list written before slices)."""
    out, current = {}, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            m = _SLICE.match(line)
            if m:
                current = BY_PARAMETER if m.group(1) == "by parameter" else int(m.group(1))
            elif line and not line.startswith("#"):
                out[line] = current
    return out


def n_slices(listed: dict[str, int]) -> int:
    return max(listed.values(), default=0) + 1


def is_slow(nodeid: str, listed) -> bool:
    return nodeid in listed or nodeid.split("[", 1)[0] in listed


def slice_of(nodeid: str, listed: dict[str, int]) -> int:
    """The slice a slow test runs in: its listed one, else (marked slow in its own file) one
    chosen by a stable hash of its file and function, so it is the same on every machine."""
    for key in (nodeid, nodeid.split("[", 1)[0]):
        if listed.get(key, BY_PARAMETER) != BY_PARAMETER:
            return listed[key]
    # by parameter: a file's tests of one parametrization together (they may share its work)
    file, _, rest = nodeid.partition("::")
    param = rest.partition("[")[2]
    key = f"{file}[{param}" if param else nodeid
    return zlib.crc32(key.encode()) % n_slices(listed)


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


def choose(log_lines, budget: float) -> tuple[list[str], dict[str, float]]:
    """(the slow ids, every test's measured time)."""
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
        facts = read_tests(os.path.join(os.path.dirname(HERE), f))
        funcs = {name: t.shares_work for name, t in facts.items()}
        # a test too fast for --durations to list costs nothing (and is never marked)
        seen = {_func(nid) for nid in ids}
        candidates = list(ids) + [f"{f}::{name}" for name in funcs if name not in seen]
        # one its own file marks slow cannot be the file's quick test
        candidates = [n for n in candidates
                      if not getattr(facts.get(_func(n)), "marked_slow", False)] or candidates

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
    return sorted(out | forced), times


def deal(ids: list[str], times: dict[str, float], slices: int) -> dict[str, int]:
    """Each listed id -> a slice, the slices about equal in time.  An id without parameters
    stands for all its parametrizations; ids of one file that share a cached helper's work for
    one parameter (test_families' two tests of one family) go together."""
    groups: dict = collections.defaultdict(lambda: [0.0, []])
    load_of = [0.0] * slices
    out = {}
    for i in ids:
        mine = [t for n, t in times.items() if n == i or n.split("[", 1)[0] == i]
        if len(mine) > 1:  # a whole parametrized test: spread by parameter (`slice_of`)
            out[i] = BY_PARAMETER
            load_of = [x + sum(mine) / slices for x in load_of]
            continue
        param = i.partition("[")[2]
        key = (_file(i), param) if param else i
        groups[key][0] += sum(mine)
        groups[key][1].append(i)
    for cost, members in sorted(groups.values(), key=lambda g: (-g[0], g[1])):
        k = min(range(slices), key=lambda j: (load_of[j], j))
        load_of[k] += cost
        out.update({m: k for m in members})
    return out


def main(argv: list[str]) -> None:
    budget = float(argv[argv.index("--budget") + 1]) if "--budget" in argv else 900.0
    slices = int(argv[argv.index("--slices") + 1]) if "--slices" in argv else 4
    with open(argv[0], encoding="utf-8") as f:
        ids, times = choose(f, budget)
    where = deal(ids, times, slices)
    header = []
    with open(LIST, encoding="utf-8") as f:
        for line in f:  # the comment lines above the first slice (or the first id)
            if not line.startswith("#"):
                break
            header.append(line)
    body = []
    for k in [BY_PARAMETER] + list(range(slices)):
        mine = sorted(i for i in ids if where[i] == k)
        cost = sum(t for n, t in times.items() if n in mine or n.split("[", 1)[0] in mine)
        name = "by parameter" if k == BY_PARAMETER else k
        body.append(f"[slice {name}]\n# about {cost:.0f} s of test time in the measured run\n")
        body += [i + "\n" for i in mine]
    sys.stdout.write("".join(header) + "".join(body))


if __name__ == "__main__":
    main(sys.argv[1:])
