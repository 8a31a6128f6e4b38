import pytest
import torch

from slimtorch import is_masked
from slimtorch.compat.nni import FPGMPruner, L1NormPruner, L2NormPruner, LevelPruner
from slimtorch.errors import ConfigError, NoMatchError
from slimtorch.models import MnistNet

SEED_CONFIG = [{"sparsity_per_layer": 0.5, "op_types": ["Linear", "Conv2d"]}, {"exclude": True, "op_names": ["fc2"]}]


def _units_kept(mask: torch.Tensor) -> int:
    return int(mask.reshape(mask.shape[0], -1).any(dim=1).sum())


@pytest.mark.parametrize("pruner_cls", [L1NormPruner, L2NormPruner, FPGMPruner])
def test_seed_net_structured_pruners(pruner_cls):
    model = MnistNet()
    pruner = pruner_cls(model, SEED_CONFIG)
    returned, masks = pruner.compress()
    assert returned is model and is_masked(model)
    assert {k: _units_kept(m) for k, m in masks.items() if k.endswith("weight")} == {
        "conv1.weight": 10, "conv2.weight": 25, "fc1.weight": 250,
    }
    assert "fc2" not in masks and torch.equal(masks["conv1"]["weight"], masks["conv1.weight"])
    assert int(torch.count_nonzero(model.conv1.weight.reshape(20, -1).any(dim=1))) == 10
    pruner._unwrap_model()
    assert not is_masked(model)
    assert int(torch.count_nonzero(model.conv1.weight.reshape(20, -1).any(dim=1))) == 10
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_level_pruner_is_unstructured():
    model = MnistNet()
    _, masks = LevelPruner(model, [{"op_types": ["Linear"], "sparse_ratio": 0.8}]).compress()
    assert set(masks) == {"fc1.weight", "fc2.weight"}
    assert abs(1 - masks["fc1.weight"].float().mean().item() - 0.8) < 1e-3
    assert _units_kept(masks["fc1.weight"]) == 500  # whole rows survive


def test_book_style_snippet():
    model = MnistNet()
    config_list = [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.50}]
    pruner = L1NormPruner(model, config_list)
    _, masks = pruner.compress()
    pruner._unwrap_model()
    assert set(masks) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}


def test_bad_config_fails_at_construction_and_leaves_model_alone():
    model = MnistNet()
    with pytest.raises(NoMatchError, match="fc1"):
        L1NormPruner(model, [{"op_names": ["fc"], "sparse_ratio": 0.5}])
    with pytest.raises(ConfigError):
        L1NormPruner(model, [{"op_types": ["Linear"], "sparse_ratio": 1.5}])
    with pytest.raises(ValueError, match="dummy_input"):
        L1NormPruner(model, SEED_CONFIG, mode="dependency_aware")
    assert not is_masked(model)
