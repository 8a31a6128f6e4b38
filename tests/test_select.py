import pytest
import torch
from torch import nn

from slimtorch import compute_masks
from slimtorch.errors import ConfigError, NoMatchError
from slimtorch.models import BookCNN, MnistNet
from slimtorch.select import select_modules


def test_types_names_and_exclusion():
    chosen = select_modules(
        MnistNet(),
        [{"sparsity_per_layer": 0.5, "op_types": ["Linear", "Conv2d"]}, {"exclude": True, "op_names": ["fc2"]}],
    )
    assert list(chosen) == ["conv1", "conv2", "fc1"]
    assert all(sel.target.sparse_ratio == 0.5 for sel in chosen.values())


def test_later_entries_override_earlier():
    chosen = select_modules(
        MnistNet(),
        [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}, {"op_names": ["conv2"], "sparse_ratio": 0.2}],
    )
    assert chosen["conv1"].target.sparse_ratio == 0.5
    assert chosen["conv2"].target.sparse_ratio == 0.2 and chosen["conv2"].entry == 1


def test_block_names_select_the_layers_inside():
    chosen = select_modules(BookCNN(), [{"op_types": ["Conv2d"], "exclude_op_names": ["layer2"], "sparse_ratio": 0.25}])
    assert list(chosen) == ["layer1.0"]
    chosen = select_modules(BookCNN(), [{"op_names": ["layer2"], "sparse_ratio": 0.25}])
    assert list(chosen) == ["layer2.0"]


def test_partial_names():
    chosen = select_modules(BookCNN(), [{"op_partial_names": ["fc"], "sparse_ratio": 0.1}])
    assert list(chosen) == ["fc1", "fc2"]


def test_subclasses_match_their_base_type():
    class MyLinear(nn.Linear):
        pass

    net = nn.Sequential(MyLinear(2, 3))
    assert list(select_modules(net, [{"op_types": ["Linear"], "sparse_ratio": 0.5}])) == ["0"]
    assert list(select_modules(net, [{"op_types": ["MyLinear"], "sparse_ratio": 0.5}])) == ["0"]


def test_name_that_matches_nothing_names_the_closest():
    with pytest.raises(NoMatchError) as err:
        select_modules(MnistNet(), [{"op_names": ["fc3"], "sparse_ratio": 0.5}])
    assert "'fc3'" in str(err.value) and "fc1" in str(err.value)
    with pytest.raises(NoMatchError, match="conv1"):
        select_modules(MnistNet(), [{"op_types": ["Conv2d"], "exclude_op_names": ["conv_1"], "sparse_ratio": 0.5}])
    with pytest.raises(NoMatchError, match="part of no module name"):
        select_modules(MnistNet(), [{"op_partial_names": ["encoder"], "sparse_ratio": 0.5}])


def test_op_type_that_is_not_a_module_class():
    with pytest.raises(ConfigError, match="'Conv' is not a module class.*Conv2d"):
        select_modules(MnistNet(), [{"op_types": ["Conv"], "sparse_ratio": 0.5}])


def test_entry_matching_no_prunable_module():
    with pytest.raises(NoMatchError, match="matches no prunable module"):
        select_modules(MnistNet(), [{"op_types": ["LSTM"], "sparse_ratio": 0.5}])
    with pytest.raises(NoMatchError):
        select_modules(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), [{"op_types": ["ReLU"], "sparse_ratio": 0.5}])


def test_rejected_config_leaves_model_untouched():
    model = MnistNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NoMatchError):
        compute_masks(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}, {"op_names": ["nope"], "exclude": True}])
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(k.endswith("_mask") for k in after)
