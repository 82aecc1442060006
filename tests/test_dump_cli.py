"""`ligerfx dump` and `ligerfx patterns`, run in-process through `ligerfx.tools.cli.main`.

Targets: a file:factory, a package.module:factory and `hf:` models (json, dot, text, html);
every error path must be one line on stderr, exit status 2, no traceback (unless --debug).
One subprocess test runs the installed console script (or `python -m ligerfx`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from ligerfx.tools.cli import main
from ligerfx.compiler.pattern import REGISTRY

MODEL_SRC = textwrap.dedent("""
    import torch
    import torch.nn as nn


    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            v = x.pow(2).mean(-1, keepdim=True)
            h = self.weight * (x * torch.rsqrt(v + 1e-6))  # the rms norm line
            s = h.pow(2).mean(1, keepdim=True)
            h = self.proj(h * torch.rsqrt(s + 1e-6))  # normalises over dim 1: a near miss
            return h * torch.sigmoid(1.702 * h)


    def make():
        return Block(), (torch.randn(2, 4, 8),)


    def make_kwargs():
        return Block(), (), {"x": torch.randn(2, 4, 8)}


    def wrong():
        return Block()


    def boom():
        raise RuntimeError("factory exploded")


    class Untraceable(torch.nn.Module):
        def forward(self, x):
            raise ValueError("this model cannot run\\nsecond line")


    def untraceable():
        return Untraceable(), (torch.randn(2),)


    not_callable = 3
""")


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(MODEL_SRC)
    return str(path)


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_file_target_json(model_file, tmp_path, capsys):
    out_path = tmp_path / "dump.json"
    rc, _, err = _run(capsys, "dump", f"{model_file}:make", "--format", "json", "-o", str(out_path))
    assert rc == 0, err
    d = json.loads(out_path.read_text())
    assert d["counts"] == {"rms_norm": 1}
    assert {"matches", "near_misses", "graphs_before", "graphs_after"} <= set(d)
    (m,) = d["matches"]
    assert m["pattern"] == "rms_norm"
    assert m["location"]["file"] == model_file and "the rms norm line" in m["location"]["code"]
    (nm,) = [n for n in d["near_misses"] if n["pattern"] == "rms_norm"]
    assert "dim" in nm["reason"] and "dim 1" in nm["location"]["code"]
    assert "liger.rms_norm" in d["graphs_after"][0]
    assert "liger.rms_norm" not in d["graphs_before"][0] and "rsqrt" in d["graphs_before"][0]


def test_file_target_text_to_stdout_with_kwargs_factory(model_file, capsys):
    rc, out, err = _run(capsys, "dump", f"{model_file}:make_kwargs")
    assert rc == 0, err
    assert "counts: rms_norm=1" in out
    assert "the rms norm line" in out and "near miss: rms_norm" in out
    assert "graph 0: before" in out and "graph 0: after" in out


def test_options_are_passed_to_the_backend(model_file, capsys):
    rc, out, err = _run(capsys, "dump", f"{model_file}:make", "-f", "json",
                        "--options", '{"exclude": ["rms_norm"]}')
    assert rc == 0, err
    assert json.loads(out)["counts"] == {}


def test_module_target_dot(model_file, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_model", None)
    rc, out, err = _run(capsys, "dump", "my_model:make", "-f", "dot")
    assert rc == 0, err
    assert out.startswith("digraph ligerfx {") and out.rstrip().endswith("}")
    assert "cluster_g0_before" in out and "cluster_g0_after" in out
    # The new node in the rewritten graph and the replaced nodes are labelled with the pattern.
    after = out[out.index("cluster_g0_after"):]
    assert "liger.rms_norm" in after and "[rms_norm]" in after
    before = out[out.index("cluster_g0_before"):out.index("cluster_g0_after")]
    assert before.count("[rms_norm]") >= 3
    assert out.count("{") == out.count("}")


def test_user_pattern_shows_in_dump(model_file, capsys):
    from ligerfx import register_pattern

    def quick_gelu(x):
        return x * torch.sigmoid(1.702 * x)

    register_pattern("test_dump_quick_gelu", quick_gelu, lambda x: torch.nn.functional.gelu(x) * 1,
                     (torch.randn(2, 8),))
    try:
        rc, out, err = _run(capsys, "dump", f"{model_file}:make", "-f", "json")
    finally:
        REGISTRY.remove("test_dump_quick_gelu")
    assert rc == 0, err
    assert json.loads(out)["counts"] == {"rms_norm": 1, "test_dump_quick_gelu": 1}


def test_hf_llama_json(capsys):
    pytest.importorskip("transformers")
    rc, out, err = _run(capsys, "dump", "hf:llama", "-f", "json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["target"] == "hf:llama" and d["counts"].get("rms_norm") == 1
    assert d["counts"].get("add_rms_norm") == 4  # every norm but the first follows a residual add
    norms = [m for m in d["matches"] if m["pattern"] == "rms_norm"]
    assert norms and all("modeling_llama.py" in m["location"]["file"] for m in norms)
    # the other families are found in the same model (each points at the user's source)
    assert d["counts"].get("rope") == 2 and d["counts"].get("swiglu") == 2
    assert all(m["location"]["file"] and m["location"]["line"] > 0 for m in d["matches"])


def test_hf_gpt_neox_text(capsys):
    pytest.importorskip("transformers")
    rc, out, err = _run(capsys, "dump", "hf:gpt_neox", "-f", "text")
    assert rc == 0, err
    # parallel residual: one norm per layer boundary (and the final norm) reads the add
    assert "layer_norm=3" in out and "add_layer_norm=2" in out and "liger.layer_norm" in out
    assert "liger.add_layer_norm" in out


def test_hf_config_json_html(tmp_path, capsys):
    pytest.importorskip("transformers")
    cfg = dict(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
               max_position_embeddings=32)
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    out_path = tmp_path / "dump.html"
    rc, _, err = _run(capsys, "dump", f"hf:{cfg_path}", "-f", "html", "-o", str(out_path))
    assert rc == 0, err
    page = out_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # Self-contained: no external script, style, image or font is loaded.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(""", page)
    assert "<td><span class='sw' style='background:" in page  # the per-pattern summary
    # one layer: the input norm reads the embeddings, the other two follow a residual add
    assert re.search(r"rms_norm</td><td class='num'>1</td><td><code>liger::rms_norm</code>", page)
    assert re.search(r"add_rms_norm</td><td class='num'>2</td><td><code>liger::add_rms_norm</code>",
                     page)
    assert "modeling_qwen2.py" in page and "window.LIGERFX_DUMP=" in page
    data = json.loads(page.split("window.LIGERFX_DUMP=", 1)[1].split(";</script>", 1)[0])
    (g,) = data["graphs"]
    assert sum(r[0] == "rewrite" for r in g["regions"]) == 3 + 1 + 1 + 1  # norms, rope, swiglu, lce


def test_svg_format_to_file(model_file, tmp_path, capsys):
    out_path = tmp_path / "dump.svg"
    rc, _, err = _run(capsys, "dump", f"{model_file}:make", "-f", "svg", "-o", str(out_path))
    assert rc == 0, err
    svg = out_path.read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg.count('class="node rw"') >= 3 and 'class="node nm"' in svg
    assert "rms_norm \u2192 liger::rms_norm" in svg


@pytest.mark.parametrize("target, message", [
    ("no/such/file.py:make", "no such file: no/such/file.py"),
    ("{file}:nope", "has no function 'nope'"),
    ("{file}:not_callable", "is not callable"),
    ("{file}:wrong", "must return (model, args) or (model, args, kwargs), got Block"),
    ("{file}:boom", "the factory raised RuntimeError: factory exploded"),
    ("{file}:untraceable", "did not trace: ValueError: this model cannot run"),
    ("no_such_module_xyz:make", "no module named 'no_such_module_xyz'"),
    ("justaname", "must be path/to/file.py:factory"),
    ("hf:no_such_arch", "unknown Hugging Face model type 'no_such_arch'"),
    ("hf:missing/config.json", "cannot read missing/config.json"),
])
def test_errors_are_one_line(target, message, model_file, capsys):
    rc, out, err = _run(capsys, "dump", target.format(file=model_file))
    assert rc == 2
    assert out == ""
    assert err.startswith("ligerfx: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_options_and_output_path(model_file, tmp_path, capsys):
    rc, _, err = _run(capsys, "dump", f"{model_file}:make", "--options", "{not json")
    assert rc == 2 and "--options is not valid JSON" in err
    rc, _, err = _run(capsys, "dump", f"{model_file}:make", "--options", '{"bogus": 1}')
    assert rc == 2 and "unknown liger option(s) 'bogus'" in err
    rc, _, err = _run(capsys, "dump", f"{model_file}:make", "-o", str(tmp_path / "no" / "x.txt"))
    assert rc == 2 and "cannot write" in err


def test_debug_shows_the_exception(model_file):
    from ligerfx.dump import DumpError

    with pytest.raises(Exception) as info:
        main(["dump", f"{model_file}:boom", "--debug"])
    assert "factory exploded" in str(info.value) or isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(Exception):
        main(["--debug", "dump", "no/such/file.py:make"])
    assert DumpError


def test_patterns_lists_builtins_and_user_patterns(capsys):
    from ligerfx import register_pattern

    def halve(x):
        """Halves a tensor (test pattern)."""
        return x * 0.5

    register_pattern("test_listed_pattern", halve, lambda x: x / 2, (torch.randn(3),))
    try:
        rc, out, err = _run(capsys, "patterns")
        rc2, out2, _ = _run(capsys, "patterns", "--json")
    finally:
        REGISTRY.remove("test_listed_pattern")
    assert rc == 0 and rc2 == 0, err
    lines = {ln.split()[0]: ln for ln in out.splitlines()}
    assert "rms_norm" in lines and "built-in" in lines["rms_norm"]
    assert "layer_norm" in lines
    assert "Halves a tensor (test pattern)." in lines["test_listed_pattern"]
    assert "[user, priority 0]" in lines["test_listed_pattern"]
    rows = {r["name"]: r for r in json.loads(out2)["patterns"]}
    assert rows["test_listed_pattern"]["source"] == "user"
    assert rows["rms_norm"]["variants"] >= 1


def test_console_script_error_and_success(model_file, tmp_path):
    exe = shutil.which("ligerfx")
    cmd = [exe] if exe else [sys.executable, "-m", "ligerfx"]
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run(cmd + ["dump", "no/such/file.py:make"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and r.stderr == "ligerfx: error: no such file: no/such/file.py\n"
    out_path = tmp_path / "d.json"
    r = subprocess.run([sys.executable, "-m", "ligerfx", "dump", f"{model_file}:make", "-f", "json",
                        "-o", str(out_path)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(out_path.read_text())["counts"] == {"rms_norm": 1}
