"""Scheduled pruning that compacts between rounds (NNI's scheduled pruners with speedup): each round reaches the
schedule's sparsity of the layers' original sizes, and without fine-tuning the result is exactly the masked
schedule's result compacted once at the end."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from slimtorch import ConfigError, compact_, get_masks
from slimtorch.masks import model_state
from slimtorch.prune import Evaluator, GradualPruner, Schedule

CHANNELS = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "out_channel"}]
TOTAL = [{"op_types": ["Conv2d"], "total_sparsity": 0.6, "granularity": "out_channel"}]
FINE = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.8, "granularity": "fine"}]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 8, 3), bn1=nn.BatchNorm2d(8), relu1=nn.ReLU(),
        conv2=nn.Conv2d(8, 16, 3), relu2=nn.ReLU(), flat=nn.Flatten(), fc=nn.Linear(16 * 4 * 4, 10)))


def _data():
    torch.manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    return x, [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]


def _run(config, *, compact: bool, epochs: int):
    x, batches = _data()
    net = _net()
    with torch.no_grad():  # BatchNorm statistics that are not the identity: a dropped offset would show
        net.bn1.running_mean.uniform_(-1, 1)
        net.bn1.running_var.uniform_(0.5, 2)
    pruner = GradualPruner(net, config, schedule=Schedule(kind="agp", start=0, end=3), criterion="l1",
                           example_inputs=x[:4])
    torch.manual_seed(2)
    pruner.run_(Evaluator(train_data=batches, eval_data=batches, lr=1e-2), finetune_epochs=epochs,
                compact=compact_ if compact else None)
    return net.eval(), pruner, x


# (single weights do not compact: each round warns that it removed nothing, which is the point of that case)
@pytest.mark.filterwarnings("ignore:compaction removed no channel")
@pytest.mark.parametrize("config", [CHANNELS, TOTAL, FINE], ids=["sparse_ratio", "total_sparsity", "fine"])
def test_compacting_between_rounds_equals_compacting_at_the_end(config):
    masked, masked_pruner, x = _run(config, compact=False, epochs=0)
    compact_(masked, get_masks(masked), example_inputs=x[:4])
    rounds, pruner, _ = _run(config, compact=True, epochs=0)
    assert model_state(rounds) == "compacted"
    assert [tuple(p.shape) for p in rounds.parameters()] == [tuple(p.shape) for p in masked.parameters()]
    with torch.no_grad():
        torch.testing.assert_close(rounds(x), masked(x))
    assert [r["sparsity"] for r in pruner.history] == pytest.approx([r["sparsity"] for r in masked_pruner.history])
    params = [r["params"] for r in pruner.history]
    assert params == sorted(params, reverse=True) and len(params) == len(masked_pruner.history)


def test_each_round_reaches_the_schedule_against_the_original_sizes():
    net, pruner, x = _run(CHANNELS, compact=True, epochs=1)
    assert (net.conv1.out_channels, net.conv2.out_channels, net.fc.in_features) == (4, 8, 128)
    schedule = Schedule(kind="agp", start=0, end=3)
    expected = [schedule.sparsity(int(r["round"]), 0.5) for r in pruner.history]
    for row, sparsity in zip(pruner.history, expected, strict=True):
        # (at least the channels' share: a pruned conv1 channel also takes its input column of conv2)
        assert sparsity - 1e-9 <= row["sparsity"] < 1.0
        assert "metric" in row
    assert net(x).shape == (32, 10)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"example_inputs": None}, "example_inputs"),
    ({"regrow": True}, "regrow"),
])
def test_settings_that_cannot_compact_are_refused_before_anything_changes(kwargs, words):
    x, batches = _data()
    net = _net()
    before = copy.deepcopy(net.state_dict())
    settings = {"example_inputs": x[:4], **kwargs}
    pruner = GradualPruner(net, CHANNELS, schedule=Schedule(kind="agp", end=3), criterion="l1", **settings)
    with pytest.raises(ConfigError, match=words):
        pruner.run_(Evaluator(train_data=batches), compact=compact_)
    with pytest.raises(ConfigError, match="compact must be a function"):
        pruner.run_(Evaluator(train_data=batches), compact="yes")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
