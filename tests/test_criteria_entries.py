"""The seeds' criteria as they define them (weight, gradient and the hybrid of both, each by threshold), a
criterion per config-list entry, and quantization keys refused by a pruning config list."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch import collect_stats, compute_masks
from slimtorch.config import parse_config_list
from slimtorch.errors import ConfigError
from slimtorch.prune import Evaluator, GradualPruner, Schedule, criteria_needs
from slimtorch.prune.loop import cross_entropy_loss

SEEDS = Path(os.environ.get("SLIMTORCH_SEEDS_DIR", Path(__file__).resolve().parents[2] / "shared" / "seeds"))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(32, 10, generator=gen), torch.randint(0, 10, (32,), generator=gen)


def _with_grad(model: nn.Module, batch) -> nn.Module:
    """The seeds' functions read ``.grad``: one backward pass of the same loss collect_stats uses."""
    cross_entropy_loss(model, batch).backward()
    return model


def seed_function(name: str):
    """A pruning function of the seed article on pruning criteria (its code is unfenced text), as written."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(SEEDS.glob("*.txt"))]
    text = next((t for t in texts if f"def {name}(" in t), None)
    if text is None:
        pytest.skip(f"the seed defining {name} is not in {SEEDS} (set SLIMTORCH_SEEDS_DIR)")
    body = re.search(rf"^def {name}\(.*?(?=^\S)", text + "\nEND", re.S | re.M)[0]
    namespace = {"torch": torch, "nn": nn}
    exec(compile(body, f"<seed {name}>", "exec"), namespace)
    return namespace[name]


def _kept_by_seed(fn, model: nn.Module, *thresholds: float) -> dict[str, torch.Tensor]:
    """What the seed's function keeps: it zeroes ``model``'s weights in place (give it a copy)."""
    fn(model, *thresholds)
    return {f"{n}.weight": m.weight != 0 for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize(("weight_threshold", "gradient_threshold"), [(0.1, 0.01), (0.05, 0.0005)])
def test_hybrid_is_the_seeds_two_thresholds(weight_threshold, gradient_threshold):
    """The seed keeps a weight where |w| >= weight_threshold AND |grad| >= gradient_threshold (its example's
    thresholds first: on this net they leave a handful of weights)."""
    model, batch = _net(), _batch()
    expected = _kept_by_seed(seed_function("hybrid_pruning"), _with_grad(copy.deepcopy(model), batch),
                             weight_threshold, gradient_threshold)
    cfg = [{"op_types": ["Linear"], "criterion": "hybrid", "weight_threshold": weight_threshold,
            "gradient_threshold": gradient_threshold}]
    stats = collect_stats(model, [batch], keys=criteria_needs(cfg, "l1"), loss_fn=cross_entropy_loss)
    masks = compute_masks(model, cfg, stats=stats)
    assert set(masks) == set(expected)
    for name, mask in masks.items():
        assert torch.equal(mask, expected[name]), name
    pruned_share = 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert 0.0 < pruned_share < 1.0


def test_hybrid_thresholds_match_an_explicit_rule_without_the_seed():
    model, batch = _net(), _batch()
    grads = torch.autograd.grad(cross_entropy_loss(model, batch), [model[2].weight])[0]
    cfg = [{"op_names": ["2"], "criterion": "hybrid", "weight_threshold": 0.05, "gradient_threshold": 0.001}]
    stats = collect_stats(model, [batch], keys=("grad_sq",), loss_fn=cross_entropy_loss, config_list=cfg)
    mask = compute_masks(model, cfg, stats=stats)["2.weight"]
    assert torch.equal(mask, (model[2].weight.abs() >= 0.05) & (grads.abs() >= 0.001))
    free = [{**cfg[0], "gradient_threshold": 0}]  # a threshold of 0 leaves its quantity free
    assert torch.equal(compute_masks(model, free, stats=stats)["2.weight"], model[2].weight.abs() >= 0.05)


@pytest.mark.parametrize(("name", "criterion", "thresholds"), [
    ("weight_magnitude_pruning", "magnitude", 0.1), ("gradient_magnitude_pruning", "gradient", 0.01),
])
def test_single_threshold_criteria_are_the_seeds(name, criterion, thresholds):
    model, batch = _net(), _batch()
    expected = _kept_by_seed(seed_function(name), _with_grad(copy.deepcopy(model), batch), thresholds)
    cfg = [{"op_types": ["Linear"], "sparse_threshold": thresholds, "granularity": "fine"}]
    stats = collect_stats(model, [batch], keys=("grad_sq",), loss_fn=cross_entropy_loss)
    masks = compute_masks(model, cfg, criterion=criterion, stats=stats)
    for key, mask in masks.items():
        assert torch.equal(mask, expected[key]), key


@pytest.mark.parametrize(("entry", "match"), [
    ({"op_types": ["Linear"], "weight_threshold": 0.1}, "give both"),
    ({"op_types": ["Linear"], "weight_threshold": 0.1, "gradient_threshold": 0.01, "sparse_ratio": 0.5},
     "exactly one of"),
    ({"op_types": ["Linear"], "weight_threshold": -1, "gradient_threshold": 0.01}, "number >= 0"),
    ({"op_types": ["Linear"], "sparse_ratio": 0.5, "criterion": ""}, "criterion's name"),
])
def test_threshold_and_criterion_keys_are_checked(entry, match):
    with pytest.raises(ConfigError, match=match):
        parse_config_list([entry])


def test_hybrid_thresholds_need_the_hybrid_criterion():
    model, batch = _net(), _batch()
    cfg = [{"op_types": ["Linear"], "weight_threshold": 0.1, "gradient_threshold": 0.01}]
    stats = collect_stats(model, [batch], keys=("grad_sq",), loss_fn=cross_entropy_loss)
    with pytest.raises(ConfigError, match="'criterion': 'hybrid'"):
        compute_masks(model, cfg, criterion="magnitude", stats=stats)
    assert compute_masks(model, cfg, criterion="hybrid", stats=stats)  # the caller's criterion counts too
    with pytest.raises(ConfigError, match="gradual methods need"):
        GradualPruner(model, cfg, schedule=Schedule(kind="linear", end=2), criterion="hybrid")


def test_each_entry_scores_with_its_own_criterion():
    """The seed's example: weight magnitude for the fully-connected layers, gradient magnitude for the
    convolutions, in one config list."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    batch = (torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    convs = {"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "fine"}
    linears = {"op_types": ["Linear"], "sparse_ratio": 0.7}
    cfg = [{**convs, "criterion": "gradient"}, {**linears, "criterion": "magnitude"}]
    assert criteria_needs(cfg, "l1") == ("grad_sq",)
    stats = collect_stats(model, [batch], keys=criteria_needs(cfg, "l1"), loss_fn=cross_entropy_loss)
    masks = compute_masks(model, cfg, stats=stats)
    alone = {**compute_masks(model, [convs], criterion="gradient", stats=stats),
             **compute_masks(model, [linears], criterion="magnitude")}
    assert set(masks) == set(alone) and all(torch.equal(masks[k], alone[k]) for k in masks)
    assert parse_config_list(cfg)[0].to_dict()["criterion"] == "gradient"
    with pytest.raises(ConfigError, match="unknown criterion 'gradiant'"):
        compute_masks(model, [{**convs, "criterion": "gradiant"}], stats=stats)


def test_gradual_pruning_collects_what_every_entrys_criterion_needs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    data = [(torch.randn(8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]
    cfg = [{"op_names": ["0"], "sparse_ratio": 0.5, "criterion": "taylor"}, {"op_names": ["2"], "sparse_ratio": 0.5}]
    pruner = GradualPruner(model, cfg, schedule=Schedule(kind="linear", end=2), criterion="magnitude")
    assert pruner.needs == ("grad_sq",)
    pruner.run_(Evaluator(train_data=data, lr=1e-3), finetune_epochs=0)
    assert abs(float(pruner.masks["2.weight"].float().mean()) - 0.5) < 0.02
    assert int(pruner.masks["0.weight"].any(dim=1).sum()) == 8  # taylor's default: whole output channels


@pytest.mark.parametrize("key", ["quant_types", "quant_bits", "quant_dtype", "quant_scheme", "target_names"])
def test_quantization_keys_in_a_pruning_config_list_point_at_the_quantizers(key):
    """NNI accepts them in any config list and a pruner ignores them: here they are an error that says where
    they belong."""
    with pytest.raises(ConfigError, match=f"'{key}' is a quantization key.*QATQuantizer"):
        parse_config_list([{"op_types": ["Linear"], "sparse_ratio": 0.5, key: ["weight"]}])
    with pytest.raises(ConfigError, match="quantization key"):
        compute_masks(_net(), [{"op_types": ["Linear"], "sparse_ratio": 0.5, key: 8}])


def test_model_untouched_by_the_seeds_criteria():
    model, batch = _net(), _batch()
    before = copy.deepcopy(model.state_dict())
    cfg = [{"op_types": ["Linear"], "criterion": "hybrid", "weight_threshold": 0.1, "gradient_threshold": 0.01}]
    compute_masks(model, cfg, stats=collect_stats(model, [batch], keys=("grad_sq",), loss_fn=cross_entropy_loss))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
