"""A task's classifier through the seeds' workflow: fine-tuned, pruned with or without distillation, compacted."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import slimtorch  # noqa: E402
from slimtorch.errors import ConfigError  # noqa: E402
from slimtorch.integrations.hf.compaction import compact_hf_, unit_masks  # noqa: E402
from slimtorch.integrations.hf.folders import load_hf_folder, save_hf_folder  # noqa: E402
from slimtorch.integrations.hf.units import find_blocks  # noqa: E402
from slimtorch.recipes.classifier import (  # noqa: E402
    TaskConfig,
    accuracy,
    finetune_classifier_,
    prune_classifier_,
)
from slimtorch.recover.transformer_distill import (  # noqa: E402
    DistilWeights,
    EncoderDistiller,
    LabelLoss,
    TeacherCache,
    pack_tokens,
)


def _classifier(layers: int = 2, seed: int = 0):
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=60, num_labels=3)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg).eval()


def _data(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sentences of 3 to 9 tokens (padding after) and a label each."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (n, 9), generator=gen)
    mask = (torch.arange(9)[None, :] < torch.randint(3, 10, (n, 1), generator=gen)).long()  # (n, 9)
    return pack_tokens({"input_ids": ids * mask, "attention_mask": mask}), torch.arange(n) % 3


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens[:, 0], attention_mask=tokens[:, 1]).logits


def test_a_classifier_prunes_compacts_and_reloads_exactly(tmp_path):
    model, tokens = _classifier(), _data(seed=1)[0]
    masks = unit_masks(model, {"bert.encoder.layer.0.attention": [0, 2], "bert.encoder.layer.1.attention": [3],
                               "bert.encoder.layer.1": range(0, 64, 2)})
    masked = copy.deepcopy(model)
    slimtorch.apply_masks_(masked, masks)
    before = sum(p.numel() for p in model.parameters())
    compact_hf_(model, masks)
    torch.testing.assert_close(_logits(model, tokens), _logits(masked, tokens))
    removed = 3 * (3 * 32 * 8 + 3 * 8 + 8 * 32) + 32 * (32 + 1 + 32)  # 3 heads (q, k, v rows, o columns), 32 neurons
    assert sum(p.numel() for p in model.parameters()) == before - removed
    save_hf_folder(model, tmp_path / "small")
    again = load_hf_folder(tmp_path / "small").eval()
    assert type(again).__name__ == "BertForSequenceClassification"
    torch.testing.assert_close(_logits(again, tokens), _logits(masked, tokens))


@pytest.mark.parametrize("distil", [True, False])
def test_the_workflow_reaches_the_targets_with_and_without_distillation(distil):
    model, (tokens, labels) = _classifier(), _data()
    cfg = TaskConfig(head_sparsity=0.5, ffn_sparsity=0.25, steps=6, batch_size=4, prune_every=1, distil=distil)
    lines = prune_classifier_(model, tokens, labels, cfg)
    sizes = {s.name: s.units for s in find_blocks(model).values()}
    assert sizes["bert.encoder.layer.0.attention"] + sizes["bert.encoder.layer.1.attention"] == 4  # 8 heads -> 4
    assert sizes["bert.encoder.layer.0"] == sizes["bert.encoder.layer.1"] == 48
    assert len(lines) == 2 and not model.training
    assert _logits(model, tokens).shape == (12, 3) and 0.0 <= accuracy(model, tokens, labels) <= 1.0


def test_layers_are_dropped_and_the_rest_distilled_from_the_teacher_layer_they_were():
    model, (tokens, labels) = _classifier(layers=3), _data()
    teacher = copy.deepcopy(model)
    prune_classifier_(model, tokens, labels, TaskConfig(head_sparsity=0.0, ffn_sparsity=0.0, drop_layers=1,
                                                        steps=3, batch_size=4), teacher=teacher)
    assert model.config.num_hidden_layers == 2 and len(model.bert.encoder.layer) == 2
    assert teacher.config.num_hidden_layers == 3  # the teacher is left alone


def test_training_without_distillation_never_runs_a_teacher():
    class Exploding(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("the teacher ran")

    model, (tokens, labels) = _classifier(), _data()
    prune_classifier_(model, tokens, labels, TaskConfig(head_sparsity=0.25, ffn_sparsity=0.0, steps=3, batch_size=4,
                                                        prune_every=1, distil=False), teacher=Exploding())
    assert sum(s.units for s in find_blocks(model).values() if s.kind == "attention") == 6


def test_distilling_from_a_teacher_with_identical_weights_costs_nothing():
    model, (tokens, _) = _classifier(), _data()
    loss = EncoderDistiller(TeacherCache(copy.deepcopy(model)), temperature=2.0,
                            weights=DistilWeights(embedding=0.0, cosine=0.0, hidden=1.0, logits=1.0))
    assert float(loss(model, tokens, torch.arange(len(tokens))).detach()) == pytest.approx(0.0, abs=1e-6)
    other = _classifier(seed=1)
    assert float(loss(other, tokens, torch.arange(len(tokens))).detach()) > 0.01


def test_the_label_share_of_the_logits_term_is_the_cross_entropy():
    model, (tokens, labels) = _classifier(), _data()
    loss = EncoderDistiller(TeacherCache(copy.deepcopy(model)), alpha=0.25, labels=labels,
                            weights=DistilWeights(embedding=0.0, cosine=0.0, hidden=0.0, logits=1.0))
    index = torch.arange(len(tokens))
    expected = 0.75 * float(LabelLoss(labels)(model, tokens, index).detach())  # the KL share is zero: same weights
    assert float(loss(model, tokens, index).detach()) == pytest.approx(expected, rel=1e-5)


def test_finetuning_fits_the_labels():
    model, (tokens, labels) = _classifier(), _data(n=6)
    finetune_classifier_(model, tokens, labels, steps=40, batch_size=6, lr=3e-3)
    assert accuracy(model, tokens, labels) == 1.0 and not model.training


def test_bad_input_is_refused_and_leaves_the_model_as_it_was():
    model, (tokens, labels) = _classifier(), _data()
    state = copy.deepcopy(model.state_dict())
    cfg = TaskConfig(steps=2, batch_size=4)
    bad = [(labels[:5], "one label per sentence"), (labels.float(), "integer"), (labels + 1, "label 3"),
           (labels - 1, ">= 0")]
    for wrong, match in bad:
        with pytest.raises(ConfigError, match=match):
            prune_classifier_(model, tokens, wrong, cfg)
    with pytest.raises(ConfigError, match="one label per sentence"):
        prune_classifier_(model, tokens[:, 0], labels, cfg)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.config.num_hidden_layers == 2


def test_task_config_validates_and_round_trips():
    cfg = TaskConfig(head_sparsity=0.3, temperature=4.0, alpha=0.5, distil=False)
    assert TaskConfig.from_dict(cfg.to_dict()) == cfg
    for key, value in [("temperature", 0.0), ("alpha", 1.5), ("logit_weight", -1.0), ("distil", "yes"),
                       ("head_sparsity", 1.0)]:
        with pytest.raises(ConfigError, match=key):
            TaskConfig(**{key: value})
    with pytest.raises(ConfigError, match="at least one"):
        TaskConfig(hidden_weight=0.0, logit_weight=0.0)


def test_the_distiller_refuses_what_it_cannot_compute():
    encoder = transformers.BertModel(_classifier().config).eval()
    tokens = _data()[0]
    logits_only = DistilWeights(embedding=0.0, cosine=0.0, hidden=0.0, logits=1.0)
    with pytest.raises(ConfigError, match="sequence classifier"):
        EncoderDistiller(TeacherCache(encoder), weights=logits_only)(encoder, tokens, torch.arange(12))
    with pytest.raises(ConfigError, match="pass labels"):
        EncoderDistiller(TeacherCache(encoder), weights=logits_only, alpha=0.5)
    with pytest.raises(ConfigError, match="temperature"):
        EncoderDistiller(TeacherCache(encoder), temperature=0.0)
    with pytest.raises(ConfigError, match="do not all have a label"):
        LabelLoss(torch.tensor([0, 1])).of(torch.tensor([0, 2]))


def test_the_minilm_classifier_needs_two_classes_or_more():
    from slimtorch.models.minilm import load_minilm_classifier

    for bad in (1, 2.0, True):
        with pytest.raises(ConfigError, match="num_labels"):
            load_minilm_classifier(bad)
