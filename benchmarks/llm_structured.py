"""Quality of structured LLM pruning on the tiny LLaMA: heads and FFN neurons removed at 20% / 35% / 50%
(FLAP importance with bias compensation, and structured Wanda without), whole layers dropped by block
influence, each before and after LoRA recovery; one-shot unstructured pruning beside them.

    PYTHONPATH=src python benchmarks/llm_structured.py                 # the 3.8M tiny LLaMA (trained once, cached)
    PYTHONPATH=src python benchmarks/llm_structured.py --recovery-steps 300
    PYTHONPATH=src python benchmarks/llm_structured.py --smoke         # a one-layer LM, a few steps (meaningless)

Every model goes through the streamed path a large model takes: saved with ``save_pretrained``, pruned layer
by layer from its shards (:mod:`slimtorch.integrations.hf.llm_structured`,
:mod:`slimtorch.integrations.hf.streamed`), loaded again with ``from_pretrained``. Recovery: PEFT's LoRA
(r=8 on every linear of the decoder layers) trained with :func:`slimtorch.recover.fit` on random windows of
the training articles (next-token loss, AdamW, cosine schedule), then merged. Perplexity on held-out
articles as in ``transformer_pruning.py``; compare ratios, not absolute values with papers (another
tokenizer, another model size).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from slimtorch.data.text import TextSplits, text_splits
from slimtorch.integrations.hf.llm_structured import block_influence, stream_drop_layers, stream_structured_prune
from slimtorch.integrations.hf.streamed import stream_one_shot_prune
from slimtorch.lora import LoRAConfig, add_lora_, merge_lora_
from slimtorch.models.tiny_lm import (
    TinyLMConfig,
    calibration_batches,
    encode_documents,
    load_or_train_lm,
    perplexity,
    train_lm,
)
from slimtorch.recover import TrainConfig, fit
from slimtorch.recover.losses import causal_lm_loss

#: ``--lm small``: the tiny LLaMA's layout at half its width, trained for a third of its steps (a busy machine)
SMALL_LM = TinyLMConfig(hidden_size=128, intermediate_size=344, batch_size=8, steps=400)
SMOKE_LM = TinyLMConfig(vocab_size=256, hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64,
                        seq_len=32, batch_size=4, steps=3)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def recover(model: torch.nn.Module, windows: torch.Tensor, steps: int, batch_size: int) -> torch.nn.Module:
    """LoRA on every decoder linear, ``steps`` optimizer steps of next-token loss, merged back."""
    add_lora_(model, LoRAConfig(r=8, lora_alpha=16, target_modules=LINEARS))
    data = TensorDataset(windows[: steps * batch_size], windows[: steps * batch_size])
    fit(model.train(), data, TrainConfig(epochs=1, batch_size=batch_size, lr=1e-3, optimizer="adamw",
                                         schedule="cosine"),
        loss_fn=lambda m, x, y: causal_lm_loss(m, x))
    merge_lora_(model)
    return model.eval()


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    from transformers import LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=64, help="calibration windows")
    parser.add_argument("--recovery-steps", type=int, default=200, help="LoRA optimizer steps")
    parser.add_argument("--lm", choices=("default", "small"), default="default",
                        help="the 3.8M tiny LLaMA, or a smaller one quicker to train (1.2M)")
    parser.add_argument("--test-tokens", type=int, default=0, help="perplexity on the first N test tokens (0: all)")
    parser.add_argument("--smoke", action="store_true", help="a tiny LM, a few steps: checks that the table works")
    args = parser.parse_args(argv)
    splits = text_splits()
    if args.smoke:
        splits = TextSplits(splits.train[:4], splits.val[:1], splits.test[:1])
        args.calibration, args.recovery_steps = 4, 2
    cfg = SMALL_LM if args.lm == "small" else TinyLMConfig()
    lm = train_lm(SMOKE_LM, splits) if args.smoke else load_or_train_lm(cfg)
    cfg, batch = lm.config, 4 if args.smoke else 16
    test = encode_documents(lm.tokenizer, splits.test)[: 2048 if args.smoke else args.test_tokens or None]
    train = encode_documents(lm.tokenizer, splits.train)
    calib = calibration_batches(train, num=args.calibration, seq_len=cfg.seq_len, seed=0)
    windows = calibration_batches(train, num=args.recovery_steps * batch, seq_len=cfg.seq_len, seed=1)
    dense_ppl, dense_params = perplexity(lm.model, test, seq_len=cfg.seq_len), params(lm.model)
    print(f"<!-- {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {date.today()} -->")
    print(f"Tiny LLaMA ({dense_params / 1e6:.2f}M parameters, {cfg.layers} layers, {cfg.heads} query / "
          f"{cfg.kv_heads} key-value heads, FFN {cfg.intermediate_size}); test {test.numel():,} tokens; calibration "
          f"{args.calibration} x {cfg.seq_len} tokens; recovery {args.recovery_steps} LoRA steps of {batch} x "
          f"{cfg.seq_len} tokens.\n")
    print("| pruned | method | params | params removed | perplexity | x dense | after LoRA recovery | x dense | "
          "prune s | recovery s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| 0% | dense | {dense_params:,} | 0% | {dense_ppl:.2f} | 1.00 | - | - | - | - |")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "dense"
        lm.model.save_pretrained(source)
        for index, (what, method, prune) in enumerate(pruning_runs(source, calib, cfg.layers, batch)):
            out = Path(tmp) / f"run{index}"
            start = time.perf_counter()
            prune(out)
            seconds = time.perf_counter() - start
            model = LlamaForCausalLM.from_pretrained(out).eval()
            ppl, size = perplexity(model, test, seq_len=cfg.seq_len), params(model)
            line = (f"| {what} | {method} | {size:,} | {1 - size / dense_params:.0%} | {ppl:.2f} | "
                    f"{ppl / dense_ppl:.2f} |")
            if method.startswith("one-shot"):  # a merged LoRA update is dense: it would undo the sparsity
                print(f"{line} - | - | {seconds:.1f} | - |")
                continue
            start = time.perf_counter()
            healed = perplexity(recover(model, windows, args.recovery_steps, batch), test, seq_len=cfg.seq_len)
            print(f"{line} {healed:.2f} | {healed / dense_ppl:.2f} | {seconds:.1f} | "
                  f"{time.perf_counter() - start:.0f} |")


def pruning_runs(source: Path, calib: torch.Tensor, layers: int, batch: int) -> list[tuple[str, str, Callable]]:
    """(what is pruned, method, ``prune(output folder)``) of every row after the dense one."""
    runs = [(f"{r:.0%} heads + FFN", f"structured {imp}{' + bias' if comp else ''}",
             lambda out, r=r, imp=imp, comp=comp: stream_structured_prune(
                 source, out, calib, heads=r, neurons=r, importance=imp, bias_compensation=comp, batch_size=batch))
            for r in (0.2, 0.35, 0.5) for imp, comp in (("flap", True), ("wanda", False))]
    drop = max(1, layers // 4)
    runs.append((f"{drop} of {layers} layers", "block influence", lambda out: stream_drop_layers(
        source, out, drop_lowest(block_influence(source, calib, batch_size=batch), drop))))
    runs += [(f"{p or '50%'} of weights", f"one-shot {m}", lambda out, m=m, p=p: stream_one_shot_prune(
        source, out, calib, method=m, pattern=p, batch_size=batch))
        for m in ("wanda", "sparsegpt") for p in (None, "2:4")]
    return runs


def drop_lowest(influence: list[float], count: int) -> list[int]:
    """The ``count`` layers of lowest block influence (at least one)."""
    return sorted(sorted(range(len(influence)), key=influence.__getitem__)[: max(1, count)])


if __name__ == "__main__":
    main()
