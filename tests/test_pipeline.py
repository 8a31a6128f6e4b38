"""The combined pipeline on a small CNN: real compaction, distillation, int8 and ONNX Runtime, measured."""

import re

import pytest
import torch
from torch.utils.data import TensorDataset

from slimtorch.data import load_digits
from slimtorch.errors import ConfigError
from slimtorch.models import DigitsCNN
from slimtorch.pipeline import PipelineConfig, PipelineResult, Stage, distil_recovery, run_pipeline
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


def test_hugging_face_model_through_compact_hf_and_dynamic_int8():
    transformers = pytest.importorskip("transformers")
    from slimtorch.recipes.minilm import ffn_config

    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=128, vocab_size=100)).eval()
    batch = {"input_ids": torch.randint(0, 100, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    with torch.no_grad():
        reference = bert(**batch).last_hidden_state

    def cosine(model):
        return float(torch.nn.functional.cosine_similarity(model(**batch).last_hidden_state, reference, dim=-1).mean())

    config = PipelineConfig(config_list=tuple(ffn_config(bert, 0.5)), compactor="hf",
                            quant=QuantConfig(method="dynamic_int8"), onnx=False, runs=2)
    result = run_pipeline(bert, batch, config, score=cosine)
    s = {st.stage: st for st in result.stages}
    assert list(s) == ["dense", "prune", "compact", "quantize"]
    removed = 2 * 64 * (32 + 1 + 32)  # per layer: 64 neurons, their rows + biases in, their columns out
    assert s["dense"].params - s["compact"].params == removed
    assert s["compact"].quality == pytest.approx(s["prune"].quality, abs=1e-5)  # compaction is exact
    assert bert.config.intermediate_size == 128  # the input model is untouched
    # Its embeddings are quantized too, and they take the strided position ids BERT slices from a buffer.
    assert s["quantize"].state == "compacted, dynamic_int8 (real kernels)"
    assert s["quantize"].quality > 0.9 * s["compact"].quality


def test_markdown_keeps_a_note_with_pipes_in_its_cell():
    """The export stage's note says ``max |diff|``: unescaped, those pipes split the row into extra cells."""
    stage = Stage(stage="export", state="compacted, ONNX Runtime", params=10, size_bytes=40, latency_s=1e-3,
                  quality=1.0, note="torch.export -> ONNX, max |diff| to PyTorch 1.0e-07", model=torch.nn.Identity(),
                  latency_best_s=1e-3)
    lines = PipelineResult(stages=[stage], masks={}).to_markdown().splitlines()
    cells = [re.split(r"(?<!\\)\|", line.strip().strip("|")) for line in lines]
    assert len(cells[2]) == len(cells[0]) == 8
    assert cells[2][-1].strip() == r"torch.export -> ONNX, max \|diff\| to PyTorch 1.0e-07"
