"""Inductor's on-disk caches shared by processes that compile in different ligerfx modes.

Inductor keeps compiled graphs in an FX-graph cache and an AOTAutograd cache under
TORCHINDUCTOR_CACHE_DIR, shared by every process of the user.  Whatever ligerfx decides at compile
time (the interpreter or the CPU torch path, the CPU decompositions handed to inductor, the fused
lm head's logits-gradient mode, the backend options) must either be part of those caches' keys or
leave the compiled code valid in every mode; otherwise a graph compiled in one mode is loaded by a
process in another and fails there (or computes something else).

Each test runs tests/compile_cache_child.py in fresh processes, one per mode, all sharing one new
cache folder: every mode after the first finds the entries of each mode run before it.  The two
orders (a sequence and its reverse) put every pair of modes in both orders.  Each run is compared
with eager (training step: loss, logits, every gradient; then a no-grad forward).  The interpreter
mode, run again after the others, must be served by the cache: the key is stable and caching
stays on.  (It is the mode to rerun because torch 2.13's FX-graph cache bypasses every compile
given its own decomposition table, which the CPU torch path modes are: nothing of theirs is
stored there.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CHILD = ROOT / "tests" / "compile_cache_child.py"

# name -> (environment, child spec)
MODES = {
    # Triton kernels under the interpreter; the ops stay calls, the lm head chunks its gradients
    "interpreter": ({"TRITON_INTERPRET": "1"}, {"case": "logits"}),
    # CPU torch path: ops decomposed for inductor, the lm head in its logits-gradient mode
    "decomposed": ({"TRITON_INTERPRET": "0"}, {"case": "logits"}),
    # CPU torch path, the loss alone (the lm head keeps its chunked op: no logits-gradient mode)
    # and an option (RoPE left to inductor)
    "loss-only": ({"TRITON_INTERPRET": "0"}, {"case": "loss", "options": {"exclude": ["rope"]}}),
}
ORDER = ["interpreter", "decomposed", "loss-only"]

# Relative error against eager (fp32): the compiled code rounds differently from eager, by a few
# ulps; a graph of another mode fails outright or is far off.
TOL = 1e-5


def run_child(mode: str, cache_dir: Path) -> dict:
    env_over, spec = MODES[mode]
    env = dict(os.environ)
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    env.update(env_over)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                   else [])),
        TORCHINDUCTOR_CACHE_DIR=str(cache_dir),
        TRITON_CACHE_DIR=str(cache_dir / "triton"),
        TORCHINDUCTOR_FX_GRAPH_CACHE="1",
        TORCHINDUCTOR_AUTOGRAD_CACHE="1",
    )
    proc = subprocess.run([sys.executable, str(CHILD), json.dumps(spec)], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, (f"mode {mode}: the child printed no result (exit {proc.returncode})\n"
                   f"{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    assert Path(result["ligerfx"]) == ROOT, \
        f"the child imported ligerfx from {result['ligerfx']}, not from {ROOT}"
    assert "error" not in result, (f"mode {mode} failed with the cache of the earlier modes: "
                                   f"{result['error']}\n{result.get('traceback', '')}")
    assert result["rewrites"].get("fused_linear_cross_entropy") == 1, result["rewrites"]
    worst = max(result["errors"].items(), key=lambda kv: kv[1])
    assert worst[1] < TOL, f"mode {mode}: {worst[0]} differs from eager by {worst[1]:.2e}"
    return result


def _aot(result: dict, what: str) -> int:
    return result["counters"]["aot_autograd"].get(f"autograd_cache_{what}", 0)


def _fx(result: dict, what: str) -> int:
    return result["counters"]["inductor"].get(f"fxgraph_cache_{what}", 0)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_modes_share_one_cache_folder(tmp_path, order):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3ForCausalLM"):
        pytest.skip("this transformers has no Qwen3")
    modes = ORDER if order == "forward" else ORDER[::-1]
    for i, mode in enumerate(modes):
        r = run_child(mode, tmp_path)
        # No two modes compile the same thing: an entry of an earlier mode must not be served.
        assert _aot(r, "hit") == 0 and _aot(r, "miss") > 0, \
            (f"mode {mode} after {modes[:i]}: AOTAutograd cache counters "
             f"{r['counters']['aot_autograd']}")
    if order == "forward":
        # The interpreter mode again, after the others wrote to the folder: every graph
        # (training and inference) comes from the cache.  Once is enough: in the reverse order
        # the others ran before its first run.
        r = run_child("interpreter", tmp_path)
        assert _aot(r, "hit") > 0 and _aot(r, "miss") == 0 and _fx(r, "miss") == 0, \
            f"the interpreter mode run again was not served by the cache: {r['counters']}"


# -- in one process: the pieces ---------------------------------------------------------------

def _flce_args(logits_mode: int):
    torch.manual_seed(0)
    h, w = torch.randn(6, 8), torch.randn(40, 8) * 0.2
    t = torch.randint(0, 40, (6,))
    # return_logits, fp32, "mean": a call the logits-gradient mode is allowed for
    return (h, w, None, t, None, -100, "mean", 0.0, 0.0, 0.0, 1.0, True, True, True, False, 0,
            logits_mode)


@pytest.mark.parametrize("logits_mode", [0, 1])
def test_flce_outputs_follow_logits_mode_not_the_environment(monkeypatch, logits_mode):
    # Given logits_mode, fake and real outputs have the same shapes under the interpreter and on
    # the CPU torch path (a graph compiled in one is valid in the other).
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.liger.fused_linear_cross_entropy.default
    args = _flce_args(logits_mode)
    shapes = set()
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        shapes.add(tuple(tuple(o.shape) for o in real))
        shapes.add(tuple(tuple(o.shape) for o in fake))
    assert len(shapes) == 1, shapes
    grad_logits = shapes.pop()[6]
    assert (grad_logits != (0,)) == bool(logits_mode)


@pytest.mark.parametrize("path,want", [("torch", 1), ("triton", 0)])
def test_rewriter_writes_the_logits_mode_into_the_graph(monkeypatch, path, want):
    import ligerfx.backend as backend

    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "triton" else "0")
    graphs = []

    def capture(*_args, **_kw):
        return lambda gm, example_inputs: (graphs.append(gm), gm.forward)[1]

    monkeypatch.setattr(backend, "_inner", capture)
    head = torch.nn.Linear(8, 40, bias=False)

    def step(h, t):
        logits = head(h).float()
        return torch.nn.functional.cross_entropy(logits, t), logits

    h, t = torch.randn(6, 8, requires_grad=True), torch.randint(0, 40, (6,))
    torch.compile(step, backend="liger", options={"log_report": False})(h, t)
    calls = [n for gm in graphs for n in gm.graph.nodes
             if n.target in (torch.ops.liger.fused_linear_cross_entropy,
                             torch.ops.liger.fused_linear_cross_entropy.default)]
    assert len(calls) == 1, [gm.graph for gm in graphs]
    args = calls[0].args
    # logits_mode, the op's 17th argument: decided at compile time, not left to -1 (the run's env)
    assert len(args) == 17 and args[16] == want, args


def test_cache_token_covers_each_decision(monkeypatch):
    from ligerfx.compiler.cache_key import token
    from ligerfx.kernels.runtime import cpu_decompositions
    from ligerfx.options import Options

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    table = cpu_decompositions()
    base = token(Options(), None, table)
    assert token(Options(), None, dict(table)) == base  # the same decisions, the same token
    assert token(Options(log_report=False), None, table) == base  # reporting only
    others = {
        "options": token(Options.from_any({"exclude": ["rope"]}), None, table),
        "mode": token(Options(), "max-autotune", table),
        "decompositions": token(Options(), None, {}),
    }
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    others["interpreter"] = token(Options(), None, table)
    assert all(t != base for t in others.values()), others
    assert len(set(others.values())) == len(others)


def test_config_patches_keep_a_users_pass():
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from ligerfx.compiler.cache_key import CacheKeyPass, config_patches

    class Users(CustomGraphPass):
        def __call__(self, graph):
            pass

        def uuid(self):
            return "users-pass"

    (slot, ours), = config_patches("t0").items()
    assert slot == "post_grad_custom_post_pass" and ours.uuid() == "ligerfx:t0"
    with config.patch(post_grad_custom_post_pass=Users()):
        patched = config_patches("t1")["post_grad_custom_post_pass"]
    passes = patched if isinstance(patched, list) else [patched]
    uuids = [p.uuid() for p in passes]
    # either a list holding both passes (a torch taking lists) or ours wrapping the user's
    assert uuids in (["users-pass", "ligerfx:t1"], [("ligerfx:t1", "users-pass")]), uuids
    assert all(isinstance(p, (Users, CacheKeyPass)) for p in passes)


class _NormHead(torch.nn.Module):
    """An RMSNorm before a linear: one `liger::rms_norm`, a training graph (forward and
    backward) small enough to compile in seconds."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(16) + 0.5)
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        v = x.pow(2).mean(-1, keepdim=True)
        return self.proj(x * torch.rsqrt(v + 1e-6) * self.weight)


def test_the_token_enters_both_cache_keys(tmp_path, monkeypatch, triton_path):
    # One graph compiled three times in one cache folder: the same decisions are served by both
    # caches; an option that changes nothing in this graph (excluding a pattern it does not
    # have) but the token misses both the AOTAutograd cache and the FX-graph cache.
    import torch._functorch.config as functorch_config
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model, x = _NormHead(), torch.randn(4, 16)

    def compile_once(options):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="liger",
                                 options={"inner": "inductor", "log_report": False, **options})
        compiled(x).sum().backward()
        return dict(counters["aot_autograd"]), dict(counters["inductor"])

    with inductor_config.patch(fx_graph_cache=True), \
            functorch_config.patch(enable_autograd_cache=True):
        aot, fx = compile_once({})
        assert aot.get("autograd_cache_miss") == 1 and aot.get("autograd_cache_saved") == 1, aot
        aot, fx = compile_once({})
        assert aot.get("autograd_cache_hit") == 1, aot
        aot, fx = compile_once({"exclude": ["cross_entropy"]})
        assert aot.get("autograd_cache_miss") == 1 and not aot.get("autograd_cache_hit"), aot
        assert fx.get("fxgraph_cache_miss") == 2 and not fx.get("fxgraph_cache_hit"), fx
