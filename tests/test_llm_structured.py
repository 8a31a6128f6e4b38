"""Structured LLM pruning, streamed: the compacted model computes what the masked (and bias-compensated)
model computes, grouped-query groups are respected, bias compensation keeps each projection's mean output,
and dropping a layer that changes nothing changes nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from slimtorch.errors import ConfigError
from slimtorch.integrations.hf.llm_structured import block_influence, stream_drop_layers, stream_structured_prune
from slimtorch.models.tiny_lm import TinyLMConfig, build_model

GQA = TinyLMConfig(vocab_size=96, hidden_size=32, layers=3, heads=8, kv_heads=2, intermediate_size=64, seq_len=16)
MHA = TinyLMConfig(vocab_size=96, hidden_size=32, layers=2, heads=4, kv_heads=4, intermediate_size=64, seq_len=16)


def _calibration(cfg: TinyLMConfig, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (6, cfg.seq_len), generator=torch.Generator().manual_seed(seed))


def _saved(cfg: TinyLMConfig, path):
    model = build_model(cfg)
    model.save_pretrained(path, max_shard_size="30KB")
    return model


def _masked_reference(model, result, pruned, width):
    """The original model with the removed heads' and neurons' output columns zeroed and the compacted
    model's output-projection biases (the compensation) added."""
    ref = LlamaForCausalLM(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            cut = pruned.model.layers[i]
            for proj, units, w, compact in ((layer.self_attn.o_proj, result.heads[i], width, cut.self_attn.o_proj),
                                            (layer.mlp.down_proj, result.neurons[i], 1, cut.mlp.down_proj)):
                keep = torch.zeros(proj.in_features, dtype=torch.bool)
                for u in units:
                    keep[u * w:(u + 1) * w] = True
                proj.weight[:, ~keep] = 0
                if compact.bias is not None:
                    proj.bias = torch.nn.Parameter(compact.bias.detach().clone())
    return ref


@pytest.mark.parametrize(("cfg", "importance", "compensate"), [(GQA, "flap", True), (GQA, "wanda", False),
                                                               (MHA, "flap", True)])
def test_compacted_equals_masked_and_loads_with_from_pretrained(tmp_path, cfg, importance, compensate):
    model = _saved(cfg, tmp_path / "src")
    result = stream_structured_prune(tmp_path / "src", tmp_path / "out", _calibration(cfg), heads=0.5, neurons=0.35,
                                     importance=importance, bias_compensation=compensate, batch_size=4)
    pruned = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    width = cfg.hidden_size // cfg.heads
    group = cfg.heads // cfg.kv_heads
    for heads, kv in zip(result.heads, result.kv_heads, strict=True):
        if group > 1:  # the same number of query heads from every group; every key/value head stays
            assert [sum(h // group == g for h in heads) for g in range(cfg.kv_heads)] == [group // 2] * cfg.kv_heads
            assert kv == tuple(range(cfg.kv_heads))
        else:
            assert kv == heads and len(heads) == cfg.heads // 2
    assert pruned.config.intermediate_size == len(result.neurons[0]) == round(cfg.intermediate_size * 0.65)
    assert (pruned.model.layers[0].self_attn.o_proj.bias is not None) == compensate
    ref = _masked_reference(model, result, pruned, width)
    ids = _calibration(cfg, seed=7)  # inputs the pruning never saw
    with torch.no_grad():
        logits = pruned(input_ids=ids).logits
        torch.testing.assert_close(logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-6)
        assert (logits - model(input_ids=ids).logits).abs().max() > 1e-3  # (pruning did change the model)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_bias_compensation_keeps_the_mean_output_of_the_projection(tmp_path):
    model = _saved(GQA, tmp_path / "src")
    calib = _calibration(GQA)
    result = stream_structured_prune(tmp_path / "src", tmp_path / "out", calib, heads=0.5, neurons=0.5, batch_size=6)
    pruned = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    seen = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=calib)  # layer 0's inputs are the embeddings: the same before and after pruning
    handle.remove()
    x = seen[0].reshape(-1, GQA.intermediate_size)  # (tokens, intermediate)
    kept = list(result.neurons[0])
    full = model.model.layers[0].mlp.down_proj(x).mean(dim=0)
    cut = pruned.model.layers[0].mlp.down_proj(x[:, kept]).mean(dim=0)
    uncompensated = torch.nn.functional.linear(x[:, kept], pruned.model.layers[0].mlp.down_proj.weight).mean(dim=0)
    assert float((cut - full).abs().max()) < 1e-4 * float((uncompensated - full).abs().max())


def test_a_layer_that_changes_nothing_has_no_influence_and_dropping_it_changes_nothing(tmp_path):
    model = build_model(GQA)
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: it is the identity
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    model.save_pretrained(tmp_path / "src", max_shard_size="30KB")
    influence = block_influence(tmp_path / "src", _calibration(GQA), batch_size=4)
    assert len(influence) == GQA.layers and influence[1] == pytest.approx(0.0, abs=1e-6)
    assert min(range(GQA.layers), key=influence.__getitem__) == 1 and min(influence[0], influence[2]) > 1e-3
    stream_drop_layers(tmp_path / "src", tmp_path / "out", [1])
    shallow = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert shallow.config.num_hidden_layers == 2
    ids = _calibration(GQA, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(shallow(input_ids=ids).logits, model(input_ids=ids).logits)


def test_kept_heads_divide_the_hidden_size_so_that_from_pretrained_accepts_the_config(tmp_path):
    from transformers import LlamaConfig

    from slimtorch.integrations.hf.llm_structured import kept_counts

    gqa = LlamaConfig(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, intermediate_size=344)
    assert kept_counts(gqa, 0.2, 0.2) == (4, 2, 275)  # 3 per group (6 heads) does not divide 128: 2 per group
    mha = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008)
    assert kept_counts(mha, 0.25, 0.25)[:2] == (16, 16)  # 24 does not divide 4096
    cfg = TinyLMConfig(vocab_size=96, hidden_size=48, layers=1, heads=4, kv_heads=4, intermediate_size=32,
                       seq_len=16)
    _saved(cfg, tmp_path / "src")  # 3 of 4 heads kept: 48 = 3 x 16, allowed
    stream_structured_prune(tmp_path / "src", tmp_path / "out", _calibration(cfg), heads=0.25, neurons=0.0)
    assert LlamaForCausalLM.from_pretrained(tmp_path / "out").config.num_attention_heads == 3


def test_structured_pruning_refuses_bad_arguments(tmp_path):
    _saved(MHA, tmp_path / "src")
    calib = _calibration(MHA)
    with pytest.raises(ConfigError, match="importance"):
        stream_structured_prune(tmp_path / "src", tmp_path / "a", calib, importance="random")
    with pytest.raises(ConfigError, match="heads"):
        stream_structured_prune(tmp_path / "src", tmp_path / "a", calib, heads=1.0)
    with pytest.raises(ConfigError, match="calibration"):
        stream_structured_prune(tmp_path / "src", tmp_path / "a", None)
    with pytest.raises(ConfigError, match="distinct layers"):
        stream_drop_layers(tmp_path / "src", tmp_path / "a", [0, 1])
    with pytest.raises(ConfigError, match="distinct layers"):
        stream_drop_layers(tmp_path / "src", tmp_path / "a", [5])
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("run", ["structured", "influence", "drop"])
def test_one_layer_at_a_time_the_previous_layer_is_freed_before_the_next_is_read(tmp_path, monkeypatch, run):
    """The memory model's promise: when a decoder layer's first tensor is read, nothing of the layer
    before it (its tensors as stored, its float32 copy) is alive any more."""
    import gc
    import re
    import weakref

    from slimtorch.integrations.hf import llm_structured, streaming

    _saved(GQA, tmp_path / "src")
    alive: dict[int, list[weakref.ref]] = {}  # layer index -> what was read or built for it
    stale: list[str] = []
    get, load = streaming.ShardedWeights.get, streaming.load_layer

    def tracked_get(self, key: str) -> torch.Tensor:
        index = int(m.group(1)) if (m := re.search(r"\.layers\.(\d+)\.", key)) else None
        if index is not None and index not in alive:  # the first tensor of a layer: the one before is gone?
            gc.collect()
            stale.extend(f"layer {i} while reading layer {index}" for i, refs in alive.items()
                         if any(r() is not None for r in refs))
            alive[index] = []
        tensor = get(self, key)
        if index is not None:
            alive[index].append(weakref.ref(tensor))
        return tensor

    def tracked_load(skeleton_layer, stored, where):
        layer = load(skeleton_layer, stored, where)
        alive[int(where.rpartition(".")[2])] += [weakref.ref(p) for p in layer.parameters()]
        return layer

    monkeypatch.setattr(streaming.ShardedWeights, "get", tracked_get)
    monkeypatch.setattr(streaming, "load_layer", tracked_load)
    monkeypatch.setattr(llm_structured, "load_layer", tracked_load)
    if run == "structured":
        stream_structured_prune(tmp_path / "src", tmp_path / "out", _calibration(GQA), heads=0.5, neurons=0.5)
    elif run == "influence":
        block_influence(tmp_path / "src", _calibration(GQA))
    else:
        stream_drop_layers(tmp_path / "src", tmp_path / "out", [1])
    assert sorted(alive) == (list(range(GQA.layers)) if run != "drop" else [0, 2])
    assert stale == []
