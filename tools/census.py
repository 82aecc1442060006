"""Census: every causal LM type of the installed transformers, built tiny, compiled with ligerfx.

For each entry of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` that builds from a tiny config
(`ligerfx.dump.hf_targets.tiny_config_kwargs`): find its sites (norm module calls, rotary attention
calls, gated / ReLU² MLPs, the loss: tests/models/families.py `find_sites`), compile a copy with
`backend="liger"` (inner eager by default: the rewritten graph run by Python with the
`liger::` ops' autograd; `--inner aot_eager` traces it with AOTAutograd, falling back to eager
where aot_eager itself fails), run one forward +
backward, compare loss and every gradient with eager, and print one line per type:

    llama        full   rms_norm=5 rope=2 swiglu=2 fused_linear_cross_entropy=1  add+norm 0/4  3.1s

`full`: every site rewritten and eager-equal; `partly`: some site kind has fewer (or more)
rewrites than sites (listed as `missing kind found/sites`), with the near misses that explain it
(`SILENT` when there is none).  Sites are counted per module call, so rewrites are counted per
graph *run* (`as run ...` when that differs from the report's per-graph counts: a graph reused
by every layer after a graph break); a gated norm that gates before the norm (Mamba-2) is covered
by its exact composition, a `swiglu` and a norm in its module (`gated_norm as gate product +
norm`); `failed`: the compiled step raised or differs from eager; `torch fails`: it raised and
a plain `torch.compile(backend="eager")` step (no ligerfx) raises too;
`no build`: no tiny model of that type (the reason).  The summary counts each class.

    python tools/census.py                        # all types, ~1 h on 2 CPU cores
    python tools/census.py --only llama,qwen3_next --verbose
    python tools/census.py --out benchmarks/results/census.txt --jsonl /tmp/census.jsonl

Results are appended per type to `--jsonl` as they finish, and types already there are skipped
(`--resume`), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import logging
import os
import signal
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TRITON_INTERPRET", "0")  # the torch path: kernels are tested elsewhere

import torch  # noqa: E402

import ligerfx.backend  # noqa: E402


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int):
    def fire(signum, frame):
        raise _Timeout(f"over the {seconds} s limit")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def _loss(out):
    return out.loss if getattr(out, "loss", None) is not None else out[0].float().sum()


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _counting_backend(options: dict, runs: collections.Counter):
    """The liger backend, with each compiled graph counting its rewrites every time it runs.

    A report counts rewrites per graph, but one graph may run several times: a model whose
    layers break the graph (JetMoE's data-dependent expert routing) compiles each decoder
    layer's pieces once and every layer reruns them.  Sites are counted per call, so the census
    compares them with `runs` (rewrites per executed graph), not with the report's counts.
    """
    def backend(gm, example_inputs):
        mine = []
        plain = ligerfx.backend.rewrite

        def keep(*args, **kwargs):
            mine.append(plain(*args, **kwargs))
            return mine[-1]

        ligerfx.backend.rewrite = keep
        try:
            fn = ligerfx.backend.liger_backend(gm, example_inputs, options=options)
        finally:
            ligerfx.backend.rewrite = plain
        counts = collections.Counter(m.pattern for r in mine for m in r.matches)

        def run(*args):
            runs.update(counts)
            return fn(*args)
        return run
    return backend


def _train_step(model, inputs, inner):
    """Eager and compiled copies, one step each: (report, max relative error over loss+grads)."""
    test = copy.deepcopy(model)
    ref_loss = _loss(model(**inputs))
    ref_loss.backward()
    torch._dynamo.reset()
    ligerfx.backend.last_report = None
    runs = collections.Counter()
    compiled = torch.compile(test, backend=_counting_backend(
        {"inner": inner, "log_report": False}, runs))
    loss = _loss(compiled(**inputs))
    loss.backward()
    report = ligerfx.backend.last_report
    if report is not None:
        report.runs = dict(runs)
    err = _rel(loss.detach(), ref_loss.detach())
    pairs = [(p_ref.grad, p.grad) for p_ref, p in zip(model.parameters(), test.parameters())
             if p_ref.grad is not None]
    total = sum(g.double().norm() ** 2 for g, _ in pairs) ** 0.5
    for g_ref, g in pairs:
        if g is None:
            return report, float("inf")
        # A gradient that is zero in exact arithmetic (a key bias under softmax, the gate of a
        # hash-routed or top-1 MoE layer) is rounding noise in both: its own norm is no scale.
        # The floor, 1e-4 of the whole gradient's norm, makes differences below rtol * 1e-4 of
        # it (1e-8 at rtol 1e-4) count as equal: far under fp32's resolution of that norm
        # (eps 1.2e-7), and far under what a wrong formula gives.
        scale = max(g_ref.double().norm(), 1e-4 * total)
        err = max(err, ((g.double() - g_ref.double()).norm() / scale).item())
    return report, err


def _torch_alone_fails(model, inputs) -> bool:
    """Whether a plain torch.compile (Dynamo, no ligerfx) fails the same training step."""
    torch._dynamo.reset()
    try:
        with _time_limit(120):
            _loss(torch.compile(copy.deepcopy(model), backend="eager")(**inputs)).backward()
    except Exception:  # noqa: BLE001
        return True
    finally:
        torch._dynamo.reset()
    return False


def census_one(model_type: str, limit: int, rtol: float, inner: str) -> dict:
    from tests.models.families import MLP_OPS, build_tiny, composed, extra, find_sites, unrewritten

    row = dict(type=model_type)
    t0 = time.time()
    try:
        with _time_limit(limit):
            model, inputs = build_tiny(model_type)
            with torch.no_grad():
                model(**copy.deepcopy(inputs))  # eager must run before it can be compared
    except Exception as e:  # noqa: BLE001 - any failure to build is reported, in one line
        return dict(row, status="no build", reason=_one_line(e), seconds=time.time() - t0)
    try:
        with _time_limit(limit):
            sites = find_sites(model, inputs)
            try:
                report, err = _train_step(model, inputs, inner)
            except _Timeout:
                raise
            except Exception as e:  # noqa: BLE001 - aot_eager alone may not train it: try eager
                if inner == "eager":
                    raise
                row["aot_eager_error"] = _one_line(e)
                model.zero_grad(set_to_none=True)
                inner = "eager"
                report, err = _train_step(model, inputs, inner)
    except Exception as e:  # noqa: BLE001
        why = _one_line(e)
        if _torch_alone_fails(model, inputs):
            # Dynamo cannot compile it without ligerfx either: not a failure of ours
            return dict(row, status="torch fails", reason=f"torch.compile(backend='eager') "
                        f"fails too: {why}", seconds=time.time() - t0)
        return dict(row, status="failed", reason=why, seconds=time.time() - t0)
    counts = report.counts if report else {}
    runs = getattr(report, "runs", counts) if report else {}
    n_composed = composed(report.matches, sites) if report else 0
    missing = unrewritten(runs, sites, add_norm=False, n_composed=n_composed)
    want = sites.expected()
    row.update(
        inner=inner, counts=counts, rel_err=err, missing={k: list(v) for k, v in missing.items()},
        runs=runs,
        add_norm=[runs.get("add_rms_norm", 0) + runs.get("add_layer_norm", 0),
                  want["add_norm"]],
        extra={k: list(v) for k, v in extra(runs, sites, n_composed).items()},
        composed=[n_composed, want["gated_norm"]],
        other_mlps=sorted({k for _, k in sites.mlps if k not in MLP_OPS}),
        near_misses=[str(n) for n in (report.near_misses if report else [])],
        graphs=report.graphs if report else 0, seconds=time.time() - t0)
    if not err < rtol:
        row.update(status="failed", reason=f"not eager-equal: relative error {err:.2e}")
    else:
        row["status"] = "partly" if missing else "full"
    return row


def format_row(r: dict, verbose: bool = False) -> str:
    head = f"{r['type']:<26} {r['status']:<8}"
    if r["status"] in ("no build", "torch fails"):
        return f"{head} {r['reason']}"
    if r["status"] == "failed" and "counts" not in r:
        return f"{head} {r['reason']}"
    counts = " ".join(f"{k}={v}" for k, v in sorted(r["counts"].items())) or "no rewrites"
    parts = [head, counts]
    runs = r.get("runs")
    if runs and runs != r["counts"]:  # graphs that ran more than once (see _counting_backend)
        parts.append("| as run " + " ".join(f"{k}={v}" for k, v in sorted(runs.items())))
    if r["missing"]:
        parts.append("| missing " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in r["missing"].items()))
        parts.append(f"| near misses {len(r['near_misses'])}" if r["near_misses"] else "| SILENT")
    if r.get("composed", [0])[0]:
        parts.append("| gated_norm as gate product + norm {}/{}".format(*r["composed"]))
    a, b = r["add_norm"]
    if b:
        parts.append(f"| add+norm {a}/{b}")
    if r.get("extra"):
        parts.append("| more than sites " + ", ".join(
            f"{k} {a}/{b}" for k, (a, b) in r["extra"].items()))
    if r["other_mlps"]:
        parts.append("| other MLPs: " + ", ".join(r["other_mlps"]))
    if r.get("aot_eager_error"):
        parts.append(f"| inner {r['inner']} (aot_eager: {r.get('aot_eager_error', '')[:60]})")
    if r["status"] == "failed":
        parts.append(f"| {r['reason']}")
    parts.append(f"| {r['seconds']:.0f}s")
    lines = [" ".join(parts)]
    if verbose or r["missing"]:
        seen = set()
        for nm in r["near_misses"]:
            short = nm.split(": not rewritten: ", 1)
            key = short[0].split(" at ")[0] + ": " + (short[1] if len(short) > 1 else nm)
            if key not in seen:
                seen.add(key)
                lines.append(f"{'':29}near miss {key[:220]}")
    return "\n".join(lines)


def summary(rows: list) -> str:
    by = {}
    for r in rows:
        by[r["status"]] = by.get(r["status"], 0) + 1
    built = len(rows) - by.get("no build", 0)
    silent = sum(1 for r in rows if r["status"] == "partly" and not r["near_misses"])
    return (f"{len(rows)} causal LM types: {built} built, {by.get('full', 0)} fully rewritten, "
            f"{by.get('partly', 0)} partly ({silent} without a near miss), "
            f"{by.get('failed', 0)} failed, {by.get('torch fails', 0)} that torch.compile alone "
            f"cannot train, {by.get('no build', 0)} not built")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated model types")
    ap.add_argument("--limit", type=int, default=300, help="seconds per model type")
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--inner", default="eager", choices=("eager", "aot_eager"),
                    help="backend under ligerfx (eager: the liger ops' own autograd, no AOT "
                         "tracing, several times faster; aot_eager falls back to eager on error)")
    ap.add_argument("--jsonl", help="append each result here; types already in it are skipped")
    ap.add_argument("--out", help="also write the table and summary to this file")
    ap.add_argument("--verbose", action="store_true", help="near misses of every type")
    ap.add_argument("--no-run", action="store_true",
                    help="only print what --jsonl holds; types not in it are listed as not run")
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    transformers.logging.set_verbosity_error()
    types = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if args.only:
        wanted = args.only.split(",")
        unknown = [t for t in wanted if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
        if unknown:
            ap.error(f"not causal LM types of transformers {transformers.__version__}: "
                     f"{', '.join(unknown)}")
        types = wanted
    done = {}
    if args.jsonl and os.path.exists(args.jsonl):
        with open(args.jsonl) as f:
            for line in f:
                r = json.loads(line)
                done[r["type"]] = r
    rows = []
    for t in types:
        if t in done:
            r = done[t]
        elif args.no_run:
            print(f"{t:<26} not run", flush=True)
            continue
        else:
            r = census_one(t, args.limit, args.rtol, args.inner)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(r) + "\n")
        rows.append(r)
        print(format_row(r, args.verbose), flush=True)
    text = summary(rows)
    if len(rows) < len(types):
        text += f"; {len(types) - len(rows)} types not run (listed as such)"
    print(text)
    if args.out:
        head = (f"# tools/census.py, transformers {transformers.__version__}, torch "
                f"{torch.__version__}, CPU, inner {args.inner}\n")
        with open(args.out, "w") as f:
            by_type = {r["type"]: r for r in rows}
            lines = [format_row(by_type[t], args.verbose) if t in by_type else f"{t:<26} not run"
                     for t in types]
            f.write(head + "\n".join(lines) + "\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
