"""Every Triton kernel compiles for sm_90, sm_80 and sm_89 at the configurations its launchers pick
for real model shapes, within each chip's shared-memory, register, thread and grid limits and
without register spills (no GPU needed: ligerfx/tools/offline_compile.py, shapes in cases.py).

The compile runs in a subprocess: this session imported triton with TRITON_INTERPRET=1, and
interpreted kernels cannot be compiled.  Triton's on-disk cache makes a rerun take seconds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ligerfx.tools import offline_compile as oc

ROOT = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("cases.py")
FP8_KERNELS = {"_quant_rows_kernel", "_fp8_mm_kernel"}
LOWBIT_KERNELS = {"_int8_mm_kernel", "_int4_mm_kernel", "_splitk_reduce_kernel"} | FP8_KERNELS
# Constexprs that hold one value on every GPU launch by design (interpreter-only workarounds).
GPU_CONSTANT = {("_int8_mm_kernel", "UPCAST"), ("_int4_mm_kernel", "UPCAST"),
                ("_fp8_mm_kernel", "UPCAST"), ("_sparse24_mm_kernel", "UPCAST"),
                ("_quant_rows_kernel", "EMULATE_CAST"),
                # eager's value of an activation at +inf on the CPU (NaN there, +inf on CUDA):
                # only ever True on the CPU / interpreter (kernels/gated_act.py)
                ("_gated_fwd_kernel", "INF_NAN"), ("_gated_bwd_kernel", "INF_NAN"),
                ("_act_fwd_kernel", "INF_NAN"),
                # CPU eager's fp16 sigmoid_backward rounds per op; CUDA's computes in fp32
                ("_cglu_bwd_kernel", "SIG_STEPS")}


def _have_ptxas() -> bool:
    try:
        oc._bin("ptxas")
        oc._bin("cuobjdump")
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not _have_ptxas():
        pytest.skip("this triton wheel bundles no ptxas/cuobjdump (needs Linux x86-64 triton)")
    out = tmp_path_factory.mktemp("offline") / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "ligerfx.tools.offline_compile", str(CASES), "--json",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    if not out.exists():
        pytest.fail(f"offline compile crashed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-4000:]}")
    rep = json.loads(out.read_text())
    rep["stdout"] = proc.stdout
    return rep


def test_no_resource_problems(report):
    assert report["problems"] == [], "\n".join(report["problems"])
    assert report["configs"], "nothing was compiled"


def test_every_kernel_compiled_on_every_chip(report):
    recorded = report["recorded"]
    for name in report["kernels_defined"]:
        want = {"sm_90", "sm_89"} if name in FP8_KERNELS else \
            {"sm_90", "sm_80", "sm_89"} if name in LOWBIT_KERNELS else {"sm_90", "sm_80"}
        assert want <= set(recorded.get(name, ())), f"{name} recorded on {recorded.get(name)}"


def test_every_flag_value_reached(report):
    missing = []
    for kernel, params in report["coverage"].items():
        for param, values in params.items():
            if set(values) <= {"True", "False"} and len(values) < 2 and \
                    (kernel, param) not in GPU_CONSTANT:
                missing.append(f"{kernel}.{param} only {values}")
    assert not missing, missing


def test_chip_independent_kernels_fit_the_smallest_chip(report):
    """Kernels compiled only for sm_80/sm_90 run unchanged on sm_86/sm_89 (99 KB per block)."""
    small = oc.CHIPS["sm_89"].smem_optin
    too_big = [f"{c['kernel']} [{c['config']}]: {c['shared']} B" for c in report["configs"]
               if c["chip"] == "sm_80" and c["kernel"] not in LOWBIT_KERNELS and c["shared"] > small]
    assert not too_big, too_big


def test_check_flags_each_limit():
    """check() itself: each limit, broken alone, is reported (so the tests above can fail)."""
    chip = oc.CHIPS["sm_89"]
    ok = oc.Resources("k", "sm_89", "", shared=1024, regs=16, stack=0, threads=128, grid=(8, 1, 1))
    assert oc.check(ok, chip) == []
    for field, value, words in (("shared", chip.smem_optin + 1, "shared memory"),
                                ("stack", 16, "spills"), ("threads", 2048, "threads"),
                                ("regs", 255 * 2, "registers"), ("grid", (8, 1 << 16, 1), "grid")):
        bad = oc.Resources(**{**ok.__dict__, field: value})
        if field == "regs":
            bad.threads = 256
        problems = oc.check(bad, chip)
        assert len(problems) == 1 and words in problems[0], (field, problems)
