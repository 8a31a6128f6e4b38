"""Recovery of a structurally compacted LLaMA under ``torchrun``: LoRA on the next-token loss, or LoRA distilled
from the unpruned model, trained by :func:`slimtorch.recover.fit` with DDP (every process holds the model) or
FSDP (every process holds a shard), and what each process held.

    PYTHONPATH=src python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/llm_recover.py
    PYTHONPATH=src python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/llm_recover.py \\
        --fsdp --out runs/llm/recovered
    PYTHONPATH=src python benchmarks/llm_recover.py --smoke      # one process, a tiny model, a few steps

The dense model is ``--source`` (a ``save_pretrained`` LLaMA folder; with a ``tokenizer.json`` in it, as the
tiny LM's cache has, the windows are the training articles, else random token ids) or a random-weight LLaMA of
the tiny LM's shape (3.8M parameters). Every process compacts it the same way (``stream_structured_prune``,
FLAP, ``--ratio`` of the heads and FFN neurons) into its own temporary folder, adds the same LoRA adapters
(same seed: FSDP shards what each process holds, it does not broadcast it) and trains on its share of every
global batch. With ``--out``, process 0 gathers the trained weights (``full_state_dict``), merges the adapters
and writes one folder per recovery that loads with ``from_pretrained``. The losses are the training losses of
the first and last epoch; with random weights they say only that training runs, not how good recovery is
(``llm_structured.py`` measures that).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from slimtorch.data.text import text_splits
from slimtorch.integrations.hf.llm_structured import stream_structured_prune
from slimtorch.lora import LoRAConfig, add_lora_, merge_lora_
from slimtorch.models.tiny_lm import TinyLMConfig, build_model, calibration_batches, encode_documents
from slimtorch.recover import CausalLMDistiller, DistillConfig, TrainConfig, fit
from slimtorch.recover.distributed import all_reduce_sum, full_state_dict, init_distributed, shutdown_distributed
from slimtorch.recover.losses import causal_lm_loss

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SMOKE = TinyLMConfig(vocab_size=96, hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64, seq_len=16)


def windows(source: Path, cfg: TinyLMConfig, count: int) -> torch.Tensor:
    """``(count, seq_len)`` token ids: windows of the training articles with the source's tokenizer, else random."""
    if (source / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokens = encode_documents(Tokenizer.from_file(str(source / "tokenizer.json")), text_splits().train)
        return calibration_batches(tokens, num=count, seq_len=cfg.seq_len, seed=1)
    return torch.randint(0, cfg.vocab_size, (count, cfg.seq_len), generator=torch.Generator().manual_seed(1))


def student(pruned: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(pruned)
    torch.manual_seed(0)  # the same adapters in every process
    add_lora_(model, LoRAConfig(r=8, lora_alpha=16, target_modules=LINEARS))
    return model


def held(model: torch.nn.Module) -> int:
    """Parameters this process holds: a shard's local part under FSDP, every parameter otherwise."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())


def recover(kind: str, dense: Path, pruned: Path, data: torch.Tensor, args: argparse.Namespace) -> list[str]:
    """Train one recovery; the table row (process 0) and, with ``--out``, the merged model."""
    from transformers import LlamaForCausalLM

    model = student(pruned)
    loss = (CausalLMDistiller(LlamaForCausalLM.from_pretrained(dense), DistillConfig(temperature=2.0, alpha=0.5))
            if kind == "distill" else lambda m, x, y: causal_lm_loss(m, x))
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, optimizer="adamw",
                         schedule="cosine", fsdp=args.fsdp)
    start = time.process_time()
    result = fit(model, TensorDataset(data, data), config, loss_fn=loss)
    seconds, mine = time.process_time() - start, held(model)
    state = full_state_dict(model)  # collective: process 0 gets every tensor whole, the others nothing
    if args.out and state:
        merged = student(pruned)
        merged.load_state_dict(state)
        merge_lora_(merged)
        merged.save_pretrained(Path(args.out) / kind)
    total = int(all_reduce_sum([mine])[0]) if args.fsdp else mine  # (the shards add up to the model)
    losses = [e.loss for e in result.epochs]
    return [kind, f"{total:,}", f"{mine:,}", f"{losses[0]:.4f}", f"{losses[-1]:.4f}", str(result.steps),
            f"{seconds:.1f}", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="a save_pretrained LLaMA folder (default: random weights, 3.8M shape)")
    parser.add_argument("--ratio", type=float, default=0.5, help="share of heads and FFN neurons removed")
    parser.add_argument("--recovery", default="lora,distill", help="comma-separated: lora, distill")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP instead of replicating with DDP")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="the global batch")
    parser.add_argument("--samples", type=int, default=64, help="training windows")
    parser.add_argument("--out", help="process 0 writes the merged recovered models here, one folder each")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, a few steps, one process")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = SMOKE if args.smoke else TinyLMConfig()
    if args.smoke:
        args.samples, args.epochs, args.out = 16, 1, None
    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(args.source) if args.source else Path(tmp) / "dense"
        if not args.source:  # (before joining the group: save_pretrained writes in process 0 only once it exists)
            build_model(cfg).save_pretrained(dense)
        data = windows(dense, cfg, args.samples)
        stream_structured_prune(dense, Path(tmp) / "pruned", data[:8], heads=args.ratio, neurons=args.ratio,
                                batch_size=4)
        info = init_distributed()
        rows = [recover(kind, dense, Path(tmp) / "pruned", data, args) for kind in args.recovery.split(",") if kind]
    if info.is_main:
        mode = "FSDP" if args.fsdp else ("DDP" if info.distributed else "one process")
        print(f"{mode}, {info.world_size} process(es), global batch {args.batch_size} x {cfg.seq_len} tokens, "
              f"{args.samples} windows, {args.epochs} epochs; CPU s and peak RSS of process 0\n")
        print("| recovery | parameters | held by process 0 | loss, first epoch | loss, last epoch | steps | CPU s "
              "| peak RSS MiB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    shutdown_distributed()


if __name__ == "__main__":
    main()
