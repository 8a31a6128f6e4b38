"""Saving and loading compacted models: safetensors + JSON, no pickle, typed errors on bad files."""

import json

import pytest
import torch

from nets import Residual, Tokens, randomize_
from slimtorch import apply_masks_, compact_, compute_masks
from slimtorch.compat.nni import L1NormPruner, ModelSpeedup
from slimtorch.errors import CheckpointError
from slimtorch.io import load_compacted_, save_compacted
from slimtorch.models import BookCNN, MnistNet

IMAGE = torch.randn(2, 3, 8, 8)


def _compacted(make, x, op_types, last):
    model = make().eval()
    randomize_(model)
    masks = compute_masks(model, [{"op_types": op_types, "sparse_ratio": 0.5}, {"exclude": True, "op_names": [last]}],
                          example_inputs=x)
    compact_(model, masks, example_inputs=x)
    return model


@pytest.mark.parametrize("make, op_types, last", [(Residual, ["Conv2d"], "fc"), (Tokens, ["Conv2d", "Linear"], "head")])
def test_round_trip_gives_the_same_outputs(make, op_types, last, tmp_path):
    model = _compacted(make, IMAGE, op_types, last)
    save_compacted(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "compaction.json"}
    fresh = make().eval()
    load_compacted_(fresh, tmp_path)
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(fresh(IMAGE), model(IMAGE), rtol=0, atol=0)
    assert fresh.slimtorch_compaction["params_after"] == model.slimtorch_compaction["params_after"]


def test_round_trip_replays_the_rewritten_view(tmp_path):
    model = MnistNet().eval()
    pruner = L1NormPruner(model, [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5}])
    _, masks = pruner.compress()
    pruner._unwrap_model()
    x = torch.randn(2, 1, 28, 28)
    ModelSpeedup(model, x, masks).speedup_model()
    save_compacted(model, tmp_path)
    fresh = MnistNet().eval()
    load_compacted_(fresh, tmp_path)
    assert fresh.fc1.in_features == 4 * 4 * 25
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, state):
    assert not hasattr(model, "slimtorch_compaction")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.fixture
def saved(tmp_path):
    model = _compacted(Residual, IMAGE, ["Conv2d"], "fc")
    save_compacted(model, tmp_path)
    return tmp_path


def test_corrupt_weights_raise_and_leave_the_model_alone(saved):
    raw = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    fresh = Residual().eval()
    state = _state(fresh)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_compacted_(fresh, saved)
    _assert_untouched(fresh, state)
    assert fresh(IMAGE).shape == (2, 5)


def test_corrupt_or_foreign_description_raises(saved):
    path = saved / "compaction.json"
    good = path.read_text()
    path.write_text(good[:-20])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_compacted_(Residual(), saved)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="slimtorch-compacted-v1"):
        load_compacted_(Residual(), saved)
    description = json.loads(good)
    description["steps"][0]["modules"]["a.0"]["keeps"]["weight:out:0"] = [0, 1, 99]
    path.write_text(json.dumps(description))
    fresh = Residual().eval()
    state = _state(fresh)
    with pytest.raises(CheckpointError, match="does not match"):
        load_compacted_(fresh, saved)
    _assert_untouched(fresh, state)


def test_mismatched_model_raises(saved, tmp_path_factory):
    with pytest.raises(CheckpointError, match="saved from .*Residual"):
        load_compacted_(BookCNN(), saved)
    with pytest.raises(CheckpointError, match="no compacted model"):
        load_compacted_(Residual(), tmp_path_factory.mktemp("empty"))
    done = Residual().eval()
    load_compacted_(done, saved)
    with pytest.raises(CheckpointError, match="freshly built"):
        load_compacted_(done, saved)


def test_masked_models_are_not_saved_as_compacted(tmp_path):
    model = Residual()
    apply_masks_(model, {"fc.weight": torch.ones_like(model.fc.weight, dtype=torch.bool)})
    with pytest.raises(CheckpointError, match="carries pruning masks"):
        save_compacted(model, tmp_path)
    assert not any(tmp_path.iterdir())
