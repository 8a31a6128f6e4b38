"""Where pruning and compaction spend their time, stage by stage (one model, one process).

Runs ``compute_masks`` (50% L1 channels of every Conv2d and Linear but the classifier) and ``compact_`` on
fresh copies of a torchvision model, timing the stages inside them, and prints a Markdown table: the
fastest of the runs (the one least disturbed by other tenants of a shared machine) and the median, per
stage. The first run warms up and is not counted. Stages nest: the masked pass is part of "compaction plan".
A stage that did not run (e.g. the measured masked pass, when the plan takes the shapes-only trace's
structure and the check runs on a forward pass of the masked model on live blocks instead) shows 0.

    PYTHONPATH=src python benchmarks/stages.py --model mobilenet_v2 --runs 15

The stages are found by wrapping slimtorch's internal functions for the duration of the script (a
profiler's own cost would swamp stages of a few milliseconds).
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torchvision
from torch import nn

from slimtorch import compact_, compute_masks
from slimtorch.compact import compact as compact_module
from slimtorch.compact import plan as plan_module
from slimtorch.graph import blocks as blocks_module
from slimtorch.graph import graph as graph_module
from slimtorch.prune import coupled as coupled_module
from slimtorch.prune import pruner as pruner_module

# (label, owner, attribute): the owner's attribute is wrapped. The graph builds are wrapped where each
# caller looks them up, so that the shapes-only trace and the masked pass are told apart.
STAGES: list[tuple[str, Any, str]] = [
    ("layer selection and scoring", pruner_module, "plan_layers"),
    ("per-layer keep flags", pruner_module, "unit_keep"),
    ("shapes-only trace", coupled_module, "build_graph"),
    ("coupled selection", coupled_module, "_select"),
    ("never emptying a layer", coupled_module, "_keep_one"),
    ("graph masks", graph_module.DependencyGraph, "masks"),
    ("per-member removal flags (all calls)", graph_module.DependencyGraph, "removed_per_member"),
    ("compaction plan", compact_module, "plan_compaction"),
    ("live rows and columns", plan_module, "live_blocks"),
    ("masked copies of the weights", plan_module, "_masked"),
    ("weights left unmasked", plan_module, "_unmasked"),
    ("structure from the shapes-only trace", plan_module, "known_structure"),
    ("masked pass (measured)", plan_module, "build_graph"),
    ("masked reference (forward on live blocks)", compact_module, "_masked_reference"),
    ("removal requests", plan_module, "_requests"),
    ("consumer checks", plan_module, "_check_sinks"),
    ("module changes", plan_module, "_module_changes"),
    ("snapshot for restoring", compact_module, "_Snapshot"),
    ("surgery", compact_module, "_apply"),
    ("check of the result", compact_module, "_verify"),
]


@contextmanager
def timed_stages(times: dict[str, float]) -> Iterator[None]:
    """Wrap every stage's function for the block, adding its time to ``times[label]``."""
    originals = []

    def wrap(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[label] += time.perf_counter() - start

        return run

    try:
        for label, owner, attr in STAGES:
            fn = owner.__dict__[attr]  # (a KeyError names a stage whose function moved)
            originals.append((owner, attr, fn))
            setattr(owner, attr, wrap(label, fn))
        yield
    finally:
        for owner, attr, fn in reversed(originals):
            setattr(owner, attr, fn)


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


def main() -> None:
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
    args = parser.parse_args()
    if args.measured:
        plan_module.known_structure = lambda *_, **__: None
    if args.cut_every_layer:
        blocks_module._pays = lambda *_: True
    torch.manual_seed(0)
    dense = torchvision.models.get_model(args.model, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    head = [n for n, m in dense.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    config = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5}, {"exclude": True, "op_names": [head]}]
    per_run: dict[str, list[float]] = collections.defaultdict(list)
    for run in range(args.runs + 1):
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
    print(f"{args.model}, input 1x3x{args.size}x{args.size}, {args.runs} runs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; compaction plans "
          f"{'from a measured pass' if args.measured else 'from the shapes-only trace where no value matters'}; "
          f"live blocks cut {'in every layer' if args.cut_every_layer else 'where it pays'}\n")
    print("| stage | fastest (ms) | median (ms) |\n|---|---:|---:|")
    for label in [*(s[0] for s in STAGES), "compute_masks, in all", "compact_, in all",
                  "for comparison: a plain forward of the masked model"]:
        found = per_run.get(label) or [0.0]
        print(f"| {label} | {min(found) * 1e3:.1f} | {statistics.median(found) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
