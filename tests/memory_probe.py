"""Peak host memory of one step, measured in a fresh child process (shared by the memory tests).

A test file runs itself as a script per variant (`run_child`); the child builds its inputs, warms
up and hands the step to `measure`, which calls `window()` to take the RSS base and reset the
kernel's high-water mark, runs the step, and prints `result(...)`: VmHWM - VmRSS(base) in MiB plus
what the parent compares (loss, gradient norms, rewrite counts) with `check_peak`.  Peak RSS cannot
be compared inside one process, hence children.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import subprocess
import sys
import tempfile
import time


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> bool:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0). Without it the import/warm-up peak stays
    # in VmHWM, which can only overstate a variant's increase.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def window() -> tuple[int, bool]:
    """(RSS base in KiB, whether the peak was reset): call right before the measured step."""
    base = status_kib("VmRSS")
    return base, reset_peak()


def result(mode: str, base: tuple[int, bool], **fields) -> None:
    """Print the child's one JSON line: the peak increase over `base` and `fields`."""
    kib, reset = base
    print(json.dumps(dict(mode=mode, increase_mib=(status_kib("VmHWM") - kib) / 1024, reset=reset,
                          **fields)))


def run_child(script: str, mode: str, timeout: int = 600) -> dict:
    """Run `python script mode` on the CPU torch path (not the interpreter); its JSON line.

    One child at a time on the machine (a file lock shared by pytest-xdist's workers): two
    eager children of different memory tests side by side need more than CI's 24 GiB, and the
    kernel's OOM killer ends one of them without a word.  Translation validation is off in the
    child: it runs each rewritten region again in float64 at full size on the first call (4x the
    child's time), and the parent compares the loss and gradients with eager's anyway."""
    env = dict(os.environ, TRITON_INTERPRET="0", LIGERFX_VALIDATE="0")
    lock = os.path.join(tempfile.gettempdir(), "ligerfx-memory-probe.lock")
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        out = subprocess.run([sys.executable, os.path.abspath(script), mode], env=env,
                             capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (
        f"the {mode!r} child of {os.path.basename(script)} exited with {out.returncode}"
        + (" (killed by a signal; -9 is usually the OOM killer)" if out.returncode < 0 else "")
        + f"; its stderr ends: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(mode: str, step, grads: dict) -> None:
    """Child: run `step()` (forward and backward; it returns the loss) in a fresh window and print
    the result line: the peak, the step's seconds, its loss, the norm of each `grads` tensor's
    .grad (name -> tensor) and, when compiled, the rewrites and the number of graphs Dynamo made."""
    gc.collect()
    base = window()
    t0 = time.perf_counter()
    loss = step()
    elapsed = time.perf_counter() - t0
    fields = dict(seconds=elapsed, loss=loss.item(), counts={}, graphs=0,
                  **{name: t.grad.norm().item() for name, t in grads.items()})
    if mode.startswith("compiled") or mode == "per_token":
        import torch

        import ligerfx.backend

        fields["counts"] = ligerfx.backend.last_report.counts
        fields["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    result(mode, base, **fields)


def check_peak(eager: dict, ours: dict, *, floor_mib: float, grad_w_mib: float, under: int,
               grad_rtol: float = 1e-3) -> None:
    """Parent: both children computed the same (loss, gh, gw), eager's peak really held what it
    must (`floor_mib`: its [N, V] tensors), ours is a real measurement (at least w.grad's
    `grad_w_mib`, which both keep) and under 1/`under` of eager's."""
    # Same computation (fp32, same seed): the comparison is meaningless otherwise.
    assert abs(ours["loss"] - eager["loss"]) <= 1e-4 * abs(eager["loss"]), (ours, eager)
    for k in ("gh", "gw"):
        assert abs(ours[k] - eager[k]) <= grad_rtol * eager[k], (k, ours[k], eager[k])
    assert eager["increase_mib"] >= floor_mib, eager
    assert ours["increase_mib"] >= grad_w_mib, ours
    assert ours["increase_mib"] < eager["increase_mib"] / under, (ours, eager)
