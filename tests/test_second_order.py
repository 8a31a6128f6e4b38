"""OBD and OBS: the statistics they read (the loss Hessian's diagonal, the layer-wise input Hessian), their
saliencies against the formulas, and OBS's update of the weights kept."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch import apply_masks_, collect_stats, compute_masks
from slimtorch.errors import ConfigError
from slimtorch.prune import StatsTracker, apply_obs_, get_criterion, obs_weights, plan_layers
from slimtorch.prune.second_order import DAMP
from slimtorch.prune.sparsegpt import damped_inverse, sparsegpt_solve
from slimtorch.prune.stats import layer_inputs


def _mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def test_hessian_diag_is_exact_where_the_hessian_is_diagonal():
    """Linear regression with orthogonal input columns: the Hessian of the MSE is diagonal, so one probe of
    Hutchinson's estimator gives it exactly: 2 / (n * out) * sum_n x_nj^2 for every weight of column j."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    x = torch.cat([torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.diag(torch.tensor([1.0, 0.0, 1.0, 0.0]))])
    batch = (x, torch.randn(8, 3))
    before = copy.deepcopy(net.state_dict())
    stats = collect_stats(net, [batch, batch], keys=("hessian_diag", "grad_sq"), loss_fn=_mse)
    expected = (2 / (8 * 3) * x.pow(2).sum(dim=0)).expand(3, 4)
    torch.testing.assert_close(stats["0"]["hessian_diag"], expected)
    grad = torch.autograd.grad(_mse(net, batch), net[0].weight)[0]
    torch.testing.assert_close(stats["0"]["grad_sq"], grad.pow(2))  # the second pass left the gradients alone
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()) and net[0].weight.grad is None


def test_hessian_diag_estimates_a_full_hessian_on_average():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 2))
    batch = (torch.randn(64, 5), torch.randn(64, 2))
    stats = collect_stats(net, [batch] * 400, keys=("hessian_diag",), loss_fn=_mse)
    x = batch[0]
    exact = (2 / (64 * 2) * x.pow(2).sum(dim=0)).expand(2, 5)
    torch.testing.assert_close(stats["0"]["hessian_diag"], exact, rtol=0.15, atol=0.0)


def test_hessian_diag_is_for_collect_stats_only():
    with pytest.raises(ConfigError, match="collect_stats"):
        StatsTracker(nn.Linear(2, 2), keys=("hessian_diag",))
    with pytest.raises(ConfigError, match="loss_fn"):
        collect_stats(nn.Sequential(nn.Linear(2, 2)), [torch.randn(2, 2)], keys=("hessian_diag",))


def test_obd_prunes_the_smallest_curvature_times_weight_squared():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    batches = [(torch.randn(32, 6), torch.randn(32, 3)) for _ in range(4)]
    cfg = [{"op_names": ["0"], "sparse_ratio": 0.5}]
    stats = collect_stats(net, batches, keys=get_criterion("obd").needs, loss_fn=_mse, config_list=cfg)
    mask = compute_masks(net, cfg, criterion="obd", stats=stats)["0.weight"]
    saliency = 0.5 * stats["0"]["hessian_diag"].abs() * net[0].weight.detach().pow(2)
    assert int(mask.sum()) == 24
    assert float(saliency[mask].min()) >= float(saliency[~mask].max())


def test_input_hessian_of_a_linear_and_of_convolutions():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 3))
    x = torch.randn(8, 4, 5, 5)
    stats = collect_stats(net, [x[:4], x[4:]], keys=("input_hessian",))
    flat = net[:3](x).detach()
    torch.testing.assert_close(stats["3"]["input_hessian"][0], 2 * flat.T @ flat / 8)
    rows = layer_inputs(net[0], x)  # (groups, rows, fan_in): rows @ filters is the convolution
    assert stats["0"]["input_hessian"].shape == (2, 18, 18)
    torch.testing.assert_close(stats["0"]["input_hessian"], 2 * rows.transpose(1, 2) @ rows / rows.shape[1])
    out = net[0](x).movedim(1, -1).reshape(-1, 6)  # (rows, out)
    filters = net[0].weight.reshape(2, 3, 18)  # (groups, out/groups, fan_in)
    torch.testing.assert_close(torch.cat([rows[g] @ filters[g].T for g in range(2)], dim=1) + net[0].bias, out)


def _linear_with_hessian(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 4))
    x = torch.randn(128, 6) @ torch.randn(6, 6)  # correlated inputs: H far from diagonal
    return net, x, collect_stats(net, [x], keys=("input_hessian",))


def test_obs_single_weight_saliency_is_w2_over_2_hinv():
    net, _, stats = _linear_with_hessian()
    cfg = [{"op_names": ["0"], "sparse_ratio": 0.5}]
    masks = compute_masks(net, cfg, criterion="obs", stats=stats)
    hinv = damped_inverse(stats["0"]["input_hessian"][0], DAMP)
    saliency = net[0].weight.detach().double().pow(2) / (2 * hinv.diagonal())
    assert float(saliency[masks["0.weight"]].min()) >= float(saliency[~masks["0.weight"]].max())


def test_obs_of_a_whole_row_and_of_a_kernel():
    """A whole output row: nothing in it is left to compensate, the cost is 1/2 w^T H w; a kernel of a conv
    filter: 1/2 w_S^T ([H^-1]_SS)^-1 w_S."""
    net, _, stats = _linear_with_hessian()
    h = stats["0"]["input_hessian"][0].double()
    w = net[0].weight.detach().double()
    (plan,) = plan_layers(net, [{"op_names": ["0"], "sparse_ratio": 0.5, "granularity": "out_channel"}], "obs",
                          stats=stats)
    torch.testing.assert_close(plan.scores, 0.5 * torch.einsum("ri,ij,rj->r", w, h, w))
    torch.manual_seed(1)
    conv = nn.Sequential(nn.Conv2d(2, 3, 2))
    cstats = collect_stats(conv, [torch.randn(16, 2, 5, 5)], keys=("input_hessian",))
    (plan,) = plan_layers(conv, [{"op_names": ["0"], "sparse_ratio": 0.5, "granularity": "kernel"}], "obs",
                          stats=cstats)
    hinv = damped_inverse(cstats["0"]["input_hessian"][0], DAMP)
    weight = conv[0].weight.detach().double().reshape(3, 8)
    expected = []
    for row in range(3):
        for channel in range(2):
            cols = torch.arange(channel * 4, channel * 4 + 4)
            ws = weight[row, cols]
            expected.append(0.5 * ws @ torch.linalg.inv(hinv[cols][:, cols]) @ ws)
    torch.testing.assert_close(plan.scores, torch.stack(expected))


def test_obs_update_makes_up_for_the_pruned_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    # smooth images (neighbouring pixels correlated): what the kept weights can make up for
    x = F.interpolate(torch.randn(64, 4, 3, 3), size=(6, 6), mode="bilinear", align_corners=True)
    cfg = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5}]
    stats = collect_stats(net, [x], keys=("input_hessian",), config_list=cfg)
    masks = compute_masks(net, cfg, criterion="obs", stats=stats)
    dense = {n: net.get_submodule(n)(i).detach() for n, i in (("0", x), ("3", net[:3](x).detach()))}
    inputs = {"0": x, "3": net[:3](x).detach()}
    masked = copy.deepcopy(net)
    apply_masks_(masked, masks)
    before = copy.deepcopy(net.state_dict())
    new = obs_weights(net, masks, stats)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # pure
    apply_obs_(net, masks, stats)
    for name in ("0", "3"):
        weight = net.get_submodule(name).weight.detach()
        torch.testing.assert_close(weight, new[f"{name}.weight"] * masks[f"{name}.weight"])
        assert bool((weight[~masks[f"{name}.weight"]] == 0).all())
        with torch.no_grad():
            err_obs = (net.get_submodule(name)(inputs[name]) - dense[name]).pow(2).mean()
            err_masked = (masked.get_submodule(name)(inputs[name]) - dense[name]).pow(2).mean()
        assert float(err_obs) < 0.7 * float(err_masked), name


def test_obs_needs_its_statistic_and_a_fitting_layer():
    net, _, stats = _linear_with_hessian()
    cfg = [{"op_names": ["0"], "sparse_ratio": 0.5}]
    with pytest.raises(ConfigError, match="input_hessian"):
        compute_masks(net, cfg, criterion="obs")
    masks = compute_masks(net, cfg, criterion="obs", stats=stats)
    with pytest.raises(ConfigError, match="needs its 'input_hessian'"):
        apply_obs_(net, masks, {})
    other, _, _ = _linear_with_hessian()
    wrong = {"0": {"input_hessian": torch.eye(5)[None]}}
    with pytest.raises(ConfigError, match="collect the statistics on this model again"):
        compute_masks(other, cfg, criterion="obs", stats=wrong)


def test_sparsegpt_with_a_given_mask_keeps_exactly_it():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    x = torch.randn(256, 4) @ torch.randn(4, 16) + 0.1 * torch.randn(256, 16)  # inputs of low rank
    keep = torch.rand(6, 16) > 0.5
    new, kept = sparsegpt_solve(w, 2 * x.T @ x / 256, keep=keep, block_size=8)
    assert torch.equal(kept, keep) and bool((new[~keep] == 0).all())
    err = ((new - w) @ x.T).pow(2).mean()
    assert float(err) < 0.7 * float(((w * keep - w) @ x.T).pow(2).mean())
    with pytest.raises(ConfigError, match="keep must be"):
        sparsegpt_solve(w, 2 * x.T @ x / 256, keep=keep[:, :8])


def test_obd_fisher_scores_half_the_mean_squared_gradient_times_weight_squared():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    batches = [(torch.randn(32, 6), torch.randn(32, 3)) for _ in range(4)]
    cfg = [{"op_names": ["0"], "sparse_ratio": 0.5}]
    assert get_criterion("obd_fisher").needs == ("grad_sq",)
    stats = collect_stats(net, batches, keys=("grad_sq",), loss_fn=_mse, config_list=cfg)
    mask = compute_masks(net, cfg, criterion="obd_fisher", stats=stats)["0.weight"]
    grads = [torch.autograd.grad(_mse(net, b), net[0].weight)[0] for b in batches]
    fisher = torch.stack(grads).pow(2).mean(dim=0)  # the mean squared gradient per batch
    saliency = 0.5 * fisher * net[0].weight.detach().pow(2)
    assert int(mask.sum()) == 24
    assert float(saliency[mask].min()) >= float(saliency[~mask].max())
