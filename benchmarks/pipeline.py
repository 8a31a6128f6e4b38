"""The combined pipeline, prune -> compact -> distil -> quantize -> export, on the book's CIFAR-10 CNN and on
all-MiniLM-L6-v2: parameters, size, latency and quality after each stage, in one table
(:func:`slimtorch.pipeline.run_pipeline`).

BookCNN: trained on CIFAR-10 (cached in --out), both convolutions lose half their filters (L1, the
book's config list), ``slimtorch.compact_`` removes them, ``fit`` with a ``Distiller`` recovers from the
dense model, then static int8 (PyTorch, and ONNX Runtime on the exported file). Quality: CIFAR-10 test
top-1. MiniLM: half the FFN neurons of every layer go (L1), ``compact_hf_`` removes them, the sentence
embeddings are distilled from the dense model on Wikipedia sentences (``distil_embeddings_``), then
dynamic int8. Quality: mean cosine similarity of held-out news sentences' embeddings to the dense
model's.

    PYTHONPATH=src python benchmarks/pipeline.py --data-dir ../shared/data --threads 1
    PYTHONPATH=src python benchmarks/pipeline.py --smoke     # checks that it works, in seconds (see --help)
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimtorch.data import TensorSplit
from slimtorch.models import BookCNN
from slimtorch.pipeline import PipelineConfig, PipelineResult, distil_recovery, run_pipeline
from slimtorch.quant import QuantConfig
from slimtorch.recover import DistillConfig, TrainConfig, evaluate_accuracy
from slimtorch.recover.finetune import train


def train_dense_cnn(data: Any, args: Any) -> nn.Module:
    """The dense BookCNN, trained once and cached (Adam 1e-3, batch 64, seed 0); ``--smoke``: not cached."""
    from safetensors.torch import load_file, save_file

    path = Path(args.out) / f"bookcnn_dense_e{args.epochs}.safetensors"
    model = BookCNN()
    if args.smoke:
        torch.manual_seed(0)
        train(model, data.loader("train", 64, shuffle=True), epochs=args.epochs, lr=1e-3)
        return model.eval()
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    torch.manual_seed(0)
    train(model, data.loader("train", 64, shuffle=True), epochs=args.epochs, lr=1e-3)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval()


def synthetic_cifar10(train: int, test: int) -> TensorSplit:
    """Random CIFAR-10-shaped images and labels (``--smoke``: no data files needed)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(train + test, 3, 32, 32, generator=gen)  # (N, C, H, W) in [0, 1]
    y = torch.randint(0, 10, (train + test,), generator=gen)
    return TensorSplit(x[:train], y[:train], x[train:], y[train:], tuple(str(i) for i in range(10)))


def bookcnn(args: Any) -> tuple[str, PipelineResult]:
    from slimtorch.data import load_cifar10

    data = synthetic_cifar10(256, 64) if args.smoke else load_cifar10(args.data_dir)
    test = TensorDataset(data.x_test, data.y_test)
    dense = train_dense_cnn(data, args)
    config = PipelineConfig(config_list=({"op_types": ["Conv2d"], "sparse_ratio": 0.5},),
                            quant=QuantConfig(method="static_int8"), threads=args.threads, runs=args.runs)
    recover = distil_recovery(TensorDataset(data.x_train, data.y_train),
                              TrainConfig(epochs=args.recover_epochs, batch_size=64, lr=5e-4, seed=1),
                              DistillConfig(temperature=4.0, alpha=0.7))
    calibration = [data.x_train[i : i + 64] for i in range(0, min(64 * 16, len(data.x_train)), 64)]  # 16 of 64
    # load_cifar10's images are channels-last in memory (decoded from HWC): time a contiguous NCHW batch, the
    # layout a deployed model gets (torch.ao's int8 convs are slower than float on channels-last input here).
    example = data.x_test[: 4 if args.smoke else 32].contiguous()
    result = run_pipeline(dense, example, config, score=lambda m: evaluate_accuracy(m, test),
                          recover=recover, calibration=calibration)
    title = (f"BookCNN on {'random CIFAR-10-shaped data' if args.smoke else 'CIFAR-10'} (dense: {args.epochs} "
             f"epochs, Adam 1e-3); L1 filters, 50% of both convs; distil {args.recover_epochs} epoch(s) (T=4, "
             f"alpha=0.7); static int8 with {len(calibration)} calibration batches; latency: batch of "
             f"{len(example)} images; quality: test top-1 over {len(test)} images")
    return title, result


def minilm(args: Any) -> tuple[str, PipelineResult]:
    from slimtorch.data.text import split_sentences, text_splits
    from slimtorch.models.minilm import embedding_agreement, heldout_sentences, load_minilm, mean_pool
    from slimtorch.recipes.minilm import distil_embeddings_, ffn_config

    dense, tokenizer = load_minilm()
    if args.smoke:
        dense = tiny_bert(dense.config)
    heldout = heldout_sentences(16 if args.smoke else 256)

    def tokens(texts: list[str]) -> dict[str, torch.Tensor]:
        # One padded length for every batch: the ONNX file is exported with a dynamic batch dimension only.
        return dict(tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt"))

    evals = [tokens(heldout[i : i + 64]) for i in range(0, len(heldout), 64)]

    def embeddings(model: nn.Module) -> torch.Tensor:
        out = []
        for batch in evals:
            result = model(**batch)  # a Hugging Face output, or ONNX Runtime's tensor(s)
            hidden = getattr(result, "last_hidden_state", result if isinstance(result, torch.Tensor) else result[0])
            out.append(nn.functional.normalize(mean_pool(hidden.float(), batch["attention_mask"]), dim=-1))
        return torch.cat(out)  # (N, D)

    with torch.no_grad():
        reference = embeddings(dense)
    sentences = [s for d in text_splits().train for s in split_sentences(d.text, min_words=6, max_words=40)]
    batches = [dict(tokenizer(sentences[::7][i : i + 8], padding=True, truncation=True, max_length=48,
                              return_tensors="pt")) for i in range(0, 8 * args.distil_steps, 8)]

    def cosine(model: nn.Module) -> float:
        return embedding_agreement(reference, embeddings(model), k=10).cosine_mean

    def recover(student: nn.Module, teacher: nn.Module) -> str:
        student.embeddings.requires_grad_(False)  # the encoder only: a third of the step time
        distil_embeddings_(student, teacher, batches, steps=args.distil_steps, lr=1e-4)
        student.embeddings.requires_grad_(True)
        return f"distil embeddings (MSE to dense), {args.distil_steps} steps of 8 Wikipedia sentences"

    config = PipelineConfig(config_list=tuple(ffn_config(dense, 0.5)), compactor="hf",
                            quant=QuantConfig(method="dynamic_int8"), threads=args.threads, runs=args.runs)
    result = run_pipeline(dense, tokens(heldout[:16]), config, score=cosine, recover=recover)
    name = "a 2-layer BERT of width 32 (random)" if args.smoke else "all-MiniLM-L6-v2"
    title = (f"{name}; L1 FFN neurons, 50% of each layer; distil {args.distil_steps} steps; dynamic "
             "int8; latency: 16 held-out sentences padded to 64 tokens; quality: mean cosine of "
             f"{len(heldout)} held-out news sentences' embeddings to the dense model's")
    return title, result


def tiny_bert(config: Any) -> nn.Module:
    """A randomly initialised 2-layer BERT of width 32 with ``config``'s vocabulary (``--smoke``)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=config.vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64)).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data", help="folder with cifar10_*.npz")
    parser.add_argument("--out", default="runs/pipeline", help="where the trained dense BookCNN is cached")
    parser.add_argument("--models", nargs="+", default=["bookcnn", "minilm"], choices=["bookcnn", "minilm"])
    parser.add_argument("--epochs", type=int, default=2, help="dense BookCNN training epochs")
    parser.add_argument("--recover-epochs", type=int, default=1, help="BookCNN distillation epochs")
    parser.add_argument("--distil-steps", type=int, default=200, help="MiniLM distillation steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--smoke", action="store_true",
                        help="checks that every stage works, in seconds: BookCNN on 256 random CIFAR-10-shaped images "
                             "(no data files), a tiny random BERT in place of MiniLM, one epoch, 2 distillation "
                             "steps, one timed run; nothing cached")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.recover_epochs, args.distil_steps, args.runs = 1, 1, 2, 1
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"# Pipeline: prune -> compact -> distil -> quantize -> export\n\n{platform.machine()}, torch "
          f"{torch.__version__}, {args.threads} thread(s), median (best) of {args.runs} runs timed round-robin over "
          f"the stages, {time.strftime('%Y-%m-%d')}; speed-up and size ratio against each model's dense row\n",
          flush=True)
    runs = {"bookcnn": (bookcnn, "top-1"), "minilm": (minilm, "cosine")}
    for name in args.models:
        fn, quality = runs[name]
        start = time.perf_counter()
        title, result = fn(args)
        print(f"### {title}\n\n{result.to_markdown(quality)}\n\n({time.perf_counter() - start:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
