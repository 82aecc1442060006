"""The `ligerfx` command line: `ligerfx demo`, `ligerfx dump TARGET`, `ligerfx patterns`."""

from __future__ import annotations

import argparse
import json
import sys


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _demo(args) -> int:
    from .demo import run

    run(steps=args.steps, inner=args.inner, device=args.device)
    return 0


def _dump(args) -> int:
    from ligerfx.dump import DumpError, dump_target, render

    options = None
    if args.options:
        try:
            options = json.loads(args.options)
        except json.JSONDecodeError as e:
            raise CLIError(f"--options is not valid JSON: {e}") from None
        if not isinstance(options, dict):
            raise CLIError("--options must be a JSON object, e.g. '{\"exclude\": [\"rms_norm\"]}'")
    try:
        d = dump_target(args.target, options)
    except DumpError as e:
        raise CLIError(str(e)) from e
    text = render(d, args.format)
    if args.output and args.output != "-":
        try:
            with open(args.output, "w") as f:
                f.write(text)
        except OSError as e:
            raise CLIError(f"cannot write {args.output}: {e.strerror}") from None
        print(f"ligerfx: wrote {args.format} dump of {args.target} to {args.output} "
              f"({sum(d.report.counts.values())} rewrite(s))", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _patterns(args) -> int:
    import warnings

    from ligerfx import plugins

    with warnings.catch_warnings():
        # Plugin failures are listed below, once, instead of as Python warnings.
        warnings.simplefilter("ignore", RuntimeWarning)
        from ligerfx import builtins  # noqa: F401 - built-ins and plugins
    from ligerfx.compiler.pattern import REGISTRY

    rows = []
    for p in REGISTRY.ordered():
        src = "built-in" if p.builtin else (f"plugin {plugins.sources[p.name]}"
                                            if p.name in plugins.sources else "user")
        rows.append(dict(name=p.name, priority=p.priority, source=src,
                         variants=len(p.variants), description=p.description))
    if args.json:
        print(json.dumps({"patterns": rows, "plugin_errors": dict(plugins.errors)}, indent=2))
        return 0
    width = max([len(r["name"]) for r in rows] + [4])
    for r in rows:
        desc = (r["description"] or "").splitlines()[0] if r["description"] else "-"
        print(f"{r['name']:<{width}}  {desc}  [{r['source']}, priority {r['priority']}]")
    for name, err in plugins.errors.items():
        print(f"warning: pattern plugin {name!r} failed to load: {err}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ligerfx", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="rewrite and train the built-in Llama-style example model")
    d.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    d.add_argument("--inner", choices=["inductor", "aot_eager", "eager"], default=None,
                   help="inner backend (default: inductor on CUDA, aot_eager on CPU)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.set_defaults(func=_demo)

    from ligerfx.dump import FORMATS

    u = sub.add_parser("dump", help="trace a model offline and show what would be rewritten",
                       description="Trace TARGET offline (no training, no GPU) and write the "
                       "graphs before/after the rewrite, each rewrite with its pattern and source "
                       "line, each near miss with its reason, and the counts.")
    u.add_argument("target", help="path/to/file.py:factory, package.module:factory (the factory "
                   "returns (model, args) or (model, args, kwargs)), hf:MODEL_TYPE (e.g. hf:llama) "
                   "or hf:path/to/config.json")
    u.add_argument("--format", "-f", choices=FORMATS, default="text", help="output format (default text)")
    u.add_argument("-o", "--output", default=None, help="write to this file (default: stdout)")
    u.add_argument("--options", default=None,
                   help="backend options as JSON, e.g. '{\"exclude\": [\"rms_norm\"]}'")
    u.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show full tracebacks on errors")
    u.set_defaults(func=_dump)

    t = sub.add_parser("patterns", help="list the registered patterns (built-in and plugins)")
    t.add_argument("--json", action="store_true", help="machine-readable output")
    t.set_defaults(func=_patterns)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug shows the traceback
        if getattr(args, "debug", False):
            raise
        msg = str(e) if isinstance(e, CLIError) else f"{type(e).__name__}: {e}"
        print(f"ligerfx: error: {msg.strip().splitlines()[0] if msg.strip() else msg}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
