"""Streamed one-shot pruning (layer by layer from safetensors shards) equals the in-memory result, resumes
after an interruption, and refuses what it cannot do without touching the source."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import LlamaForCausalLM

from slimtorch.errors import ConfigError
from slimtorch.integrations.hf import streamed
from slimtorch.integrations.hf.streamed import stream_one_shot_prune
from slimtorch.integrations.hf.streaming import RECORD
from slimtorch.models.tiny_lm import TinyLMConfig, build_model
from slimtorch.prune.oneshot import apply_one_shot_, one_shot_prune

TINY = TinyLMConfig(vocab_size=96, hidden_size=32, layers=3, heads=4, kv_heads=2, intermediate_size=64, seq_len=16)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The tiny model saved in several shards that cut across decoder layers."""
    path = tmp_path_factory.mktemp("src") / "model"
    model = build_model(TINY)
    model.save_pretrained(path, max_shard_size="20KB")
    assert len(list(path.glob("model-*.safetensors"))) > 3
    return path, model


def _calibration() -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (6, TINY.seq_len), generator=torch.Generator().manual_seed(1))


def _in_memory(model, method, sparsity, pattern):
    expected = build_model(TINY)
    expected.load_state_dict(model.state_dict())
    result = one_shot_prune(expected, _calibration(), method=method, sparsity=sparsity, pattern=pattern, batch_size=4)
    apply_one_shot_(expected, result)
    return {k: v for k, v in expected.state_dict().items() if not k.endswith("_mask")}


def _files(path):
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.mark.parametrize(("method", "sparsity", "pattern"), [
    ("magnitude", 0.5, None), ("wanda", 0.6, None), ("sparsegpt", 0.5, None), ("wanda", 0.5, "2:4"),
    ("sparsegpt", 0.5, "2:4")])
def test_streamed_equals_in_memory_and_loads_with_from_pretrained(source, tmp_path, method, sparsity, pattern):
    path, model = source
    before = _files(path)
    run = stream_one_shot_prune(path, tmp_path / "out", _calibration(), method=method, sparsity=sparsity,
                                pattern=pattern, batch_size=4)
    assert _files(path) == before  # the source is only read
    assert run.layers == TINY.layers and run.resumed_from == 0 and len(run.layer_seconds) == TINY.layers
    assert not (tmp_path / "out" / RECORD).exists() and not (tmp_path / "out" / ".slimtorch-stream").exists()
    pruned = LlamaForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    expected = _in_memory(model, method, sparsity, pattern)
    assert sorted(pruned) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(pruned[key], value, rtol=0, atol=0, msg=key)
    down = pruned["model.layers.2.mlp.down_proj.weight"]
    assert float((down == 0).float().mean()) == pytest.approx(sparsity, abs=0.02)


def test_an_interrupted_run_resumes_after_the_last_layer_written(source, tmp_path, monkeypatch):
    path, model = source
    real, calls = streamed.prune_layer_, []  # (the step calls it through the module)

    def failing(layer, inputs, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped in the second layer
        return real(layer, inputs, *args, **kwargs)

    monkeypatch.setattr(streamed, "prune_layer_", failing)
    with pytest.raises(KeyboardInterrupt):
        stream_one_shot_prune(path, tmp_path / "out", _calibration(), method="sparsegpt", batch_size=4)
    record = json.loads((tmp_path / "out" / RECORD).read_text())
    assert record["layers_done"] == 1
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model-00001-of-00004.safetensors"]
    with pytest.raises(ConfigError, match="other settings"):  # a resume must use the same settings
        stream_one_shot_prune(path, tmp_path / "out", _calibration(), method="wanda", batch_size=4)
    monkeypatch.setattr(streamed, "prune_layer_", real)
    run = stream_one_shot_prune(path, tmp_path / "out", _calibration(), method="sparsegpt", batch_size=4)
    assert run.resumed_from == 1 and len(run.layer_seconds) == TINY.layers
    pruned = LlamaForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for key, value in _in_memory(model, "sparsegpt", 0.5, None).items():
        torch.testing.assert_close(pruned[key], value, rtol=0, atol=0, msg=key)


def test_streamed_pruning_refuses_bad_arguments(source, tmp_path):
    path, _ = source
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        stream_one_shot_prune(path, tmp_path / "full", _calibration())
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="differ"):
        stream_one_shot_prune(path, path, _calibration())
    with pytest.raises(ConfigError, match="calibration"):
        stream_one_shot_prune(path, tmp_path / "a", None, method="wanda")
    with pytest.raises(ConfigError, match="available"):
        stream_one_shot_prune(path, tmp_path / "b", _calibration(), method="obs")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    stream_one_shot_prune(path, tmp_path / "c", None, method="magnitude")  # magnitude reads no calibration


def test_the_progress_bar_counts_layers_and_shows_each_layers_time(source, tmp_path, monkeypatch, capsys):
    path, _ = source
    monkeypatch.setenv("SLIMTORCH_PROGRESS", "1")
    stream_one_shot_prune(path, tmp_path / "out", None, method="magnitude")
    err = capsys.readouterr().err
    assert f"magnitude pruning, layer by layer:   0%|          | 0/{TINY.layers}" in err
    assert re.search(r"\| 3/3 .*layer 2: \d+\.\d s\]", err), err  # every layer drawn, with its time
