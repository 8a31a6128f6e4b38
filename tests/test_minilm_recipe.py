"""The seeds' workflow on a small BERT: layers, heads and FFN neurons pruned while distilling, then compacted."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slimtorch.errors import ConfigError  # noqa: E402
from slimtorch.integrations.hf.units import find_blocks  # noqa: E402
from slimtorch.models.minilm import embed  # noqa: E402
from slimtorch.recipes.minilm import WorkflowConfig, distil_embeddings_, prune_workflow_  # noqa: E402


def _bert(layers: int = 2):
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=60)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _batches(n=3):
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 60, (6, 9), generator=gen),
             "attention_mask": torch.ones(6, 9, dtype=torch.long)} for _ in range(n)]


@pytest.mark.parametrize("criterion", ["movement", "taylor", "gradient", "l1"])
def test_workflow_reaches_the_targets_and_reports_heads_by_original_index(criterion):
    model = _bert()
    cfg = WorkflowConfig(head_sparsity=0.5, ffn_sparsity=0.25, steps=8, batch_size=4, prune_every=2,
                         head_criterion=criterion, ffn_criterion=criterion)
    lines = prune_workflow_(model, _batches(), cfg)
    sizes = {s.name: s.units for s in find_blocks(model).values()}
    assert sizes["encoder.layer.0.attention"] + sizes["encoder.layer.1.attention"] == 4  # 8 heads -> 4
    assert sizes["encoder.layer.0"] == sizes["encoder.layer.1"] == 48  # 64 neurons -> 48 in each layer
    assert len(lines) == 2 and all(line.startswith(f"layer {i} prune ") for i, line in enumerate(lines))
    pruned = model.slimtorch_compaction["pruned_heads"]
    assert sum(len(v) for v in pruned.values()) == 4
    assert all(0 <= h < 4 for v in pruned.values() for h in v)
    assert not model.training
    assert model(**_batches(1)[0]).last_hidden_state.shape == (6, 9, 32)


def test_workflow_drops_layers_and_prunes_the_rest():
    model = _bert(layers=3)
    prune_workflow_(model, _batches(), WorkflowConfig(head_sparsity=0.25, ffn_sparsity=0.5, drop_layers=1, steps=6,
                                                      batch_size=4, prune_every=1))
    assert model.config.num_hidden_layers == 2 and len(model.encoder.layer) == 2
    assert sum(s.units for s in find_blocks(model).values() if s.kind == "attention") == 6  # a quarter of 2 x 4 gone


def test_attention_maps_can_be_distilled_too():
    model = _bert()
    kernel = model.config._attn_implementation
    prune_workflow_(model, _batches(), WorkflowConfig(head_sparsity=0.25, ffn_sparsity=0.0, steps=4, batch_size=4,
                                                      prune_every=1, attention_weight=1.0))
    assert sum(s.units for s in find_blocks(model).values() if s.kind == "attention") == 6
    assert model.config._attn_implementation == kernel


def test_the_gradual_phase_raises_the_sparsity_in_steps(monkeypatch):
    from slimtorch.recipes import minilm

    seen = []
    original = minilm._Gradual.prune_

    def spy(self, progress):
        seen.append(round(progress, 4))
        original(self, progress)

    monkeypatch.setattr(minilm._Gradual, "prune_", spy)
    prune_workflow_(_bert(), _batches(), WorkflowConfig(steps=10, batch_size=2, prune_every=2, prune_until=0.8))
    assert seen == sorted(seen) and len(seen) >= 4 and seen[-1] == 1.0 and 0 < seen[0] < 1.0


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
    cfg = WorkflowConfig(head_sparsity=0.3, steps=4, head_criterion="gradient")
    assert WorkflowConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="head_sparsity"):
        WorkflowConfig(head_sparsity=1.0)
    with pytest.raises(ConfigError, match="steps"):
        WorkflowConfig(steps=0)
    with pytest.raises(ConfigError, match="head_criterion"):
        WorkflowConfig(head_criterion="magnitude")
    with pytest.raises(ConfigError, match="prune_until"):
        WorkflowConfig(prune_until=0.0)
    with pytest.raises(ConfigError, match="unknown"):
        WorkflowConfig.from_dict({"heads": 0.5})
    with pytest.raises(ConfigError, match="batch"):
        prune_workflow_(_bert(), [], WorkflowConfig())


def test_a_phase_without_a_teacher_or_a_loss_is_refused():
    from slimtorch.recipes.minilm import prune_phase_
    from slimtorch.recover.transformer_distill import pack_tokens

    model = _bert()
    with pytest.raises(ConfigError, match="loss factory"):
        prune_phase_(model, pack_tokens(_batches(1)[0]), WorkflowConfig(steps=2, batch_size=2), None)
