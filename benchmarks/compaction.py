"""Compaction side by side with Torch-Pruning, in one process.

For each model: the time to build the dependency graph, the time to prune (50% L1 channels, the
classifier excepted) and compact (each the median of ``--repeats`` runs on fresh copies after one
untimed warm-up, the libraries taking turns so that a load change hits all alike, each run starting
from a collected heap; pruning and compaction also as the fastest of those runs, what a run undisturbed
by other tenants of a shared machine takes), the MACs and parameters removed, and the realised CPU latency
reduction (batch 8, one thread) against the MACs reduction.
Prints a Markdown table.

    PYTHONPATH=src python benchmarks/compaction.py                      # resnet50 mobilenet_v2 vit_b_16
    PYTHONPATH=src python benchmarks/compaction.py --models resnet18 --runs 3 --size 112   # quick look
    PYTHONPATH=src python benchmarks/compaction.py --smoke     # resnet18 on 32x32, one run: checks that it works

Torch-Pruning (``pip install torch-pruning``, the ``bench`` extra) prunes with its magnitude (L1)
importance and the same ratio; each library's own result is measured. The slimtorch result is also
checked against the masked model (``compact_`` verifies it).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import platform
import statistics
import time
from typing import Any

import torch
import torchvision
from torch import nn

from slimtorch import compact_, compute_masks
from slimtorch.graph import build_graph
from slimtorch.report import count_flops

MODELS = ["resnet50", "mobilenet_v2", "vit_b_16"]


def _classifier(model: nn.Module) -> tuple[str, nn.Module]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def slimtorch_prune(model: nn.Module, x: torch.Tensor, ratio: float, verify: bool = True) -> dict[str, float]:
    """Graph build alone (the structure, as pruning builds it), then masks (which build the graph) and
    compaction (which runs the masked model once, to check that every removed channel is zero or foldable
    where it is used, and with ``verify`` runs the compacted one to check the result): the time a user
    waits."""
    name, _ = _classifier(model)
    config = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": ratio}, {"exclude": True, "op_names": [name]}]
    _, graph_s = _timed(lambda: build_graph(model, x, values=False))
    masks, masks_s = _timed(lambda: compute_masks(model, config, example_inputs=x))
    _, compact_s = _timed(lambda: compact_(model, masks, example_inputs=x, verify=verify))
    return {"graph_s": graph_s, "prune_compact_s": masks_s + compact_s}


def slimtorch_unverified(model: nn.Module, x: torch.Tensor, ratio: float) -> dict[str, float]:
    """The same without the check of the result (``compact_(..., verify=False)``): what the check costs."""
    return slimtorch_prune(model, x, ratio, verify=False)


def torch_pruning_prune(model: nn.Module, x: torch.Tensor, ratio: float) -> dict[str, float]:
    """Torch-Pruning's documented recipe; for ViT its parameters outside modules and its heads are declared."""
    import torch_pruning as tp

    _, head = _classifier(model)
    extra: dict[str, Any] = {}
    if isinstance(model, torchvision.models.VisionTransformer):
        # (parameter, pruned dim) pairs: its annotation says a dict, its code iterates pairs
        extra["unwrapped_parameters"] = [(model.class_token, 2), (model.encoder.pos_embedding, 2)]
        extra["num_heads"] = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    _, graph_s = _timed(lambda: tp.DependencyGraph().build_dependency(
        model, example_inputs=x, unwrapped_parameters=extra.get("unwrapped_parameters")))

    def run() -> None:
        pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=[head], **extra)
        pruner.step()
        for m in model.modules():  # Torch-Pruning leaves the attention's size attributes stale
            if isinstance(m, nn.MultiheadAttention):
                m.embed_dim = m.in_proj_weight.shape[1]
                m.head_dim = m.in_proj_weight.shape[0] // 3 // m.num_heads
        if isinstance(model, torchvision.models.VisionTransformer):
            model.hidden_dim = model.class_token.shape[-1]

    _, prune_s = _timed(run)
    return {"graph_s": graph_s, "prune_compact_s": prune_s}


def latencies(models: dict[str, nn.Module], x: torch.Tensor, runs: int) -> dict[str, float]:
    """Median forward time of each model, one thread, measured in interleaved rounds so that a load change
    on a shared machine hits every model alike (slimtorch.report.measure_latency times one model at a time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {k: [] for k in models}
    try:
        with torch.inference_mode():
            for m in models.values():
                m(x)  # warm-up
            for _ in range(runs):
                for k, m in models.items():
                    start = time.perf_counter()
                    m(x)
                    times[k].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)  # the next model's graph and pruning times run as the first one's did
    return {k: statistics.median(v) for k, v in times.items()}


def bench(name: str, size: int, batch: int, runs: int, ratio: float, repeats: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    extra = {"image_size": size} if name.startswith("vit_") else {}
    dense = torchvision.models.get_model(name, weights=None, **extra).eval()
    x1, xb = torch.randn(1, 3, size, size), torch.randn(batch, 3, size, size)
    models: dict[str, nn.Module] = {"dense": dense}
    libraries = {"slimtorch": slimtorch_prune, "slimtorch, verify=False": slimtorch_unverified,
                 "torch-pruning": torch_pruning_prune}
    timings: dict[str, list[dict[str, float]]] = {lib: [] for lib in libraries}
    errors: dict[str, str] = {}
    for repeat in range(repeats + 1):  # each on a fresh copy, the libraries in turn (a load change hits both)
        for lib, prune in libraries.items():
            if lib in errors:
                continue
            model = copy.deepcopy(dense)
            # the previous run's cyclic garbage (Torch-Pruning's graph holds the model it pruned) is collected
            # here, untimed: left alone, whichever library runs next pays for freeing it
            gc.collect()
            try:
                timed = prune(model, x1, ratio)
                if repeat:  # the first round warms up (imports, allocator, caches) and is not counted
                    timings[lib].append(timed)
            except Exception as err:  # a benchmark: say what failed and go on
                errors[lib] = f"{type(err).__name__}: {str(err)[:80]}"
                continue
            models[lib] = model
    rows = []
    for lib in libraries:
        if lib in errors:
            rows.append({"model": name, "library": lib, "error": errors[lib]})
            continue
        medians = {k: statistics.median(t[k] for t in timings[lib]) for k in timings[lib][0]}  # damps noise
        # the fastest run: what a run undisturbed by other tenants of a shared machine takes
        fastest = min(t["prune_compact_s"] for t in timings[lib])
        rows.append({"model": name, "library": lib, **medians, "fastest_s": fastest})
    lat = latencies(models, xb, runs)
    macs0, params0 = count_flops(dense, x1) / 2, sum(p.numel() for p in dense.parameters())
    for row in rows:
        if "error" in row:
            continue
        model = models[row["library"]]
        macs_red = 1 - count_flops(model, x1) / 2 / macs0
        lat_red = 1 - lat[row["library"]] / lat["dense"]
        row.update(params=f"{params0 / 1e6:.1f}M -> {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M",
                   macs_red=macs_red, lat=f"{lat['dense'] * 1e3:.0f} -> {lat[row['library']] * 1e3:.0f}",
                   lat_red=lat_red, realised=lat_red / macs_red if macs_red > 0 else float("nan"))
    return rows


def markdown(rows: list[dict[str, Any]], batch: int) -> str:
    head = ("| model | library | graph build (s) | prune + compact (s) | x Torch-Pruning's | fastest run (s) | "
            f"x Torch-Pruning's fastest | params | MACs removed | latency b{batch} 1 thread (ms) | latency removed | "
            "realised / MACs |")
    lines = [head, "|" + "---|" * 12]
    tp = {r["model"]: r for r in rows if r["library"] == "torch-pruning" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['library']} | failed: {r['error']} |" + " |" * 9)
            continue
        ref = tp.get(r["model"])
        ratio = f"{r['prune_compact_s'] / ref['prune_compact_s']:.2f}" if ref else "-"
        fastest = f"{r['fastest_s'] / ref['fastest_s']:.2f}" if ref else "-"
        lines.append(f"| {r['model']} | {r['library']} | {r['graph_s']:.3f} | {r['prune_compact_s']:.3f} | {ratio} | "
                     f"{r['fastest_s']:.3f} | {fastest} | {r['params']} | {r['macs_red']:.1%} | {r['lat']} | "
                     f"{r['lat_red']:.1%} | {r['realised']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the latency measurement")
    parser.add_argument("--runs", type=int, default=10, help="timed forward calls per model")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of channels pruned")
    parser.add_argument("--repeats", type=int, default=3, help="graph builds and prunings timed per library (median)")
    parser.add_argument("--smoke", action="store_true",
                        help="resnet18 on 32x32 inputs, batch 1, one run: checks that every row works, in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.size, args.batch, args.runs, args.repeats = ["resnet18"], 32, 1, 1, 1
    rows = [r for name in args.models for r in bench(name, args.size, args.batch, args.runs, args.ratio, args.repeats)]
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, input {args.size}x{args.size}, ratio {args.ratio}\n")
    print(markdown(rows, args.batch))


if __name__ == "__main__":
    main()
