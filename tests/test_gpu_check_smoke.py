"""benchmarks/gpu_check.py --smoke: the device check's control flow on the CPU (a passing, a failing
and an overrunning part, a tiny benchmark whose records are merged), so the script a lent GPU runs
first cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]  # a part failed: the check says so
    parts = {p["name"]: p for p in json.loads((tmp_path / "parts.json").read_text())}
    assert parts["environment"]["status"] == "ok"
    assert parts["failing_part"]["status"] == "failed (exit 3)"
    assert parts["overrunning_part"]["status"] == "timeout"
    assert parts["overrunning_part"]["seconds"] < 30  # stopped at its budget, not after 60 s
    assert parts["ops_benchmark"]["status"] == "ok"  # the parts after the overrun still ran
    log = (tmp_path / "gpu_check.log").read_text()
    assert "overrunning_part: STOPPED after" in log and "over its 2 s budget" in log
    assert "started" in log  # a stopped part's output is kept
    records = json.loads((tmp_path / "results.json").read_text())
    assert records and any(r.get("op") == "layer_norm" or "layer_norm" in json.dumps(r) for r in records)
