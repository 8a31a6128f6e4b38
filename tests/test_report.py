import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch import apply_masks_, compute_masks, report
from slimtorch.models import MnistNet
from slimtorch.report import COMPACTION_ATTR, compare_markdown, count_flops, model_state, saved_size


def test_linear_and_conv_flops_hand_computed():
    assert count_flops(nn.Linear(8, 4), torch.randn(2, 8)) == 2 * (2 * 8 * 4)
    # Conv2d(1 -> 2, 3x3) on 5x5: 3x3 outputs per channel, each 9 multiply-adds.
    assert count_flops(nn.Conv2d(1, 2, 3), torch.randn(1, 1, 5, 5)) == 2 * (2 * 3 * 3 * 9)


class _Attention(nn.Module):
    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, q, q)


def test_cpu_attention_is_counted():
    q = torch.randn(1, 2, 8, 4)  # (B, heads, T, head_dim)
    # QK^T and AV: each 2 * B * heads * T * T * head_dim.
    assert count_flops(_Attention(), q) == 2 * (2 * 1 * 2 * 8 * 8 * 4)


def test_report_fields_and_states():
    model = MnistNet()
    x = torch.randn(4, 1, 28, 28)
    dense = report(model, x, runs=2, warmup=1)
    assert dense.state == "dense" and dense.params == 431080 and dense.nonzero_params == dense.params
    assert dense.batch_size == 4 and dense.latency_s > 0 and dense.throughput == 4 / dense.latency_s
    assert dense.size_bytes > 4 * dense.params
    masks = compute_masks(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5, "granularity": "fine"}],
                          criterion="magnitude")
    apply_masks_(model, masks)
    masked = report(model, x, runs=0)
    assert masked.state == "masked" and masked.latency_s is None
    assert masked.params == dense.params and masked.flops == dense.flops  # a masked model is not smaller
    assert masked.nonzero_params < dense.params
    assert model.training  # the mode is restored


def test_compacted_state_and_outputs():
    model = nn.Linear(3, 3)
    setattr(model, COMPACTION_ATTR, {"removed": 1})
    assert model_state(model) == "compacted"
    r = report(model, torch.randn(2, 3), runs=1, warmup=0)
    data = json.loads(r.to_json())
    assert data["state"] == "compacted" and data["macs"] == r.macs == 18
    table = compare_markdown({"before": r, "after": r})
    assert table.count("\n") == 3 and "| after | compacted |" in table


def test_saved_size_counts_tied_weights_once():
    emb = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    tied = nn.ModuleDict({"emb": emb, "head": head})
    assert saved_size(tied) < 2 * 100 * 16 * 4


def _small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 64),
                         nn.ReLU(), nn.Linear(64, 10)).eval()


@pytest.mark.parametrize("method", ["dynamic_int8", "static_int8", "int4_weight", "binary_weight", "fp16"])
def test_quantized_models_keep_their_counts_and_say_how_they_are_stored(method):
    from slimtorch.quant import QuantConfig, quantize

    model, x = _small_cnn(), torch.randn(2, 3, 8, 8)
    q = quantize(model, QuantConfig(method=method), calibration=[x])
    x_in = x.half() if method == "fp16" else x
    dense, quantized = report(model, x, runs=0), report(q, x_in, runs=0)
    # Packed int8 / 4-bit / 1-bit weights are still the model's parameters, and still cost FLOPs.
    assert quantized.params == dense.params and quantized.flops == dense.flops
    assert quantized.quantization.startswith(method) and dense.quantization is None
    bits = {"dynamic_int8": 8, "static_int8": 8, "int4_weight": 4, "binary_weight": 1, "fp16": 16}[method]
    # The saved file holds the low-bit values plus scales: at most bits/32 of fp32 plus 10% for scales.
    assert quantized.size_bytes < dense.size_bytes * (bits / 32 + 0.1)
    assert f"| q | dense, {method} " in compare_markdown({"float": dense, "q": quantized})


def test_report_gives_each_module_its_own_mode_back():
    # a model training with its dropout switched off: mixed modes must survive the measurement
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    model[2].eval()
    before = [m.training for m in model.modules()]
    report(model, torch.randn(4, 4), runs=1, warmup=0)
    assert [m.training for m in model.modules()] == before == [True, True, True, False, True]
