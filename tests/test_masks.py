import copy

import pytest
import torch
from torch import nn

from slimtorch import apply_masks_, get_masks, is_masked, load_masks, remove_masks_, save_masks
from slimtorch.errors import CheckpointError, ConfigError, NoMatchError
from slimtorch.models import MnistNet


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _masks(net: nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "0.weight": torch.rand(5, 6, generator=gen) > 0.5,
        "0.bias": torch.tensor([True, False, True, True, False]),
        "2.weight": torch.rand(3, 5, generator=gen) > 0.3,
    }


def _pruned_are_zero(net: nn.Module, masks: dict[str, torch.Tensor]) -> bool:
    params = dict(net.named_parameters())
    return all(bool((params[k].detach()[~m] == 0).all()) for k, m in masks.items())


def test_apply_zeroes_and_keeps_parameter_objects():
    net = _net()
    params_before = list(net.parameters())
    masks = _masks(net)
    apply_masks_(net, masks)
    assert list(net.parameters()) == params_before  # same objects: existing optimizers keep working
    assert _pruned_are_zero(net, masks) and is_masked(net)
    assert all(torch.equal(get_masks(net)[k], m) for k, m in masks.items())
    assert [k for k in net.state_dict() if k.endswith("_mask")] == ["0.weight_mask", "0.bias_mask", "2.weight_mask"]


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_training_keeps_pruned_weights_zero(opt_cls):
    net = _net()
    masks = _masks(net)
    extra = {"momentum": 0.9} if opt_cls is torch.optim.SGD else {}
    opt = opt_cls(net.parameters(), lr=0.1, weight_decay=0.1, **extra)
    apply_masks_(net, masks)
    for _ in range(5):
        opt.zero_grad()
        net(torch.randn(8, 6)).pow(2).sum().backward()
        assert all(bool((dict(net.named_parameters())[k].grad[~m] == 0).all()) for k, m in masks.items())
        opt.step()
        assert _pruned_are_zero(net, masks)  # zero straight after the step, not only at the next forward


def test_deepcopy_is_masked_independently_and_trains_masked():
    net = _net()
    masks = _masks(net)
    apply_masks_(net, masks)
    twin = copy.deepcopy(net)
    assert is_masked(twin)
    opt = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        twin(torch.randn(4, 6)).sum().backward()
        opt.step()
    assert _pruned_are_zero(twin, masks)
    remove_masks_(twin)
    assert is_masked(net) and not is_masked(twin)


def test_state_dict_round_trip_restores_masks():
    net = _net()
    masks = _masks(net)
    apply_masks_(net, masks)
    state = net.state_dict()
    other = _net()
    apply_masks_(other, {k: torch.ones_like(m) for k, m in masks.items()})
    other.load_state_dict(state)
    x = torch.randn(4, 6)
    torch.testing.assert_close(other(x), net(x))
    assert all(torch.equal(get_masks(other)[k], m) for k, m in masks.items())
    # The saved weights are already zero where pruned, so a plain model computes the same function.
    plain = _net()
    plain.load_state_dict({k: v for k, v in state.items() if not k.endswith("_mask")})
    torch.testing.assert_close(plain(x), net(x))


def test_remove_bakes_zeros_and_clears_everything():
    net = _net()
    masks = _masks(net)
    apply_masks_(net, masks)
    remove_masks_(net)
    assert not is_masked(net) and _pruned_are_zero(net, masks)
    assert not any(k.endswith("_mask") for k in net.state_dict())
    assert all(not m._forward_pre_hooks and not m._state_dict_pre_hooks for m in net.modules())
    net(torch.randn(2, 6)).sum().backward()
    assert bool((net[0].weight.grad[~masks["0.weight"]] != 0).any())  # no gradient masking left


def test_reapply_replaces_masks_of_named_params_only():
    net = _net()
    masks = _masks(net)
    apply_masks_(net, masks)
    new = torch.zeros(5, 6, dtype=torch.bool)
    new[0] = True
    apply_masks_(net, {"0.weight": new})
    current = get_masks(net)
    assert torch.equal(current["0.weight"], new) and torch.equal(current["2.weight"], masks["2.weight"])
    assert int(torch.count_nonzero(net[0].weight)) <= 6


def test_float_masks_are_accepted():
    net = _net()
    apply_masks_(net, {"0.weight": torch.ones(5, 6).triu()})
    assert int(torch.count_nonzero(net[0].weight)) == int(torch.ones(5, 6).triu().sum())


@pytest.mark.parametrize(
    ("masks", "error", "fragment"),
    [
        ({"0.weigth": torch.ones(5, 6, dtype=torch.bool)}, NoMatchError, "0.weight"),
        ({"0.weight": torch.ones(6, 5, dtype=torch.bool)}, ConfigError, r"shape \(6, 5\)"),
        ({"0.weight": torch.full((5, 6), 0.5)}, ConfigError, "only 0 and 1"),
        ({"0.weight": [[1]]}, ConfigError, "must be a tensor"),
    ],
)
def test_bad_masks_are_rejected_before_any_change(masks, error, fragment):
    net = _net()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(error, match=fragment):
        apply_masks_(net, {"2.weight": torch.zeros(3, 5, dtype=torch.bool), **masks})
    assert not is_masked(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_save_and_load_masks(tmp_path):
    masks = _masks(_net())
    path = tmp_path / "masks.safetensors"
    save_masks(masks, path)
    loaded = load_masks(path)
    assert loaded.keys() == masks.keys() and all(torch.equal(loaded[k], masks[k]) for k in masks)


def test_corrupt_or_foreign_mask_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_masks(tmp_path / "none.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    save_masks(_masks(_net()), corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_masks(corrupt)
    from safetensors.torch import save_file

    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.randn(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a mask file"):
        load_masks(foreign)


def test_masked_seed_net_trains_and_stays_sparse():
    from slimtorch import compute_masks

    model = MnistNet()
    masks = compute_masks(model, [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.7, "granularity": "fine"}],
                          criterion="magnitude")
    apply_masks_(model, masks)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.nll_loss(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    assert _pruned_are_zero(model, masks)
