"""The benchmark harness at tiny sizes on the CPU (`benchmarks/run.py --smoke`), so it never rots.

One in-process smoke run (every op benchmark, every e2e model, the convergence check; kernels in
Triton's interpreter) feeds the assertions below; report rendering, README update, floor checks and
plotting (only when matplotlib is installed) are tested on its results.json.
"""

import importlib
import json
import os
import pkgutil
import sys

import pytest

import ligerfx.kernels

# Triton decides at a kernel's decoration whether it runs interpreted: import every kernel module
# at collection, while conftest's TRITON_INTERPRET=1 holds (the smoke run uses the interpreter).
for _m in pkgutil.iter_modules(ligerfx.kernels.__path__):
    importlib.import_module(f"ligerfx.kernels.{_m.name}")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import e2e  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402
import run as bench_run  # noqa: E402

# Families whose benchmarks exist today; a new family adds OPS to a benchmarks/bench_*.py module.
COVERED = {"rms_norm", "layer_norm", "rope", "gated_act", "cross_entropy", "fused_linear_cross_entropy",
           "int8_matmul", "int4_matmul", "fp8_matmul", "add_norm",
           "gated_rms_norm", "fused_linear_logprob"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    lines = []
    assert bench_run.main(["--smoke", "--out", str(out), "--no-plots"], log=lines.append) == 0
    with open(out / "results.json") as f:
        return json.load(f), "\n".join(lines), out


def _values(records, **match):
    return [r["value"] for r in records if all(r.get(k) == v for k, v in match.items())]


def test_discovery_covers_the_kernel_families():
    ops = harness.discover()
    assert COVERED <= {o.family for o in ops}
    assert COVERED <= set(harness.kernel_families())
    assert len({o.name for o in ops}) == len(ops), "duplicate op benchmark names"


def test_every_op_measured_with_eager_and_liger(smoke):
    records, log, _ = smoke
    assert "FAILED" not in log, log
    for op in harness.discover():
        for variant in ("eager", "liger"):
            times = _values(records, benchmark=op.name, variant=variant, metric="fwd_bwd_time")
            assert len(times) == len(op.smoke_sizes) and all(t > 0 for t in times), (op.name, variant)
            diffs = _values(records, benchmark=op.name, variant=variant, metric="max_abs_diff_vs_eager")
            assert diffs and max(diffs) < 1e-3, (op.name, variant, diffs)
        rate = "fwd_bwd_bandwidth" if op.bound == "memory" else "fwd_bwd_tflops"
        assert _values(records, benchmark=op.name, variant="liger", metric=rate)
    # exactly one inductor variant runs in the smoke (inductor compiles are slow on CPU)
    assert {r["benchmark"] for r in records if r["variant"] == "inductor"} == {"rms_norm"}


def test_records_carry_environment(smoke):
    records, _, _ = smoke
    keys = {"benchmark", "variant", "shape", "metric", "value", "unit", "device", "torch", "triton", "commit"}
    for r in records:
        assert keys <= set(r), r
    ceilings = {r["metric"]: r["value"] for r in records if r["benchmark"] == "device"}
    assert ceilings["copy_bandwidth"] > 0 and ceilings["matmul_tflops"] > 0


def test_e2e_and_convergence(smoke):
    records, log, _ = smoke
    for name in e2e.FULL:
        for variant in ("eager", "liger"):
            tps = _values(records, benchmark=f"e2e_{name}", variant=variant, metric="tokens_per_s")
            assert tps and all(t > 0 for t in tps), (name, variant)
        # same seed, same batch: the first-step losses agree across variants
        l_e = _values(records, benchmark=f"e2e_{name}", variant="eager", metric="first_loss")
        l_l = _values(records, benchmark=f"e2e_{name}", variant="liger", metric="first_loss")
        assert l_e == pytest.approx(l_l, rel=1e-4)
        assert _values(records, benchmark=f"e2e_{name}", variant="liger", metric="speedup_vs_eager")
    assert "speedup_vs_eager" in log  # the floor ratios are printed
    gap = _values(records, benchmark="convergence", metric="max_relative_loss_gap")
    assert gap and gap[0] < 1e-3


def test_report_renders_and_updates_readme(smoke, tmp_path):
    records, _, out = smoke
    table = report.render(records)
    assert "| llama3_8b |" in table and "| rms_norm |" in table and "Convergence" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n{report.START}\nold\n{report.END}\n\nafter\n")
    assert report.main([str(out / "results.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| llama3_8b |" in text and text.endswith("after\n")
    assert report.render([]) == report.NO_RESULTS


def test_floor_checks():
    by = {"eager": dict(tokens_per_s=100.0, peak_memory=1000.0),
          "inductor": dict(tokens_per_s=110.0, peak_memory=900.0),
          "liger": dict(tokens_per_s=125.0, peak_memory=550.0)}
    r = e2e.ratios(by)
    assert r["speedup_vs_eager"] == pytest.approx(1.25) and r["memory_vs_eager"] == pytest.approx(0.55)
    assert all(ok for *_, ok in e2e.check_floors(r))
    by["liger"]["peak_memory"] = 700.0
    failed = [m for m, _, _, _, ok in e2e.check_floors(e2e.ratios(by)) if not ok]
    assert failed == ["memory_vs_eager"]


def test_plots(smoke, tmp_path):
    pytest.importorskip("matplotlib")
    records, _, _ = smoke
    paths = report.plot(records, str(tmp_path), log=lambda *a: None)
    assert any(p.endswith("e2e_llama3_8b.png") for p in paths)
    assert all(os.path.getsize(p) > 0 for p in paths)


def test_plots_skipped_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setattr(report, "have_matplotlib", lambda: False)
    msgs = []
    assert report.plot([], str(tmp_path), log=msgs.append) == []
    assert "matplotlib" in msgs[0]


def test_cpu_step_reads_steal_time(monkeypatch, tmp_path):
    # The CPU step benchmark qualifies its figures with the hypervisor's steal time from
    # /proc/stat (8th field of the "cpu" line); a machine without the file gives (0, 0).
    import cpu_step

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 2 30 800 5 0 1 40 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    real_open = open
    monkeypatch.setattr("builtins.open",
                        lambda f, *a, **k: real_open(stat if f == "/proc/stat" else f, *a, **k))
    assert cpu_step.cpu_jiffies() == (40, 100 + 2 + 30 + 800 + 5 + 0 + 1 + 40)
    stat.unlink()
    assert cpu_step.cpu_jiffies() == (0, 0)
