"""Table 6.1's time column, measured per training step: BookCNN pruned per layer (L1, both convs) at
every sparsity, masked (same size) and compacted (really smaller), one Adam step on a batch of 64.

    PYTHONPATH=src python benchmarks/table61_steps.py [--threads 1] [--steps 30]
    PYTHONPATH=src python benchmarks/table61_steps.py --smoke    # batch 8, one step: checks that it works

Wall-clock times of whole training runs on a shared machine swing with the other processes; the fastest
of many short steps is the one least disturbed by them, so it is the figure to compare with the book's
relative times (book: 122 s dense, 89 s at 50%, 76 s at 80%, i.e. 0.73 and 0.62 of dense). The median
is printed beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from slimtorch import apply_masks_, compact_, compute_masks
from slimtorch.models import BookCNN
from slimtorch.recipes.table61_report import BOOK_FIGURES
from slimtorch.report import count_flops

SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def _model(sparsity: float, compact: bool, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = BookCNN()
    if sparsity:
        masks = compute_masks(model, [{"op_types": ["Conv2d"], "sparse_ratio": sparsity}], criterion="l1")
        apply_masks_(model, masks)
        if compact:
            compact_(model, masks, example_inputs=x[:2])
    return model


def _step_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[float, float]:
    """Fastest and median seconds of one training step (forward, backward, Adam update) after 3 warm-up
    steps."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, weight_decay=5e-3)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="batch 8 and one step: checks that it works, in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch = 1, 8
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, generator=generator)  # (B, C, H, W) pixels in [0, 1], as the book's
    y = torch.randint(0, 10, (args.batch,), generator=generator)
    print(f"BookCNN, batch {args.batch}, Adam, {args.threads} thread(s), fastest (median) of {args.steps} steps, "
          f"torch {torch.__version__}\n")
    print("| sparsity per layer | params (compacted) | forward FLOPs/image | masked step | compacted step "
          "| compacted / dense | book's time / dense |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    dense = None
    for s in SPARSITIES:
        compacted = _model(s, True, x)
        t_compact = _step_seconds(compacted, x, y, args.steps)
        t_masked = _step_seconds(_model(s, False, x), x, y, args.steps) if s else t_compact
        dense = dense or t_compact[0]
        flops = count_flops(compacted, x[:1])
        book = BOOK_FIGURES[s][0] / BOOK_FIGURES[0.0][0]
        params = sum(p.numel() for p in compacted.parameters())
        masked, compact = (f"{t[0] * 1e3:.0f} ({t[1] * 1e3:.0f}) ms" for t in (t_masked, t_compact))
        print(f"| {'dense' if s == 0 else f'{s:.0%}'} | {params:,} | {flops / 1e6:.1f}M | {masked} | {compact} | "
              f"{t_compact[0] / dense:.2f} | {book:.2f} |")


if __name__ == "__main__":
    main()
