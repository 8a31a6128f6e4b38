"""Partly masked attention heads: kept with their zeros, restored whole or pruned whole. The compacted model
computes what the model masked with the resolved masks computes."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slimtorch import ConfigError, apply_masks_, get_masks  # noqa: E402
from slimtorch.integrations.hf.compaction import compact_hf_, resolve_partial_heads, unit_masks  # noqa: E402

BLOCK = "encoder.layer.0.attention"
Q, O = f"{BLOCK}.self.query.weight", f"{BLOCK}.output.dense.weight"  # head h: query rows / output columns 8h..8h+8


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=50)
    inputs = {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}
    return transformers.BertModel(cfg).eval(), inputs


def _movement_like(model) -> dict[str, torch.Tensor]:
    """Head 1 pruned whole; head 2 pruned in part (query rows and output columns), as block-sparse movement
    pruning leaves attention weights."""
    masks = unit_masks(model, {BLOCK: [1]})
    masks[Q][16:19] = False
    masks[O][:, 20:22] = False
    return masks


def _reference(model, masks, inputs) -> torch.Tensor:
    ref = copy.deepcopy(model)
    apply_masks_(ref, masks)
    with torch.no_grad():
        return ref(**inputs).last_hidden_state


@pytest.mark.parametrize(("mode", "heads", "pruned"), [("keep", 3, [1]), ("restore", 3, [1]), ("prune", 2, [1, 2])])
def test_partial_heads_are_kept_restored_or_pruned(mode, heads, pruned):
    model, inputs = _bert()
    masks = _movement_like(model)
    resolved = resolve_partial_heads(model, masks, mode)
    expected = _reference(model, resolved, inputs)
    compact_hf_(model, masks, example_inputs=inputs, partial_heads=mode)
    attention = model.encoder.layer[0].attention
    assert attention.self.query.out_features == 8 * heads
    assert model.slimtorch_compaction["pruned_heads"] == {BLOCK: pruned}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, expected)
    kept_zeros = int((attention.self.query.weight == 0).sum())
    assert (kept_zeros > 0) == (mode == "keep")  # restored or pruned: no head keeps zeros


def test_resolving_is_pure_and_leaves_whole_heads_alone():
    model, _ = _bert()
    masks = _movement_like(model)
    copies = {k: v.clone() for k, v in masks.items()}
    restored = resolve_partial_heads(model, masks, "restore")
    assert all(torch.equal(masks[k], copies[k]) for k in masks)
    assert bool(restored[Q][16:24].all()) and bool(restored[O][:, 16:24].all())
    assert not bool(restored[Q][8:16].any())  # head 1 stays pruned
    assert torch.equal(resolve_partial_heads(model, masks, "keep")[Q], masks[Q])
    with pytest.raises(ConfigError, match="partial_heads must be one of"):
        resolve_partial_heads(model, masks, "regrow")


def test_a_masked_model_is_restored_from_its_original_weights():
    model, inputs = _bert()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    masks = _movement_like(model)
    expected = _reference(model, resolve_partial_heads(model, masks, "restore"), inputs)
    apply_masks_(model, masks)  # head 2's masked weights are zero in the model now
    compact_hf_(model, example_inputs=inputs, partial_heads="restore", original=original)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, expected)
    assert model.encoder.layer[0].attention.self.query.out_features == 24


def test_restoring_a_masked_model_without_its_weights_is_refused_and_changes_nothing():
    model, inputs = _bert()
    apply_masks_(model, _movement_like(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks_before = get_masks(model)
    with pytest.raises(ConfigError, match="original="):
        compact_hf_(model, example_inputs=inputs, partial_heads="restore")
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(get_masks(model)[k], m) for k, m in masks_before.items())
    assert not hasattr(model, "slimtorch_compaction") or not model.slimtorch_compaction
