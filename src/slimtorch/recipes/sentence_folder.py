"""One call from a sentence-transformers folder to a pruned and distilled one (``slimtorch prune-sentence``).

The model in ``source`` is pruned by the MiniLM workflow (:mod:`slimtorch.recipes.minilm`: layers, heads and FFN
neurons, distilling from the model as it was) on the offline text's training sentences
(:func:`~slimtorch.data.text.sentence_splits`), and written to ``out`` with the source's tokenizer, pooling and
normalisation (:func:`~slimtorch.integrations.hf.sentence.save_sentence_folder`). With a ``work`` folder the run
is resumable: the pruned model is kept there after the pruning phase, and the distillation phase writes
:func:`~slimtorch.recover.fit` checkpoints; a run started again with ``resume`` continues from them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimtorch.atomic import atomic_folder, check_output_folder
from slimtorch.data.text import sentence_splits
from slimtorch.errors import CheckpointError
from slimtorch.integrations.hf.folders import load_hf_folder, save_hf_folder
from slimtorch.integrations.hf.sentence import load_sentence_folder, needs_our_loader, save_sentence_folder
from slimtorch.recipes.minilm import WorkflowConfig, distil_phase_, pack_sentences, prune_phase_, teacher_cache
from slimtorch.recover.transformer_distill import TeacherCache

__all__ = ["SentenceRun", "prune_sentence_folder"]


@dataclass(frozen=True)
class SentenceRun:
    """What :func:`prune_sentence_folder` made: parameters before and after, the teacher layer each kept layer
    stands for (None: all kept), and whether plain ``SentenceTransformer(out)`` opens the result."""

    params_before: int
    params_after: int
    layer_map: list[int] | None
    plain_loader: bool

    def to_dict(self) -> dict[str, Any]:
        return {"params_before": self.params_before, "params_after": self.params_after,
                "layer_map": self.layer_map, "plain_loader": self.plain_loader}


def _sentences(count: int, seed: int) -> list[str]:
    """``count`` training sentences in a fixed shuffle (all registers mixed)."""
    train = list(sentence_splits().train)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    return [train[i] for i in order[:count]]


def _pruned(model: torch.nn.Module, tokens: torch.Tensor, cfg: WorkflowConfig, cache: TeacherCache,
            work: Path | None, resume: bool) -> tuple[torch.nn.Module, list[int] | None]:
    """The model after the pruning phase: from ``work`` when resuming, else pruned now (and kept in ``work``)."""
    folder = work / "pruned" if work is not None else None
    record = folder / "slimtorch_workflow.json" if folder is not None else None
    if resume and record is not None and record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("workflow") != cfg.to_dict():
            raise CheckpointError(f"{str(folder)!r} was pruned with other settings ({saved.get('workflow')}); run "
                                  "with those, or without --resume to start afresh")
        return load_hf_folder(folder), saved["layer_map"]
    layer_map = prune_phase_(model, tokens, cfg, cache)
    if folder is None:
        return model, layer_map
    save_hf_folder(model, folder)
    with atomic_folder(folder) as staging:  # the record last: a folder without it is pruned again
        (staging / "slimtorch_workflow.json").write_text(json.dumps({"workflow": cfg.to_dict(),
                                                                     "layer_map": layer_map}))
    # the distillation starts from the saved model, so that a resumed run starts from the very same one
    return load_hf_folder(folder), layer_map


def prune_sentence_folder(source: str | Path, out: str | Path, cfg: WorkflowConfig, *, work: str | Path | None = None,
                          resume: bool = False, max_length: int = 128) -> SentenceRun:
    """Prune and distil the sentence-transformers model in ``source`` (see the module docstring) and write it to
    ``out``. ``source`` is only read; ``out`` is written at once at the end."""
    check_output_folder(out)
    st = load_sentence_folder(source)
    teacher = st[0].model.eval()
    before = sum(p.numel() for p in teacher.parameters())
    model = copy.deepcopy(teacher)
    tokens = pack_sentences(st.tokenizer, _sentences(cfg.steps * cfg.batch_size, cfg.seed), max_length=max_length)
    cache = teacher_cache(teacher, cfg)
    work_path = Path(work) if work is not None else None
    model, layer_map = _pruned(model, tokens, cfg, cache, work_path, resume)
    if cfg.attention_weight > 0:
        model.set_attn_implementation("eager")
    if hasattr(model, "embeddings"):
        model.embeddings.requires_grad_(False)  # the encoder is distilled: a third of the step time
    checkpoint = work_path / "distil.ckpt" if work_path is not None else None
    if checkpoint is not None and not resume and checkpoint.exists():
        checkpoint.unlink()  # a fresh run: an earlier run's checkpoint must not be resumed
    distil_phase_(model, tokens, cfg, cache, layer_map, checkpoint=checkpoint)
    if cfg.attention_weight > 0:
        model.set_attn_implementation("sdpa")  # back to the fused kernel for use
    save_sentence_folder(model, st, out)
    return SentenceRun(before, sum(p.numel() for p in model.parameters()), layer_map, not needs_our_loader(model))
