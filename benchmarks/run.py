"""Run the benchmark suite: every op benchmark and the end-to-end training steps, in one process.

    python benchmarks/run.py                          # everything (needs a CUDA GPU)
    python benchmarks/run.py --ops rms_norm rope      # only these op benchmarks (or kernel families)
    python benchmarks/run.py --ops none --e2e llama3_8b --seqs 2048 4096
    python benchmarks/run.py --smoke                  # tiny sizes on CPU in < 2 min: proves it runs
    python benchmarks/run.py --list                   # registered op benchmarks and e2e models
    python benchmarks/run.py --cpu                    # CPU training step: eager/inductor/liger (cpu_step.py)

Op benchmarks are discovered from `OPS` lists in benchmarks/bench_*.py (see harness.py); a kernel
family in kernels/ without one is reported.  Output goes to --out (default on a GPU:
benchmarks/results/<device>-<date>/; with --smoke: benchmarks/results/local/smoke/, git-ignored):
results.json (one record per measurement) and, when matplotlib is installed, a PNG per benchmark.
Render the README table from it with benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

if "--smoke" in sys.argv[1:]:
    # The smoke run also drives the Triton kernels, through the interpreter on CPU; triton reads
    # this when it is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import common  # noqa: E402
import e2e  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402


def commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except Exception:
        return None


def default_out(device, smoke: bool) -> str:
    if smoke or device.type != "cuda":
        return os.path.join(HERE, "results", "local", "smoke" if smoke else "")
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return os.path.join(HERE, "results", f"{slug}-{datetime.date.today().isoformat()}")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="*", default=None,
                   help="op benchmarks or kernel families to run (default all; 'none' for no op benchmarks)")
    p.add_argument("--e2e", nargs="*", default=None,
                   help=f"end-to-end models (default all of {', '.join(e2e.FULL)}; 'none' for none)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, every benchmark, < 2 minutes")
    p.add_argument("--out", default=None, help="output folder (results.json and PNGs)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the e2e models")
    p.add_argument("--seqs", type=int, nargs="*", default=None, help="e2e sequence lengths")
    p.add_argument("--no-convergence", action="store_true", help="skip the bf16 convergence check")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--sizes-per-op", type=int, default=0,
                   help="run only this many of each op's sizes (smallest and largest first)")
    p.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    return p.parse_args(argv)


def _names(arg, everything):
    if arg is None or arg == []:
        return list(everything)
    if arg == ["none"]:
        return []
    return arg


def main(argv=None, log=print) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--cpu" in argv:  # its own options, see benchmarks/cpu_step.py
        import cpu_step

        cpu_step.main(argv, log=log)
        return 0
    args = parse(argv)
    all_ops = harness.discover()
    if args.list:
        for op in all_ops:
            log(f"op   {op.name:28s} kernels/{op.family}.py  sizes ({op.size_name}) {op.sizes}")
        for name in e2e.FULL:
            log(f"e2e  {name}")
        missing = harness.uncovered_families(all_ops)
        log(f"kernel families without a benchmark: {', '.join(missing) or 'none'}")
        return 0
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.smoke:
        device = torch.device("cpu")
    else:
        log("run.py: no CUDA device, nothing to benchmark (use --smoke for a tiny CPU run that only "
            "checks the harness works)")
        return 0
    smoke = args.smoke
    if smoke and device.type == "cuda":
        device = torch.device("cpu")  # --smoke means the CPU run, even where a GPU exists
    warmup = args.warmup if args.warmup is not None else (0 if smoke else 10)
    reps = args.reps if args.reps is not None else (1 if smoke else 50)
    out = args.out or default_out(device, smoke)
    common.raise_recompile_limit()
    env = dict(common.environment(device), commit=commit(), date=datetime.date.today().isoformat())
    t_start = time.perf_counter()
    log(f"{env['device']}: torch {env['torch']}, triton {env['triton']}, commit {env['commit']}"
        + (f"; --smoke: CPU, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}, timings mean nothing"
           if smoke else ""))

    records = []
    ceiling, recs = harness.ceilings(device, smoke, env)
    records += recs
    log(f"ceilings: copy {ceiling['GB/s']:.1f} GB/s, matmul {ceiling['TFLOP/s']:.2f} TFLOP/s")

    op_names = _names(args.ops, [o.name for o in all_ops])
    ops = harness.discover(op_names) if op_names else []
    if args.sizes_per_op > 0:  # the quick device check: the ends of each op's size range
        import dataclasses

        def ends(sizes):
            return tuple(sorted({sizes[0], sizes[-1]}, key=sizes.index))[:args.sizes_per_op]
        ops = [dataclasses.replace(op, sizes=ends(op.sizes), smoke_sizes=ends(op.smoke_sizes))
               for op in ops]
    missing = harness.uncovered_families(all_ops)
    if missing:
        log(f"warning: kernel families without a benchmark (add OPS to a benchmarks/bench_*.py): "
            f"{', '.join(missing)}")
    for op in ops:
        log(f"op {op.name} (kernels/{op.family}.py)")
        records += harness.measure(op, device, smoke, warmup, reps, env, ceiling, log=log)

    models = _names(args.e2e, e2e.FULL)
    unknown = [m for m in models if m not in e2e.FULL]
    if unknown:
        raise SystemExit(f"unknown e2e model(s) {unknown}; known: {list(e2e.FULL)}")
    if models:
        log(f"end to end: {', '.join(models)} ({args.layers} layers)")
        records += e2e.run(models, smoke, device, env, layers=args.layers, seqs=args.seqs,
                           warmup=min(warmup, 3), reps=min(reps, 10), log=log)
    if not args.no_convergence and models:
        records += e2e.convergence(device, env, smoke, log=log)

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    log(f"{len(records)} records -> {path} ({time.perf_counter() - t_start:.0f} s)")
    if not args.no_plots:
        report.plot(records, out, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
