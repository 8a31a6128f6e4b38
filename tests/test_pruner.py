import copy

import pytest
import torch
from torch import nn

from slimtorch import compute_masks, sparsity_table
from slimtorch.errors import ConfigError
from slimtorch.models import BookCNN, MnistNet
from slimtorch.prune.pruner import units_to_prune


def _linear(weight: list[list[float]], bias: bool = True) -> nn.Sequential:
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(w)
    return nn.Sequential(layer)


def _conv(weight: torch.Tensor) -> nn.Sequential:
    out_c, in_c, kh, kw = weight.shape
    conv = nn.Conv2d(in_c, out_c, (kh, kw))
    with torch.no_grad():
        conv.weight.copy_(weight)
    return nn.Sequential(conv)


def _cfg(ratio=None, granularity=None, **extra):
    entry = {"op_types": ["Linear", "Conv2d"], **extra}
    if ratio is not None:
        entry["sparse_ratio"] = ratio
    if granularity is not None:
        entry["granularity"] = granularity
    return [entry]


def test_l1_channels_hand_computed():
    net = _linear([[1, 1], [0.1, 0.2], [3, 0], [0, 0.05]])  # L1 norms 2, 0.3, 3, 0.05
    masks = compute_masks(net, _cfg(0.5), criterion="l1")
    keep = torch.tensor([True, False, True, False])
    assert torch.equal(masks["0.weight"], keep[:, None].expand(4, 2))
    assert torch.equal(masks["0.bias"], keep)


def test_l1_and_l2_differ_where_they_should():
    net = _linear([[3, 0], [2, 2]])  # L1: 3 < 4, L2: 3 > 2.83
    assert masks_rows(compute_masks(net, _cfg(0.5), criterion="l1")) == [False, True]
    assert masks_rows(compute_masks(net, _cfg(0.5), criterion="l2")) == [True, False]


def masks_rows(masks):
    return masks["0.weight"].any(dim=1).tolist()


def test_magnitude_fine_hand_computed():
    net = _linear([[0.1, -5], [2, -0.3]])
    masks = compute_masks(net, _cfg(0.5), criterion="magnitude")
    assert masks["0.weight"].tolist() == [[False, True], [True, False]]
    assert "0.bias" not in masks  # unstructured pruning leaves the bias alone


def test_fpgm_prunes_the_most_central_filter():
    # Distances: u0 -> 1 + 10 = 11, u1 -> 1 + 9 = 10 (the geometric median), u2 -> 10 + 9 = 19.
    net = _linear([[0, 0], [1, 0], [10, 0]])
    assert masks_rows(compute_masks(net, _cfg(0.34), criterion="fpgm")) == [True, False, True]


def test_random_prunes_the_requested_count_and_is_seeded():
    net = nn.Sequential(nn.Linear(10, 40))
    a = compute_masks(net, _cfg(0.25, "fine"), criterion="random", seed=3)["0.weight"]
    b = compute_masks(net, _cfg(0.25, "fine"), criterion="random", seed=3)["0.weight"]
    c = compute_masks(net, _cfg(0.25, "fine"), criterion="random", seed=4)["0.weight"]
    assert int((~a).sum()) == 100 and torch.equal(a, b) and not torch.equal(a, c)


def test_in_channel_granularity():
    w = torch.ones(2, 3, 1, 1)
    w[:, 1] = 0.1  # input channel 1 is weakest
    masks = compute_masks(_conv(w), _cfg(0.34, "in_channel"), criterion="l1")
    assert masks["0.weight"][:, :, 0, 0].tolist() == [[True, False, True]] * 2
    assert "0.bias" not in masks


def test_vector_and_kernel_granularity():
    w = torch.ones(1, 2, 2, 2)
    w[0, 0, 1] = 0.01  # one kernel row (vector) of kernel (0, 0)
    w[0, 1] = 0.5  # the whole kernel (0, 1) is weaker than kernel (0, 0) in L1 (2.0 vs 2.02)
    vec = compute_masks(_conv(w), _cfg(0.25, "vector"), criterion="l1")["0.weight"]
    expected = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    expected[0, 0, 1] = False
    assert torch.equal(vec, expected)
    ker = compute_masks(_conv(w), _cfg(0.5, "kernel"), criterion="l1")["0.weight"]
    assert ker[0, 0].all() and not ker[0, 1].any()


def test_kernel_granularity_needs_a_conv():
    with pytest.raises(ConfigError, match="kernel granularity needs a conv"):
        compute_masks(nn.Sequential(nn.Linear(4, 4)), _cfg(0.5, "kernel"))


def test_block_granularity_hand_computed():
    w = torch.ones(4, 4)
    w[2:, :2] = 0.1  # the bottom-left 2x2 block is weakest
    masks = compute_masks(_linear(w.tolist()), _cfg(0.25, [2, 2]), criterion="l1")["0.weight"]
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[2:, :2] = False
    assert torch.equal(masks, expected)
    with pytest.raises(ConfigError, match="does not tile"):
        compute_masks(_linear(w.tolist()), _cfg(0.25, [3, 2]), criterion="l1")


def test_two_four_keeps_the_two_largest_of_each_group():
    net = _linear([[1, 2, 3, 4, -8, 0.5, 0.1, 7]])
    masks = compute_masks(net, _cfg(granularity="2:4"), criterion="magnitude")["0.weight"]
    assert masks.tolist() == [[False, False, True, True, True, False, False, True]]


def test_n_m_on_conv_runs_along_input_channels():
    conv = nn.Conv2d(8, 4, 3)
    masks = compute_masks(nn.Sequential(conv), _cfg(granularity="2:4"), criterion="magnitude")["0.weight"]
    per_group = masks.permute(0, 2, 3, 1).reshape(-1, 4).sum(dim=1)  # (out, kh, kw, in) groups of 4
    assert bool((per_group == 2).all())
    with pytest.raises(ConfigError, match="multiple of 4"):
        compute_masks(nn.Sequential(nn.Conv2d(3, 4, 3)), _cfg(granularity="2:4"), criterion="magnitude")


def test_threshold_prunes_units_below_it():
    net = _linear([[1, 1], [0.1, 0.2], [3, 0], [0, 0.05]])
    cfg = [{"op_types": ["Linear"], "sparse_threshold": 1.0}]
    assert masks_rows(compute_masks(net, cfg, criterion="l1")) == [True, False, True, False]
    # A structured layer is never emptied, even when every unit is below the threshold.
    cfg = [{"op_types": ["Linear"], "sparse_threshold": 100.0}]
    assert masks_rows(compute_masks(net, cfg, criterion="l1")) == [False, False, True, False]


def test_global_ranking_across_layers_with_caps():
    a = nn.Linear(1, 4, bias=False)
    b = nn.Linear(1, 4, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[0.1], [0.2], [0.3], [0.4]]))
        b.weight.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
    net = nn.Sequential(a, b)
    cfg = [{"op_types": ["Linear"], "total_sparsity": 0.5, "granularity": "fine"}]
    masks = compute_masks(net, cfg, criterion="magnitude")
    assert int((~masks["0.weight"]).sum()) == 4 and int((~masks["1.weight"]).sum()) == 0
    capped = [{**cfg[0], "max_sparse_ratio": 0.5}]
    masks = compute_masks(net, capped, criterion="magnitude")
    assert masks["0.weight"].flatten().tolist() == [False, False, True, True]
    assert masks["1.weight"].flatten().tolist() == [False, False, True, True]


def test_global_ranking_weighs_unit_sizes():
    big = nn.Linear(10, 2, bias=False)  # two rows of 10 weights
    small = nn.Linear(2, 2, bias=False)  # two rows of 2 weights
    with torch.no_grad():
        big.weight.fill_(0.5)
        small.weight.fill_(1.0)
    cfg = [{"op_types": ["Linear"], "total_sparsity": 0.4, "granularity": "out_channel"}]
    masks = compute_masks(nn.Sequential(big, small), cfg, criterion="l1")  # 40% of 24 weights ~ 10 weights
    assert masks["0.weight"].any(dim=1).tolist().count(False) == 1
    assert masks["1.weight"].all()


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5, 0.73, 0.9])
@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "random"])
def test_achieved_channel_sparsity_within_one_unit(sparsity, criterion):
    model = BookCNN()
    cfg = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": sparsity, "granularity": "out_channel"}]
    masks = compute_masks(model, cfg, criterion=criterion)
    for row in sparsity_table(model, masks):
        pruned = row["units"] - row["units_kept"]
        assert abs(pruned - sparsity * row["units"]) <= 1, row


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_achieved_fine_sparsity_within_one_weight(sparsity, criterion):
    model = BookCNN()
    cfg = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": sparsity, "granularity": "fine"}]
    masks = compute_masks(model, cfg, criterion=criterion)
    for row in sparsity_table(model, masks):
        assert abs((row["total"] - row["kept"]) - sparsity * row["total"]) <= 1, row


def test_units_to_prune_rounds_and_never_empties_structured_layers():
    assert units_to_prune(20, 0.5, structured=True) == 10
    assert units_to_prune(10, 0.25, structured=True) == 3  # 2.5 rounds half up
    assert units_to_prune(10, 0.99, structured=True) == 9
    assert units_to_prune(10, 0.99, structured=False) == 10


def test_seed_mnist_net_masks_exactly_half_the_units():
    model = MnistNet()
    cfg = [{"sparsity_per_layer": 0.5, "op_types": ["Linear", "Conv2d"]}, {"exclude": True, "op_names": ["fc2"]}]
    masks = compute_masks(model, cfg, criterion="l1")
    kept = {r["param"]: (r["units_kept"], r["units"]) for r in sparsity_table(model, masks)}
    assert kept == {
        "conv1.weight": (10, 20), "conv1.bias": (10, 20), "conv2.weight": (25, 50), "conv2.bias": (25, 50),
        "fc1.weight": (250, 500), "fc1.bias": (250, 500),
    }
    assert not any(k.startswith("fc2") for k in masks)


def test_compute_masks_is_pure():
    model = BookCNN()
    before = copy.deepcopy(model.state_dict())
    compute_masks(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], criterion="random")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_unknown_criterion_and_non_module():
    with pytest.raises(ConfigError, match="unknown criterion 'l3'.*'l1'"):
        compute_masks(MnistNet(), _cfg(0.5), criterion="l3")
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        compute_masks({"w": torch.ones(2)}, _cfg(0.5))


def test_nan_scores_name_the_first_layer_that_has_them():
    model = MnistNet()
    stats = {n: {"grad_sq": torch.ones_like(m.weight)} for n, m in model.named_modules() if n in ("conv2", "fc1")}
    stats["conv2"]["grad_sq"][0] = float("nan")
    stats["fc1"]["grad_sq"][0] = float("nan")
    config = [{"op_names": ["conv2", "fc1"], "sparse_ratio": 0.5}]
    with pytest.raises(ConfigError, match="criterion 'gradient' gave NaN scores for layer 'conv2'"):
        compute_masks(model, config, criterion="gradient", stats=stats)
