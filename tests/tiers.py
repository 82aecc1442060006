"""The quick tier: which tests `pytest -m "not slow"` leaves out (tests/slow_tests.txt).

`load()` reads the list for tests/conftest.py, which marks the listed tests `slow`.  Run as a script
on the output of a full run with `--durations=0` to choose the list again:

    python -m pytest -q -n 2 --dist loadfile --durations=0 > full.log
    python tests/tiers.py full.log [--budget 400] > tests/slow_tests.txt.new

It marks the slowest tests until the rest take about `--budget` seconds of test time, keeping the
cheapest test of every file (so the quick tier still imports and runs every module), and writes a
test's id without its parameters when every parametrization of it is slow.
"""

from __future__ import annotations

import collections
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
LIST = os.path.join(HERE, "slow_tests.txt")
_DURATION = re.compile(r"^([0-9.]+)s (?:call|setup|teardown)\s+(\S+)")


def load(path: str = LIST) -> frozenset[str]:
    with open(path, encoding="utf-8") as f:
        return frozenset(line.strip() for line in f if line.strip() and not line.startswith("#"))


def is_slow(nodeid: str, listed: frozenset[str]) -> bool:
    return nodeid in listed or nodeid.split("[", 1)[0] in listed


def choose(log_lines, budget: float) -> list[str]:
    times: collections.Counter = collections.Counter()
    for line in log_lines:
        m = _DURATION.match(line)
        if m:
            times[m.group(2)] += float(m.group(1))
    by_file = collections.defaultdict(list)
    for nid, t in times.items():
        by_file[nid.split("::")[0]].append((t, nid))
    keep = {min(v)[1] for v in by_file.values()}
    remaining, slow = sum(times.values()), set()
    for nid, t in sorted(times.items(), key=lambda x: -x[1]):
        if remaining <= budget:
            break
        if nid not in keep:
            slow.add(nid)
            remaining -= t
    params = collections.defaultdict(set)
    for nid in times:
        params[nid.split("[", 1)[0]].add(nid)
    out = set()
    for func, ids in params.items():
        mine = ids & slow
        out |= {func} if mine == ids and len(ids) > 1 else mine
    return sorted(out)


def main(argv: list[str]) -> None:
    budget = float(argv[argv.index("--budget") + 1]) if "--budget" in argv else 400.0
    with open(argv[0], encoding="utf-8") as f:
        ids = choose(f, budget)
    with open(LIST, encoding="utf-8") as f:
        header = [line for line in f if line.startswith("#")]
    sys.stdout.write("".join(header) + "\n".join(ids) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
