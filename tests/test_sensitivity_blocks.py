"""Sensitivity analysis, block dropping, network slimming and DropConnect."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch import compute_masks
from slimtorch.errors import ConfigError, NoMatchError
from slimtorch.nn import DropConnectLinear, add_dropconnect_, drop_connect
from slimtorch.prune.depth import block_drop_loss, block_influence, drop_blocks_, plan_block_drop
from slimtorch.prune.loop import Evaluator
from slimtorch.prune.regularize import SlimmingRegularizer, bn_l1_penalty
from slimtorch.prune.sensitivity import SensitivityResult, SensitivityRow, sensitivity_analysis
from slimtorch.report import report


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def test_sensitivity_prunes_one_layer_at_a_time_on_a_copy():
    model = _mlp()
    x = torch.randn(20, 6)
    ref = model(x).detach()
    seen = []

    @torch.no_grad()
    def closeness(m):
        seen.append([int((layer.weight == 0).sum()) for layer in (m[0], m[2])])
        return -float((m(x) - ref).pow(2).mean())

    state = copy.deepcopy(model.state_dict())
    result = sensitivity_analysis(model, closeness, sparsities=(0.0, 0.5))
    assert seen == [[0, 0], [0, 0], [36, 0], [0, 0], [0, 18]]  # baseline, then one layer pruned at a time
    assert result.drop("0", 0.0) == 0.0 and result.drop("0", 0.5) > 0 and result.drop("2", 0.5) > 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert "| 0 | 72 |" in result.to_markdown()


def _result():
    rows = [
        SensitivityRow("a", 0.5, 0.89, 0.01, 100), SensitivityRow("a", 0.9, 0.7, 0.2, 100),
        SensitivityRow("b", 0.5, 0.899, 0.001, 300), SensitivityRow("b", 0.9, 0.898, 0.002, 300),
    ]
    return SensitivityResult(0.9, tuple(rows))


def test_allocation_takes_the_least_harmful_steps_first():
    result = _result()
    # b's steps up to 90% all cost at most 0.002, less than any step of a: 270 of 400 weights = 0.675 >= 0.6.
    assert result.allocate(0.6) == {"a": 0.0, "b": 0.9}
    # 0.8 needs the next cheapest step, a at 50% (drop 0.01): (50 + 270) / 400 = 0.8.
    expected = [{"op_names": ["a"], "sparse_ratio": 0.5}, {"op_names": ["b"], "sparse_ratio": 0.9}]
    assert result.config_list(0.8) == expected
    with pytest.raises(ConfigError, match="beyond the analysed range"):
        result.allocate(0.95)


def test_sensitivity_plot_is_written(tmp_path):
    path = tmp_path / "sens.png"
    _result().save_plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Residual(nn.Module):
    def __init__(self, width, scale):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.scale = scale

    def forward(self, x):
        return x + self.scale * self.fc(x)


def _resnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), _Residual(8, 1.0), _Residual(8, 0.01), _Residual(8, 0.5), nn.Linear(8, 2))


def test_blocks_are_scored_planned_and_dropped_exactly():
    model = _resnet()
    x = torch.randn(16, 4)
    scores = block_influence(model, ["1", "2", "3"], [x])
    assert scores["2"] < scores["3"] < scores["1"]
    plan = plan_block_drop(scores, count=2)
    assert plan == ["2", "3"]
    skipped = copy.deepcopy(model)
    for name in plan:
        skipped[int(name)].register_forward_hook(lambda m, args, out: args[0])
    before = sum(p.numel() for p in model.parameters())
    drop_blocks_(model, plan)
    assert isinstance(model[2], nn.Identity) and isinstance(model[3], nn.Identity)
    torch.testing.assert_close(model(x), skipped(x))
    # a really smaller model: two of the three residual blocks' parameters are gone
    block = sum(p.numel() for p in skipped[1].parameters())
    after = report(model, x, runs=0)
    assert after.state == "compacted" and after.params == before - 2 * block
    assert model.slimtorch_compaction == {"params_before": before, "params_after": before - 2 * block,
                                          "dropped_blocks": ["2", "3"]}
    # a later channel compaction keeps the record of the dropped blocks and the first parameter count
    import slimtorch

    masks = compute_masks(model, [{"op_names": ["0"], "sparse_ratio": 0.5}], criterion="l1", example_inputs=x)
    slimtorch.compact_(model, masks, example_inputs=x)
    record = model.slimtorch_compaction
    assert record["dropped_blocks"] == ["2", "3"] and record["params_before"] == before
    assert record["params_after"] == sum(p.numel() for p in model.parameters()) < before - 2 * block


def test_block_drop_loss_and_errors():
    model = _resnet()
    x = torch.randn(16, 4)
    ref = model(x).detach()
    losses = block_drop_loss(model, ["1", "2"], torch.no_grad()(lambda m: -float((m(x) - ref).pow(2).mean())))
    assert 0 <= losses["2"] < losses["1"]
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ConfigError, match="block '0' maps \\(16, 4\\) to \\(16, 8\\)"):
        block_influence(model, ["0"], [x])
    with pytest.raises(NoMatchError, match="block '7'"):
        drop_blocks_(model, ["7"])
    with pytest.raises(ConfigError, match="overlap"):
        drop_blocks_(model, ["1", "1.fc"])
    assert isinstance(model[1], _Residual)


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def test_slimming_penalty_and_its_subgradient():
    net = _bn_net()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    assert bn_l1_penalty(net, 0.1).item() == pytest.approx(0.35)
    net[1].weight.grad = torch.zeros(4)
    SlimmingRegularizer(net, 0.1).after_backward(None)
    assert net[1].weight.grad.tolist() == pytest.approx([0.1, -0.1, 0.1, 0.0])
    with pytest.raises(ConfigError, match="needs BatchNorm"):
        bn_l1_penalty(nn.Linear(2, 2), 0.1)


def test_slimming_training_shrinks_scales_then_bn_scale_prunes_them():
    net = _bn_net()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 6, 6, generator=gen), torch.randint(0, 2, (8,), generator=gen)) for _ in range(4)]
    before = net[1].weight.detach().abs().sum()
    evaluator = Evaluator(train_data=data, optimizer="sgd", lr=0.05)
    evaluator.train_(net, epochs=3, callbacks=[SlimmingRegularizer(net, 1.0)])
    assert net[1].weight.detach().abs().sum() < before
    masks = compute_masks(net, [{"op_types": ["BatchNorm2d"], "total_sparsity": 0.5}], criterion="bn_scale")
    smallest = net[1].weight.detach().abs().argsort()[:2]
    assert not masks["1.weight"][smallest].any() and int(masks["1.bias"].sum()) == 2


def test_bn_scale_masks_reach_the_conv_and_compact():
    import slimtorch
    from slimtorch.masks import apply_masks_

    net = _bn_net().eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, -0.01, 2.0, 0.02]))
    x = torch.randn(3, 1, 6, 6)
    masks = compute_masks(net, [{"op_types": ["BatchNorm2d"], "sparse_ratio": 0.5}], criterion="bn_scale",
                          example_inputs=x)
    # channels 1 and 3 (smallest |gamma|) go from the conv that makes them and the Linear that reads them
    assert masks["0.weight"].flatten(1).all(dim=1).tolist() == [True, False, True, False]
    assert masks["4.weight"].reshape(2, 4, 16).all(dim=(0, 2)).tolist() == [True, False, True, False]
    masked = copy.deepcopy(net)
    apply_masks_(masked, masks)
    slimtorch.compact_(net, masks, example_inputs=x)
    assert (net[0].out_channels, net[1].num_features, net[4].in_features) == (2, 2, 32)
    torch.testing.assert_close(net(x), masked(x))


def test_drop_connect_drops_weights_not_outputs():
    gen = torch.Generator().manual_seed(0)
    w = torch.ones(200, 50)
    dropped = drop_connect(w, 0.3, generator=gen)
    assert abs((dropped == 0).float().mean().item() - 0.3) < 0.02
    assert torch.allclose(dropped[dropped != 0], torch.full_like(dropped[dropped != 0], 1 / 0.7))
    assert drop_connect(w, 0.3, training=False) is w
    # Dropout zeroes whole outputs; DropConnect leaves each output a sum over the surviving weights.
    layer = DropConnectLinear(50, 200, bias=False, p=0.3)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    out = layer(torch.ones(1, 50))
    assert (out != 0).all() and out.std() > 0
    assert (F.dropout(torch.ones(1, 200), 0.3) == 0).any()


def test_add_dropconnect_keeps_parameters_and_keys():
    model = _mlp()
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    add_dropconnect_(model, 0.2)
    assert isinstance(model[0], DropConnectLinear) and model[2].p == 0.2
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    x = torch.randn(3, 6)
    assert torch.equal(model.eval()(x), model.eval()(x))
    with pytest.raises(ConfigError, match="p must be in \\[0, 1\\)"):
        add_dropconnect_(model, 1.0)


@pytest.mark.slow
def test_seed_finding_on_mnist_convolutions_are_more_sensitive(data_dir):
    # The set-up of benchmarks/sensitivity.py (whose full table is in docs/pruning.md), at fewer sparsities.
    from slimtorch.data import load_mnist
    from slimtorch.models import MnistNet

    data = load_mnist(data_dir, limit=30000)
    train = [(data.x_train[i : i + 128], data.y_train[i : i + 128]) for i in range(0, 30000, 128)]
    test = [(data.x_test[i : i + 500], data.y_test[i : i + 500]) for i in range(0, 2000, 500)]
    model = MnistNet()
    evaluator = Evaluator(train_data=train, eval_data=test, lr=1e-3)
    evaluator.train_(model, epochs=1)
    sparsities = (0.9, 0.95, 0.98)
    result = sensitivity_analysis(model, evaluator.evaluate, sparsities=sparsities)
    drop = {layer: sum(result.drop(layer, s) for s in sparsities) / 3 for layer in result.layers}
    # The seeds' finding (AlexNet): convolutions are more sensitive than fully-connected layers, the first most.
    assert drop["conv1"] > drop["conv2"] > drop["fc2"] > drop["fc1"]
