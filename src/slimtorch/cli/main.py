"""The ``slimtorch`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from slimtorch.errors import SlimError

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from slimtorch.cli.demo import run_demo

    run_demo(args.out, epochs=args.epochs, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimtorch", description="Make PyTorch models smaller and faster.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline demo on scikit-learn's digits: train, prune, report")
    demo.add_argument("--out", default="runs/demo", help="folder for report.md, report.json and demo.png")
    demo.add_argument("--epochs", type=int, default=8, help="training epochs before pruning")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SlimError as err:
        print(f"slimtorch: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
