"""The seeds' workflow on a small BERT: heads then FFN neurons, gradually, with embedding distillation."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slimtorch.errors import ConfigError  # noqa: E402
from slimtorch.integrations.hf.units import find_blocks  # noqa: E402
from slimtorch.models.minilm import embed  # noqa: E402
from slimtorch.recipes.minilm import WorkflowConfig, distil_embeddings_, prune_workflow_  # noqa: E402


def _bert():
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=60)
    return transformers.BertModel(cfg).eval()


def _batches(n=3):
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 60, (6, 9), generator=gen),
             "attention_mask": torch.ones(6, 9, dtype=torch.long)} for _ in range(n)]


def test_workflow_reaches_the_targets_and_reports_heads_by_original_index():
    model = _bert()
    lines = prune_workflow_(model, _batches(), WorkflowConfig(head_sparsity=0.5, ffn_sparsity=0.25, steps=2,
                                                              distil_steps=2))
    sizes = {s.name: s.units for s in find_blocks(model).values()}
    assert sizes["encoder.layer.0.attention"] + sizes["encoder.layer.1.attention"] == 4  # 8 heads -> 4
    assert sizes["encoder.layer.0"] == sizes["encoder.layer.1"] == 48  # 64 neurons -> 48 in each layer
    assert len(lines) == 2 and all(line.startswith(f"layer {i} prune ") for i, line in enumerate(lines))
    pruned = model.slimtorch_compaction["pruned_heads"]
    assert sum(len(v) for v in pruned.values()) == 4
    assert all(0 <= h < 4 for v in pruned.values() for h in v)
    out = model(**_batches(1)[0]).last_hidden_state
    assert out.shape == (6, 9, 32)


def test_distillation_moves_the_student_towards_the_teacher():
    teacher = _bert()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batches = _batches()

    def gap():
        with torch.no_grad():
            return sum(float((embed(student, b) - embed(teacher, b)).pow(2).sum()) for b in batches)

    before = gap()
    distil_embeddings_(student, teacher, batches, steps=30, lr=1e-3)
    assert gap() < 0.5 * before
    assert not student.training


def test_workflow_config_validates_and_round_trips():
    cfg = WorkflowConfig(head_sparsity=0.3, steps=4)
    assert WorkflowConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="head_sparsity"):
        WorkflowConfig(head_sparsity=1.0)
    with pytest.raises(ConfigError, match="steps"):
        WorkflowConfig(steps=0)
    with pytest.raises(ConfigError, match="unknown"):
        WorkflowConfig.from_dict({"heads": 0.5})
    with pytest.raises(ConfigError, match="batch"):
        prune_workflow_(_bert(), [], WorkflowConfig())
