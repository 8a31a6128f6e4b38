"""Pruning criteria and pruning methods side by side on real data; prints Markdown tables.

    PYTHONPATH=src python benchmarks/criteria.py --data-dir ../shared/data
    PYTHONPATH=src python benchmarks/criteria.py --smoke      # one seed, 256 digits, a few steps: checks that it works

MNIST from ``--data-dir`` (``mnist_train.npz`` / ``mnist_test.npz``); scikit-learn's 8x8 digits when the
files are absent. One small CNN with BatchNorm (so network slimming applies) is trained once; then

1. criteria: the trained model pruned at equal sparsity by each criterion, the test accuracy right
   after pruning and after the same short fine-tune (90% of single weights of every layer but the
   first conv; 50% of the channels of both convs); the second-order criteria (OBD, OBS, and OBS with
   its update of the weights kept) and a config list scoring each entry with its own criterion among them;
2. methods at equal fine-tuning budget where the method allows it: one-shot + fine-tune, AGP during
   fine-tuning, gradual pruning with regrowth, lottery ticket (rewound to an early step, retrained for
   the dense budget), SET and RigL (sparse from scratch for the dense budget), at 90% unstructured and
   at 50% channels.

Channel-pruned models are compacted (``slimtorch.compact_``) at the end, so their parameter count and
latency are those of the really smaller model; unstructured ones stay masked (same size and speed as
the dense model, the non-zero count is what shrinks).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch import apply_masks_, collect_stats, compact_, compute_masks, get_masks, remove_masks_
from slimtorch.data import load_digits, load_mnist
from slimtorch.models import DigitsCNN
from slimtorch.prune import (
    DynamicSparsity,
    Evaluator,
    GradualPruner,
    LotteryTicket,
    Schedule,
    StatsTracker,
    apply_obs_,
    criteria_needs,
)
from slimtorch.prune.regularize import SlimmingRegularizer
from slimtorch.report import model_state, report


class SmallCNN(nn.Module):
    """LeNet-sized CNN for 28x28 digits, with BatchNorm after each conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # (N, 8, 12, 12)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # (N, 16, 4, 4)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _setup(args: argparse.Namespace):
    """Data, model factory and the two pruning configurations for the data set at hand."""
    if args.data_dir is not None and (Path(args.data_dir) / "mnist_train.npz").is_file():
        data = load_mnist(args.data_dir)
        args.epochs, args.finetune_epochs = args.epochs or 1, args.finetune_epochs or 1
        data = type(data)(data.x_train[: args.train_limit], data.y_train[: args.train_limit],
                          data.x_test, data.y_test, data.classes)
        factory, name = SmallCNN, f"MNIST ({len(data.y_train)} train / {len(data.y_test)} test images)"
        fine = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.9, "granularity": "fine"},
                {"op_names": ["conv1"], "exclude": True}]
        channels = {"convs": ["conv1", "conv2"], "norms": ["bn1", "bn2"]}
    else:
        data = load_digits()
        args.epochs, args.finetune_epochs = args.epochs or 10, args.finetune_epochs or 5  # a small set: more passes
        if args.smoke:
            data = type(data)(data.x_train[:256], data.y_train[:256], data.x_test[:128], data.y_test[:128],
                              data.classes)
        factory, name = (lambda: DigitsCNN(width=16)), "scikit-learn digits (8x8)"
        fine = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.9, "granularity": "fine"},
                {"op_names": ["stem"], "exclude": True}]
        channels = {"convs": ["block.0", "down.0"], "norms": ["block.1", "down.1"]}
    conv_cfg = [{"op_names": channels["convs"], "op_types": ["Conv2d"], "sparse_ratio": 0.5,
                 "granularity": "out_channel"}]
    norm_cfg = [{"op_names": channels["norms"], "op_types": ["BatchNorm2d"], "sparse_ratio": 0.5}]
    return data, factory, name, fine, conv_cfg, norm_cfg


def _evaluator(data, args, lr: float | None = None) -> Evaluator:
    return Evaluator(
        train_data=data.loader("train", args.batch_size, shuffle=True, seed=args.seed),
        eval_data=data.loader("test", 1000),
        lr=lr or args.lr,
    )


def _stats(model, evaluator, criterion, config_list):
    needs = criteria_needs(config_list, criterion)  # every entry's own criterion too
    if not needs:
        return None
    batches = list(itertools.islice(iter(evaluator.train_data), 16))
    return collect_stats(model, batches, keys=needs, loss_fn=evaluator.loss_fn, config_list=config_list)


def _prune(model, config_list, criterion, evaluator, example, *, obs_update=False):
    stats = _stats(model, evaluator, criterion, config_list)
    # example_inputs: channel masks go through the dependency graph, so they compact exactly
    masks = compute_masks(model, config_list, criterion=criterion, stats=stats, example_inputs=example)
    if obs_update:  # OBS: the kept weights of each layer move to make up for the pruned ones
        apply_obs_(model, masks, stats)
    else:
        apply_masks_(model, masks)
    return masks


def _measure(model, example, args, *, compact: bool) -> dict:
    """Compact a channel-pruned model (``compact_`` checks it still computes the masked model's outputs),
    then measure parameters, non-zero parameters and latency on the example batch."""
    state = model_state(model)
    if compact:
        compact_(model, get_masks(model), example_inputs=example)
        state = model_state(model)
    else:  # baked: the mask hooks would add their own cost; a zeroed dense weight costs what a dense one does
        remove_masks_(model)
    r = report(model, example, runs=args.latency_runs, threads=args.threads)
    return {"params": r.params, "nonzero": r.nonzero_params, "state": state, "ms": 1e3 * r.latency_s}


def _per_entry(fine: list[dict]) -> list[dict]:
    """The seeds' mixed criterion: gradient magnitude for the convolutions, weight magnitude for the linears."""
    return [{**fine[0], "op_types": ["Conv2d"], "criterion": "gradient"},
            {**fine[0], "op_types": ["Linear"], "criterion": "magnitude"}, *fine[1:]]


def criteria_rows(base, evaluator, example, configs, args) -> list[dict]:
    fine, conv_cfg, norm_cfg = configs
    runs = [(c, "90% weights", fine) for c in
            ("magnitude", "gradient", "hybrid", "taylor", "movement", "wanda", "obd", "obs", "obs + update",
             "random")]
    runs += [("per entry: gradient convs, magnitude linears", "90% weights", _per_entry(fine))]
    runs += [(c, "50% conv channels", conv_cfg) for c in
             ("l1", "l2", "fpgm", "taylor", "apoz", "mean_activation", "random")]
    runs += [("bn_scale", "50% conv channels", norm_cfg), ("bn_scale + slimming", "50% conv channels", norm_cfg)]
    rows = []
    for criterion, scope, cfg in runs:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        if criterion.endswith("slimming"):  # network slimming: one epoch with an L1 push on BN scales first
            evaluator.train_(model, epochs=1, callbacks=[SlimmingRegularizer(model, args.slim_strength)])
        name = "magnitude" if criterion.startswith("per entry") else criterion.split(" ")[0]
        _prune(model, cfg, name, evaluator, example, obs_update=criterion.endswith("update"))
        pruned = evaluator.evaluate(model)
        evaluator.train_(model, max_steps=args.finetune_steps)
        tuned = evaluator.evaluate(model)
        size = _measure(model, example, args, compact=scope.endswith("channels"))
        rows.append({"criterion": criterion, "scope": scope, "pruned": pruned, "tuned": tuned, **size,
                     "seconds": time.perf_counter() - start})
    return rows


def _one_shot(base, cfg, criterion, evaluator, args, example):
    model = copy.deepcopy(base)
    _prune(model, cfg, criterion, evaluator, example)
    evaluator.train_(model, epochs=args.finetune_epochs)
    return model


def _gradual(base, cfg, criterion, evaluator, args, example, *, regrow=False):
    model = copy.deepcopy(base)
    steps = args.finetune_epochs * len(evaluator.train_data)
    end = int(0.75 * steps)
    schedule = Schedule(kind="agp", start=0, end=end, every=max(1, end // 10))
    pruner = GradualPruner(model, cfg, schedule=schedule, criterion=criterion, regrow=regrow,
                           example_inputs=example)
    evaluator.train_(model, epochs=args.finetune_epochs, max_steps=end, callbacks=[pruner])
    pruner.finish_()
    evaluator.train_(model, max_steps=steps - end)
    return model


def _lottery(base, cfg, criterion, evaluator, args, example, rewind_state):
    model = copy.deepcopy(base)
    ticket = LotteryTicket(model, cfg, rounds=1, criterion=criterion, rewind_step=10**9, example_inputs=example)
    ticket.rewind_state = rewind_state  # recorded early in the dense run
    ticket.next_round_()
    evaluator.train_(model, epochs=args.epochs)
    return model


def _movement(base, cfg, evaluator, args):
    """Movement pruning as designed: scores accumulate while fine-tuning, sparsity rises on a cubic."""
    model = copy.deepcopy(base)
    tracker = StatsTracker(model, keys=("movement",), config_list=cfg)
    steps = args.finetune_epochs * len(evaluator.train_data)
    end = int(0.75 * steps)
    schedule = Schedule(kind="agp", start=0, end=end, every=max(1, end // 10))
    pruner = GradualPruner(model, cfg, schedule=schedule, criterion="movement", stats=tracker.stats)
    evaluator.train_(model, epochs=args.finetune_epochs, callbacks=[pruner])
    tracker.close()
    return model


def _sparse_from_scratch(init, cfg, evaluator, args, regrow):
    model = copy.deepcopy(init)
    steps = args.epochs * len(evaluator.train_data)
    sparse = DynamicSparsity(model, cfg, regrow=regrow, every=50, drop_fraction=0.3, end=int(0.75 * steps))
    evaluator.train_(model, epochs=args.epochs, callbacks=[sparse])
    sparse.close()
    return model


def method_rows(base, init, rewind_state, evaluator, example, configs, args) -> list[dict]:
    fine, conv_cfg, _ = configs
    ft, dense = f"{args.finetune_epochs} (fine-tune)", f"{args.epochs} (retrain)"
    scratch = f"{args.epochs} (from scratch)"
    unstructured = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.9}, *fine[1:]]
    w, c = "90% weights", "50% conv channels"
    common = (evaluator, args, example)
    runs = [
        ("dense (no pruning)", "-", "-", lambda: copy.deepcopy(base)),
        ("one-shot + fine-tune", w, ft, lambda: _one_shot(base, fine, "magnitude", *common)),
        ("AGP", w, ft, lambda: _gradual(base, fine, "magnitude", *common)),
        ("AGP with regrowth", w, ft, lambda: _gradual(base, fine, "magnitude", *common, regrow=True)),
        ("movement, gradual", w, ft, lambda: _movement(base, fine, evaluator, args)),
        ("lottery ticket", w, dense, lambda: _lottery(base, fine, "magnitude", *common, rewind_state)),
        ("SET", w, scratch, lambda: _sparse_from_scratch(init, unstructured, evaluator, args, "random")),
        ("RigL", w, scratch, lambda: _sparse_from_scratch(init, unstructured, evaluator, args, "gradient")),
        ("one-shot + fine-tune", c, ft, lambda: _one_shot(base, conv_cfg, "l1", *common)),
        ("AGP", c, ft, lambda: _gradual(base, conv_cfg, "l1", *common)),
        ("lottery ticket", c, dense, lambda: _lottery(base, conv_cfg, "l1", *common, rewind_state)),
    ]
    rows = []
    for method, scope, epochs, run in runs:
        start = time.perf_counter()
        model = run()
        accuracy = evaluator.evaluate(model)
        size = _measure(model, example, args, compact=scope == c)
        rows.append({"method": method, "scope": scope, "epochs": epochs, "accuracy": accuracy, **size,
                     "seconds": time.perf_counter() - start})
    return rows


def _aggregate(runs: list[list[dict]], keys: tuple[str, ...], values: tuple[str, ...]) -> list[dict]:
    """Rows of several seeds merged by ``keys``: each value becomes 'mean ± std' (std over seeds)."""
    merged = []
    for rows in zip(*runs, strict=True):
        out = {k: rows[0][k] for k in rows[0] if k not in values}
        for v in values:
            column = torch.tensor([float(r[v]) for r in rows])
            spread = f" ± {column.std().item():.4f}" if len(rows) > 1 else ""
            out[v] = f"{column.mean().item():.4f}{spread}"
        for v in ("seconds", "ms", "params", "nonzero"):  # sizes differ by seed only where compaction kept channels
            out[v] = sum(r[v] for r in rows) / len(rows)
        assert all(r[k] == rows[0][k] for r in rows for k in keys)
        merged.append(out)
    return merged


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "|".join("---" if fmt == "s" else "---:" for _, _, fmt in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format(row[key], fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="folder with mnist_*.npz (default: digits)")
    parser.add_argument("--train-limit", type=int, default=20000, help="training images used (MNIST)")
    parser.add_argument("--epochs", type=int, default=None, help="dense training epochs (1 MNIST, 10 digits)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="(default 1 MNIST, 5 digits)")
    parser.add_argument("--finetune-steps", type=int, default=50, help="fine-tune of the criteria table")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--slim-strength", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="one avoids thread contention on busy machines")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--latency-runs", type=int, default=20, help="timed forward passes per model")
    parser.add_argument("--smoke", action="store_true", help="one seed, one epoch, 256 training images of digits "
                        "and a few steps: checks that every row still works, in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data_dir, args.seeds, args.epochs, args.finetune_epochs = None, [0], 1, 1
        args.finetune_steps, args.latency_runs = 2, 1
    torch.set_num_threads(args.threads)
    criteria_runs, method_runs, dense = [], [], []
    for seed in args.seeds:
        args.seed = seed
        torch.manual_seed(seed)
        data, factory, name, *configs = _setup(args)
        evaluator = _evaluator(data, args)
        example = data.x_test[:256]  # dependency graph, compaction check and latency batch
        fine = configs[0]
        init = factory()
        base = copy.deepcopy(init)
        early = LotteryTicket(base, fine, rounds=1, rewind_step=max(1, len(evaluator.train_data) // 4))
        start = time.perf_counter()
        evaluator.train_(base, epochs=args.epochs, callbacks=[early])
        dense.append((evaluator.evaluate(base), time.perf_counter() - start))
        criteria_runs.append(criteria_rows(base, evaluator, example, configs, args))
        method_runs.append(method_rows(base, init, early.rewind_state, evaluator, example, configs, args))
    _print(name, args, base, example, dense, criteria_runs, method_runs)


def _print(name, args, base, example, dense, criteria_runs, method_runs) -> None:
    print(f"# Pruning criteria and methods on {name}\n")
    print(f"{platform.platform()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {datetime.date.today()}; command: python {' '.join(sys.argv)}\n")
    accs = ", ".join(f"{a:.4f}" for a, _ in dense)
    print(f"Dense model: {sum(p.numel() for p in base.parameters())} parameters; accuracy {accs} (seeds "
          f"{args.seeds}) after {args.epochs} epochs ({dense[0][1]:.0f} s). Values: mean ± std over the seeds.\n")
    crit = _aggregate(criteria_runs, ("criterion", "scope"), ("pruned", "tuned"))
    print(f"## Criteria: accuracy right after pruning and after {args.finetune_steps} fine-tuning steps\n")
    print(_table(crit, [("criterion", "criterion", "s"), ("scope", "pruned", "s"), ("pruned", "after pruning", "s"),
                        ("tuned", "after fine-tune", "s"), ("state", "model", "s"), ("params", "params", ",.0f"),
                        ("nonzero", "non-zero params", ",.0f"), ("seconds", "s", ".0f")]))
    methods = _aggregate(method_runs, ("method", "scope"), ("accuracy",))
    print(f"\n## Methods: accuracy at the end; latency of one batch of {len(example)} (eval, median)\n")
    print(_table(methods, [("method", "method", "s"), ("scope", "pruned", "s"), ("epochs", "training epochs", "s"),
                           ("accuracy", "accuracy", "s"), ("state", "model", "s"), ("params", "params", ",.0f"),
                           ("nonzero", "non-zero params", ",.0f"), ("ms", "latency ms", ".2f"),
                           ("seconds", "s", ".0f")]))


if __name__ == "__main__":
    main()
