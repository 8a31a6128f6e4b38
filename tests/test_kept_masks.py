"""A compacted model keeps the masks that still prune something (compacted size): training keeps those
weights at zero, the masks are saved and reloaded with the model, and pruning can start again after
compaction (prune, compact, prune, compact) through the API, the files and the command line."""

import json
import warnings

import torch
from safetensors import safe_open
from torch import nn

from nets import Residual, randomize_
from slimtorch import apply_masks_, compact_, compute_masks, get_masks, is_masked, remove_masks_
from slimtorch.cli.main import main
from slimtorch.io import load_compacted_, save_compacted
from slimtorch.models.modelfile import load_model, save_model
from slimtorch.models.registry import ModelSpec, build_model
from slimtorch.report import model_state, saved_size

IMAGE = torch.randn(4, 3, 8, 8)


def _fine_and_channel_masks(net: nn.Sequential) -> dict[str, torch.Tensor]:
    """Layer 0 loses 4 of its 16 outputs whole and half of the remaining weights one by one."""
    g = torch.Generator().manual_seed(0)
    weight = torch.rand(16, 8, generator=g) > 0.5
    weight[:4] = False
    return {"0.weight": weight, "0.bias": torch.arange(16) >= 4}


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _quiet_compact(model, masks, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compact_(model, masks, example_inputs=x)


def test_training_after_compaction_keeps_fine_zeros():
    net, x = _mlp(), torch.randn(5, 8)
    masks = _fine_and_channel_masks(net)
    _quiet_compact(net, masks, x)
    zeros = int((net[0].weight == 0).sum())
    assert net[0].out_features == 12 and zeros == int((~masks["0.weight"][4:]).sum()) > 0
    assert model_state(net) == "compacted" and is_masked(net)
    assert torch.equal(get_masks(net)["0.weight"], masks["0.weight"][4:])  # the compacted-size mask
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
    assert int((net[0].weight == 0).sum()) == zeros
    remove_masks_(net)  # asking for regrowth: the zeros may now move
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.zero_grad()
    net(x).sum().backward()
    opt.step()
    assert int((net[0].weight == 0).sum()) < zeros


def test_whole_channels_leave_no_mask_behind():
    net = Residual().eval()
    masks = compute_masks(net, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}, {"op_names": ["fc"], "exclude": True}],
                          example_inputs=IMAGE)
    apply_masks_(net, masks)
    kept = {n for n, m in masks.items() if m.all()}
    _quiet_compact(net, masks, IMAGE)
    # what stays masked is only what compaction had to keep (channels a residual addition shares)
    for name, mask in get_masks(net).items():
        assert name not in kept and not bool(mask.all())
        assert tuple(mask.shape) == tuple(dict(net.named_parameters())[name].shape)


def test_kept_masks_round_trip_through_both_file_formats(tmp_path):
    spec = ModelSpec(name="DigitsCNN", kwargs={"width": 8})
    net, x = build_model(spec).eval(), torch.randn(4, 1, 8, 8)
    structured = compute_masks(net, [{"op_names": ["down.0"], "sparse_ratio": 0.5}], example_inputs=x)
    fine = compute_masks(net, [{"op_names": ["block.0"], "sparse_ratio": 0.5}], criterion="magnitude")
    masks = {**structured, **fine}
    apply_masks_(net, masks)
    _quiet_compact(net, masks, x)
    own = get_masks(net)
    assert own and all(tuple(m.shape) == tuple(dict(net.named_parameters())[n].shape) for n, m in own.items())
    save_model(tmp_path / "m.safetensors", net, spec)
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.state == "compacted" and set(loaded.masks) == set(own)
    assert all(torch.equal(loaded.masks[n], own[n]) for n in own) and is_masked(loaded.model)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert {k for k in stored if k.startswith("mask::")} == {f"mask::{n}" for n in own}
    assert not any(k.endswith("_mask") for k in stored)  # each mask once
    save_compacted(net, tmp_path / "folder")
    fresh = build_model(spec).eval()
    load_compacted_(fresh, tmp_path / "folder")
    assert set(get_masks(fresh)) == set(own) and model_state(fresh) == "compacted"
    with torch.no_grad():
        for model in (loaded.model.eval(), fresh):
            torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)


def test_cli_compact_stores_compacted_size_masks_only(tmp_path):
    assert main(["prune", "BookCNN", "--sparsity", "0.5", "--out", str(tmp_path / "p"), "--runs", "0"]) == 0
    assert main(["compact", str(tmp_path / "p" / "model.safetensors"), "--out", str(tmp_path / "c"),
                 "--runs", "0"]) == 0
    loaded = load_model(tmp_path / "c" / "model.safetensors")
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    size = (tmp_path / "c" / "model.safetensors").stat().st_size
    # whole filters pruned: no mask is kept, and the file is the reported size plus its JSON header
    assert loaded.masks == {} and report["compacted"]["size_bytes"] == saved_size(loaded.model)
    assert size < 1.01 * report["compacted"]["size_bytes"]


def _cli(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def test_iterative_prune_compact_on_the_command_line(tmp_path):
    _cli("prune", "BookCNN", "--sparsity", "0.5", "--out", tmp_path / "p1", "--runs", "0")
    _cli("compact", tmp_path / "p1" / "model.safetensors", "--out", tmp_path / "c1", "--runs", "0")
    _cli("prune", tmp_path / "c1" / "model.safetensors", "--sparsity", "0.5", "--out", tmp_path / "p2", "--runs", "0")
    masked = load_model(tmp_path / "p2" / "model.safetensors")
    assert masked.state == "compacted" and masked.masks and masked.model.layer1[0].out_channels == 16
    _cli("compact", tmp_path / "p2" / "model.safetensors", "--out", tmp_path / "c2", "--runs", "0")
    _cli("report", tmp_path / "c2" / "model.safetensors", "--runs", "0", "--format", "json")
    twice = load_model(tmp_path / "c2" / "model.safetensors")
    assert twice.state == "compacted" and twice.model.layer1[0].out_channels == 8
    assert len(twice.model.slimtorch_compaction["steps"]) == 2
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(twice.model.eval()(x), masked.model.eval()(x), rtol=1e-4, atol=1e-5)


def test_iterative_prune_compact_through_the_api_and_save_compacted(tmp_path):
    net = Residual().eval()
    randomize_(net)
    first = compute_masks(net, [{"op_types": ["Conv2d"], "sparse_ratio": 0.25}, {"op_names": ["fc"], "exclude": True}],
                          example_inputs=IMAGE)
    _quiet_compact(net, first, IMAGE)
    second = compute_masks(net, [{"op_types": ["Conv2d"], "sparse_ratio": 0.25},
                                 {"op_names": ["fc"], "exclude": True}], example_inputs=IMAGE)
    apply_masks_(net, second)
    with torch.no_grad():
        expected = net(IMAGE)
    _quiet_compact(net, second, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(net(IMAGE), expected)
    save_compacted(net, tmp_path)
    fresh = Residual().eval()
    load_compacted_(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IMAGE), expected)


def test_recipe_distillation_after_compaction_keeps_the_zeros(tmp_path):
    from slimtorch.recipes.runner import run_recipe
    from slimtorch.recipes.schema import Recipe

    fine = {"config_list": [{"op_names": ["block.0", "down.0"], "sparse_ratio": 0.5}], "criterion": "magnitude"}
    recipe = Recipe.from_dict({"model": "DigitsCNN", "model_kwargs": {"width": 8},
                               "data": {"dataset": "digits", "limit": 256},
                               "steps": [{"prune": fine}, {"compact": {}},
                                         {"distill": {"epochs": 1, "batch_size": 32, "lr": 0.01}}]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_recipe(recipe, tmp_path, quiet=True)
    compacted, distilled = result.stages[-2], result.stages[-1]
    assert distilled.state == compacted.state == "compacted" and distilled.params == compacted.params
    masks, params = get_masks(result.model), dict(result.model.named_parameters())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert set(masks) == {"block.0.weight", "down.0.weight"} and pruned > 500
    assert all(not bool(params[n][~m].any()) for n, m in masks.items())  # every pruned weight is still zero
    # (what grows elsewhere, zero-initialised BatchNorm offsets, was never pruned)
    assert sum(int((params[n] != 0).sum()) for n in masks) <= sum(int(m.sum()) for m in masks.values())


def test_recipe_prunes_and_compacts_twice(tmp_path):
    from slimtorch.recipes.runner import run_recipe
    from slimtorch.recipes.schema import Recipe

    prune = {"prune": {"config_list": [{"op_names": ["down.0"], "sparse_ratio": 0.5}]}}
    recipe = Recipe.from_dict({"model": "DigitsCNN", "model_kwargs": {"width": 8},
                               "data": {"dataset": "digits", "limit": 128},
                               "steps": [prune, {"compact": {}}, prune, {"compact": {}}]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_recipe(recipe, tmp_path, quiet=True)
    assert [s.state for s in result.stages] == ["dense", "masked", "compacted", "compacted", "compacted"]
    assert result.model.down[0].out_channels == 4  # 16 -> 8 -> 4
    assert result.stages[-1].params < result.stages[2].params < result.stages[0].params


def test_a_compacted_model_that_keeps_masks_exports(tmp_path):
    from slimtorch.export import export_onnx

    net, x = _mlp().eval(), torch.randn(5, 8)
    _quiet_compact(net, _fine_and_channel_masks(net), x)
    assert is_masked(net)
    check = export_onnx(net, x, tmp_path / "m.onnx")
    assert check.max_abs_diff < 1e-5 and is_masked(net)


def test_a_masked_model_exports_what_it_computes(tmp_path):
    from slimtorch.export import export_onnx

    net, x = _mlp().eval(), torch.randn(5, 8)
    apply_masks_(net, {"0.weight": _fine_and_channel_masks(net)["0.weight"]})
    with torch.no_grad():
        expected = net(x)
    check = export_onnx(net, x, tmp_path / "m.onnx")  # the masking hook must not write while torch.export traces
    assert check.max_abs_diff < 1e-5 and is_masked(net)
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
