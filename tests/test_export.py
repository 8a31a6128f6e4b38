"""Export: torch.export and ONNX parity in ONNX Runtime; typed errors naming the alternative."""

import pytest
import torch
from torch import nn

from slimtorch.errors import ConfigError, ExportError
from slimtorch.export import export_onnx, export_program, onnx_session, run_onnx
from slimtorch.lora import LoRAConfig, add_lora_, merge_lora_
from slimtorch.lowrank import LowRankConfig, factorize_
from slimtorch.quant import QuantConfig, quantize, sqnr
from slimtorch.quant.onnx import quantize_onnx


def cnn(hidden=64):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, 10),
    ).eval()


# Seeded here, not by test order: the SQNR floors below hold for this input with margin.
X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_float_export_matches_pytorch_at_other_batch_sizes(tmp_path):
    model = cnn()
    check = export_onnx(model, X, tmp_path / "m.onnx")
    assert check.max_abs_diff < 1e-5 and check.size_bytes > 0
    x5 = torch.randn(5, 3, 8, 8)  # the batch dimension is exported as dynamic
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(onnx_session(check.path), x5)[0], model(x5), atol=1e-5, rtol=1e-4)


def test_factorized_and_lora_models_export(tmp_path):
    model = cnn()
    factorize_(model, LowRankConfig(rank=8, op_names=("5",)))
    add_lora_(model, LoRAConfig(r=2, target_modules=("7",)))
    with torch.no_grad():
        model.get_submodule("7").lora_B["default"].weight.normal_()
    assert export_onnx(model, X, tmp_path / "adapted.onnx").max_abs_diff < 1e-5
    merge_lora_(model)
    assert export_onnx(model, X, tmp_path / "merged.onnx").max_abs_diff < 1e-5


@pytest.mark.parametrize("method", ["int4_weight", "binary_weight"])
def test_low_bit_weights_export_small_and_exact(tmp_path, method):
    q = quantize(cnn(512), QuantConfig(method=method, op_types=("Linear",), group_size=16))
    check = export_onnx(q, X, tmp_path / "q.onnx")
    assert check.max_abs_diff < 1e-5  # ONNX Runtime reproduces the simulated low-bit model
    float_size = export_onnx(cnn(512), X, tmp_path / "f.onnx").size_bytes
    assert check.size_bytes < 0.5 * float_size  # the packed weights travel packed (plus graph overhead)


def test_unexportable_combinations_name_the_alternative(tmp_path):
    q = quantize(cnn(), QuantConfig(method="static_int8"), calibration=[X])
    with pytest.raises(ExportError, match="quantize_onnx"):
        export_onnx(q, X, tmp_path / "q.onnx")
    with pytest.raises(ExportError, match="quantize_onnx"):
        export_program(quantize(cnn(), QuantConfig(method="dynamic_int8")), X)
    with pytest.raises(ExportError, match="bfloat16"):
        export_onnx(quantize(cnn(), QuantConfig(method="bf16")), X, tmp_path / "b.onnx")
    assert not list(tmp_path.iterdir())

    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ExportError, match="control flow"):
        export_program(Branchy(), torch.ones(2))


def test_failed_parity_leaves_no_file(tmp_path):
    half = quantize(cnn(), QuantConfig(method="fp16"))
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(half, X, tmp_path / "h.onnx", atol=1e-9)
    assert not (tmp_path / "h.onnx").exists()


# ONNX Runtime's dynamic int8 quantizes each activation per tensor to uint8 (23-32 dB over six seeds);
# static int8 quantizes the activations between every pair of layers too (per tensor, MinMax
# calibration, 32-37 dB); int4 weights with groups of 16 give 18-20 dB.
@pytest.mark.parametrize(("method", "floor"), [("dynamic_int8", 20), ("static_int8", 25), ("int4_weight", 15)])
def test_onnx_runtime_quantization_within_stated_sqnr(tmp_path, method, floor):
    model = cnn(512)
    src = export_onnx(model, X, tmp_path / "m.onnx")
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(16, 3, 8, 8, generator=gen) for _ in range(8)]
    quantize_onnx(src.path, tmp_path / "q.onnx", QuantConfig(method=method, group_size=16), calibration=calib)
    with torch.no_grad():
        assert sqnr(model(X), run_onnx(onnx_session(tmp_path / "q.onnx"), X)[0]) >= floor
    assert (tmp_path / "q.onnx").stat().st_size < 0.4 * src.size_bytes


def test_quantize_onnx_refusals(tmp_path):
    with pytest.raises(ConfigError, match="calibration"):
        quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", QuantConfig(method="static_int8"))
    with pytest.raises(ConfigError, match="PyTorch only"):
        quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", QuantConfig(method="binary_weight"))
    with pytest.raises(ConfigError, match="ONNX nodes"):
        quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", QuantConfig(method="fp16", exclude_op_names=("5",)))
