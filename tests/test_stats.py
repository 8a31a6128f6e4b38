import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.prune.stats import StatsTracker, collect_stats, expand_input_stat


def _net():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))


def _batches(n=3):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 2, 4, 4, generator=gen), torch.randint(0, 4, (5,), generator=gen)) for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def test_gradient_statistics_match_a_manual_computation():
    model, batches = _net(), _batches()
    stats = collect_stats(model, batches, keys=("grad", "grad_sq", "movement"), loss_fn=_loss)
    grads = []
    for batch in batches:
        ref = copy.deepcopy(model)
        _loss(ref, batch).backward()
        grads.append(ref[4].weight.grad)
    g = torch.stack(grads)
    torch.testing.assert_close(stats["4"]["grad"], g.mean(0))
    torch.testing.assert_close(stats["4"]["grad_sq"], g.pow(2).mean(0))
    torch.testing.assert_close(stats["4"]["movement"], -(model[4].weight.detach() * g.sum(0)))
    assert set(stats) == {"0", "1", "4"}  # every module owning a weight, BatchNorm included


def test_activation_statistics_per_channel():
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1))
    x = torch.tensor([1.0, -2.0, 3.0, 0.5]).reshape(1, 1, 2, 2)
    stats = collect_stats(model, [x], keys=("apoz", "mean_activation", "input_norm"))
    # Channel 0 = x: ReLU keeps 1, 3, 0.5 (one zero); channel 1 = -x: ReLU keeps 2 (three zeros).
    assert stats["0"]["apoz"].tolist() == [0.25, 0.75]
    assert stats["0"]["mean_activation"].tolist() == pytest.approx([4.5 / 4, 2.0 / 4])
    assert stats["0"]["input_norm"].tolist() == pytest.approx([(1 + 4 + 9 + 0.25) ** 0.5])
    identity = collect_stats(model, [x], keys=("mean_activation",), activation="identity")
    assert identity["0"]["mean_activation"].tolist() == pytest.approx([2.5 / 4, -2.5 / 4])


def test_collect_stats_leaves_the_model_exactly_as_it_was():
    model = _net().train()
    model[4].weight.grad = torch.full_like(model[4].weight, 7.0)
    state = copy.deepcopy(model.state_dict())
    collect_stats(model, _batches(), keys=("grad_sq", "apoz", "input_norm"), loss_fn=_loss)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # BN running stats restored too
    assert torch.equal(model[4].weight.grad, torch.full_like(model[4].weight, 7.0)) and model[0].weight.grad is None
    assert model.training
    assert not any(m._forward_hooks for m in model.modules())
    assert all(not p._backward_hooks for p in model.parameters())


def test_config_list_selects_the_layers():
    stats = collect_stats(_net(), _batches(1), keys=("grad",), loss_fn=_loss, config_list=[{"op_types": ["Linear"],
                                                                                              "sparse_ratio": 0.5}])
    assert set(stats) == {"4"}


def test_tracker_accumulates_inside_a_training_loop():
    model, batches = _net(), _batches(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    movement = torch.zeros_like(model[4].weight)
    with StatsTracker(model, keys=("movement", "grad"), config_list=[{"op_names": ["4"], "sparse_ratio": 0.5}]) as t:
        for batch in batches:
            opt.zero_grad()
            _loss(model, batch).backward()
            movement -= model[4].weight.detach() * model[4].weight.grad
            opt.step()
        stats = t.stats()
    torch.testing.assert_close(stats["4"]["movement"], movement)
    t.reset()
    assert t.stats() == {}
    assert not model[4].weight._backward_hooks


def test_bad_requests_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown statistics \\['grads'\\]"):
        collect_stats(_net(), _batches(1), keys=("grads",))
    with pytest.raises(ConfigError, match="need gradients; pass loss_fn"):
        collect_stats(_net(), _batches(1), keys=("grad_sq",))
    with pytest.raises(ConfigError, match="no batches"):
        collect_stats(_net(), [], keys=("apoz",))
    frozen = _net()
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(ConfigError, match="'0' has a frozen weight"):
        collect_stats(frozen, _batches(1), keys=("grad",), loss_fn=_loss)
    assert not any(p._backward_hooks for p in frozen.parameters())  # no hook left behind on failure


def test_expand_input_stat_for_linear_and_transposed_conv():
    lin = nn.Linear(3, 2)
    assert expand_input_stat(lin, torch.tensor([1.0, 2.0, 3.0]), lin.weight.shape).tolist() == [[1, 2, 3]] * 2
    tconv = nn.ConvTranspose2d(2, 3, 1)  # weight (in 2, out 3, 1, 1)
    expanded = expand_input_stat(tconv, torch.tensor([5.0, 6.0]), tconv.weight.shape)
    assert expanded[:, :, 0, 0].tolist() == [[5.0] * 3, [6.0] * 3]
    with pytest.raises(ConfigError, match="reads 2 input channels"):
        expand_input_stat(tconv, torch.ones(3), tconv.weight.shape)
