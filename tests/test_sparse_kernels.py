"""Sparse CPU kernels: a Linear converted to CSR computes what the masked layer did; only layers sparse
enough are converted; bad arguments are typed errors that leave the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch import ConfigError, NoMatchError, apply_masks_
from slimtorch.sparse import BREAK_EVEN_SPARSITY, SparseLinear, sparsify_linear_


def _masked_mlp(sparsities: tuple[float, ...], bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 48, bias=bias), nn.ReLU(), nn.Linear(48, 40, bias=bias), nn.ReLU(),
                        nn.Linear(40, 6, bias=bias)).eval()
    masks = {}
    for index, sparsity in zip((0, 2, 4), sparsities, strict=True):
        weight = net[index].weight
        scores = torch.rand(weight.shape)
        masks[f"{index}.weight"] = scores >= torch.quantile(scores.flatten(), sparsity)
    apply_masks_(net, masks)
    return net


@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_computes_what_the_masked_layer_did(bias):
    net = _masked_mlp((0.97, 0.5, 0.98), bias=bias)
    x = torch.randn(5, 7, 32)  # leading dimensions are kept
    kept = int(net[0].weight_mask.sum())
    with torch.no_grad():
        expected = net(x)
        assert sparsify_linear_(net) == ["0", "4"]  # the 50% layer stays dense: CSR does not pay there
        torch.testing.assert_close(net(x), expected, rtol=1e-6, atol=1e-6)
    assert isinstance(net[0], SparseLinear) and type(net[2]) is nn.Linear
    assert net[0].weight.layout == torch.sparse_csr
    assert net[0].weight.values().numel() == kept  # (no masked entry is stored)


def test_threshold_and_names_choose_the_layers():
    net = _masked_mlp((0.97, 0.5, 0.98))
    assert sparsify_linear_(net, min_sparsity=0.4, names=["2"]) == ["2"]
    assert type(net[0]) is nn.Linear and isinstance(net[2], SparseLinear)
    assert sparsify_linear_(net, min_sparsity=0.99) == []
    assert 0.5 < BREAK_EVEN_SPARSITY < 0.97


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"min_sparsity": 1.5}, ConfigError, "min_sparsity"),
    ({"min_sparsity": True}, ConfigError, "min_sparsity"),
    ({"names": ["7"]}, NoMatchError, "no nn.Linear"),
    ({"names": "0"}, ConfigError, "list of Linear"),
])
def test_bad_arguments_leave_the_model_as_it_was(kwargs, error, words):
    net = _masked_mlp((0.97, 0.5, 0.98))
    before = [type(m) for m in net]
    with pytest.raises(error, match=words):
        sparsify_linear_(net, **kwargs)
    assert [type(m) for m in net] == before


def test_sparse_linear_needs_a_csr_weight():
    with pytest.raises(ConfigError, match="CSR"):
        SparseLinear(torch.randn(3, 4), None)
