"""The combined pipeline on a small CNN: real compaction, distillation, int8 and ONNX Runtime, measured."""

import pytest
import torch
from torch.utils.data import TensorDataset

from slimtorch.data import load_digits
from slimtorch.errors import ConfigError
from slimtorch.models import DigitsCNN
from slimtorch.pipeline import PipelineConfig, distil_recovery, run_pipeline
from slimtorch.quant import QuantConfig
from slimtorch.recover import DistillConfig, TrainConfig, evaluate_accuracy, fit


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = load_digits()
    train, test = TensorDataset(data.x_train, data.y_train), TensorDataset(data.x_test, data.y_test)
    model = DigitsCNN(width=16)
    fit(model, train, TrainConfig(epochs=3, batch_size=32, lr=3e-3))
    return model.eval(), train, test, data


def test_prune_compact_distil_quantize_export(trained):
    model, train, test, data = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = PipelineConfig(config_list=({"op_types": ["Conv2d"], "sparse_ratio": 0.5},),
                            quant=QuantConfig(method="static_int8"), runs=2)
    recover = distil_recovery(train, TrainConfig(epochs=2, batch_size=32, lr=2e-3), DistillConfig())
    result = run_pipeline(model, data.x_test[:16], config, score=lambda m: evaluate_accuracy(m, test),
                          recover=recover, calibration=[data.x_train[i : i + 64] for i in range(0, 512, 64)])
    s = {st.stage: st for st in result.stages}
    assert list(s) == ["dense", "prune", "compact", "recover", "quantize", "export", "quantize (ONNX Runtime)"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input is untouched
    one = 1 / len(test)  # one test image
    assert s["prune"].state == "masked" and s["prune"].params == s["dense"].params
    # Compaction makes the model really smaller and computes what the masked one does.
    assert s["compact"].state == "compacted" and s["compact"].params < 0.5 * s["dense"].params
    assert s["compact"].size_bytes < 0.5 * s["dense"].size_bytes
    assert abs(s["compact"].quality - s["prune"].quality) <= one
    # Pruning half of the filters hurts; distilling from the dense model wins most of it back.
    assert s["prune"].quality < s["dense"].quality - 0.1 and s["recover"].quality > s["prune"].quality + 0.1
    assert s["quantize"].state == "compacted, static_int8 (real kernels)"
    # Static int8 folds the batch norms into the convolutions: a few parameters fewer, never more.
    assert 0.9 * s["recover"].params < s["quantize"].params <= s["recover"].params
    # int8 values are a quarter of fp32; the safetensors header (names, shapes, per-layer scales) is a
    # large part of a 2,600-parameter file, hence the looser bound.
    assert s["quantize"].size_bytes < 0.5 * s["recover"].size_bytes
    assert abs(s["quantize"].quality - s["recover"].quality) <= 0.03
    assert abs(s["export"].quality - s["recover"].quality) <= one and s["export"].params == s["recover"].params
    assert s["export"].state == "compacted, ONNX Runtime"
    assert abs(s["quantize (ONNX Runtime)"].quality - s["recover"].quality) <= 0.03
    assert "| recover | compacted |" in result.to_markdown("top-1")
    assert all(0 < st.latency_best_s <= st.latency_s for st in result.stages)
    # Group-consistent masks: every conv weight, and the batch norms that share their channels.
    assert {n for n, p in model.named_parameters() if p.dim() == 4} < set(result.masks)


def test_config_is_validated_and_round_trips():
    config = PipelineConfig(config_list=({"op_types": ["Linear"], "sparsity": 0.5},), compactor="hf", quant=None)
    assert PipelineConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="compactor"):
        PipelineConfig(config_list=({"op_types": ["Linear"], "sparse_ratio": 0.5},), compactor="speedup")
    with pytest.raises(ConfigError):
        PipelineConfig(config_list=({"op_types": ["Linear"], "sparse_ratio": 1.5},))
    with pytest.raises(ConfigError, match="unknown pipeline key"):
        PipelineConfig.from_dict({"config_list": [], "quantize": "int8"})
