"""NNI's quantizers (slimtorch.compat.nni) against fp32 and against the real int8 paths; prints a Markdown table.

    PYTHONPATH=src python benchmarks/quantizers.py --data-dir ../shared/data
    PYTHONPATH=src python benchmarks/quantizers.py --smoke     # digits, a few steps, one run: checks that it works

MNIST from ``--data-dir`` (scikit-learn's 8x8 digits when the files are absent). A LeNet-sized CNN with
BatchNorm and Hardtanh (binarised activations need centred inputs) is trained, then every row starts from
it: fp32 trained on for the same epochs as the quantization-aware rows; QATQuantizer, DoReFaQuantizer,
LsqQuantizer and BNNQuantizer trained that long through their fake quantizers; PtqQuantizer calibrated on
16 batches; and slimtorch's real int8 paths on the same model (``static_int8``, calibrated; ``qat_int8``,
trained as long, then converted), which torch.ao's int8 kernels run. Latency: one batch, every row timed
round-robin (median), the same thread count for all.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from slimtorch.compat.nni.quantization import BNNQuantizer, DoReFaQuantizer, LsqQuantizer, PtqQuantizer, QATQuantizer
from slimtorch.data import load_digits, load_mnist
from slimtorch.prune import Evaluator
from slimtorch.quant import QuantConfig, convert_qat, quant_info, quantize

CONVS_LINEARS = {"op_types": ["Conv2d", "Linear"]}
W8A8 = [{**CONVS_LINEARS, "quant_types": ["weight", "input"], "quant_bits": 8,
         "granularity": {"weight": "per_channel"}}]
NNI_ROWS = [  # (label, quantizer, config list, trains)
    ("QATQuantizer", QATQuantizer, W8A8, True),
    ("PtqQuantizer", PtqQuantizer, W8A8, False),
    ("LsqQuantizer", LsqQuantizer, [{**CONVS_LINEARS, "target_names": ["weight", "_input_"], "quant_dtype": "int4",
                                     "quant_scheme": "symmetric"}], True),
    ("DoReFaQuantizer", DoReFaQuantizer, [{**CONVS_LINEARS, "quant_types": ["weight"], "quant_bits": 4}], True),
    ("BNNQuantizer", BNNQuantizer, [{**CONVS_LINEARS, "quant_types": ["weight", "input"]}], True),
]


class QuantCNN(nn.Module):
    """conv 5x5 (16) - BN - Hardtanh - pool, conv 5x5 (32) - BN - Hardtanh - pool, linear: any square input."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.BatchNorm2d(16), nn.Hardtanh(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.BatchNorm2d(32), nn.Hardtanh(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * (side // 4) ** 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))  # (N, 32 * side/4 * side/4) -> (N, 10)


def _data(args: argparse.Namespace):
    if args.data_dir is not None and (Path(args.data_dir) / "mnist_train.npz").is_file():
        data = load_mnist(args.data_dir)
        data = type(data)(data.x_train[: args.train_limit], data.y_train[: args.train_limit], data.x_test,
                          data.y_test, data.classes)
        return data, f"MNIST ({len(data.y_train)} training / {len(data.y_test)} test images)"
    data = load_digits()
    if args.smoke:
        data = type(data)(data.x_train[:256], data.y_train[:256], data.x_test[:128], data.y_test[:128], data.classes)
    return data, f"scikit-learn digits (8x8; {len(data.y_train)} training / {len(data.y_test)} test images)"


def _bits(model: nn.Module) -> str:
    info = quant_info(model)
    if info is None:
        return "32 / 32"
    return f"{info.weight_bits} / {info.activation_bits or 32}"


def nni_rows(base: nn.Module, evaluator: Evaluator, args: argparse.Namespace) -> list[dict]:
    rows = []
    for label, cls, config, trains in NNI_ROWS:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        quantizer = cls(model, config, evaluator)
        if trains:  # as long as fp32 trains on: whichever of the epochs and the step cap ends first
            quantizer.compress(args.max_steps, args.epochs)
        else:
            quantizer.compress(args.calibration_batches)
        rows.append({"row": label, "model": model, "what": quant_info(model).method, "trained": trains,
                     "seconds": time.perf_counter() - start})
    return rows


def real_rows(base: nn.Module, evaluator: Evaluator, example: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    """slimtorch's int8 methods on the same model: torch.ao's kernels run them."""
    start = time.perf_counter()
    calibration = [x for x, _ in itertools.islice(iter(evaluator.train_data), args.calibration_batches)]
    static = quantize(base, QuantConfig(method="static_int8"), calibration=calibration)
    rows = [{"row": "static_int8", "model": static, "what": "torch.ao, calibrated", "trained": False,
             "seconds": time.perf_counter() - start}]
    start = time.perf_counter()
    qat = quantize(base, QuantConfig(method="qat_int8"), example_inputs=example[:2])
    evaluator.train_(qat, epochs=args.epochs, max_steps=args.max_steps)
    rows.append({"row": "qat_int8, converted", "model": convert_qat(qat), "what": "torch.ao, trained then converted",
                 "trained": True, "seconds": time.perf_counter() - start})
    return rows


def latencies(models: list[nn.Module], example: torch.Tensor, runs: int) -> list[float]:
    """Median wall time of one call of each model, timed round-robin so the machine's load hits all alike."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model(example)
        for _ in range(runs):
            for i, model in enumerate(models):
                start = time.perf_counter()
                model(example)
                times[i].append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="folder with mnist_*.npz (default: digits)")
    parser.add_argument("--train-limit", type=int, default=20000, help="training images used (MNIST)")
    parser.add_argument("--dense-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1, help="training of fp32 and the quantization-aware rows")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on those training steps")
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20, help="timed calls per row")
    parser.add_argument("--smoke", action="store_true", help="digits, a few steps, one timed run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data_dir, args.dense_epochs, args.max_steps, args.runs, args.calibration_batches = None, 1, 3, 1, 2
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data, name = _data(args)
    evaluator = Evaluator(train_data=data.loader("train", 64, shuffle=True), eval_data=data.loader("test", 1000),
                          lr=args.lr)
    base = QuantCNN(data.x_train.shape[-1])
    start = time.perf_counter()
    evaluator.train_(base, epochs=args.dense_epochs)
    dense_seconds = time.perf_counter() - start
    start = time.perf_counter()
    fp32 = copy.deepcopy(base)
    evaluator.train_(fp32, epochs=args.epochs, max_steps=args.max_steps)
    example = data.x_test[:256].contiguous()
    rows = [{"row": "fp32", "model": fp32, "what": "trained on as long as the quantization-aware rows",
             "trained": True, "seconds": time.perf_counter() - start}]
    rows += nni_rows(base, evaluator, args) + real_rows(base, evaluator, example, args)
    times = latencies([r["model"].eval() for r in rows], example, args.runs)
    _print(rows, times, evaluator, name, dense_seconds, evaluator.evaluate(base), args)


def _print(rows, times, evaluator, name, dense_seconds, dense_accuracy, args) -> None:
    print(f"# NNI's quantizers on {name}\n")
    print(f"{platform.platform()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {datetime.date.today()}; command: python {' '.join(sys.argv)}\n")
    print(f"Dense CNN: {args.dense_epochs} epoch(s), {dense_seconds:.0f} s, accuracy {dense_accuracy:.4f}; then "
          f"{args.epochs} epoch(s){f' (at most {args.max_steps} steps)' if args.max_steps else ''} of training for "
          f"fp32 and the quantization-aware rows. Latency: a batch of 256, median of {args.runs} round-robin runs. "
          "'vs fp32': against fp32 for the trained rows, against the dense CNN for the calibrated ones "
          "(PtqQuantizer, static_int8).\n")
    # the float model each row started from: fp32 trained on as long for the trained rows, the dense CNN
    # itself for the calibrated ones (PTQ and static int8 do not train)
    fp32 = {True: evaluator.evaluate(rows[0]["model"]), False: dense_accuracy}
    lines = ["| quantizer | method | bits (weights / inputs) | kernels | accuracy | vs fp32 | latency ms | "
             "x fp32 | s |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for row, t in zip(rows, times, strict=True):
        info = quant_info(row["model"])
        kernels = "real (fp32)" if info is None else f"{info.kernels} ({info.backend})"
        accuracy = evaluator.evaluate(row["model"])
        lines.append(f"| {row['row']} | {row['what']} | {_bits(row['model'])} | {kernels} | {accuracy:.4f} | "
                     f"{accuracy - fp32[row['trained']]:+.4f} | {t * 1e3:.2f} | {times[0] / t:.2f}x | "
                     f"{row['seconds']:.0f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
