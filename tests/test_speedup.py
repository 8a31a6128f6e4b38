"""NNI's ModelSpeedup on the seed models: the figures of the quick start and of the book chapter."""

import copy

import pytest
import torch
from torch import nn

from slimtorch.compat.nni import L1NormPruner, ModelSpeedup
from slimtorch.errors import ConfigError
from slimtorch.io import save_masks
from slimtorch.models import BookCNN, MnistNet

SEED_CONFIG = [{"sparsity_per_layer": 0.5, "op_types": ["Linear", "Conv2d"]}, {"exclude": True, "op_names": ["fc2"]}]


def _pruned(model, config):
    pruner = L1NormPruner(model, config)
    _, masks = pruner.compress()
    pruner._unwrap_model()
    return masks


def _shapes(model):
    return {n: (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
            for n, m in model.named_children()}


def test_seed_mnist_net_runs_after_speedup_and_computes_the_same():
    model = MnistNet().eval()
    masks = _pruned(model, SEED_CONFIG)
    masked, x = copy.deepcopy(model), torch.randn(3, 1, 28, 28)
    returned = ModelSpeedup(model, x, masks).speedup_model()
    assert returned is model
    assert _shapes(model) == {"conv1": (1, 10), "conv2": (10, 25), "fc1": (400, 250), "fc2": (250, 10)}
    torch.testing.assert_close(model(x), masked(x))  # x.view(-1, 4*4*50) was rewritten to 4*4*25
    assert model.slimtorch_compaction["rewritten_calls"] == 1


def test_book_cnn_half_filters_gives_the_chapters_parameter_count():
    model = BookCNN().eval()
    masks = _pruned(model, [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}])
    masked, x = copy.deepcopy(model), torch.randn(2, 3, 32, 32)
    ModelSpeedup(model, x, masks).speedup_model()
    assert sum(p.numel() for p in model.parameters()) == 1_059_306
    assert model.layer2[0].out_channels == 32 and model.fc1.in_features == 32 * 8 * 8
    torch.testing.assert_close(model(x), masked(x))


@pytest.mark.parametrize("form", ["module_keys", "name_keys", "file"])
def test_nested_and_file_masks(form, tmp_path):
    model = MnistNet().eval()
    flat = dict(_pruned(model, SEED_CONFIG))
    nested: dict = {}
    for key, mask in flat.items():
        owner, _, param = key.rpartition(".")
        nested.setdefault(model.get_submodule(owner) if form == "module_keys" else owner, {})[param] = mask
    if form == "file":
        save_masks(flat, tmp_path / "m.safetensors")
        nested = tmp_path / "m.safetensors"
    ModelSpeedup(model, torch.randn(2, 1, 28, 28), nested).speedup_model()
    assert _shapes(model)["fc1"] == (400, 250)


def test_foreign_module_key_is_refused():
    model = MnistNet()
    with pytest.raises(ConfigError, match="not part of the model"):
        foreign = {nn.Linear(2, 2): {"weight": torch.ones(2, 2, dtype=torch.bool)}}
        ModelSpeedup(model, torch.randn(1, 1, 28, 28), foreign)
