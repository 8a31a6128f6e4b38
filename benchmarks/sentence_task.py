"""A task, as the seeds do with BERT: all-MiniLM-L6-v2 fine-tuned to tell registers apart, then pruned.

    PYTHONPATH=src python benchmarks/sentence_task.py --dense runs/sentence_task/dense --save runs/sentence_task
    PYTHONPATH=src python benchmarks/sentence_task.py --smoke   # a tiny random BERT: checks that it works

The task (:func:`slimtorch.data.text.register_splits`): is a sentence from an encyclopaedia (Wikipedia), a news
story or a movie review? Test sentences are the held-out text of :func:`~slimtorch.data.text.sentence_splits`
(held-out news stories, Wikipedia's test articles; never trained on) plus every fifth review. Training takes every
news and review sentence of the other documents and as many encyclopaedia sentences as news ones (a fixed draw).

all-MiniLM-L6-v2's real weights get a classification head (``BertForSequenceClassification``) and are fine-tuned
(``--finetune-steps``; embeddings frozen); that dense classifier is saved to ``--dense`` (safetensors) and read
from there by later runs. Each setting of ``SETTINGS`` is then made twice from it with
:func:`slimtorch.recipes.classifier.prune_classifier_` (``--steps`` steps of ``--batch-size`` sentences): distilled
from the dense classifier (logits at temperature 2 and every layer's hidden states) and trained on the labels
alone. One table: params, MACs, latency at 1 and 8 sentences (one thread), accuracy on the test sentences.
Training times go to stderr too (wall and CPU seconds: on a shared machine the wall time says little).
``--smoke`` uses a 4-layer random BERT of width 32 with MiniLM's tokenizer, a few steps and sentences, nothing
written: the table in seconds, its figures meaningless.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from slimtorch import report
from slimtorch.data.text import REGISTERS, register_splits
from slimtorch.integrations.hf.folders import save_hf_folder
from slimtorch.models.minilm import load_minilm_classifier
from slimtorch.recipes.classifier import TaskConfig, accuracy, finetune_classifier_, prune_classifier_
from slimtorch.recipes.minilm import pack_sentences
from slimtorch.recover.transformer_distill import TeacherCache

#: the pruned classifiers, by name: the workflow's settings (the rest default); each made with and without
#: distillation
SETTINGS: dict[str, dict[str, object]] = {
    "heads25-ffn25": {"head_sparsity": 0.25, "ffn_sparsity": 0.25},
    "heads50-ffn50": {"head_sparsity": 0.5, "ffn_sparsity": 0.5},
    "layers3": {"head_sparsity": 0.0, "ffn_sparsity": 0.0, "drop_layers": 3},
}
#: the control, on request (``--settings unpruned``): nothing pruned, the same training steps as a setting gets, so
#: that a pruned row can be told apart from what the extra training alone does to the dense classifier
CONTROL = {"unpruned": {"head_sparsity": 0.0, "ffn_sparsity": 0.0}}


def task_data(tokenizer, smoke: bool) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Packed training and test sentences with their labels (training: news and reviews, as many encyclopaedia
    sentences as news ones)."""
    splits = register_splits()
    texts, labels = splits.train.texts, torch.tensor(splits.train.labels)
    gen = torch.Generator().manual_seed(0)
    wiki = torch.nonzero(labels == 0).flatten()
    wiki = wiki[torch.randperm(len(wiki), generator=gen)][: int((labels == 1).sum())]
    keep = torch.cat([wiki, torch.nonzero(labels != 0).flatten()])
    keep = keep[torch.randperm(len(keep), generator=gen)]  # (N,) classes mixed
    test_texts, test_labels = list(splits.test.texts), torch.tensor(splits.test.labels)
    if smoke:
        keep, test_texts, test_labels = keep[:64], test_texts[::40], test_labels[::40]
    train = (pack_sentences(tokenizer, [texts[i] for i in keep], max_length=64), labels[keep])
    return train, (pack_sentences(tokenizer, test_texts, max_length=64), test_labels)


def tiny_classifier(vocab_size: int) -> torch.nn.Module:
    """A randomly initialised 4-layer BERT classifier of width 32 (``--smoke``)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    num_labels=len(REGISTERS))).eval()


def _timed(what: str, fn) -> str:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{what}: {wall:.0f} s wall, {cpu:.0f} s CPU", file=sys.stderr, flush=True)
    return f"{wall / 60:.1f} min ({cpu / 60:.1f} CPU)"


def dense_classifier(args, train) -> tuple[torch.nn.Module, object, str]:
    """The fine-tuned dense classifier: read from ``--dense`` if saved there, else fine-tuned (and saved)."""
    folder = Path(args.dense) if args.dense and not args.smoke else None
    if folder is not None and (folder / "config.json").is_file():
        model, tokenizer = load_minilm_classifier(len(REGISTERS), path=str(folder))
        return model, tokenizer, "read from " + str(folder)
    model, tokenizer = load_minilm_classifier(len(REGISTERS))
    if args.smoke:
        model = tiny_classifier(tokenizer.vocab_size)
    model.bert.embeddings.requires_grad_(False)  # fine-tune the encoder and the head: a third of the step time
    times = _timed("fine-tune", lambda: finetune_classifier_(model, *train, steps=args.finetune_steps,
                                                            batch_size=args.batch_size, lr=args.finetune_lr))
    model.bert.embeddings.requires_grad_(True)
    if folder is not None:
        save_hf_folder(model, folder)
    return model, tokenizer, times


def _row(name: str, distil: str, model, test, examples, base, dense_acc, runs: int, times: str) -> tuple[str, float]:
    acc = accuracy(model, *test)
    r1, r8 = (report(model, examples[n], runs=runs, warmup=min(5, runs), threads=1) for n in (1, 8))
    speed = f"{base.latency_s / r8.latency_s:.2f}x" if base else "1.00x"
    delta = f"{100 * (acc - dense_acc):+.2f}" if dense_acc is not None else "-"
    return (f"| {name} | {distil} | {r8.params / 1e6:.2f}M | {r8.macs / 1e9:.2f}G | {r1.latency_s * 1e3:.1f} ms | "
            f"{r8.latency_s * 1e3:.1f} ms | {speed} | {100 * acc:.2f}% | {delta} | {times} |"), r8


def prune_one(dense, train, cache, setting: str, distil: bool, args) -> tuple[torch.nn.Module, str]:
    model = copy.deepcopy(dense)
    model.bert.embeddings.requires_grad_(False)
    cfg = TaskConfig(steps=args.steps, batch_size=args.batch_size, prune_every=args.prune_every, lr=args.lr,
                     distil=distil, **(SETTINGS | CONTROL)[setting])
    times = _timed(f"{setting} {'distilled' if distil else 'labels only'}",
                   lambda: prune_classifier_(model, *train, cfg, cache=cache if distil else None))
    model.bert.embeddings.requires_grad_(True)
    return model, times


def task_table(args) -> None:
    """Print the table, each row as soon as its model is made."""
    torch.set_num_threads(args.threads)
    _, tokenizer = load_minilm_classifier(len(REGISTERS))
    train, test = task_data(tokenizer, args.smoke)
    dense, tokenizer, times = dense_classifier(args, train)
    runs = 1 if args.smoke else 20
    examples = {n: {"input_ids": test[0][:n, 0], "attention_mask": test[0][:n, 1]} for n in (1, 8)}
    examples = {n: {k: v[:, : int(e["attention_mask"].sum(dim=1).max())] for k, v in e.items()}
                for n, e in examples.items()}
    counts = [int((test[1] == c).sum()) for c in range(len(REGISTERS))]
    dense_acc = accuracy(dense, *test)
    print("\n".join([
        f"{'a 4-layer random BERT of width 32' if args.smoke else 'all-MiniLM-L6-v2'} as a {len(REGISTERS)}-class "
        f"register classifier ({', '.join(REGISTERS)}): fine-tuned {args.finetune_steps} steps of {args.batch_size} "
        f"on {len(train[0]):,} sentences ({times}); test: {len(test[0]):,} held-out sentences "
        f"({', '.join(f'{n} {c}' for n, c in zip(counts, REGISTERS, strict=True))}; majority class "
        f"{100 * max(counts) / sum(counts):.1f}%); pruning: {args.steps} steps of {args.batch_size}, sparsity raised "
        f"every {args.prune_every} steps over the first 60%, then compacted and trained on; latency: 1 and 8 "
        f"sentences ({examples[8]['input_ids'].shape[1]} tokens), 1 thread, median of {runs}, speed-up at 8.",
        "",
        "| model | distillation | params | MACs | latency 1 | latency 8 | speed-up | accuracy | vs dense | training |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]), flush=True)
    line, base = _row("dense (fine-tuned)", "-", dense, test, examples, None, None, runs, "-")
    print(line, flush=True)
    cache = TeacherCache(dense)  # the teacher runs once per sentence, for every distilled setting
    for setting in args.settings:
        for distil in {"both": (True, False), "yes": (True,), "no": (False,)}[args.distil]:
            model, times = prune_one(dense, train, cache, setting, distil, args)
            label = "logits + hidden states" if distil else "none (labels)"
            print(_row(setting, label, model, test, examples, base, dense_acc, runs, times)[0], flush=True)
            if args.save and not args.smoke:
                save_hf_folder(model, Path(args.save) / f"{setting}-{'distil' if distil else 'labels'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetune-steps", type=int, default=250, help="fine-tuning steps of the dense classifier")
    parser.add_argument("--finetune-lr", type=float, default=2e-4, help="fine-tuning learning rate (AdamW)")
    parser.add_argument("--steps", type=int, default=150, help="pruning and training steps per setting")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate while pruning (AdamW)")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per step")
    parser.add_argument("--prune-every", type=int, default=5, help="steps between sparsity increases")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--settings", nargs="+", choices=[*SETTINGS, *CONTROL], default=list(SETTINGS))
    parser.add_argument("--distil", choices=("both", "yes", "no"), default="both",
                        help="make each setting distilled, trained on the labels, or both")
    parser.add_argument("--dense", default=None, help="folder of the fine-tuned dense classifier: read if it is "
                        "there, else written after fine-tuning")
    parser.add_argument("--save", default=None, help="folder to write each pruned classifier to, by setting")
    parser.add_argument("--smoke", action="store_true", help="a tiny random BERT, a few steps: checks that the "
                        "table still works, in seconds (figures meaningless)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.finetune_steps, args.steps, args.batch_size, args.prune_every = 4, 4, 4, 2
    print(f"<!-- {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"{date.today()} -->")
    task_table(args)


if __name__ == "__main__":
    main()
