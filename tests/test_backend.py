"""The backend itself: entry point, options, inner backends, dynamic shapes, the demo."""

import subprocess
import sys
import textwrap

import pytest
import torch

import ligerfx
from ligerfx.tools.example_model import make_example
from tests.compare import compare_training_step


def test_entry_point_in_fresh_interpreter():
    code = textwrap.dedent("""
        import torch, logging
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        c = torch.compile(m, backend="liger", options={"inner": "eager"})
        x = torch.randn(3, 8)
        assert torch.allclose(c(x), m(x), atol=1e-6)
        import sys
        assert "ligerfx" in sys.modules  # loaded through the torch_dynamo_backends entry point
        from ligerfx import backend
        assert backend.last_report.counts == {"layer_norm": 1}, backend.last_report.counts
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok" in out.stdout


def _compile_err(options):
    m = torch.nn.LayerNorm(8)
    c = torch.compile(m, backend="liger", options=options)
    with pytest.raises(Exception) as e:
        c(torch.randn(2, 8))
    return str(e.value)


def test_unknown_option_lists_valid_ones():
    msg = _compile_err({"innr": "eager"})
    assert "unknown liger option(s) 'innr'" in msg and "valid options are: inner" in msg


def test_bad_inner_backend():
    msg = _compile_err({"inner": "tvm"})
    assert "'inner' must be one of inductor, aot_eager, eager" in msg


def test_unknown_pattern_name():
    with pytest.raises(ligerfx.OptionsError, match="unknown pattern"):
        ligerfx.Options.from_any({"exclude": ["rms_nrom"]})
    with pytest.raises(ligerfx.OptionsError, match="list of pattern names"):
        ligerfx.Options.from_any({"patterns": 3})


def test_exclude_and_patterns_select():
    model, ids, labels = make_example()
    assert ligerfx.explain(model, ids, labels, options={"exclude": ["rms_norm"]}).counts.get("rms_norm") is None
    r = ligerfx.explain(model, ids, labels, options={"patterns": ["rms_norm"]})
    assert set(r.counts) == {"rms_norm"}


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_inner_backends_train_like_eager(inner, kernel_path):
    model, ids, labels = make_example()
    report = compare_training_step(model, (ids, labels), options={"inner": inner})
    # the first input norm reads the embeddings; the other four a residual add
    assert report.counts["rms_norm"] == 1 and report.counts["add_rms_norm"] == 4


@pytest.mark.slow
def test_inductor_inner(torch_path):
    model, ids, labels = make_example(seq=16)
    report = compare_training_step(model, (ids, labels), options={"inner": "inductor"})
    # the first input norm reads the embeddings; the other four a residual add
    assert report.counts["rms_norm"] == 1 and report.counts["add_rms_norm"] == 4


def test_no_recompile_across_sequence_lengths():
    model, _, _ = make_example()
    calls = []

    def counting(gm, ex):
        calls.append(1)
        return ligerfx.liger_backend(gm, ex, options={"inner": "aot_eager", "log_report": False})

    c = torch.compile(model, backend=counting, dynamic=True)
    first = None
    for b, t in [(2, 16), (2, 24), (3, 40), (4, 9)]:
        ids = torch.randint(0, model.cfg.vocab_size, (b, t))
        out = c(ids, ids)
        ref = model(ids, ids)
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
        # Dynamo may restart the first compile once to specialise eps (a float attribute the
        # kernel takes as a constant); after the first call nothing may compile again.
        first = first or len(calls)
    assert len(calls) == first, f"recompiled {len(calls) - first} times"
    counts = ligerfx.backend.last_report.counts
    assert counts["rms_norm"] == 1 and counts["add_rms_norm"] == 4


def test_demo_runs(capsys):
    from ligerfx.tools.demo import run

    res = run(steps=2, inner="aot_eager")
    out = capsys.readouterr().out
    assert "rms_norm" in out and "step" in out
    for e, l in res["losses"]:
        assert abs(e - l) / abs(e) < 1e-4
    assert res["counts"]["rms_norm"] == 1 and res["counts"]["add_rms_norm"] == 4
