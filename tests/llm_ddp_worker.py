"""Run under ``torchrun --nproc-per-node 2``: recovers a structurally compacted tiny LLaMA through ``fit`` with
LoRA (next-token loss) and with distillation from the unpruned model, under DDP and under FSDP, and saves what
the tests compare: every process's final weights (FSDP's gathered whole) and process 0's losses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from torch.utils.data import TensorDataset
from transformers import LlamaForCausalLM

from slimtorch.lora import LoRAConfig, add_lora_
from slimtorch.recover import CausalLMDistiller, DistillConfig, FitResult, TrainConfig, fit
from slimtorch.recover.distributed import full_state_dict, init_distributed, shutdown_distributed
from slimtorch.recover.losses import causal_lm_loss

VOCAB, SEQ = 96, 16
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KINDS = ("lora", "distill")


def windows() -> torch.Tensor:
    """32 windows of token ids: 4 global batches of 8 per epoch, 4 samples per process."""
    return torch.randint(0, VOCAB, (32, SEQ), generator=torch.Generator().manual_seed(3))


def recover(kind: str, dense: Path, pruned: Path, *, fsdp: bool = False,
            checkpoint: Path | None = None) -> tuple[torch.nn.Module, FitResult]:
    """LoRA on the compacted model, trained on the next-token loss (``lora``) or on the unpruned model's
    next-token distributions (``distill``). Every process builds the same adapters (same seed): FSDP shards
    what each process holds, it does not broadcast it as DDP does."""
    student = LlamaForCausalLM.from_pretrained(pruned)
    torch.manual_seed(0)
    add_lora_(student, LoRAConfig(r=4, lora_alpha=8, target_modules=LINEARS))
    if kind == "lora":
        loss = lambda model, x, y: causal_lm_loss(model, x)  # noqa: E731
    else:
        loss = CausalLMDistiller(LlamaForCausalLM.from_pretrained(dense), DistillConfig(temperature=2.0, alpha=0.5))
    data = windows()
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-2, optimizer="adamw", fsdp=fsdp)
    return student, fit(student, TensorDataset(data, data), config, loss_fn=loss, checkpoint=checkpoint)


def main(out: Path, dense: Path, pruned: Path) -> None:
    info = init_distributed()
    torch.set_num_threads(1)
    results: dict[str, object] = {"world_size": info.world_size}
    for mode in ("ddp", "fsdp"):
        for kind in KINDS:
            fsdp = mode == "fsdp"
            model, result = recover(kind, dense, pruned, fsdp=fsdp,
                                    checkpoint=out / f"{mode}-{kind}.ckpt.safetensors" if fsdp else None)
            state = full_state_dict(model, all_ranks=True) if fsdp else model.state_dict()
            save_file({k: v.detach().clone() for k, v in state.items()},  # (tied embeddings share storage)
                      str(out / f"{mode}-{kind}.rank{info.rank}.safetensors"))
            sharded = [isinstance(p, DTensor) for p in model.parameters()]
            results[f"{mode}-{kind}"] = {**result.to_dict(), "sharded": sum(sharded), "parameters": len(sharded)}
    if info.is_main:
        (out / "results.json").write_text(json.dumps(results))
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
