"""Where sparse storage and sparse CPU kernels pay: bytes stored and Linear latency against sparsity.

    PYTHONPATH=src python benchmarks/sparse_kernels.py            # on an otherwise idle machine
    PYTHONPATH=src python benchmarks/sparse_kernels.py --smoke     # tiny layers, few runs: checks that it works

1. Storage: models masked at several sparsities (fine-grained and 2:4), saved as a model file with the
   masked weights dense beside their bool masks and stored sparse (bitmask, CSR, the smaller per tensor),
   against the dense model; the last column is what ``slimtorch.report`` gives as the stored size.
2. Kernels: one Linear layer, dense ``F.linear`` against :class:`slimtorch.sparse.SparseLinear` (CSR,
   ``torch.sparse.mm``) at each sparsity; the median of ``--runs`` calls, dense and sparse calls
   interleaved so that they share the machine's load alike; ``break-even`` is the lowest sparsity from
   which the CSR layer is faster at that sparsity and every higher one measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from slimtorch import apply_masks_, compute_masks, report
from slimtorch.models.modelfile import save_model
from slimtorch.models.registry import ModelSpec, build_model
from slimtorch.sparse import SparseLinear

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def _file_size(model: nn.Module, spec: ModelSpec, sparse: str | None) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        save_model(path, model, spec, sparse=sparse)
        return path.stat().st_size


def _storage_row(name: str, what: str, config: list[dict] | None, x: torch.Tensor) -> str:
    spec = ModelSpec(name=name)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    dense = _file_size(model, spec, None)
    if config is not None:
        apply_masks_(model, compute_masks(model, config, criterion="magnitude"))
    sizes = [_file_size(model, spec, layout) for layout in (None, "bitmask", "csr", "auto")]
    stored = report(model, x, runs=0).size_bytes
    cells = [f"{s:,}" for s in (dense, *sizes)] + [f"{sizes[-1] / dense:.3f}", f"{stored:,}"]
    return f"| {name} | {what} | " + " | ".join(cells) + " |"


def storage_table() -> None:
    print("| model | masks | dense file (B) | masked, dense + bool masks (B) | bitmask (B) | CSR (B) | smaller per "
          "tensor (B) | stored / dense | report's stored size (B) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    x = torch.randn(2, 1, 28, 28)
    rows = [("none", None)]
    for ratio in (0.5, 0.8, 0.9, 0.95, 0.99):
        rows.append((f"{ratio:.0%} fine", [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": ratio,
                                           "granularity": "fine"}]))
    rows.append(("2:4 (conv1 dense)", [{"op_types": ["Conv2d", "Linear"], "granularity": "2:4"},
                                       {"op_names": ["conv1"], "exclude": True}]))
    for what, config in rows:
        print(_storage_row("MnistNet", what, config, x))


def _median_ms(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, runs: int) -> tuple[float, float]:
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.inference_mode():
        for module in (dense, sparse):  # warm-up
            module(x)
        for _ in range(runs):
            for i, module in enumerate((dense, sparse)):
                start = time.perf_counter()
                module(x)
                times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def _break_even(speedups: list[float]) -> str:
    from_here = None
    for sparsity, speedup in zip(reversed(SPARSITIES), reversed(speedups), strict=True):
        if speedup <= 1.0:
            break
        from_here = sparsity
    return "-" if from_here is None else f"{from_here:.0%}"


def kernel_table(features: list[int], batches: list[int], runs: int) -> None:
    head = " | ".join(f"{s:.0%}" for s in SPARSITIES)
    print(f"| layer | batch | dense (ms) | {head} | break-even |")
    print("|---|---:|---:|" + "---:|" * len(SPARSITIES) + "---|")
    for size in features:
        for batch in batches:
            torch.manual_seed(0)
            x = torch.randn(batch, size)
            cells, speedups, dense_ms = [], [], []
            for sparsity in SPARSITIES:
                layer = nn.Linear(size, size)
                with torch.no_grad():  # the zeros baked in: a masked layer's hook would slow the dense one down
                    layer.weight.mul_(torch.rand(size, size) >= sparsity)
                d_ms, s_ms = _median_ms(layer, SparseLinear.from_linear(layer), x, runs)
                dense_ms.append(d_ms)
                speedups.append(d_ms / s_ms)
                cells.append(f"{s_ms:.3f} ({d_ms / s_ms:.2f}x)")
            print(f"| {size}x{size} | {batch} | {statistics.median(dense_ms):.3f} | " + " | ".join(cells)
                  + f" | {_break_even(speedups)} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="64-feature layers, 3 runs: checks that it works")
    args = parser.parse_args(argv)
    if args.smoke:
        args.features, args.batches, args.runs = [64], [1, 8], 3
    torch.set_num_threads(args.threads)
    machine = platform.processor() or platform.machine()
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {args.threads} thread(s)\n")
    storage_table()
    print("\nCSR Linear latency in ms (speed-up against the dense layer of the same sparsity):\n")
    kernel_table(args.features, args.batches, args.runs)


if __name__ == "__main__":
    main()
