"""Quality of structured LLM pruning on the tiny LLaMA: heads and FFN neurons removed at 20% / 35% / 50%
(FLAP importance with bias compensation, and structured Wanda without), whole layers dropped by block
influence, each before and after recovery (LoRA on the next-token loss, and LoRA distilled from the unpruned
model); one-shot unstructured pruning beside them.

    PYTHONPATH=src python benchmarks/llm_structured.py                 # the 3.8M tiny LLaMA (trained once, cached)
    PYTHONPATH=src python benchmarks/llm_structured.py --recovery-steps 300 --recovery lora
    PYTHONPATH=src python benchmarks/llm_structured.py --smoke         # a one-layer LM, a few steps (meaningless)

The trained dense LM is kept in ``$SLIMTORCH_CACHE`` (safetensors, :func:`slimtorch.models.tiny_lm.load_or_train_lm`)
and reused by later runs. Every model goes through the streamed path a large model takes: saved with
``save_pretrained``, pruned layer by layer from its shards (:mod:`slimtorch.integrations.hf.llm_structured`,
:mod:`slimtorch.integrations.hf.streamed`), loaded again with ``from_pretrained``. Recovery: PEFT's LoRA
(r=8 on every linear of the decoder layers) trained with :func:`slimtorch.recover.fit` on the same random
windows of the training articles (AdamW, cosine schedule), then merged; ``lora`` trains it on the next-token
loss, ``distill`` on the unpruned model's next-token distributions
(:class:`slimtorch.recover.CausalLMDistiller`: KL at temperature ``--temperature``, mixed with the next-token
loss by ``--alpha``; the teacher's logits computed on the fly). Perplexity on held-out articles as in
``transformer_pruning.py``; compare ratios, not absolute values with papers (another tokenizer, another model
size). Seconds are CPU seconds of this process (``time.process_time``).
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
from slimtorch.recover import CausalLMDistiller, DistillConfig, TrainConfig, fit
from slimtorch.recover.losses import causal_lm_loss

#: ``--lm small``: the tiny LLaMA's layout at half its width, trained for a third of its steps (a busy machine)
SMALL_LM = TinyLMConfig(hidden_size=128, intermediate_size=344, batch_size=8, steps=400)
SMOKE_LM = TinyLMConfig(vocab_size=256, hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64,
                        seq_len=32, batch_size=4, steps=3)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECOVERIES = {"lora": "after LoRA recovery", "distill": "after LoRA distillation"}


def next_token_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return causal_lm_loss(model, x)


def recover(model: torch.nn.Module, windows: torch.Tensor, steps: int, batch_size: int,
            loss_fn: Callable = next_token_loss) -> torch.nn.Module:
    """LoRA on every decoder linear, ``steps`` optimizer steps of ``loss_fn`` (next-token loss by default),
    merged back."""
    torch.manual_seed(0)  # the same adapters for every recovery, whichever ran before
    add_lora_(model, LoRAConfig(r=8, lora_alpha=16, target_modules=LINEARS))
    data = TensorDataset(windows[: steps * batch_size], windows[: steps * batch_size])
    fit(model.train(), data, TrainConfig(epochs=1, batch_size=batch_size, lr=1e-3, optimizer="adamw",
                                         schedule="cosine"), loss_fn=loss_fn)
    merge_lora_(model)
    return model.eval()


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=64, help="calibration windows")
    parser.add_argument("--recovery-steps", type=int, default=200, help="LoRA optimizer steps of each recovery")
    parser.add_argument("--recovery", default="lora,distill",
                        help=f"comma-separated recoveries, of {sorted(RECOVERIES)} (empty: none)")
    parser.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="weight of the distillation term (the next-token loss gets 1 - alpha)")
    parser.add_argument("--importance", default="flap,wanda",
                        help="comma-separated structured importances, of flap (with bias compensation) and wanda")
    parser.add_argument("--one-shot", default="wanda,sparsegpt",
                        help="comma-separated one-shot methods for the rows beside (empty: none)")
    parser.add_argument("--lm", choices=("default", "small"), default="default",
                        help="the 3.8M tiny LLaMA, or a smaller one quicker to train (1.2M)")
    parser.add_argument("--test-tokens", type=int, default=0, help="perplexity on the first N test tokens (0: all)")
    parser.add_argument("--smoke", action="store_true", help="a tiny LM, a few steps: checks that the table works")
    args = parser.parse_args(argv)
    args.recovery, args.importance, args.one_shot = ([v for v in text.split(",") if v] for text in
                                                     (args.recovery, args.importance, args.one_shot))
    for values, known in ((args.recovery, RECOVERIES), (args.importance, ("flap", "wanda")),
                          (args.one_shot, ("magnitude", "wanda", "sparsegpt"))):
        if set(values) - set(known):
            parser.error(f"unknown {sorted(set(values) - set(known))}; choose from {sorted(known)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
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
          f"{torch.__version__}, {date.today()}; the dense LM trained in {lm.record.get('train_cpu_seconds', '?')} "
          f"CPU s -->")
    print(f"Tiny LLaMA ({dense_params / 1e6:.2f}M parameters, {cfg.layers} layers, {cfg.heads} query / "
          f"{cfg.kv_heads} key-value heads, FFN {cfg.intermediate_size}); test {test.numel():,} tokens; calibration "
          f"{args.calibration} x {cfg.seq_len} tokens; recovery {args.recovery_steps} LoRA steps of {batch} x "
          f"{cfg.seq_len} tokens; distillation T={args.temperature}, alpha={args.alpha}.\n")
    heads = [c for r in args.recovery for c in (RECOVERIES[r], "x dense")]
    print("| " + " | ".join(["pruned", "method", "params", "params removed", "perplexity", "x dense", *heads,
                             "prune s", "recovery s"]) + " |")
    print("|---|---|" + "---:|" * (len(heads) + 6))
    print(f"| 0% | dense | {dense_params:,} | 0% | {dense_ppl:.2f} | 1.00 |" + " - |" * (len(heads) + 2))
    start = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "dense"
        lm.model.save_pretrained(source)
        losses = {"lora": next_token_loss, "distill": CausalLMDistiller(
            lm.model, DistillConfig(temperature=args.temperature, alpha=args.alpha))}
        runs = pruning_runs(source, calib, cfg.layers, batch, args.importance, args.one_shot)
        for index, (what, method, prune) in enumerate(runs):
            print(row(Path(tmp) / f"run{index}", what, method, prune, [losses[r] for r in args.recovery],
                      lambda m: perplexity(m, test, seq_len=cfg.seq_len), (dense_ppl, dense_params),
                      lambda m, loss: recover(m, windows, args.recovery_steps, batch, loss)), flush=True)
    print(f"\n<!-- pruning, recovery and perplexity: {time.process_time() - start:.0f} CPU s -->")


def row(out: Path, what: str, method: str, prune: Callable, losses: list[Callable],
        score: Callable[[torch.nn.Module], float], dense: tuple[float, int],
        heal: Callable[[torch.nn.Module, Callable], torch.nn.Module]) -> str:
    """One line of the table: prune into ``out``, score, then each recovery on a fresh copy of the pruned model."""
    from transformers import LlamaForCausalLM

    start = time.process_time()
    prune(out)
    seconds = time.process_time() - start
    model = LlamaForCausalLM.from_pretrained(out).eval()
    ppl, size = score(model), params(model)
    line = f"| {what} | {method} | {size:,} | {1 - size / dense[1]:.0%} | {ppl:.2f} | {ppl / dense[0]:.2f} |"
    if method.startswith("one-shot"):  # a merged LoRA update is dense: it would undo the sparsity
        return f"{line}{' - | - |' * len(losses)} {seconds:.1f} | - |"
    start = time.process_time()
    for loss in losses:
        healed = score(heal(LlamaForCausalLM.from_pretrained(out), loss))
        line += f" {healed:.2f} | {healed / dense[0]:.2f} |"
    return f"{line} {seconds:.1f} | {time.process_time() - start:.0f} |"


def pruning_runs(source: Path, calib: torch.Tensor, layers: int, batch: int, importances: list[str],
                 one_shot: list[str]) -> list[tuple[str, str, Callable]]:
    """(what is pruned, method, ``prune(output folder)``) of every row after the dense one. FLAP importance
    comes with its bias compensation, structured Wanda without."""
    runs = [(f"{r:.0%} heads + FFN", f"structured {imp}{' + bias' if imp == 'flap' else ''}",
             lambda out, r=r, imp=imp: stream_structured_prune(
                 source, out, calib, heads=r, neurons=r, importance=imp, bias_compensation=imp == "flap",
                 batch_size=batch))
            for r in (0.2, 0.35, 0.5) for imp in importances]
    drop = max(1, layers // 4)
    runs.append((f"{drop} of {layers} layers", "block influence", lambda out: stream_drop_layers(
        source, out, drop_lowest(block_influence(source, calib, batch_size=batch), drop))))
    runs += [(f"{p or '50%'} of weights", f"one-shot {m}", lambda out, m=m, p=p: stream_one_shot_prune(
        source, out, calib, method=m, pattern=p, batch_size=batch))
        for m in one_shot for p in (None, "2:4")]
    return runs


def drop_lowest(influence: list[float], count: int) -> list[int]:
    """The ``count`` layers of lowest block influence (at least one)."""
    return sorted(sorted(range(len(influence)), key=influence.__getitem__)[: max(1, count)])


if __name__ == "__main__":
    main()
