"""Peak host memory of one step, measured in a fresh child process (shared by the memory tests).

A test file runs itself as a script per variant (`run_child`); the child builds its inputs, warms
up, calls `window()` to take the RSS base and reset the kernel's high-water mark, runs the step,
and prints `result(...)`: VmHWM - VmRSS(base) in MiB plus whatever the parent compares (loss,
gradient norms, rewrite counts).  Peak RSS cannot be compared inside one process, hence children.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


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
    """Run `python script mode` on the CPU torch path (not the interpreter); its JSON line."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, os.path.abspath(script), mode], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
