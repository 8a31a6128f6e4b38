"""The ``slimtorch`` command line: prune, compact, report, recipe, table61, prune-sentence, demo.

Every bad argument or file ends the command with exit code 2 and one line saying what is wrong and
what to do; nothing is half-written (outputs are written atomically, after the work succeeded).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from slimtorch.cli.common import OneLineParser, add_threads_arg, apply_threads, positive_int
from slimtorch.errors import SlimError

__all__ = ["build_parser", "main"]


def _demo(args: argparse.Namespace) -> int:
    from slimtorch.cli.demo import run_demo

    apply_threads(args)
    run_demo(args.out, epochs=args.epochs, finetune_epochs=args.finetune_epochs, seed=args.seed)
    return 0


def _recipe(args: argparse.Namespace) -> int:
    from slimtorch.atomic import check_output_folder
    from slimtorch.recipes.outputs import OUTPUTS, stages_markdown, write_outputs
    from slimtorch.recipes.runner import run_recipe
    from slimtorch.recipes.schema import load_recipe
    from slimtorch.recover.distributed import init_distributed, shutdown_distributed

    apply_threads(args)
    recipe = load_recipe(args.file)
    check_output_folder(args.out, OUTPUTS)  # before any training: an --out that cannot take them fails now
    info = init_distributed()
    result = run_recipe(recipe, args.out, data_dir=args.data_dir, resume=args.resume)
    if info.is_main:
        paths = write_outputs(result, args.out, title=f"recipe {args.file}", extra={"recipe": recipe.to_dict()})
        print(f"\n{stages_markdown(result.stages)}\n\nwrote {', '.join(str(p) for p in paths)}")
    shutdown_distributed()  # (after a failure torchrun stops the other processes: no barrier to wait at)
    return 0


def _table61(args: argparse.Namespace) -> int:
    from slimtorch.recipes.table61 import Table61Config, run_table61

    apply_threads(args)
    config = Table61Config(data_dir=args.data_dir, limit=args.limit, epochs=args.epochs,
                           sparsities=tuple(args.sparsities), recipes=tuple(args.recipes), seed=args.seed)
    run_table61(config, args.out, resume=args.resume)
    return 0


def _add_recipe(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("recipe", help="run a YAML recipe (train, prune, compact, distill, finetune); "
                                      "works under torchrun for data-parallel training")
    r.add_argument("file", help="the recipe YAML file")
    r.add_argument("--out", default="runs/recipe", help="folder for reports, figure, model and checkpoints")
    r.add_argument("--data-dir", default=None, help="folder with the local dataset files (overrides the recipe's)")
    r.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoints")
    add_threads_arg(r)
    r.set_defaults(func=_recipe)


def _add_table61(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("table61", help="the book's Table 6.1 experiment on CIFAR-10, with the book's recipe "
                                       "and ours side by side")
    t.add_argument("--data-dir", required=True, help="folder holding cifar10_jpeg.npz")
    t.add_argument("--out", default="runs/table61", help="folder for table61.md, table61.json, table61.png")
    t.add_argument("--limit", type=positive_int, default=None, help="first N train and test images only")
    t.add_argument("--epochs", type=positive_int, default=10, help="training epochs per row (the book: 10)")
    t.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    t.add_argument("--recipes", nargs="+", choices=("book", "ours"), default=["book", "ours"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue a killed run (finished rows are kept)")
    add_threads_arg(t)
    t.set_defaults(func=_table61)


def build_parser() -> argparse.ArgumentParser:
    from slimtorch.cli.commands import add_commands
    from slimtorch.cli.sentence import add_sentence_command

    parser = OneLineParser(prog="slimtorch", description="Make PyTorch models smaller and faster.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub)
    _add_recipe(sub)
    _add_table61(sub)
    add_sentence_command(sub)
    demo = sub.add_parser("demo", help="offline demo on scikit-learn's digits: train, prune, compact, distil, report")
    demo.add_argument("--out", default="runs/demo", help="folder for report.md, report.json and the figures")
    demo.add_argument("--epochs", type=positive_int, default=8, help="training epochs before pruning")
    demo.add_argument("--finetune-epochs", type=positive_int, default=4, help="distillation epochs after pruning")
    demo.add_argument("--seed", type=int, default=0)
    add_threads_arg(demo)
    # one thread: the demo's model is tiny, and a second thread only adds overhead (more on a busy machine)
    demo.set_defaults(func=_demo, threads=1)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SlimError as err:
        message = " ".join(str(err).split("\n"))  # one line, always
        print(f"slimtorch {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # a file that cannot be read or written
        print(f"slimtorch {args.command}: error: {err.strerror or err}: {err.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return 2
    except ImportError as err:  # an optional dependency is missing; the message names the extra to install
        print(f"slimtorch {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
