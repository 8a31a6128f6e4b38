"""Observation: weight histograms before and after pruning, and activation sparsity on data."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch import apply_masks_, compute_masks
from slimtorch.errors import ConfigError, TraceError
from slimtorch.models import DigitsCNN
from slimtorch.report import (
    activation_sparsity,
    activation_table,
    compare_weight_histograms,
    weight_histograms,
    weight_table,
)
from slimtorch.report.plots import plot_activation_sparsity, plot_weight_histograms


class Mixed(nn.Module):
    """ReLUs as modules, as functions and as a method; a Hardtanh that is not ReLU-like; one dead unit."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5)
        self.clip, self.six = nn.Hardtanh(), nn.ReLU6()
        with torch.no_grad():
            self.fc2.bias[0] = -1e3  # unit 0 of fc2 is negative on any input: dead after the ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        g = F.relu(self.fc2(h))
        return self.six(self.clip(g)) + torch.relu(g).relu()


def test_activation_sparsity_counts_every_relu_like_call_exactly():
    torch.manual_seed(0)
    net = Mixed()
    batches = [torch.randn(7, 4), torch.randn(3, 4)]
    rows = activation_sparsity(net, batches)
    assert [(r.op, r.function, r.calls) for r in rows] == [
        ("act", "relu", 2), ("(model): relu", "relu", 2), ("six", "relu6", 2), ("(model): relu 2", "relu", 2),
        ("(model): relu 3", "relu", 2)]  # the Hardtanh from -1 is not ReLU-like: not counted
    with torch.no_grad():
        hidden = torch.cat([net.act(net.fc1(x)) for x in batches])
        out = torch.cat([F.relu(net.fc2(net.act(net.fc1(x)))) for x in batches])
    first, second = rows[0], rows[1]
    assert (first.zeros, first.total) == (int((hidden == 0).sum()), hidden.numel())
    assert (second.zeros, second.total) == (int((out == 0).sum()), out.numel())
    assert (second.units, second.dead_units) == (5, int((out == 0).all(dim=0).sum())) and second.dead_units >= 1
    assert second.sparsity == pytest.approx(second.zeros / second.total)


def test_activation_sparsity_leaves_the_model_as_it_was():
    net = Mixed().train()
    net.clip.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    activation_sparsity(net, [(torch.randn(4, 4), torch.zeros(4))])  # an (input, label) pair: the input is used
    assert net.training and not net.clip.training  # each module's own mode back
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_activation_sparsity_of_a_reference_cnn_on_digits_per_channel():
    torch.manual_seed(0)
    model = DigitsCNN()
    x = torch.randn(16, 1, 8, 8)
    rows = activation_sparsity(model, [x[:8], x[8:]], max_batches=1)
    assert [r.op for r in rows] == ["stem.2", "block.2", "(model): relu", "down.2"]
    assert all(r.calls == 1 and r.units == (64 if r.op == "down.2" else 32) for r in rows)
    with torch.no_grad():
        stem = model.eval().stem(x[:8])
    assert rows[0].zeros == int((stem == 0).sum())


@pytest.mark.parametrize(("model", "batches", "error", "match"), [
    (nn.Sequential(nn.Linear(3, 2), nn.Tanh()), [torch.randn(2, 3)], ConfigError, "no ReLU-like op"),
    (nn.Sequential(nn.Linear(3, 2), nn.ReLU()), [], ConfigError, "no batches"),
    (nn.Sequential(nn.Linear(3, 2), nn.ReLU()), torch.randn(2, 3), ConfigError, "iterable of batches"),
    (nn.Sequential(nn.Linear(3, 2), nn.ReLU()), [torch.randn(2, 5)], TraceError, "cannot run"),
])
def test_activation_sparsity_refuses_what_it_cannot_measure(model, batches, error, match):
    with pytest.raises(error, match=match):
        activation_sparsity(model, batches)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_weight_histograms_count_every_value_and_the_zeros():
    torch.manual_seed(0)
    model = DigitsCNN()
    hists = weight_histograms(model, bins=20)
    assert list(hists) == ["stem.0.weight", "block.0.weight", "block.3.weight", "down.0.weight", "head.weight"]
    for name, h in hists.items():  # matrices and kernels only: no biases, no norm scales
        weight = model.get_parameter(name).detach()
        assert sum(h.counts) == weight.numel() == h.numel and len(h.edges) == 21
        assert h.edges[-1] == pytest.approx(float(weight.abs().max()))
        assert h.mean_abs == pytest.approx(float(weight.abs().mean()))
    with pytest.raises(ConfigError, match="no weight matrix"):
        weight_histograms(nn.BatchNorm1d(3))


def test_before_and_after_pruning_share_bins_and_show_the_zeros():
    torch.manual_seed(0)
    dense = DigitsCNN()
    pruned = copy.deepcopy(dense)
    masks = compute_masks(pruned, [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.7, "granularity": "fine"}],
                          criterion="magnitude")
    apply_masks_(pruned, masks)
    before, after = compare_weight_histograms(dense, pruned, bins=31)
    for name in before:
        assert before[name].edges == after[name].edges
        assert after[name].zeros == int((~masks[name]).sum()) and before[name].zeros == 0
        middle = len(after[name].counts) // 2  # odd bins, symmetric around 0: 0 is inside the middle one
        assert after[name].counts[middle] >= after[name].zeros
    table = weight_table(before, after)
    assert "| block.0.weight | 32x32x3x3 | 0.0% |" in table and "| 70.0% |" in table


def test_tables_and_figures(tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN()
    rows = activation_sparsity(model, [torch.randn(8, 1, 8, 8)])
    table = activation_table(rows, rows)
    assert table.splitlines()[0] == "| op | function | zeros | dead units | zeros after | dead units after |"
    assert len(table.splitlines()) == 2 + len(rows)
    plot_activation_sparsity(rows, tmp_path / "activations.png", after=rows)
    plot_weight_histograms(weight_histograms(model), tmp_path / "weights.png")
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("activations.png", "weights.png"))
