"""A small LLaMA-style causal language model (grouped-query attention) trained here on offline Wikipedia
text, its tokenizer, perplexity, and a cache so that it is trained once per machine.

    >>> from slimtorch.models.tiny_lm import TinyLMConfig, build_model
    >>> cfg = TinyLMConfig(vocab_size=64, hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate_size=64)
    >>> model = build_model(cfg)
    >>> model.config.num_key_value_heads, model.model.layers[0].self_attn.k_proj.out_features
    (2, 16)

The tokenizer is a byte-level BPE trained with Hugging Face ``tokenizers`` on the training articles, so
nothing is downloaded. Perplexity is per token of that tokenizer: compare ratios between pruning
methods, not absolute values with papers that use LLaMA's tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtorch.atomic import atomic_folder
from slimtorch.data.text import Document, TextSplits, text_splits
from slimtorch.errors import CheckpointError, ConfigError
from slimtorch.recover.loop import FunctionLR, Loop, StepModule
from slimtorch.recover.losses import causal_lm_loss

__all__ = [
    "TinyLM",
    "TinyLMConfig",
    "build_model",
    "cache_dir",
    "calibration_batches",
    "encode_documents",
    "load_or_train_lm",
    "perplexity",
    "train_lm",
    "train_tokenizer",
]


@dataclass(frozen=True, kw_only=True)
class TinyLMConfig:
    """Architecture and training recipe of the small LLaMA-style model (defaults: 3.8M parameters, 4
    layers, 8 query heads sharing 2 key/value heads, trained for a few minutes on 2 CPU cores)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    intermediate_size: int = 688
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1200
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "seed" and not value > 0:
                raise ConfigError(f"TinyLMConfig.{f.name} must be positive, got {value!r}")
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be a multiple of heads ({self.heads}) and heads a "
                f"multiple of kv_heads ({self.kv_heads})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TinyLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown TinyLMConfig keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)


@dataclass
class TinyLM:
    """A trained model, its tokenizer and what its training recorded (loss, time, validation perplexity)."""

    model: nn.Module
    tokenizer: Any
    config: TinyLMConfig
    record: dict[str, Any]


def build_model(cfg: TinyLMConfig) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of ``cfg``'s shape (tied input/output embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden_size // cfg.heads,
        max_position_embeddings=max(cfg.seq_len, 256),
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def train_tokenizer(docs: Sequence[Document], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (Hugging Face ``tokenizers``) trained on ``docs``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer)
    return tok


def encode_documents(tokenizer: Any, docs: Sequence[Document]) -> torch.Tensor:
    """All documents as one 1-D token stream (documents separated by a blank line), int64."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc.text + "\n\n").ids)
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(tokens: torch.Tensor, *, num: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``num`` random windows of ``seq_len`` tokens, ``(num, seq_len)`` (as SparseGPT samples its
    calibration segments)."""
    if tokens.numel() <= seq_len:
        raise ConfigError(f"need more than seq_len={seq_len} tokens to cut windows, got {tokens.numel()}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (num,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, *, seq_len: int, batch_size: int = 8) -> float:
    """exp(mean next-token loss) over consecutive non-overlapping windows of ``seq_len`` tokens (the
    WikiText evaluation of the SparseGPT and Wanda papers; the tail shorter than a window is dropped)."""
    was_training = model.training
    model.eval()
    windows = tokens[: tokens.numel() // seq_len * seq_len].reshape(-1, seq_len)  # (N, seq_len)
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1]  # (B, T-1, vocab): predicts tokens 1..T-1
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                           reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def _lr_at(step: int, cfg: TinyLMConfig) -> float:
    warmup = max(1, cfg.steps // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))


def _windows(tokens: torch.Tensor, cfg: TinyLMConfig) -> Iterator[torch.Tensor]:
    """``cfg.steps`` batches of random windows, ``(batch_size, seq_len)`` each, every one drawn afresh."""
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.steps):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        yield calibration_batches(tokens, num=cfg.batch_size, seq_len=cfg.seq_len, seed=seed)


def train_lm(cfg: TinyLMConfig, splits: TextSplits | None = None) -> TinyLM:
    """Train a tokenizer and a model of ``cfg`` on the training articles (AdamW, warm-up then cosine
    learning rate, gradients clipped to norm 1, random windows of ``seq_len`` tokens) with the library's
    training loop and its next-token loss (:func:`slimtorch.recover.losses.causal_lm_loss`)."""
    splits = splits or text_splits()
    tokenizer = train_tokenizer(splits.train, cfg.vocab_size)
    train_tokens = encode_documents(tokenizer, splits.train)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    loop = Loop(StepModule(model, causal_lm_loss), opt, scheduler=FunctionLR(opt, lambda step: _lr_at(step, cfg)),
                max_grad_norm=1.0)
    start, start_cpu = time.perf_counter(), time.process_time()
    losses = loop.run(_windows(train_tokens, cfg), desc="train LM").step_losses
    model.eval()
    record = {
        "train_seconds": round(time.perf_counter() - start, 1),
        "train_cpu_seconds": round(time.process_time() - start_cpu, 1),  # (wall time misleads on a shared machine)
        "train_tokens": int(train_tokens.numel()),
        "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "val_perplexity": round(perplexity(model, encode_documents(tokenizer, splits.val), seq_len=cfg.seq_len), 3),
        "threads": torch.get_num_threads(),
    }
    return TinyLM(model, tokenizer, cfg, record)


def cache_dir() -> Path:
    """Where trained models are kept: ``$SLIMTORCH_CACHE`` or ``.slimtorch-cache`` (git-ignored)."""
    return Path(os.environ.get("SLIMTORCH_CACHE", ".slimtorch-cache"))


def _cache_path(cfg: TinyLMConfig, root: Path) -> Path:
    key = "-".join(str(v) for v in asdict(cfg).values()).replace(".", "p")
    return root / f"tiny-llama-{key}"


def load_or_train_lm(cfg: TinyLMConfig | None = None, *, root: str | Path | None = None) -> TinyLM:
    """The trained model of ``cfg`` from the cache, or train it (minutes) and cache it: weights through
    ``save_pretrained`` (safetensors), the tokenizer as JSON, the training record as JSON, written together
    (:func:`slimtorch.atomic.atomic_folder`)."""
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    cfg = cfg or TinyLMConfig()
    path = _cache_path(cfg, Path(root) if root is not None else cache_dir())
    if (path / "record.json").is_file():
        try:
            model = LlamaForCausalLM.from_pretrained(path, use_safetensors=True).eval()
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            record = json.loads((path / "record.json").read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"the cached model in {str(path)!r} is unreadable ({err}); delete that folder"
            ) from None
        return TinyLM(model, tokenizer, cfg, record)
    lm = train_lm(cfg)
    with atomic_folder(path) as staging:  # all files at once: an interrupted write leaves no half-made cache
        lm.model.save_pretrained(staging)
        lm.tokenizer.save(str(staging / "tokenizer.json"))
        (staging / "record.json").write_text(json.dumps({"config": cfg.to_dict(), **lm.record}, indent=2))
    return lm
