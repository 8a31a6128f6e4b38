"""How many models of a zoo each library compacts, and how many exactly: slimtorch and Torch-Pruning side by side
on one small model of every timm family (the list of ``tests/zoo_timm.py``), random weights, eval mode.

Each library prunes 50% of the channels of every convolution and linear layer by L1 magnitude its own way
(slimtorch: ``compute_masks`` then ``compact_``; Torch-Pruning: its documented ``BasePruner`` recipe with
``MagnitudeImportance``, the classifiers ignored and timm's attention heads declared), and each result is compared
on a fresh input with that library's own *masked* model: the dense model with the removed channels zeroed where
they are made (slimtorch: its masks; Torch-Pruning: every output slice of each group it removes, recorded as it
prunes). A model is

- *compacted* when the library returns a model that has fewer parameters and runs on the fresh input,
- *exact* when that model's outputs also equal the masked model's (``torch.testing.assert_close``, relative
  tolerance 1e-4, absolute 1e-5 times the output's largest value).

    PYTHONPATH=src python benchmarks/zoo_counts.py            # every family (tens of minutes single-core)
    PYTHONPATH=src python benchmarks/zoo_counts.py --families resnet vision_transformer
    PYTHONPATH=src python benchmarks/zoo_counts.py --smoke    # two tiny models: checks that every row works

Prints a table per model and the counts per library.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from slimtorch import apply_masks_, compact_, compute_masks

TESTS = Path(__file__).resolve().parents[1] / "tests"
SMOKE = {"resnet": ("test_resnet", 32, {}), "vision_transformer": ("test_vit", 32, {"img_size": 32})}

Outcome = tuple[str, str]  # (exact / inexact / no-op / fails / breaks, detail)


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """A run longer than ``seconds`` raises TimeoutError (SIGALRM: the main thread, on Unix; 0 means none)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def stop(*_: Any) -> None:
        raise TimeoutError(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _compare(model: nn.Module, masked: nn.Module, fresh: torch.Tensor, before: int) -> Outcome:
    """The outcome of a library's result against its masked model on ``fresh``."""
    after = _params(model)
    if after >= before:
        return "no-op", f"{before:,} parameters"
    with torch.no_grad():
        try:
            got = tree_leaves(model(fresh))
        except Exception as err:  # the pruned model no longer runs: a result of the library
            return "breaks", f"{type(err).__name__}: {str(err)[:60]}"
        want = tree_leaves(masked(fresh))
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        scale = max(1.0, float(b.abs().max()))
        if a.shape != b.shape:
            return "inexact", f"output shape {tuple(a.shape)} for {tuple(b.shape)}"
        try:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
        except AssertionError:
            worst = max(worst, float((a - b).abs().max()) / scale)
    detail = f"{before / 1e6:.2f}M -> {after / 1e6:.2f}M"
    return ("exact", detail) if worst == 0.0 else ("inexact", f"{detail}, max diff {worst:.2g} of the scale")


def slimtorch_run(model: nn.Module, x: torch.Tensor, fresh: torch.Tensor) -> Outcome:
    before = _params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (what stays and why is in the record; the table counts)
        masks = compute_masks(model, [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5}], example_inputs=x)
        masked = copy.deepcopy(model)
        apply_masks_(masked, masks)
        compact_(model, masks, example_inputs=x)
    return _compare(model, masked, fresh, before)


def _zero_removed(group: Any, masked: dict[int, nn.Module | torch.Tensor]) -> None:
    """Zero, in the masked copy, every output slice Torch-Pruning is about to remove in ``group`` (the layers
    that make the removed channels, their norms, parameters outside modules); the input slices follow."""
    for item in group.items:
        dep, idxs = item.dep, [int(i) for i in item.idxs]
        if getattr(dep.handler, "__name__", "") != "prune_out_channels" or id(dep.target.module) not in masked:
            continue
        target = masked[id(dep.target.module)]
        with torch.no_grad():
            if isinstance(target, torch.Tensor):  # a parameter outside a module, pruned along its own dim
                target.index_fill_(dep.handler.__self__.pruning_dim % target.dim(), torch.tensor(idxs), 0.0)
                continue
            dim = 1 if isinstance(target, nn.modules.conv._ConvTransposeNd) else 0
            for name in ("weight", "bias"):
                tensor = getattr(target, name, None)
                if isinstance(tensor, torch.Tensor) and tensor.dim() > dim:
                    tensor.index_fill_(dim, torch.tensor(idxs), 0.0)


def torch_pruning_run(model: nn.Module, x: torch.Tensor, fresh: torch.Tensor) -> Outcome:
    import torch_pruning as tp

    before = _params(model)
    masked = copy.deepcopy(model)
    twins = dict(zip(map(id, model.modules()), masked.modules(), strict=True))
    twins.update(zip(map(id, model.parameters()), masked.parameters(), strict=True))
    # the classifiers (a distilled model has two): every layer making the model's class scores
    classes = getattr(model, "num_classes", None)
    heads_out = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                 and classes in (getattr(m, "out_features", None), getattr(m, "out_channels", None))]
    # timm's attention layers: the fused qkv projection's heads, as Torch-Pruning's timm example declares them
    heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(getattr(m, "qkv", None), nn.Linear)
             and isinstance(getattr(m, "num_heads", None), int)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (its note on parameters outside modules, which it prunes as documented)
        pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                                      ignored_layers=heads_out, num_heads=heads)
        for group in pruner.step(interactive=True):
            _zero_removed(group, twins)
            group.prune()
    # the size attributes the attention's forward reads, updated as that example does
    for attention in [m for m in model.modules() if getattr(m, "qkv", None) in heads]:
        attention.head_dim = attention.qkv.out_features // (3 * attention.num_heads)
        if hasattr(attention, "attn_dim"):
            attention.attn_dim = attention.head_dim * attention.num_heads
    return _compare(model, masked, fresh, before)


LIBRARIES: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], Outcome]] = {
    "slimtorch": slimtorch_run, "Torch-Pruning": torch_pruning_run}


def run_family(spec: tuple[str, int, dict[str, Any]], limit: int) -> dict[str, Outcome]:
    from zoo_timm import build_timm  # (tests/ is on the path: main put it there)

    outcomes: dict[str, Outcome] = {}
    for library, prune in LIBRARIES.items():
        model, x, fresh = build_timm(*spec)
        start = time.perf_counter()
        try:
            with _time_limit(limit):
                outcome = prune(model, x, fresh)
        except Exception as err:  # a benchmark: say what failed and go on
            outcome = ("fails", f"{type(err).__name__}: {str(err).splitlines()[0][:70] if str(err) else ''}")
        outcomes[library] = (outcome[0], f"{outcome[1]} ({time.perf_counter() - start:.0f} s)")
    return outcomes


def _cell(outcome: Outcome) -> str:
    return f"{outcome[0]}: {outcome[1]}".replace("|", "\\|")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", help="timm families (modules of timm.models); default: all listed")
    parser.add_argument("--limit", type=int, default=600, help="seconds allowed to one library on one model")
    parser.add_argument("--smoke", action="store_true", help="two tiny models at 32 x 32: checks that every row works")
    args = parser.parse_args(argv)
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from zoo_timm import MODELS

    models = SMOKE if args.smoke else {f: MODELS[f] for f in (args.families or MODELS)}
    torch.set_num_threads(1)
    print(f"{datetime.date.today()}, torch {torch.__version__}, one thread; 50% of the channels of every conv and "
          "linear layer by L1 magnitude, random weights\n")
    print("| family | model | input | " + " | ".join(LIBRARIES) + " |\n|---|---|---|" + "---|" * len(LIBRARIES))
    results = []
    for family, spec in models.items():
        outcomes = run_family(spec, 0 if args.smoke else args.limit)
        results.append(outcomes)
        print(f"| {family} | {spec[0]} | {spec[1]} | " + " | ".join(_cell(outcomes[lib]) for lib in LIBRARIES) + " |",
              flush=True)
    print("\n| library | models | compacted | exact |\n|---|---:|---:|---:|")
    for lib in LIBRARIES:
        kinds = [r[lib][0] for r in results]
        compacted = sum(k in ("exact", "inexact") for k in kinds)
        print(f"| {lib} | {len(kinds)} | {compacted} | {kinds.count('exact')} |")


if __name__ == "__main__":
    main()
