"""Lottery-ticket rewinding and sparse training at constant sparsity (SET, RigL)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch import apply_masks_, compute_masks, get_masks
from slimtorch.errors import ConfigError
from slimtorch.prune.loop import Evaluator
from slimtorch.prune.lottery import LotteryTicket
from slimtorch.prune.sparse_training import DynamicSparsity, drop_and_grow

CFG = [{"op_types": ["Linear"], "sparse_ratio": 0.75}]


def _train_a_bit(net, steps=3, callback=None):
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(4, 8, generator=gen)).pow(2).mean().backward()
        opt.step()
        if callback is not None:
            callback.step()


def test_rounds_prune_a_share_of_the_rest_and_rewind_to_init():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8, bias=False))
    init = net[0].weight.detach().clone()
    ticket = LotteryTicket(net, CFG, rounds=2)
    _train_a_bit(net)
    ticket.next_round_()
    first = get_masks(net)["0.weight"]
    assert int((~first).sum()) == 32 and ticket.sparsity == 0.5  # 1 - 0.25 ** (1/2)
    assert torch.equal(net[0].weight[first], init[first])
    _train_a_bit(net)
    ticket.next_round_()
    second = get_masks(net)["0.weight"]
    assert int((~second).sum()) == 48 and not (second & ~first).any()
    assert torch.equal(net[0].weight[second], init[second])
    with pytest.raises(ConfigError, match="all 2 rounds are done"):
        ticket.next_round_()


def test_late_rewinding_records_the_weights_after_step_k():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8, bias=False))
    ticket = LotteryTicket(net, CFG, rounds=1, rewind_step=2)
    with pytest.raises(ConfigError, match="no rewind point yet"):
        ticket.next_round_()
    _train_a_bit(net, steps=2, callback=ticket)
    early = net[0].weight.detach().clone()
    _train_a_bit(net, steps=3, callback=ticket)
    ticket.next_round_()
    kept = get_masks(net)["0.weight"]
    assert torch.equal(net[0].weight[kept], early[kept])


def test_ticket_run_with_an_evaluator():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    data = [(x[i : i + 16], (x[i : i + 16, 0] > 0).long()) for i in range(0, 64, 16)]
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    ticket = LotteryTicket(net, [{"op_names": ["0"], "sparse_ratio": 0.75}], rounds=2)
    ticket.run_(Evaluator(train_data=data, eval_data=data, lr=0.05), epochs_per_round=1)
    assert [row["sparsity"] for row in ticket.history] == pytest.approx([0.0, 0.5, 0.75])
    assert int((net[0].weight == 0).sum()) == 48


def test_drop_and_grow_hand_computed():
    mask = torch.tensor([True, True, True, False, False, False])
    weight = torch.tensor([0.5, -0.1, 2.0, 0.0, 0.0, 0.0])
    grow = torch.tensor([9.0, 9.0, 9.0, 0.2, 0.7, 0.1])  # only inactive entries may grow
    assert drop_and_grow(mask, weight, grow, 2).tolist() == [False, False, True, True, True, False]
    assert torch.equal(drop_and_grow(mask, weight, grow, 0), mask)


@pytest.mark.parametrize("regrow", ["random", "gradient"])
def test_sparsity_is_constant_and_regrowth_avoids_the_dropped(regrow):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 4))
    cfg = [{"op_types": ["Linear"], "sparse_ratio": 0.9}]
    sparse = DynamicSparsity(net, cfg, regrow=regrow, every=2, drop_fraction=0.3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in sparse.masks.items()}
    for step in range(1, 9):
        opt.zero_grad()
        F.cross_entropy(net(torch.randn(8, 20)), torch.randint(0, 4, (8,))).backward()
        opt.step()
        sparse.step()
        if step % 2:
            continue
        record = sparse.updates[-1]
        for name, mask in sparse.masks.items():
            assert int(mask.sum()) == int(before[name].sum())  # constant sparsity, every layer
            dropped, grown = record[name]["dropped"], record[name]["grown"]
            assert len(dropped) == len(grown) == math.floor(0.3 * int(mask.sum()) + 0.5)
            assert not before[name][tuple(grown.T)].any()  # grown where inactive before: not just dropped
            assert before[name][tuple(dropped.T)].all()
        before = {k: v.clone() for k, v in sparse.masks.items()}
    assert len(sparse.updates) == 4
    assert int((net[0].weight != 0).sum()) <= 20


def test_rigl_grows_where_the_dense_gradient_is_largest():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5, bias=False))
    sparse = DynamicSparsity(net, [{"op_types": ["Linear"], "sparse_ratio": 0.8}], regrow="gradient", every=1,
                             drop_fraction=0.5)
    x = torch.randn(7, 6)
    inactive = ~sparse.masks["0.weight"]
    dense = net[0].weight.detach().clone().requires_grad_()  # masked entries are zero here too
    F.linear(x, dense).pow(2).sum().backward()
    net(x).pow(2).sum().backward()  # the masks zero the pruned gradients; RigL must see them anyway
    assert net[0].weight.grad[inactive].abs().sum() == 0
    sparse.step()
    grown = sparse.updates[-1]["0.weight"]["grown"]
    scores = dense.grad.abs().masked_fill(~inactive, -1.0).flatten()
    expected = torch.topk(scores, len(grown)).indices
    assert sorted((grown[:, 0] * 6 + grown[:, 1]).tolist()) == sorted(expected.tolist())


def test_sparse_training_starts_from_existing_masks_and_checks_its_config():
    net = nn.Sequential(nn.Linear(10, 10))
    masks = compute_masks(net, [{"op_types": ["Linear"], "sparse_ratio": 0.6, "granularity": "fine"}],
                          criterion="magnitude")
    apply_masks_(net, masks)
    sparse = DynamicSparsity(net, [{"op_types": ["Linear"], "sparse_ratio": 0.6}])
    assert torch.equal(sparse.masks["0.weight"], masks["0.weight"])
    with pytest.raises(ConfigError, match="single weights"):
        DynamicSparsity(net, [{"op_types": ["Linear"], "sparse_ratio": 0.5, "granularity": "out_channel"}])
    with pytest.raises(ConfigError, match="regrow must be one of"):
        DynamicSparsity(net, CFG, regrow="magnitude")


def test_rigl_drop_fraction_decays_with_a_cosine():
    sparse = DynamicSparsity(nn.Sequential(nn.Linear(4, 4)), CFG, drop_fraction=0.3, end=100)
    assert [sparse.fraction(s) for s in (0, 50, 100, 101)] == pytest.approx([0.3, 0.15, 0.0, 0.0])


def test_channel_ticket_and_gradual_channels_compact_exactly():
    import copy

    from slimtorch import compact_
    from slimtorch.prune import GradualPruner, Schedule

    x = torch.randn(4, 8)
    cfg = [{"op_names": ["0"], "sparse_ratio": 0.5, "granularity": "out_channel"}]
    for method in ("ticket", "gradual"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        if method == "ticket":
            pruner = LotteryTicket(net, cfg, rounds=1, criterion="l1", example_inputs=x)
            _train_a_bit(net)
            pruner.next_round_()
        else:
            pruner = GradualPruner(net, cfg, schedule=Schedule(kind="linear", end=2), criterion="l1",
                                   example_inputs=x)
            _train_a_bit(net, steps=2, callback=pruner)
        masks = get_masks(net)
        # the graph masks the next layer's inputs too: three hidden units are gone everywhere
        assert (~masks["2.weight"].all(dim=0)).sum() == 3 and (~masks["0.weight"].all(dim=1)).sum() == 3
        masked = copy.deepcopy(net)
        compact_(net, masks, example_inputs=x)
        assert (net[0].out_features, net[2].in_features) == (3, 3), method
        torch.testing.assert_close(net(x), masked(x))
