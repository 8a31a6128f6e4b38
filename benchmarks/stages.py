"""Where pruning and compaction spend their time, stage by stage (one model, one process).

Runs ``compute_masks`` (50% L1 channels of every Conv2d and Linear but the classifier) and ``compact_`` on
fresh copies of a torchvision model, timing the stages inside them, and prints a Markdown table: the
fastest of the runs (the one least disturbed by other tenants of a shared machine) and the median, per
stage. The first run warms up and is not counted. Stages nest: the masked pass is part of "compaction plan".
A stage that did not run (e.g. the measured masked pass, when the plan takes the shapes-only trace's
structure and the check runs on a forward pass of the masked model on live blocks instead) shows 0.

    PYTHONPATH=src python benchmarks/stages.py --model mobilenet_v2 --runs 15
    PYTHONPATH=src python benchmarks/stages.py --smoke     # resnet18 on 32x32, one run: checks that it works

The stages are found by wrapping slimtorch's internal functions for the duration of the script (a
profiler's own cost would swamp stages of a few milliseconds). They are internal on purpose and so are
named here by their dotted paths, not imported: a stage whose function has moved stops the script with
its name (``--smoke``, which the test suite runs, is there to catch that).
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import gc
import importlib
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torchvision
from torch import nn

from slimtorch import compact_, compute_masks

# (label, owner, attribute): the owner's attribute is wrapped; an owner is a module's dotted path, with
# ":Class" for a method. The graph builds are wrapped where each caller looks them up, so that the
# shapes-only trace and the masked pass are told apart.
PRUNER, COUPLED, GRAPH = "slimtorch.prune.pruner", "slimtorch.prune.coupled", "slimtorch.graph.graph:DependencyGraph"
COMPACT, PLAN, BLOCKS = "slimtorch.compact.compact", "slimtorch.compact.plan", "slimtorch.graph.live"
STAGES: list[tuple[str, str, str]] = [
    ("layer selection and scoring", PRUNER, "plan_layers"),
    ("per-layer keep flags", PRUNER, "unit_keep"),
    ("shapes-only trace", COUPLED, "build_graph"),
    ("coupled selection", COUPLED, "_select"),
    ("never emptying a layer", COUPLED, "_keep_one"),
    ("graph masks", GRAPH, "masks"),
    ("per-member removal flags (all calls)", GRAPH, "removed_per_member"),
    ("compaction plan", COMPACT, "plan_compaction"),
    ("live rows and columns", PLAN, "live_blocks"),
    ("masked copies of the weights", PLAN, "_masked"),
    ("masks cut to what they keep (and weights left unmasked)", PLAN, "_cut_to_kept"),
    ("structure from the shapes-only trace", PLAN, "known_structure"),
    ("masked pass (measured)", PLAN, "build_graph"),
    ("masked reference (forward on live blocks)", COMPACT, "_masked_reference"),
    ("removal requests", PLAN, "requests"),
    ("consumer checks", PLAN, "check_sinks"),
    ("module changes", PLAN, "_module_changes"),
    ("snapshot for restoring", COMPACT, "Snapshot"),
    ("surgery", COMPACT, "_apply"),
    ("check of the result", COMPACT, "verify_result"),
    ("masks cut for the compacted model", COMPACT, "cut_masks"),
    ("masks put on the compacted model", COMPACT, "keep_masks_"),
]


def _owner(path: str) -> Any:
    """The module (``"pkg.mod"``) or class (``"pkg.mod:Class"``) a stage's function lives in."""
    module, _, cls = path.partition(":")
    owner = importlib.import_module(module)
    return getattr(owner, cls) if cls else owner


@contextmanager
def replaced(path: str, attr: str, make: Callable[[Any], Any]) -> Iterator[None]:
    """Within the block, ``path``'s ``attr`` is ``make(original)``; the original is put back after."""
    owner = _owner(path)
    if attr not in owner.__dict__:
        raise SystemExit(f"benchmarks/stages.py: {path}.{attr} no longer exists; update STAGES to where it went")
    original = owner.__dict__[attr]
    setattr(owner, attr, make(original))
    try:
        yield
    finally:
        setattr(owner, attr, original)


@contextmanager
def timed_stages(times: dict[str, float]) -> Iterator[None]:
    """Wrap every stage's function for the block, adding its time to ``times[label]``."""

    def wrap(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[label] += time.perf_counter() - start

        return run

    with ExitStack() as stack:
        for label, owner, attr in STAGES:
            stack.enter_context(replaced(owner, attr, functools.partial(wrap, label)))
        yield


def _plain_masked_forward(dense: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor) -> float:
    """Seconds of one forward pass of a masked copy of ``dense``, without slimtorch (the masked pass's floor)."""
    masked = copy.deepcopy(dense)
    with torch.no_grad():
        for name, p in masked.named_parameters():
            if name in masks:
                p.mul_(masks[name])
        start = time.perf_counter()
        masked(x)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mobilenet_v2", help="a torchvision classification model")
    parser.add_argument("--size", type=int, default=224, help="input height and width (batch of one)")
    parser.add_argument("--runs", type=int, default=15, help="timed runs, after one warm-up")
    parser.add_argument("--measured", action="store_true",
                        help="compaction plans from a measured masked pass even where no value would change the "
                             "plan (what it does when one would, and with verify=False)")
    parser.add_argument("--cut-every-layer", action="store_true",
                        help="with --measured: the masked pass computes every layer with a live block on it, "
                             "depthwise convolutions too, whether that pays or not (what it did before it weighed "
                             "the cost)")
    parser.add_argument("--smoke", action="store_true",
                        help="resnet18 on 32x32 inputs, one run: checks that every stage is still found, in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.size, args.runs = "resnet18", 32, 1
    with ExitStack() as stack:  # the switches hold for this run only
        if args.measured:
            stack.enter_context(replaced(PLAN, "known_structure", lambda _: lambda *_, **__: None))
        if args.cut_every_layer:
            stack.enter_context(replaced(BLOCKS, "_pays", lambda _: lambda *_: True))
        per_run = measure(args.model, args.size, args.runs)
    print(f"{args.model}, input 1x3x{args.size}x{args.size}, {args.runs} runs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; compaction plans "
          f"{'from a measured pass' if args.measured else 'from the shapes-only trace where no value matters'}; "
          f"live blocks cut {'in every layer' if args.cut_every_layer else 'where it pays'}\n")
    print("| stage | fastest (ms) | median (ms) |\n|---|---:|---:|")
    for label in [*(s[0] for s in STAGES), "compute_masks, in all", "compact_, in all",
                  "for comparison: a plain forward of the masked model"]:
        found = per_run.get(label) or [0.0]
        print(f"| {label} | {min(found) * 1e3:.1f} | {statistics.median(found) * 1e3:.1f} |")


def measure(name: str, size: int, runs: int) -> dict[str, list[float]]:
    """Seconds per stage of each run after the first (a warm-up): masks and compaction of a fresh copy."""
    torch.manual_seed(0)
    dense = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size)
    head = [n for n, m in dense.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    config = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5}, {"exclude": True, "op_names": [head]}]
    per_run: dict[str, list[float]] = collections.defaultdict(list)
    for run in range(runs + 1):
        model = copy.deepcopy(dense)
        gc.collect()
        times: dict[str, float] = collections.defaultdict(float)
        with timed_stages(times):
            start = time.perf_counter()
            masks = compute_masks(model, config, example_inputs=x)
            middle = time.perf_counter()
            compact_(model, masks, example_inputs=x)
            end = time.perf_counter()
        times["compute_masks, in all"], times["compact_, in all"] = middle - start, end - middle
        times["for comparison: a plain forward of the masked model"] = _plain_masked_forward(dense, masks, x)
        if run:  # the first run warms up
            for label, seconds in times.items():
                per_run[label].append(seconds)
    return per_run


if __name__ == "__main__":
    main()
