import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimtorch import apply_masks_, compute_masks
from slimtorch.data.sources import load_dataset
from slimtorch.errors import CheckpointError, ConfigError
from slimtorch.models.modelfile import load_model, save_model
from slimtorch.models.registry import ModelSpec, build_model, model_names
from slimtorch.recipes.schema import Recipe, Step
from slimtorch.recover import TrainConfig, evaluate_accuracy, fit
from slimtorch.recover.batches import augment, batch_indices
from slimtorch.recover.distributed import DistInfo
from slimtorch.recover.guards import Start


def test_fit_is_deterministic_and_keeps_masks():
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    config = TrainConfig(epochs=2, batch_size=16, lr=0.01, augment="flip-crop")
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        net = build_model(ModelSpec(name="DigitsCNN", kwargs={"width": 4}))
        apply_masks_(net, compute_masks(net, [{"op_names": ["down.0"], "sparse_ratio": 0.5}]))
        fit(net, data, config)
        nets.append(net)
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    weight = nets[0].down[0].weight
    assert int((weight.abs().sum(dim=(1, 2, 3)) == 0).sum()) == 4  # pruned filters stayed zero through training


def test_batches_split_across_processes_cover_each_global_batch():
    config = TrainConfig(epochs=1, batch_size=8)
    whole = batch_indices(20, config, 0, DistInfo(0, 1))
    halves = [batch_indices(20, config, 0, DistInfo(r, 2)) for r in range(2)]
    for step, batch in enumerate(whole[:2]):
        assert torch.equal(torch.cat([halves[0][step], halves[1][step]]), batch)
    assert [len(b) for b in whole] == [8, 8, 4] and len(halves[0]) == 3
    assert not torch.equal(whole[0], batch_indices(20, config, 1, DistInfo(0, 1))[0])  # reshuffled per epoch


def test_augment_keeps_shapes_and_content():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    flipped = augment(x, "flip")
    for original, out in zip(x, flipped, strict=True):
        assert torch.equal(out, original) or torch.equal(out, original.flip(-1))
    assert augment(x, "flip-crop").shape == x.shape
    assert augment(x, "none") is x


def test_train_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        TrainConfig(epochs=1, optimizer="lamb")
    with pytest.raises(ConfigError, match=r"unknown training key\(s\) \['lrate'\]"):
        TrainConfig.from_dict({"epochs": 1, "lrate": 0.1})
    assert TrainConfig.from_dict(TrainConfig(epochs=3, lr=0.5).to_dict()) == TrainConfig(epochs=3, lr=0.5)
    with pytest.raises(ConfigError, match="empty"):
        fit(nn.Linear(2, 2), TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), TrainConfig(epochs=1))


def test_model_files_round_trip_and_refuse_foreign_files(tmp_path):
    spec = ModelSpec(name="bookcnn")  # names are case-insensitive
    assert spec.name == "BookCNN" and spec.input_shape == (3, 32, 32)
    net = build_model(spec)
    save_model(tmp_path / "dense.safetensors", net, spec)
    loaded = load_model(tmp_path / "dense.safetensors")
    assert loaded.state == "dense" and torch.equal(loaded.model.fc2.weight, net.fc2.weight)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a slimtorch model file"):
        load_model(tmp_path / "foreign.safetensors")
    with pytest.raises(ConfigError, match="closest real names"):
        ModelSpec.parse("BookCN")
    assert ModelSpec.parse("resnet18").source == "torchvision"
    assert "torchvision:resnet18" in model_names() and "MnistNet" in model_names()
    assert type(build_model(ModelSpec.parse("torchvision:resnet18"))).__name__ == "ResNet"


def test_datasets_by_name():
    digits = load_dataset("digits", limit=10)
    assert len(digits.y_train) == 10 and len(digits.y_test) == 10
    with pytest.raises(ConfigError, match="closest"):
        load_dataset("cifar100")
    with pytest.raises(ConfigError, match="not a folder"):
        load_dataset("mnist", data_dir="/nonexistent/folder")


def test_mnist_from_local_files(data_dir):
    split = load_dataset("mnist", data_dir=data_dir, limit=32)
    net = build_model(ModelSpec(name="MnistNet"))
    assert 0.0 <= evaluate_accuracy(net, TensorDataset(split.x_test, split.y_test)) <= 1.0
    assert tuple(split.x_train.shape) == (32, 1, 28, 28)


def test_recipe_round_trips_and_rejects_bad_steps():
    recipe = Recipe.from_dict({"model": "DigitsCNN", "steps": [
        {"train": {"epochs": 1}}, {"prune": {"config_list": [{"op_types": ["Conv2d"], "sparse_ratio": 0.3}]}},
        {"compact": {}}, {"distill": {"epochs": 1, "alpha": 0.5, "teacher": "dense"}}]})
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ConfigError, match="sparse_ratio"):
        Step.from_dict({"prune": {"config_list": [{"op_types": ["Conv2d"], "sparse_ratio": 2}]}})
    with pytest.raises(ConfigError, match="needs a config_list"):
        Step.from_dict({"prune": {}})
    prune = {"prune": {"config_list": [{"op_types": ["Conv2d"], "sparse_ratio": 0.3}]}}
    iterative = Recipe.from_dict({"model": "DigitsCNN", "steps": [prune, {"compact": {}}, prune, {"compact": {}}]})
    assert [s.kind for s in iterative.steps] == ["prune", "compact", "prune", "compact"]
    with pytest.raises(ConfigError, match="at least one step"):
        Recipe.from_dict({"model": "DigitsCNN", "steps": []})


def test_recipe_compact_step_keeps_what_the_masked_model_computes(tmp_path):
    from slimtorch.recipes.runner import run_recipe

    prune = {"config_list": [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}, {"op_names": ["stem.0"], "exclude": True}]}
    recipe = Recipe.from_dict({"model": "DigitsCNN", "model_kwargs": {"width": 8},
                               "data": {"dataset": "digits", "limit": 256},
                               "steps": [{"train": {"epochs": 1}}, {"prune": prune}, {"compact": {}}]})
    result = run_recipe(recipe, tmp_path, quiet=True)
    masked, compacted = result.stages[-2], result.stages[-1]
    assert (masked.state, compacted.state) == ("masked", "compacted")
    assert compacted.params == masked.nonzero_params < 0.4 * masked.params  # the zeros are gone, nothing else
    assert compacted.flops < 0.4 * masked.flops and compacted.accuracy == masked.accuracy
    assert result.model.down[0].out_channels == 8 and result.model.block[0].out_channels == 4


def test_compacted_model_file_replays_its_shapes(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from slimtorch import compact_

    spec = ModelSpec(name="MnistNet")  # its hard-coded view(-1, 800) needs a rewritten call after compaction
    net = build_model(spec).eval()
    x = torch.randn(3, 1, 28, 28)
    masks = compute_masks(net, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], example_inputs=x)
    compact_(net, masks, example_inputs=x)
    save_model(tmp_path / "c.safetensors", net, spec)
    loaded = load_model(tmp_path / "c.safetensors")
    # whole filters were pruned: nothing is left masked inside the filters that stay, and no mask is stored
    assert loaded.state == "compacted" and loaded.model.conv2.out_channels == 25 and loaded.masks == {}
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), net(x))
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata={**header, "compaction": "{}"})
    with pytest.raises(CheckpointError, match="compaction record"):
        load_model(tmp_path / "broken.safetensors")


def test_the_start_of_training_copies_only_what_training_can_change():
    """fit keeps a copy of the trained tensors to put back on a failure: frozen parameters (a LoRA's base
    weights) are left out, buffers and trainable parameters are copied and restored."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    net[0].weight.requires_grad_(False)
    start = Start({"model": net})
    assert sorted(start.states["model"]) == ["0.bias", "1.bias", "1.num_batches_tracked", "1.running_mean",
                                             "1.running_var", "1.weight"]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for t in net.state_dict(keep_vars=True).values():
            if t.dtype.is_floating_point and t.requires_grad:
                t.add_(1.0)
        net[1].running_mean.add_(1.0)
    start.restore()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
