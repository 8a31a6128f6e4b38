"""Mixtures of experts (slimtorch.integrations.hf.moe): whole experts and the neurons of each expert, on a tiny
Mixtral (random weights, no download)."""

import copy
import warnings

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import slimtorch
from slimtorch.errors import ConfigError, NoMatchError
from slimtorch.integrations.hf.compaction import unit_masks
from slimtorch.integrations.hf.moe import disabled_experts, moe_blocks, prune_experts_

IDS = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])


def _mixtral():
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=16, vocab_size=50,
                                            num_local_experts=4, num_experts_per_tok=2)).eval()


def test_moe_blocks_are_found():
    assert list(moe_blocks(_mixtral())) == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_too_many_experts_removed_is_refused_and_the_model_is_untouched():
    model = _mixtral()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="keep at least 2"):
        prune_experts_(model, {"model.layers.0.mlp": [0, 1, 2]})
    with pytest.raises(NoMatchError, match="model.layers.0.mlp"):
        prune_experts_(model, {"model.layers.0.mlpp": [0]})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.config.num_local_experts == 4


def test_removed_experts_compute_what_the_disabled_ones_did():
    model = _mixtral()
    gone = {"model.layers.0.mlp": [0, 3], "model.layers.1.mlp": [1, 2]}
    with torch.no_grad(), disabled_experts(model, gone):
        want = model(input_ids=IDS).logits
    prune_experts_(model, gone)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, want)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 2 and model.config.num_local_experts == 2


def _compact_neurons(chosen):
    model = _mixtral()
    masks = unit_masks(model, {f"model.layers.0.mlp.experts[{e}]": units for e, units in chosen.items()})
    masked = copy.deepcopy(model)
    slimtorch.apply_masks_(masked, masks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slimtorch.compact_(model, masks, example_inputs={"input_ids": IDS})
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, masked(input_ids=IDS).logits)
    return model.model.layers[0].mlp.experts, [str(w.message) for w in caught]


def test_expert_neurons_kept_for_equal_aligned_sizes_are_reported():
    # 8, 5, 6 and 7 neurons masked: expert 1 needs 11; every expert keeps 12 (rows of float32 weights that are a
    # multiple of 16 bytes, as transformers' grouped matrix products need), so 4 + 1 + 2 + 3 stay at zero
    experts, said = _compact_neurons({0: range(8), 1: range(5), 2: range(6), 3: range(7)})
    assert experts.down_proj.shape == (4, 32, 12) and experts.gate_up_proj.shape == (4, 24, 32)
    assert any("10 expert neurons that the masks remove stay" in m and "keeps 12" in m for m in said), said


def test_expert_neurons_that_cannot_go_are_not_left_silently():
    experts, said = _compact_neurons({0: [0, 1, 2, 3]})  # the other experts keep all 16
    assert experts.down_proj.shape == (4, 32, 16)
    assert any("4 expert neurons that the masks remove stay" in m and "keeps 16" in m for m in said), said
