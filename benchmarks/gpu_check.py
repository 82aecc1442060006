"""The one device check for a lent GPU: the CUDA suite, then a quick benchmark, in under 8 minutes.

    bash benchmarks/gpu_check.sh            # on the GPU machine (installs the project, then this)
    python benchmarks/gpu_check.py --smoke  # CPU dry run of the control flow, < 30 s (a test)

Parts run one after another as subprocesses, each with its own time budget; one that overruns is
stopped with a clear line and the next part starts, so a slow part never loses the others'
results.  Every part prints a timing line.  Output goes to one folder ($OUT when set, else
benchmarks/results/gpu-check-<date>/): gpu_check.log (everything), cuda_suite.xml (JUnit),
results.json (all benchmark records merged), the plots, and parts.json (status and time of each
part).  Budgets (s) sum to 450 of the 480 allowed; the rest is start-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable


def parts(out: str) -> list[tuple[str, list[str], int]]:
    """(name, command, budget in seconds) of the real check."""
    bench = [PY, os.path.join(HERE, "run.py"), "--no-convergence", "--no-plots"]
    return [
        ("environment", [PY, "-c", "import torch, triton; print(torch.__version__, triton.__version__,"
                         " torch.cuda.get_device_name(), torch.cuda.get_device_capability())"], 30),
        ("cuda_suite", [PY, "-m", "pytest", "-m", "cuda", "-q", "-x", "--no-header", "-p",
                        "no:cacheprovider", f"--junitxml={os.path.join(out, 'cuda_suite.xml')}",
                        "tests/kernels", "tests/cuda"], 210),
        ("ops_benchmark", bench + ["--ops", "--e2e", "none", "--sizes-per-op", "2", "--warmup", "3",
                                   "--reps", "10", "--out", os.path.join(out, "ops")], 110),
        ("e2e_llama3_8b_2layers_seq4096", bench + ["--ops", "none", "--e2e", "llama3_8b", "--layers",
                                                   "2", "--seqs", "4096", "--warmup", "2", "--reps",
                                                   "5", "--out", os.path.join(out, "e2e")], 100),
    ]


def smoke_parts(out: str) -> list[tuple[str, list[str], int]]:
    """Stand-ins with the same control flow: a passing part, a failing one, one that overruns its
    budget, and a tiny real benchmark run (CPU, --smoke) whose results get merged."""
    return [
        ("environment", [PY, "-c", "import torch; print(torch.__version__)"], 30),
        ("failing_part", [PY, "-c", "raise SystemExit(3)"], 30),
        ("overrunning_part", [PY, "-c", "import time; print('started', flush=True); time.sleep(60)"], 2),
        ("ops_benchmark", [PY, os.path.join(HERE, "run.py"), "--smoke", "--ops", "layer_norm", "--e2e",
                           "none", "--sizes-per-op", "1", "--no-plots", "--out",
                           os.path.join(out, "ops")], 60),
    ]


def run_part(name: str, cmd: list[str], budget: int, log) -> dict:
    t0 = time.perf_counter()
    log(f"=== {name}: {' '.join(cmd)}  (budget {budget} s)")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, to stop it whole
    status = "ok"
    try:
        out, _ = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = "timeout"
    for line in (out or "").splitlines():
        log(f"  {line}")
    if status == "ok" and proc.returncode != 0:
        status = f"failed (exit {proc.returncode})"
    dt = time.perf_counter() - t0
    if status == "timeout":
        log(f"--- {name}: STOPPED after {dt:.0f} s: over its {budget} s budget; going on with the rest")
    else:
        log(f"--- {name}: {status} in {dt:.0f} s (budget {budget} s)")
    return dict(name=name, status=status, seconds=round(dt, 1), budget=budget)


def merge_results(out: str, log) -> list:
    records = []
    for sub in ("ops", "e2e"):
        path = os.path.join(out, sub, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                records += json.load(f)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    log(f"{len(records)} benchmark records -> {os.path.join(out, 'results.json')}")
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU dry run of the control flow (< 30 s)")
    ap.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results/...)")
    args = ap.parse_args(argv)
    out = args.out or os.environ.get("OUT") or os.path.join(
        HERE, "results", "local" if args.smoke else "", f"gpu-check-{datetime.date.today().isoformat()}")
    os.makedirs(out, exist_ok=True)
    logf = open(os.path.join(out, "gpu_check.log"), "w")

    def log(line: str) -> None:
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    t0 = time.perf_counter()
    log(f"gpu_check{' --smoke' if args.smoke else ''}: output in {out}")
    done = [run_part(*p, log=log) for p in (smoke_parts(out) if args.smoke else parts(out))]
    records = merge_results(out, log)
    if records:
        sys.path.insert(0, HERE)
        import report

        report.plot(records, out, log=log)
    with open(os.path.join(out, "parts.json"), "w") as f:
        json.dump(done, f, indent=1)
    for p in done:
        log(f"{p['name']:34s} {p['status']:20s} {p['seconds']:6.1f} s / {p['budget']} s")
    log(f"gpu_check finished in {time.perf_counter() - t0:.0f} s")
    logf.close()
    return 0 if all(p["status"] == "ok" for p in done) else 1


if __name__ == "__main__":
    sys.exit(main())
