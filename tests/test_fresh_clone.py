"""A checkout's root on sys.path hides no other distribution, and the project imports its own
packages only as `ligerfx.kernels` / `ligerfx.patterns` (issue 20: transformers 5.25 imports
Hugging Face's `kernels` at start-up, and the root's kernels/ used to be found first).

The children run with the repository root as their working directory and first on sys.path, as
`python -m ligerfx ...`, a script or a notebook started there would have it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every folder at the root that holds Python code, and the names it would take if importable bare.
TOP_FOLDERS = ("kernels", "patterns", "tests", "tools", "benchmarks", "docs")
SOURCE_FOLDERS = ("ligerfx", "kernels", "patterns", "tests", "tools", "benchmarks")


def _child(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = ROOT  # first on sys.path, as the root is when Python starts there
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_root_folders_are_not_regular_packages():
    """A folder with an __init__.py at the root would be a regular package, which shadows an
    installed distribution of the same name; a namespace portion never does."""
    regular = [d for d in TOP_FOLDERS if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))]
    assert not regular, (f"{regular}: an __init__.py at the repository root makes the folder a "
                         "top-level package that hides any installed distribution of that name")


@pytest.mark.parametrize("name", ["kernels", "patterns", "tests", "tools", "benchmarks"])
def test_an_installed_distribution_wins_over_the_root(tmp_path, name):
    """Whatever `name` a distribution installs, it is what `import name` gives from the root."""
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("MARK = 'installed'\n")
    # after every root entry (the working directory and PYTHONPATH), before site-packages
    code = (f"import sys; sys.path.insert(sys.path.index({ROOT!r}) + 1, {str(site)!r}); "
            f"import {name}; print({name}.MARK)")
    out = _child(code)
    assert out.returncode == 0 and out.stdout.strip() == "installed", out.stderr[-2000:]


def test_transformers_builds_a_model_from_the_root():
    pytest.importorskip("transformers")
    code = (
        "import sys, os, json; assert sys.path[0] in ('', os.getcwd()) or os.getcwd() in sys.path\n"
        "import torch, transformers\n"
        "cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,\n"
        "    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)\n"
        "m = transformers.LlamaForCausalLM(cfg)\n"
        "out = m(torch.randint(0, 64, (1, 5)))\n"
        "k = sys.modules.get('kernels')\n"
        "print(json.dumps({'shape': list(out.logits.shape),\n"
        "                  'kernels': getattr(k, '__file__', None) if k else None}))\n")
    out = _child(code)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["shape"] == [1, 5, 64]
    if res["kernels"] is not None:  # transformers imported Hugging Face's kernels: not ours
        assert not os.path.abspath(res["kernels"]).startswith(os.path.join(ROOT, "kernels"))


def test_python_m_dump_from_the_root():
    pytest.importorskip("transformers")
    out = _child("", "-m", "ligerfx", "dump", "hf:llama", "-f", "json", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)  # the dump is JSON


def test_ligerfx_imports_resolve_to_this_checkout():
    import ligerfx.kernels
    import ligerfx.patterns

    for mod, folder in ((ligerfx.kernels, "kernels"), (ligerfx.patterns, "patterns")):
        assert [os.path.realpath(p) for p in mod.__path__] == \
            [os.path.realpath(os.path.join(ROOT, folder))]
    # importing one pattern module runs the package first: every built-in family is registered
    from ligerfx.compiler.pattern import REGISTRY

    assert {"rms_norm", "rope", "fused_linear_cross_entropy", "swiglu"} <= set(REGISTRY.names())


def _bare_imports(path: str) -> list[str]:
    """`import kernels...` / `from patterns... import` and their importlib spellings."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    bad = []
    for n in ast.walk(tree):
        names = []
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            names = [n.module]
        elif isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", "")) \
                in ("import_module", "__import__") and n.args \
                and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str):
            names = [n.args[0].value]
        bad += [f"{os.path.relpath(path, ROOT)}:{n.lineno}: {m}" for m in names
                if m.split(".")[0] in ("kernels", "patterns")]
    return bad


def test_no_module_imports_a_bare_kernels_or_patterns():
    bad = []
    for folder in SOURCE_FOLDERS:
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            bad += [b for f in files if f.endswith(".py")
                    for b in _bare_imports(os.path.join(dirpath, f))]
    assert not bad, ("import these as ligerfx.kernels... / ligerfx.patterns... (the bare names "
                     "belong to other distributions):\n" + "\n".join(bad))


def test_the_guard_sees_a_bare_import(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("import kernels.rope\nfrom patterns import rope\n"
                 "import importlib\nimportlib.import_module('kernels.x')\nimport ligerfx.kernels\n")
    assert len(_bare_imports(str(p))) == 3


def test_subpackage_finder_is_installed_once():
    import ligerfx
    from ligerfx import _imports

    before = list(sys.meta_path)
    _imports.install("ligerfx", ligerfx.__path__[0])
    assert sys.meta_path == before
    assert importlib.util.find_spec("ligerfx.kernels").origin.endswith("_package.py")
