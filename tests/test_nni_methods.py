"""The NNI-style names of the data-driven and scheduled pruners."""

import pytest
import torch
from torch import nn

from slimtorch import ConfigError, is_masked
from slimtorch.compat.nni import (
    ActivationAPoZRankPruner,
    ActivationMeanRankPruner,
    AGPPruner,
    LinearPruner,
    LotteryTicketPruner,
    MovementPruner,
    SlimPruner,
    TaylorFOWeightPruner,
)
from slimtorch.masks import model_state
from slimtorch.prune.loop import Evaluator


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(),
        nn.Linear(16, 2),
    )


def _evaluator():
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 6, 6, generator=gen), torch.randint(0, 2, (8,), generator=gen)) for _ in range(3)]
    return Evaluator(train_data=data, eval_data=data, lr=0.01)


def _kept_channels(mask):
    return int(mask.reshape(mask.shape[0], -1).any(dim=1).sum())


CHANNELS = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}, {"op_names": ["4"], "sparse_ratio": 0.25}]


@pytest.mark.parametrize("cls", [TaylorFOWeightPruner, ActivationAPoZRankPruner, ActivationMeanRankPruner])
def test_data_driven_one_shot_pruners(cls):
    model = _net()
    returned, masks = cls(model, CHANNELS, _evaluator(), training_batches=2).compress()
    assert returned is model and is_masked(model)
    assert _kept_channels(masks["0.weight"]) == 4 and _kept_channels(masks["4.weight"]) == 12
    assert torch.equal(masks["0"]["bias"], masks["0.bias"])


def test_slim_pruner_ranks_batchnorm_scales_globally():
    model = _net()
    _, masks = SlimPruner(model, [{"op_types": ["BatchNorm2d"], "total_sparsity": 0.25}], _evaluator()).compress()
    assert int(masks["1.weight"].sum()) == 6


@pytest.mark.parametrize("cls", [LinearPruner, AGPPruner])
def test_scheduled_pruners(cls):
    model = _net()
    pruner = cls(model, [{"op_types": ["Linear"], "sparse_ratio": 0.8}], _evaluator(), total_iteration=2)
    _, masks = pruner.compress()
    assert abs(1 - masks["4.weight"].float().mean().item() - 0.8) < 1e-3
    assert len(pruner.pruner.history) == 2


def test_scheduled_pruner_with_a_structured_algorithm():
    model = _net()
    _, masks = LinearPruner(model, CHANNELS, _evaluator(), total_iteration=2, pruning_algorithm="l1").compress()
    assert _kept_channels(masks["0.weight"]) == 4


@pytest.mark.parametrize("cls", [LinearPruner, AGPPruner])
def test_scheduled_pruners_speed_up_between_rounds(cls):
    model = _net()
    x = torch.randn(2, 1, 6, 6)
    pruner = cls(model, CHANNELS, _evaluator(), total_iteration=2, pruning_algorithm="l1", dummy_input=x,
                 speedup=True)
    returned, _ = pruner.compress()
    assert returned is model and model_state(model) == "compacted"
    assert (model[0].out_channels, model[4].in_features, model[4].out_features) == (4, 4 * 4 * 4, 12)
    assert [r["params"] for r in pruner.pruner.history] == sorted((r["params"] for r in pruner.pruner.history),
                                                                  reverse=True)
    with pytest.raises(ConfigError, match="example_inputs"):
        cls(_net(), CHANNELS, _evaluator(), total_iteration=2, pruning_algorithm="l1", speedup=True).compress()


def test_lottery_ticket_pruner():
    model = _net()
    pruner = LotteryTicketPruner(model, [{"op_types": ["Linear"], "sparse_ratio": 0.75}], _evaluator(),
                                 total_iteration=2)
    _, masks = pruner.compress()
    assert abs(1 - masks["6.weight"].float().mean().item() - 0.75) < 1e-3
    assert [round(r["sparsity"], 3) for r in pruner.ticket.history] == [0.0, 0.5, 0.75]


def test_movement_pruner_prunes_while_fine_tuning():
    model = _net()
    pruner = MovementPruner(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], _evaluator(), training_epochs=2,
                            warm_up_step=1, cool_down_beginning_step=4)
    _, masks = pruner.compress()
    assert abs(1 - masks["4.weight"].float().mean().item() - 0.5) < 1e-3
    assert pruner.tracker._handles == []  # the movement tracker's hooks are gone (the masks' stay)
