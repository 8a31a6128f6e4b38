"""Quantization: each method against fp32 within a stated SQNR, honest kernel labels, typed errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import ConfigError, NoMatchError, TraceError
from slimtorch.quant import QuantConfig, convert_qat, quant_info, quantize, quantize_, sqnr
from slimtorch.quant.lowbit import pack_binary, pack_int4, unpack_binary, unpack_int4
from slimtorch.report import saved_size

# Stated quality floors (dB) against fp32 on seeded random nets; ~6 dB per bit of precision.
SQNR_FLOOR = {"dynamic_int8": 30, "static_int8": 28, "fp16": 60, "bf16": 40, "int4_weight": 15}


def mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("method", ["dynamic_int8", "fp16", "bf16", "int4_weight"])
def test_linear_methods_within_stated_sqnr(method):
    model, x = mlp(), torch.randn(32, 64)
    q = quantize(model, QuantConfig(method=method))
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert out.dtype == torch.float32
    assert sqnr(ref, out) >= SQNR_FLOOR[method]
    assert quant_info(q).layers == ("0", "2", "4")
    assert type(model[0]) is nn.Linear  # quantize is pure


def test_kernel_labels_are_honest():
    model = mlp()
    real = {m: quant_info(quantize(model, QuantConfig(method=m))).kernels for m in ("dynamic_int8", "fp16")}
    sim = {m: quant_info(quantize(model, QuantConfig(method=m))).kernels for m in ("int4_weight", "binary_weight")}
    assert set(real.values()) == {"real"}
    assert set(sim.values()) == {"simulated"}


def test_static_int8_cnn_with_calibration():
    model = cnn()
    _randomise_bn(model)
    calib = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    q = quantize(model, QuantConfig(method="static_int8"), calibration=calib)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert sqnr(model(x), q(x)) >= SQNR_FLOOR["static_int8"]
    assert quant_info(q).kernels == "real"
    assert any(p.is_quantized for p in q.state_dict().values() if isinstance(p, torch.Tensor))
    with pytest.raises(ConfigError, match="calibration"):
        quantize(model, QuantConfig(method="static_int8"))


def test_static_int8_exclusion_stays_float():
    model = cnn()
    q = quantize(model, QuantConfig(method="static_int8", exclude_op_names=("7",)),
                 calibration=[torch.randn(4, 3, 16, 16)])
    assert type(q.get_submodule("7")) is nn.Linear
    assert "7" not in quant_info(q).layers


def test_qat_trains_with_straight_through_gradients_and_converts():
    model = cnn().train()
    x = torch.randn(8, 3, 16, 16)
    qat = quantize(model, QuantConfig(method="qat_int8"), example_inputs=x)
    assert quant_info(qat).kernels == "simulated"
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        qat(x).square().mean().backward()
        grads = [p.grad for p in qat.parameters() if p.dim() > 1]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)  # STE lets gradients through
        opt.step()
    real = convert_qat(qat)
    assert quant_info(real).kernels == "real"
    qat.eval()
    with torch.no_grad():
        assert sqnr(qat(x), real(x)) >= 25  # the real int8 model computes what training simulated
    with pytest.raises(ConfigError, match="qat_int8"):
        convert_qat(model)


def test_int4_pack_roundtrip_and_size():
    w = torch.randn(8, 64)
    packed = pack_int4(w, group_size=16)
    back = unpack_int4(packed, group_size=16)
    scale = packed["scale"].repeat_interleave(16, dim=1)  # (8, 64): each weight's group scale
    assert torch.all((back - w).abs() <= scale / 2 + 1e-6)
    assert packed["qweight"].numel() == w.numel() // 2
    exact = torch.tensor([[-7.0, -3.0, 0.0, 7.0]]) * 0.5  # max 3.5 -> scale 0.5: every value representable
    torch.testing.assert_close(unpack_int4(pack_int4(exact, group_size=4), group_size=4), exact, rtol=0, atol=0)


def test_int4_layer_is_an_eighth_of_the_float_size():
    model = nn.Sequential(nn.Linear(256, 256, bias=False))
    q = quantize(model, QuantConfig(method="int4_weight", group_size=64))
    weight_bytes = 256 * 256 * 4
    # 4 bits per weight plus one fp32 scale per 64 weights, plus the file header.
    assert saved_size(q) < weight_bytes / 8 + weight_bytes / 64 + 1024


def test_binary_weights_are_sign_times_channel_scale():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    q = quantize(nn.Sequential(conv), QuantConfig(method="binary_weight"))
    alpha = conv.weight.abs().mean(dim=(1, 2, 3))
    expected_w = torch.where(conv.weight >= 0, 1.0, -1.0) * alpha[:, None, None, None]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(q(x), F.conv2d(x, expected_w, conv.bias, padding=1))
    packed = pack_binary(conv.weight)
    assert packed["bits"].shape == (4, 4)  # 27 signs per filter -> 4 bytes
    torch.testing.assert_close(unpack_binary(packed, conv.weight.shape), expected_w)


def test_quantize_in_place_and_its_refusals():
    model = mlp()
    x = torch.randn(4, 64)
    before = model(x)
    quantize_(model, QuantConfig(method="dynamic_int8"))
    assert quant_info(model).method == "dynamic_int8"
    assert sqnr(before, model(x)) >= SQNR_FLOOR["dynamic_int8"]
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_(model, QuantConfig(method="fp16"))
    with pytest.raises(ConfigError, match="cannot change the model in place"):
        quantize_(mlp(), QuantConfig(method="static_int8"))


def test_failed_in_place_leaves_model_intact():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="group_size"):
        quantize_(model, QuantConfig(method="int4_weight", group_size=64))
    assert type(model[0]) is nn.Linear and quant_info(model) is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_selection_errors_are_typed():
    with pytest.raises(NoMatchError, match="fc9"):
        quantize(mlp(), QuantConfig(method="dynamic_int8", op_names=("fc9",)))
    with pytest.raises(ConfigError, match="Conv2d"):
        quantize(cnn(), QuantConfig(method="dynamic_int8", op_types=("Conv2d",)))


def test_config_validation_and_round_trip():
    cfg = QuantConfig(method="int4_weight", op_types=("Linear",), group_size=64)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="dynamic_int8"):
        QuantConfig(method="dynamic_int")
    with pytest.raises(ConfigError, match="per_channel"):
        QuantConfig(method="static_int8", per_channel=False)
    with pytest.raises(ConfigError, match="group_size"):
        QuantConfig(method="int4_weight", group_size=33)
    with pytest.raises(ConfigError, match="allowed keys"):
        QuantConfig.from_dict({"method": "fp16", "bits": 16})


def test_untraceable_model_gets_trace_error_naming_alternative():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(TraceError, match="dynamic_int8"):
        quantize(Branchy(), QuantConfig(method="static_int8"), calibration=[torch.ones(2, 4)])


def test_dynamic_int8_saves_a_quarter_of_the_size():
    model = nn.Sequential(nn.Linear(256, 256))
    assert saved_size(quantize(model, QuantConfig(method="dynamic_int8"))) < 0.3 * saved_size(model)


def test_dynamic_int8_embeddings_are_int8_rows():
    model = nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 8)).eval()
    tokens = torch.randint(0, 100, (4, 12))
    q = quantize(model, QuantConfig(method="dynamic_int8"))
    assert quant_info(q).layers == ("0", "1")
    assert q[0].weight().is_quantized
    with torch.no_grad():
        assert sqnr(model(tokens), q(tokens)) >= SQNR_FLOOR["dynamic_int8"]
    assert saved_size(q) < 0.35 * saved_size(model)


@pytest.mark.parametrize("method", ["qat_int4_weight", "qat_binary_weight"])
def test_low_bit_qat_trains_float_weights_and_packs_what_it_simulated(method):
    model = cnn()
    x = torch.randn(8, 3, 16, 16)
    qat = quantize(model, QuantConfig(method=method, op_types=("Linear",), group_size=16))
    assert set(qat.state_dict()) == set(model.state_dict())  # same keys: checkpoints keep loading
    before = qat[7].weight.detach().clone()
    opt = torch.optim.SGD(qat.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        qat(x).square().mean().backward()
        assert qat[7].weight.grad.abs().sum() > 0  # the straight-through estimator reaches the float weight
        opt.step()
    assert not torch.equal(qat[7].weight, before)
    packed = convert_qat(qat.eval())
    assert quant_info(packed).method == method.removeprefix("qat_")
    with torch.no_grad():
        torch.testing.assert_close(packed(x), qat(x), atol=1e-5, rtol=1e-4)
