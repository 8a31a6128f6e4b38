"""Quantized models saved as safetensors + JSON and loaded back compute exactly what they computed."""

import pytest
import torch
from torch import nn

from slimtorch import compact_, compute_masks
from slimtorch.errors import CheckpointError, ConfigError
from slimtorch.io import plain_state, save_compacted
from slimtorch.masks import COMPACTION_ATTR
from slimtorch.models.modelfile import save_model
from slimtorch.models.registry import ModelSpec
from slimtorch.quant import QuantConfig, quant_info, quantize
from slimtorch.quant.saving import load_quantized, save_quantized


def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["dynamic_int8", "static_int8", "int4_weight", "binary_weight", "fp16"])
def test_round_trip_is_exact(tmp_path, method):
    q = quantize(cnn(), QuantConfig(method=method), calibration=[X])
    save_quantized(q, tmp_path / "q.safetensors")
    fresh = cnn()  # other float weights: only the architecture is used
    loaded = load_quantized(fresh, tmp_path / "q.safetensors", example_inputs=X)
    x = X.half() if method == "fp16" else X
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert quant_info(loaded) == quant_info(q)
    assert isinstance(fresh[0], nn.Conv2d) and quant_info(fresh) is None  # the template is untouched


def test_quantized_embeddings_keep_their_float_zero_points(tmp_path):
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 4)).eval()
    q = quantize(model, QuantConfig(method="dynamic_int8", op_types=("Embedding", "Linear")))
    zero = plain_state(q)["0._packed_params._packed_weight.zero_point"]
    assert zero.is_floating_point() and not torch.equal(zero, zero.round())  # not truncated to integers
    save_quantized(q, tmp_path / "e.safetensors")
    tokens = torch.randint(0, 50, (3, 5))
    loaded = load_quantized(nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 4)), tmp_path / "e.safetensors")
    assert torch.equal(loaded(tokens), q(tokens))


def test_compacted_quantized_model_round_trip(tmp_path):
    masks = compute_masks(cnn(), [{"op_names": ["0"], "sparse_ratio": 0.5}], example_inputs=X)
    compacted = cnn()
    compact_(compacted, masks, example_inputs=X)
    q = quantize(compacted, QuantConfig(method="static_int8"), calibration=[X])
    assert getattr(q, COMPACTION_ATTR)  # a rebuilt graph still says it is compacted
    save_quantized(q, tmp_path / "q.safetensors")
    template = cnn()
    compact_(template, masks, example_inputs=X)
    loaded = load_quantized(template, tmp_path / "q.safetensors", example_inputs=X)
    assert torch.equal(loaded(X), q(X))
    with pytest.raises(CheckpointError, match="does not fit|in the file"):
        load_quantized(cnn(), tmp_path / "q.safetensors", example_inputs=X)  # not compacted: other shapes


def test_refusals(tmp_path):
    with pytest.raises(CheckpointError, match="save_quantized"):  # the float-model file format says where to go
        save_model(tmp_path / "m.safetensors", quantize(cnn(), QuantConfig(method="fp16")), ModelSpec(name="MnistNet"))
    with pytest.raises(CheckpointError, match="save_quantized"):
        save_compacted(quantize(cnn(), QuantConfig(method="int4_weight", op_types=("Linear",))), tmp_path / "c")
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match="not quantized"):
        save_quantized(cnn(), tmp_path / "f.safetensors")
    assert not (tmp_path / "f.safetensors").exists()
    save_quantized(quantize(cnn(), QuantConfig(method="static_int8"), calibration=[X]), tmp_path / "s.safetensors")
    with pytest.raises(ConfigError, match="example_inputs"):
        load_quantized(cnn(), tmp_path / "s.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(cnn(), tmp_path / "missing.safetensors")
    other = nn.Sequential(nn.Linear(4, 4)).eval()
    save_quantized(quantize(other, QuantConfig(method="int4_weight", group_size=4)), tmp_path / "o.safetensors")
    with pytest.raises(CheckpointError):
        load_quantized(cnn(), tmp_path / "o.safetensors")
