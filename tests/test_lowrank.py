"""Low-rank factorization: reconstruction error equals the energy dropped, exact at full rank, budgets kept."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.lowrank import (
    LowRankConfig,
    factorize_,
    factorized_layers,
    lowrank_sensitivity,
    plan_lowrank,
    ranks_for_tolerance,
)


def _low_rank_ish(out_f, in_f):
    """A weight with a decaying spectrum, like trained layers have (random init is nearly flat)."""
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f))
    k = min(out_f, in_f)
    return (u[:, :k] * torch.logspace(0, -3, k)) @ v[:, :k].T


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_linear_reconstruction_error_is_the_dropped_energy(energy):
    layer = nn.Linear(48, 32)
    with torch.no_grad():
        layer.weight.copy_(_low_rank_ish(32, 48))
    model = nn.Sequential(layer)
    plan = plan_lowrank(model, LowRankConfig(energy=energy))["0"]
    assert plan.kept_energy >= energy
    factorize_(model, LowRankConfig(energy=energy))
    first, second = model[0]
    assert first.out_features == plan.rank
    rebuilt = second.weight @ first.weight  # (out, r) @ (r, in)
    rel_sq = float((layer.weight - rebuilt).detach().square().sum() / layer.weight.detach().square().sum())
    assert rel_sq == pytest.approx(1 - plan.kept_energy, abs=1e-5)
    torch.testing.assert_close(second.bias, layer.bias)


def test_conv_reconstruction_error_is_the_dropped_energy():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, dilation=1)
    with torch.no_grad():
        conv.weight.copy_(_low_rank_ish(16, 72).reshape(16, 8, 3, 3))
    model = nn.Sequential(conv)
    plan = plan_lowrank(model, LowRankConfig(energy=0.9))["0"]
    factorize_(model, LowRankConfig(energy=0.9))
    first, second = model[0]
    assert (first.stride, first.padding, second.kernel_size) == ((2, 2), (1, 1), (1, 1))
    rebuilt = (second.weight.flatten(1) @ first.weight.flatten(1)).reshape(conv.weight.shape)  # (16, 8, 3, 3)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.conv2d(x, rebuilt, conv.bias, stride=2, padding=1), atol=1e-5, rtol=1e-4)
    rel_sq = float((conv.weight - rebuilt).detach().square().sum() / conv.weight.detach().square().sum())
    assert rel_sq == pytest.approx(1 - plan.kept_energy, abs=1e-5)


def test_full_rank_reproduces_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=2, dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 5))
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    factorize_(model, LowRankConfig(energy=1.0, only_if_smaller=False))
    assert factorized_layers(model) == {"0": 6, "3": 5}
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)


def test_param_budget_is_kept_and_counted():
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    plans = plan_lowrank(model, LowRankConfig(param_ratio=0.3))
    before = sum(p.numel() for p in model.parameters())
    factorize_(model, LowRankConfig(param_ratio=0.3))
    for plan in plans.values():
        assert plan.params_after <= 0.3 * plan.params_before
    assert sum(p.numel() for p in model.parameters()) == before - sum(
        p.params_before - p.params_after for p in plans.values()
    )


def test_layers_that_would_grow_are_left_alone():
    model = nn.Sequential(nn.Linear(8, 8))
    plan = plan_lowrank(model, LowRankConfig(rank=6))["0"]
    assert plan.skipped and plan.params_after >= plan.params_before
    factorize_(model, LowRankConfig(rank=6))
    assert isinstance(model[0], nn.Linear) and factorized_layers(model) == {}


def test_sensitivity_table_and_ranks_for_tolerance():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    with torch.no_grad():
        model[0].weight.copy_(_low_rank_ish(64, 64))
    x = torch.randn(16, 64)
    table = lowrank_sensitivity(model, x, LowRankConfig(energy=0.9), energies=(0.5, 0.9, 0.99, 0.999))
    assert set(table) == {"0", "2"}
    for rows in table.values():
        ranks = [r for r, _ in rows]
        assert ranks == sorted(ranks) and rows[-1][1] < 1e-5  # ends with the exact full rank
    ranks = ranks_for_tolerance(table, 0.1)
    assert all(err <= 0.1 for name, r in ranks.items() for rank, err in table[name] if rank == r)
    factorize_(model, LowRankConfig(energy=0.9), ranks=ranks)
    assert ranks["0"] < 32 and factorized_layers(model) == {"0": ranks["0"]}  # "2" would grow: left dense


def test_bad_inputs_are_typed_errors():
    with pytest.raises(ConfigError, match="exactly one"):
        LowRankConfig(energy=0.9, rank=4)
    with pytest.raises(ConfigError, match="energy"):
        LowRankConfig(energy=1.5)
    with pytest.raises(ConfigError, match="groups"):
        plan_lowrank(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), LowRankConfig(energy=0.9))
    with pytest.raises(ConfigError, match="does not select"):
        plan_lowrank(nn.Sequential(nn.Linear(4, 4)), LowRankConfig(energy=0.9), ranks={"fc": 2})
    cfg = LowRankConfig(param_ratio=0.5, exclude_op_names=("head",))
    assert LowRankConfig.from_dict(cfg.to_dict()) == cfg
