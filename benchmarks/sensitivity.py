"""Sensitivity analysis of a trained CNN: each layer pruned alone (magnitude, single weights) over a range of
sparsities; prints the table and the ranking, saves the plot, and turns it into per-layer sparsities.

    PYTHONPATH=src python benchmarks/sensitivity.py --data-dir ../shared/data --plot docs/img/sensitivity.png
    PYTHONPATH=src python benchmarks/sensitivity.py --smoke      # digits, few images: checks that it works

The model is the NNI quick-start MNIST net of the seeds (conv1, conv2, fc1, fc2) trained on MNIST; without
``--data-dir`` it is the digits CNN on scikit-learn's 8x8 digits.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

from slimtorch.data import load_digits, load_mnist
from slimtorch.models import DigitsCNN, MnistNet
from slimtorch.prune import Evaluator, sensitivity_analysis

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="folder with mnist_*.npz (default: digits)")
    parser.add_argument("--train-limit", type=int, default=30000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-limit", type=int, default=2000, help="test images per measurement")
    parser.add_argument("--plot", default=None, help="where to save the PNG plot")
    parser.add_argument("--target", type=float, default=0.8, help="total sparsity to allocate per layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="scikit-learn digits, 256 training and 128 test images: checks that it works, in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data_dir, args.train_limit, args.eval_limit, args.epochs = None, 256, 128, 1
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    if args.data_dir is not None and (Path(args.data_dir) / "mnist_train.npz").is_file():
        data, model, name = load_mnist(args.data_dir), MnistNet(), "the seeds' MNIST net on MNIST"
    else:
        data, model, name = load_digits(), DigitsCNN(width=16), "the digits CNN on scikit-learn digits"
    x, y = data.x_train[: args.train_limit], data.y_train[: args.train_limit]
    train = [(x[i : i + 128], y[i : i + 128]) for i in range(0, len(y), 128)]
    n_test = min(args.eval_limit, len(data.y_test))
    x_test, y_test = data.x_test[:n_test], data.y_test[:n_test]
    test = [(x_test[i : i + 500], y_test[i : i + 500]) for i in range(0, n_test, 500)]
    evaluator = Evaluator(train_data=train, eval_data=test, lr=1e-3)
    start = time.perf_counter()
    evaluator.train_(model, epochs=args.epochs)
    trained = time.perf_counter() - start
    start = time.perf_counter()
    result = sensitivity_analysis(model, evaluator.evaluate, sparsities=SPARSITIES, criterion="magnitude")
    analysed = time.perf_counter() - start

    print(f"# Sensitivity of {name}\n")
    print(f"{platform.platform()}, torch {torch.__version__}, 1 thread, {datetime.date.today()}; "
          f"command: python {' '.join(sys.argv)}\n")
    print(f"Trained {args.epochs} epoch(s) on {len(y)} images in {trained:.0f} s; analysis {analysed:.0f} s; "
          f"metric: top-1 accuracy on {sum(len(b[1]) for b in test)} test images; cells: accuracy drop.\n")
    print(result.to_markdown())
    mean_drop = {n: sum(r.drop for r in result.rows if r.layer == n) / len(SPARSITIES) for n in result.layers}
    ranking = sorted(mean_drop, key=mean_drop.get, reverse=True)
    print("\nMost to least sensitive (mean drop over the sparsities): "
          + ", ".join(f"{layer} ({mean_drop[layer]:.4f})" for layer in ranking))
    print(f"\nPer-layer sparsities for {args.target:.0%} of these layers' weights: {result.allocate(args.target)}")
    if args.plot:
        result.save_plot(args.plot, title=f"Sensitivity of each layer ({name})", ylabel="test accuracy")
        print(f"\nPlot: {args.plot}")


if __name__ == "__main__":
    main()
