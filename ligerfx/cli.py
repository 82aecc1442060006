"""The `ligerfx` command line: `ligerfx demo` (more subcommands join here)."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run

    run(steps=args.steps, inner=args.inner, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ligerfx", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="rewrite and train the built-in Llama-style example model")
    d.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    d.add_argument("--inner", choices=["inductor", "aot_eager", "eager"], default=None,
                   help="inner backend (default: inductor on CUDA, aot_eager on CPU)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
