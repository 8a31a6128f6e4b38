"""Every criterion against a hand-computed expectation."""

import pytest
import torch
from torch import nn

from slimtorch import compute_masks
from slimtorch.errors import ConfigError
from slimtorch.prune.criteria import CRITERIA, get_criterion, register_criterion
from slimtorch.prune.stats import collect_stats


def _linear(weight, bias=None):
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias))
    return nn.Sequential(layer)


def _cfg(ratio=None, granularity=None, threshold=None, op="Linear"):
    entry = {"op_types": [op]}
    if ratio is not None:
        entry["sparse_ratio"] = ratio
    if threshold is not None:
        entry["sparse_threshold"] = threshold
    if granularity is not None:
        entry["granularity"] = granularity
    return [entry]


def test_magnitude_threshold_is_the_seed_rule():
    # The seed: mask = |w| >= threshold.
    net = _linear([[0.05, -0.2], [0.1, 0.01]])
    masks = compute_masks(net, _cfg(threshold=0.1), criterion="magnitude")
    assert masks["0.weight"].tolist() == [[False, True], [True, False]]


def test_gradient_magnitude_hand_computed():
    net = _linear([[1.0, 1.0], [1.0, 1.0]])
    stats = {"0": {"grad_sq": torch.tensor([[0.04, 9.0], [1.0, 0.25]])}}  # RMS gradients 0.2, 3, 1, 0.5
    masks = compute_masks(net, _cfg(0.5), criterion="gradient", stats=stats)
    assert masks["0.weight"].tolist() == [[False, True], [True, False]]


def test_gradient_from_one_batch_is_the_absolute_gradient():
    net = _linear([[2.0, -1.0]])
    x = torch.tensor([[3.0, -0.5]])  # loss = w . x, so dL/dw = x

    stats = collect_stats(net, [x], keys=("grad_sq",), loss_fn=lambda m, b: m(b).sum())
    assert torch.allclose(stats["0"]["grad_sq"].sqrt(), x.abs())
    masks = compute_masks(net, _cfg(0.5), criterion="gradient", stats=stats)
    assert masks["0.weight"].tolist() == [[True, False]]


def test_hybrid_needs_both_weight_and_gradient_large():
    # |w| relative to its mean 1.525: 2.62, 0.07, 0.66, 0.66; RMS gradient relative: 0.07, 2.62, 0.66, 0.66.
    net = _linear([[4.0, 0.1], [1.0, 1.0]])
    stats = {"0": {"grad_sq": torch.tensor([[0.1, 4.0], [1.0, 1.0]]).pow(2)}}
    masks = compute_masks(net, _cfg(threshold=0.5), criterion="hybrid", stats=stats)
    assert masks["0.weight"].tolist() == [[False, False], [True, True]]
    # Each quantity alone keeps one of the two extremes.
    assert compute_masks(net, _cfg(0.25), criterion="magnitude")["0.weight"][0].tolist() == [True, False]
    assert compute_masks(net, _cfg(0.25), criterion="gradient", stats=stats)["0.weight"][0].tolist() == [False, True]


def test_taylor_sums_squared_weight_times_gradient_per_channel():
    # Row 0: 1*4 + 4*1 = 8; row 1: 9*0.01 + 1*5 = 5.09. L1 would prune row 0 (3 < 4), Taylor prunes row 1.
    net = _linear([[1.0, 2.0], [3.0, 1.0]], bias=[0.5, 0.5])
    stats = {"0": {"grad_sq": torch.tensor([[4.0, 1.0], [0.01, 5.0]])}}
    masks = compute_masks(net, _cfg(0.5), criterion="taylor", stats=stats)
    assert masks["0.weight"].any(dim=1).tolist() == [True, False]
    assert masks["0.bias"].tolist() == [True, False]
    assert compute_masks(net, _cfg(0.5), criterion="l1")["0.weight"].any(dim=1).tolist() == [False, True]


def test_movement_prunes_weights_moving_to_zero():
    net = _linear([[1.0, -1.0]])
    x = torch.tensor([[1.0, 1.0]])  # dL/dw = (1, 1): SGD moves w0 = 1 towards 0 and w1 = -1 away from it
    stats = collect_stats(net, [x], keys=("movement",), loss_fn=lambda m, b: m(b).sum())
    assert stats["0"]["movement"].tolist() == [[-1.0, 1.0]]
    masks = compute_masks(net, _cfg(0.5), criterion="movement", stats=stats)
    assert masks["0.weight"].tolist() == [[False, True]]


def test_wanda_weighs_magnitude_by_input_norm():
    net = _linear([[1.0, 4.0], [2.0, 1.0]])
    x = torch.tensor([[3.0, 0.3], [0.0, 0.4]])  # feature norms: 3 and 0.5
    stats = collect_stats(net, [x], keys=("input_norm",))
    assert torch.allclose(stats["0"]["input_norm"], torch.tensor([3.0, 0.5]))
    # Scores |w| * norm: [[3, 2], [6, 0.5]]; plain magnitude would prune the two 1.0 weights instead.
    masks = compute_masks(net, _cfg(0.5), criterion="wanda", stats=stats)
    assert masks["0.weight"].tolist() == [[True, False], [True, False]]


def test_wanda_lines_up_grouped_convolutions():
    conv = nn.Conv2d(4, 4, 1, groups=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)  # (out 4, in/groups 2, 1, 1)
    stats = {"0": {"input_norm": torch.tensor([1.0, 2.0, 3.0, 4.0])}}
    # Outputs 0-1 read inputs 0-1 (norms 1, 2), outputs 2-3 read inputs 2-3 (norms 3, 4).
    masks = compute_masks(nn.Sequential(conv), _cfg(0.5, op="Conv2d"), criterion="wanda", stats=stats)
    assert masks["0.weight"][:, :, 0, 0].tolist() == [[False, False], [False, False], [True, True], [True, True]]


def _activation_net():
    # out0 = 1 always; out1 = -1 always (zero after ReLU); out2 = x0, which is +1 or -1.
    return _linear([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]], bias=[1.0, -1.0, 0.0])


def test_apoz_hand_computed():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    stats = collect_stats(_activation_net(), [(x, None)], keys=("apoz", "mean_activation"))
    assert stats["0"]["apoz"].tolist() == [0.0, 1.0, 0.5]
    assert stats["0"]["mean_activation"].tolist() == [1.0, 0.0, 0.5]
    masks = compute_masks(_activation_net(), _cfg(1 / 3), criterion="apoz", stats=stats)
    assert masks["0.bias"].tolist() == [True, False, True]
    masks = compute_masks(_activation_net(), _cfg(2 / 3), criterion="mean_activation", stats=stats)
    assert masks["0.bias"].tolist() == [True, False, False]


def test_activation_criteria_need_channel_units():
    stats = {"0": {"apoz": torch.zeros(3)}}
    with pytest.raises(ConfigError, match="whole output channels.*'out_channel'"):
        compute_masks(_activation_net(), _cfg(0.5, "fine"), criterion="apoz", stats=stats)


def test_bn_scale_prunes_smallest_gammas_and_their_offsets():
    net = nn.Sequential(nn.BatchNorm1d(4))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([0.1, -2.0, 0.5, 1.0]))
    masks = compute_masks(net, _cfg(0.5, op="BatchNorm1d"), criterion="slim")
    assert masks["0.weight"].tolist() == [False, True, False, True]
    assert masks["0.bias"].tolist() == [False, True, False, True]
    with pytest.raises(ConfigError, match="normalisation layers"):
        compute_masks(_linear([[1.0, 2.0]]), _cfg(0.5), criterion="bn_scale")


@pytest.mark.parametrize("criterion", ["gradient", "hybrid", "taylor", "movement", "wanda", "apoz", "mean_activation"])
def test_data_criteria_say_which_statistic_is_missing(criterion):
    needed = get_criterion(criterion).needs[0]
    with pytest.raises(ConfigError, match=f"needs the '{needed}' statistic of layer '0'.*stats"):
        compute_masks(_linear([[1.0, 2.0]]), _cfg(0.5), criterion=criterion)


def test_every_criterion_declares_how_scores_scale():
    assert {c.size_power for c in CRITERIA.values()} <= {0.0, 0.5, 1.0}
    assert get_criterion("magnitude").size_power == 0.0 and get_criterion("l1").size_power == 1.0
    assert get_criterion("taylorfo") is get_criterion("taylor")


def test_registering_a_criterion_without_docstring():
    register_criterion("largest_first", default_granularity="out_channel", size_power=0.0)(
        lambda units, ctx: -units.abs().amax(dim=1)
    )
    try:
        net = nn.Sequential(nn.Linear(2, 3))
        with torch.no_grad():
            net[0].weight.copy_(torch.tensor([[1.0, 0.0], [5.0, 0.0], [2.0, 0.0]]))
        masks = compute_masks(net, [{"op_types": ["Linear"], "sparse_ratio": 1 / 3}], criterion="largest_first")
        assert masks["0.weight"].all(dim=1).tolist() == [True, False, True]
        assert get_criterion("largest_first").doc == ""
    finally:
        del CRITERIA["largest_first"]
