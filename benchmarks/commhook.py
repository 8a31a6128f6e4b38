"""Gradient compression under DDP: bytes sent and accuracy reached, ours (top-k with error feedback)
side by side with PyTorch's own hooks (fp16 and PowerSGD) and the plain all-reduce.

    python benchmarks/commhook.py            # launches itself under torchrun with 2 CPU processes (gloo)
    python benchmarks/commhook.py --smoke    # one epoch on 256 images: checks that it works

Task: an MLP (64-256-256-10) on scikit-learn's digits, plain SGD (lr 0.2, cosine), batch 64, every
method from the same initial weights and the same batches. Bytes are per process over the whole run:
what an all-reduce of the dense gradient would carry, and what the method sent (top-k: values + int32
indices; fp16: half the bytes; PowerSGD: the P and Q factors of every compressed matrix, as torch counts
them, plus the uncompressed tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.utils.data import TensorDataset

from slimtorch.data import load_digits
from slimtorch.recover import TrainConfig
from slimtorch.recover.batches import batch_indices, evaluate_accuracy, fetch
from slimtorch.recover.commhook import register_topk_hook_
from slimtorch.recover.distributed import dist_info, init_distributed, shutdown_distributed

METHODS = ["all-reduce", "fp16 (torch)", "PowerSGD r=2 (torch)", "top-k 10%", "top-k 1%", "top-k 0.1%"]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def _install(ddp: nn.parallel.DistributedDataParallel, method: str, numel: int):
    """Register the method's hook; returns ``bytes(steps) -> (dense bytes, sent bytes)`` per process."""
    if method.startswith("top-k"):
        state = register_topk_hook_(ddp, float(method.split()[1].rstrip("%")) / 100)
        return lambda steps: (state.dense_bytes, state.sent_bytes)
    if method.startswith("fp16"):
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return lambda steps: (steps * numel * 4, steps * numel * 2)
    if method.startswith("PowerSGD"):
        # start_powerSGD_iter=2: compress from the second step on (torch's default waits 1000 steps)
        ps = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2,
                                         compression_stats_logging_frequency=10**9)
        ddp.register_comm_hook(ps, powerSGD_hook.powerSGD_hook)
        return lambda steps: (ps.total_numel_before_compression * 4, ps.total_numel_after_compression * 4)
    return lambda steps: (steps * numel * 4, steps * numel * 4)


def _train(method: str, epochs: int, limit: int) -> dict:
    data = load_digits(seed=0)
    train = TensorDataset(data.x_train[:limit], data.y_train[:limit])
    test = TensorDataset(data.x_test, data.y_test)
    model = _mlp()
    numel = sum(p.numel() for p in model.parameters())
    ddp = nn.parallel.DistributedDataParallel(model)
    counted = _install(ddp, method, numel)
    config = TrainConfig(epochs=epochs, batch_size=64, lr=0.2, optimizer="sgd", momentum=0.0)
    steps_per_epoch = len(batch_indices(len(train), config, 0, dist_info()))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    start, curve = time.perf_counter(), []
    for epoch in range(epochs):
        for index in batch_indices(len(train), config, epoch, dist_info()):
            x, y = fetch(train, index)
            optimizer.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            optimizer.step()
            schedule.step()
        curve.append(evaluate_accuracy(model, test))
    dense, sent = counted(epochs * steps_per_epoch)
    return {"method": method, "accuracy": curve[-1], "curve": curve, "dense_bytes": dense, "sent_bytes": sent,
            "seconds": time.perf_counter() - start, "numel": numel}


def worker(out: Path, epochs: int, limit: int) -> None:
    info = init_distributed()
    torch.set_num_threads(1)
    rows = [_train(method, epochs, limit) for method in METHODS]
    if info.is_main:
        out.write_text(json.dumps(rows))
    shutdown_distributed()


def table(rows: list[dict]) -> str:
    dense = rows[0]["accuracy"]
    lines = ["| method | bytes sent / process | compression | test accuracy | vs all-reduce | train time |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["dense_bytes"] / r["sent_bytes"] if r["sent_bytes"] else float("nan")
        lines.append(f"| {r['method']} | {r['sent_bytes'] / 1e6:.2f} MB | {ratio:.1f}x | {r['accuracy']:.2%} | "
                     f"{100 * (r['accuracy'] - dense):+.1f} pt | {r['seconds']:.1f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-limit", type=int, default=1280, help="training images used")
    parser.add_argument("--smoke", action="store_true", help="one epoch on 256 images: checks that it works")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.train_limit = 1, 256
    if args.worker:
        worker(Path(args.worker), args.epochs, args.train_limit)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        src = str(Path(__file__).resolve().parents[1] / "src")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, "--worker", str(out), "--epochs", str(args.epochs), "--train-limit", str(args.train_limit)]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        rows = json.loads(out.read_text())
    print(f"DDP, 2 processes (gloo, CPU), MLP with {rows[0]['numel']:,} parameters on {args.train_limit} digits, "
          f"{args.epochs} epochs\n")
    print(table(rows))


if __name__ == "__main__":
    main()
