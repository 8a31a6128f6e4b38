"""Scopes: attention heads, whole layers, and local/global ranking with caps."""

import copy
import warnings

import pytest
import torch
from torch import nn

from slimtorch import apply_masks_, compute_masks
from slimtorch.config import Granularity
from slimtorch.errors import ConfigError, SlimWarning


def test_head_granularity_parses_and_round_trips():
    g = Granularity.parse("head(3)")
    assert g == Granularity(kind="head", heads=3) and g.structured and g.to_value() == "head(3)"
    assert Granularity.parse(g.to_value()) == g and Granularity.parse("head").heads == 0
    with pytest.raises(ConfigError, match="only goes with the 'head' granularity"):
        Granularity(kind="fine", heads=2)


def test_heads_of_a_projection():
    proj = nn.Linear(3, 8)  # 2 heads of 4 rows
    with torch.no_grad():
        proj.weight.fill_(1.0)
        proj.weight[:4] = 0.1  # head 0 is weak
    masks = compute_masks(nn.Sequential(proj), [{"op_types": ["Linear"], "sparse_ratio": 0.5,
                                                 "granularity": "head(2)"}], criterion="l1")
    rows = [False] * 4 + [True] * 4
    assert masks["0.weight"].all(dim=1).tolist() == rows and not masks["0.weight"][:4].any()
    assert masks["0.bias"].tolist() == rows


def test_head_count_is_required_and_must_divide():
    cfg = [{"op_types": ["Linear"], "sparse_ratio": 0.5, "granularity": "head"}]
    with pytest.raises(ConfigError, match="number of heads.*'head\\(8\\)'"):
        compute_masks(nn.Sequential(nn.Linear(3, 8)), cfg)
    cfg[0]["granularity"] = "head(3)"
    with pytest.raises(ConfigError, match="8 output rows, which do not split into 3 heads"):
        compute_masks(nn.Sequential(nn.Linear(3, 8)), cfg)


def _mha():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 4, batch_first=True)  # head_dim 2
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        for block in range(3):  # q, k, v rows of head 2 made weak
            mha.in_proj_weight[block * 8 + 4 : block * 8 + 6] *= 0.01
    return nn.ModuleDict({"attn": mha})


def test_multihead_attention_heads_cover_q_k_v_and_bias():
    model = _mha()
    cfg = [{"op_names": ["attn"], "op_types": ["MultiheadAttention"], "sparse_ratio": 0.25, "granularity": "head"}]
    masks = compute_masks(model, cfg, criterion="l2")
    assert set(masks) == {"attn.in_proj_weight", "attn.in_proj_bias"}
    pruned_rows = [r for r in range(24) if not masks["attn.in_proj_weight"][r].any()]
    assert pruned_rows == [4, 5, 12, 13, 20, 21]
    assert (~masks["attn.in_proj_bias"]).nonzero().flatten().tolist() == pruned_rows


def test_masked_heads_contribute_nothing():
    # A head without queries, keys, values and biases outputs zeros, as if removed from the attention:
    # the same as cutting its columns out of the output projection.
    model = _mha().eval()
    cfg = [{"op_names": ["attn"], "op_types": ["MultiheadAttention"], "sparse_ratio": 0.25, "granularity": "head"}]
    masks = compute_masks(model, cfg, criterion="l2")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference["attn"].out_proj.weight[:, 4:6] = 0.0
    apply_masks_(model, masks)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(model["attn"](x, x, x)[0], reference["attn"](x, x, x)[0])


def test_whole_layers_point_to_block_dropping():
    with pytest.raises(ConfigError, match="plan_block_drop"):
        compute_masks(nn.Sequential(nn.Linear(2, 2)), [{"op_types": ["Linear"], "sparse_ratio": 0.5,
                                                        "granularity": "layer"}])


def _random_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(4, 30))


def _reference_global(model, total, cap):
    """Brute force: walk all weights from the smallest |w| up, skipping layers at their cap."""
    weights = [m.weight.detach().abs().flatten() for m in model]
    caps = [int(cap * w.numel() + 0.5) for w in weights]
    owner = torch.cat([torch.full((w.numel(),), i) for i, w in enumerate(weights)])
    values = torch.cat(weights)
    target = int(total * len(values) + 0.5)
    pruned = [0] * len(weights)
    for index in torch.argsort(values).tolist():
        if sum(pruned) == target:
            break
        if pruned[owner[index]] < caps[owner[index]]:
            pruned[owner[index]] += 1
    return pruned


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("total", "cap"), [(0.3, 1.0), (0.6, 1.0), (0.5, 0.55), (0.7, 0.8)])
def test_global_ranking_matches_brute_force(seed, total, cap):
    model = _random_net(seed)
    cfg = [{"op_types": ["Linear"], "total_sparsity": total, "max_sparse_ratio": cap, "granularity": "fine"}]
    masks = compute_masks(model, cfg, criterion="magnitude")
    pruned = [int((~masks[f"{i}.weight"]).sum()) for i in range(3)]
    assert pruned == _reference_global(model, total, cap)
    # Within each layer, the pruned weights are exactly its smallest ones.
    for i, layer in enumerate(model):
        w = layer.weight.detach().abs()
        if pruned[i]:
            assert w[~masks[f"{i}.weight"]].max() <= w[masks[f"{i}.weight"]].min()


def test_global_ranking_compares_mean_criteria_per_weight():
    # Magnitude at channel granularity is a mean already: a 4-weight row of mean 1.2 must not be ranked
    # below a 1-weight row of 1.0 just because it has more weights.
    a, b = nn.Linear(1, 2, bias=False), nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[1.0], [3.0]]))
        b.weight.copy_(torch.tensor([[2.0] * 4, [1.2] * 4]))
    cfg = [{"op_types": ["Linear"], "total_sparsity": 0.1, "granularity": "out_channel"}]
    masks = compute_masks(nn.Sequential(a, b), cfg, criterion="magnitude")
    assert masks["0.weight"].flatten().tolist() == [False, True] and masks["1.weight"].all()


def test_unreachable_total_warns_with_numbers():
    cfg = [{"op_types": ["Linear"], "total_sparsity": 0.8, "max_sparse_ratio": 0.5, "granularity": "fine"}]
    with pytest.warns(SlimWarning, match="total_sparsity 0.800 cannot be reached.*reached 0.500"):
        masks = compute_masks(_random_net(0), cfg, criterion="magnitude")
    assert all(abs((~m).float().mean().item() - 0.5) < 0.02 for m in masks.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_masks(_random_net(0), [{**cfg[0], "max_sparse_ratio": 0.9}], criterion="magnitude")


def test_global_structured_never_empties_a_layer():
    # 95% of 312 weights is more than the 284 that leave one unit per layer.
    cfg = [{"op_types": ["Linear"], "total_sparsity": 0.95, "granularity": "out_channel"}]
    with pytest.warns(SlimWarning):
        masks = compute_masks(_random_net(3), cfg, criterion="l1")
    assert all(masks[f"{i}.weight"].any() for i in range(3))


def test_local_ratio_per_entry_and_later_entries_override():
    cfg = [
        {"op_types": ["Linear"], "sparse_ratio": 0.5, "granularity": "fine"},
        {"op_names": ["2"], "sparse_ratio": 0.9, "granularity": "fine"},
    ]
    masks = compute_masks(_random_net(0), cfg, criterion="magnitude")
    assert [int((~masks[f"{i}.weight"]).sum()) for i in range(3)] == [64, 32, 108]
