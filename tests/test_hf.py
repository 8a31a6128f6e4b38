"""Hugging Face compaction oracle: BERT, GPT-2, LLaMA (grouped-query attention) and ViT from small configs,
head and FFN pruning each: the compacted model equals the masked one, has the parameter count the
removed units imply, and survives a save/load round trip."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import slimtorch  # noqa: E402
from nets import assert_shapes_trace_exact  # noqa: E402
from slimtorch import apply_masks_, compute_masks  # noqa: E402
from slimtorch.errors import CheckpointError, CompactionError, ConfigError, NoMatchError, SlimWarning  # noqa: E402
from slimtorch.integrations.hf.compaction import compact_hf_, format_pruned_heads, unit_masks  # noqa: E402
from slimtorch.integrations.hf.folders import load_hf_folder, save_hf_folder  # noqa: E402
from slimtorch.integrations.hf.units import find_blocks  # noqa: E402
from slimtorch.report import count_params, model_state  # noqa: E402

H, LAYERS = 32, 2


def _bert():
    cfg = transformers.BertConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=50)
    return transformers.BertModel(cfg), {"input_ids": torch.randint(0, 50, (2, 7)),
                                         "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=H, n_layer=LAYERS, n_head=4, vocab_size=50, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg), {"input_ids": torch.randint(0, 50, (2, 7))}


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=8,
                                   num_key_value_heads=2, head_dim=4, intermediate_size=64, vocab_size=50)
    return transformers.LlamaForCausalLM(cfg), {"input_ids": torch.randint(0, 50, (2, 7))}


def _vit():
    cfg = transformers.ViTConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                                 intermediate_size=64, image_size=16, patch_size=8, num_channels=3)
    return transformers.ViTModel(cfg), {"pixel_values": torch.randn(2, 3, 16, 16)}


MODELS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "vit": _vit}


def _output(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _blocks(model, kind):
    return [s for s in find_blocks(model).values() if s.kind == kind]


def _randomise_biases_(model):
    # Fresh HF models have zero biases, which would hide a dropped bias; make every bias matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)


def _oracle(model, inputs, masks, *, engine=False):
    """Compact ``model`` (with ``slimtorch.compact_`` itself when ``engine``, else ``compact_hf_``) and
    check it against the masked copy; returns the removed-parameter count."""
    model.eval()
    ref = copy.deepcopy(model)
    apply_masks_(ref, masks)
    before = count_params(model)
    if engine:
        slimtorch.compact_(model, masks, example_inputs=inputs)
    else:
        compact_hf_(model, masks)
    with torch.no_grad():
        torch.testing.assert_close(_output(model, inputs), _output(ref, inputs), rtol=1e-4, atol=1e-5)
    assert model_state(model) == "compacted"
    return before - count_params(model)


def _removed_per_unit(spec, model):
    """Parameters one unit owns: its slices in every producer and consumer (independent arithmetic)."""
    params = dict(model.named_parameters())
    total = 0
    for s in (*spec.producers, *spec.consumers):
        if s.kv:
            continue
        p = params[f"{spec.name}.{s.param}"]
        total += s.width * p.numel() // p.shape[s.dim]
    return total


@pytest.mark.parametrize("family", sorted(MODELS))
def test_pruning_graph_from_shapes_equals_the_real_trace(family):
    model, inputs = MODELS[family]()
    assert_shapes_trace_exact(model.eval(), inputs)


@pytest.mark.parametrize("engine", [True, False], ids=["compact_", "compact_hf_"])
@pytest.mark.parametrize("family", sorted(MODELS))
def test_head_pruning_compacts_to_the_masked_model(family, engine, tmp_path):
    model, inputs = MODELS[family]()
    _randomise_biases_(model)
    attn = _blocks(model, "attention")
    # Layer 0 loses heads 0 and 1 (LLaMA: 0..3, a whole key/value group), layer 1 loses the last head.
    first = [0, 1, 2, 3] if family == "llama" else [0, 1]
    chosen = {attn[0].name: first, attn[1].name: [attn[1].units - 1]}
    per_unit = _removed_per_unit(attn[0], model)
    masks = unit_masks(model, chosen)
    if family == "llama":  # layer 1 would have groups of 4 and 3 query heads: one head is kept, with a warning
        with pytest.warns(SlimWarning, match="key/value head"):
            removed = _oracle(model, inputs, masks, engine=engine)
        kv_per_head = 2 * 4 * H  # k and v rows of one key/value head (no biases)
        assert removed == 4 * per_unit + kv_per_head
        assert model.model.layers[0].self_attn.num_key_value_groups == 4
        assert model.model.layers[0].self_attn.k_proj.out_features == 4
        assert model.model.layers[1].self_attn.q_proj.out_features == 8 * 4
    else:
        removed = _oracle(model, inputs, masks, engine=engine)
        assert removed == 3 * per_unit
    assert model.slimtorch_compaction["pruned_heads"][attn[0].name] == first
    kept_back = family == "llama"  # layer 1's head stays, with a warning (see above)
    assert model.config.slimtorch_blocks[attn[1].name].get("pruned", []) == ([] if kept_back else [attn[1].units - 1])
    save_hf_folder(model, tmp_path)
    again = load_hf_folder(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(_output(again, inputs), _output(model, inputs))
    assert count_params(again) == count_params(model)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_ffn_pruning_compacts_to_the_masked_model(family, tmp_path):
    model, inputs = MODELS[family]()
    _randomise_biases_(model)
    ffn = _blocks(model, "ffn")
    first = ffn[0].producers[0].param.rpartition(".")[0]
    if family == "gpt2":  # HF's Conv1D stores (in, out): select its neurons as block units
        masks = unit_masks(model, {s.name: range(0, s.units, 2) for s in ffn})
    else:  # any criterion's out_channel masks on the first FFN layer, extended to every coupled layer
        masks = compute_masks(model, [{"op_names": [f"{s.name}.{first}" for s in ffn], "sparse_ratio": 0.5}],
                              criterion="l1", example_inputs=inputs)
    per_unit = _removed_per_unit(ffn[0], model)
    removed = _oracle(model, inputs, masks)
    assert removed == sum(s.units // 2 for s in ffn) * per_unit
    assert [s.units for s in _blocks(model, "ffn")] == [s.units // 2 for s in ffn]
    # Every layer kept the same width: the config says so and plain from_pretrained rebuilds the model.
    key = ffn[0].config_keys["units"]
    assert getattr(model.config, key) == ffn[0].units // 2
    save_hf_folder(model, tmp_path)
    plain = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_output(plain, inputs), _output(model, inputs))


def test_llama_uniform_head_pruning_round_trips_through_plain_from_pretrained(tmp_path):
    model, inputs = _llama()
    # Two query heads of every key/value group in both layers: 4 of 8 heads, both key/value heads kept.
    masks = unit_masks(model, {s.name: [0, 1, 4, 5] for s in _blocks(model, "attention")})
    _oracle(model, inputs, masks)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (4, 2, 4)
    save_hf_folder(model, tmp_path)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_output(plain, inputs), _output(model, inputs))


def test_sizes_the_config_class_refuses_stay_out_of_the_config(tmp_path):
    model, inputs = _llama()
    # 6 of 8 heads: LlamaConfig refuses a hidden size (32) that is no multiple of 6 heads.
    _oracle(model, inputs, unit_masks(model, {s.name: [0, 4] for s in _blocks(model, "attention")}))
    assert model.config.num_attention_heads == 8
    save_hf_folder(model, tmp_path)
    again = load_hf_folder(tmp_path)
    assert again.model.layers[1].self_attn.q_proj.out_features == 6 * 4
    with torch.no_grad():
        torch.testing.assert_close(_output(again, inputs), _output(model, inputs))


def test_partly_masked_heads_stay_with_zero_weights():
    model, inputs = _bert()
    attn = _blocks(model, "attention")[0]
    masks = unit_masks(model, {attn.name: [2]})
    del masks[f"{attn.name}.self.value.weight"], masks[f"{attn.name}.self.value.bias"]
    masks[f"{attn.name}.output.dense.weight"][:, 16:20] = True  # half of head 2's output columns come back
    _oracle(model, inputs, masks)
    assert model.encoder.layer[0].attention.self.num_attention_heads == 4  # nothing removed, zeros baked in
    assert bool((model.encoder.layer[0].attention.self.query.weight[16:24] == 0).all())


def test_masks_applied_to_the_model_are_used_and_removed():
    model, inputs = _bert()
    model.eval()
    masks = unit_masks(model, {"encoder.layer.0.attention": [1]})
    apply_masks_(model, masks)
    with torch.no_grad():
        expected = _output(model, inputs)
    compact_hf_(model)
    with torch.no_grad():
        torch.testing.assert_close(_output(model, inputs), expected)
    assert model.encoder.layer[0].attention.self.query.out_features == 24
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())


def test_bad_input_leaves_the_model_intact():
    model, _ = _bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NoMatchError, match="closest"):
        unit_masks(model, {"encoder.layer.0.attn": [0]})
    with pytest.raises(ConfigError, match="0..3"):
        unit_masks(model, {"encoder.layer.0.attention": [4]})
    bad = unit_masks(model, {"encoder.layer.0.attention": [0]})
    bad["encoder.layer.0.attention.self.query.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ConfigError, match="shape"):
        compact_hf_(model, bad)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_all_heads_masked_is_refused_and_the_model_stays_intact():
    model, inputs = _bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompactionError, match="cannot be emptied"):
        compact_hf_(model, unit_masks(model, {"encoder.layer.0.attention": range(4)}), example_inputs=inputs)
    assert model.encoder.layer[0].attention.self.num_attention_heads == 4
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_gqa_keeps_query_heads_so_that_groups_stay_equal_and_warns():
    model, inputs = _llama()
    attn = _blocks(model, "attention")[0]
    # Group 0 loses 3 of its 4 query heads, group 1 loses 1: group 0 keeps 3 (0 and 1 stay, zero).
    masks = unit_masks(model, {attn.name: [0, 1, 2, 4]})
    with pytest.warns(SlimWarning, match="2 query heads that the masks remove stay"):
        _oracle(model, inputs, masks, engine=True)
    layer = model.model.layers[0].self_attn
    assert (layer.q_proj.out_features, layer.k_proj.out_features, layer.num_key_value_groups) == (6 * 4, 2 * 4, 3)
    assert model.slimtorch_compaction["pruned_heads"][attn.name] == [2, 4]


def test_load_rejects_foreign_and_corrupt_folders(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_folder(tmp_path)
    model, _ = _bert()
    compact_hf_(model, unit_masks(model, {"encoder.layer.0.attention": [0]}))
    save_hf_folder(model, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_hf_folder(tmp_path)
    masked, _ = _bert()
    apply_masks_(masked, unit_masks(masked, {"encoder.layer.0.attention": [0]}))
    with pytest.raises(CheckpointError, match="masks"):
        save_hf_folder(masked, tmp_path / "other")


def test_format_pruned_heads_prints_one_line_per_layer():
    lines = format_pruned_heads({"l.0": [2, 4], "l.2": [0]}, ["l.0", "l.1", "l.2"])
    assert lines == ["layer 0 prune 2 head: [2, 4]", "layer 1 prune 0 head: []", "layer 2 prune 1 head: [0]"]


def test_recorded_steps_replay_on_a_fresh_model():
    from slimtorch.compact import replay_

    torch.manual_seed(0)
    model, inputs = _gpt2()
    torch.manual_seed(0)
    fresh, _ = _gpt2()
    masks = unit_masks(model, {"transformer.h.0.attn": [1], "transformer.h.1.mlp": range(0, 128, 4)})
    _oracle(model, inputs, masks, engine=True)
    replay_(fresh, model.slimtorch_compaction["steps"])  # the engine's own reload path: shapes only
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(_output(fresh.eval(), inputs), _output(model, inputs))
    assert fresh.transformer.h[0].attn.num_heads == 3 and fresh.transformer.h[1].mlp.c_fc.nf == 96


def test_a_fresh_process_loads_a_head_pruned_folder(tmp_path):
    """Loading replays the recorded steps, the attention's among them, whose shrink function is registered when
    a trace starts: a process that loads a folder before it has traced anything must find it too."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    model, inputs = _bert()
    masks = unit_masks(model, {"encoder.layer.0.attention": [1]})
    _oracle(model, inputs, masks, engine=True)
    save_hf_folder(model, tmp_path / "pruned")
    with torch.no_grad():
        save_file({**inputs, "expected": _output(model, inputs).contiguous()}, tmp_path / "io.safetensors")
    code = (
        "import sys, torch\n"
        "from safetensors.torch import load_file\n"
        "from slimtorch.integrations.hf.folders import load_hf_folder\n"
        "m = load_hf_folder(sys.argv[1]).eval()\n"
        "io = load_file(sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    out = m(input_ids=io['input_ids'], attention_mask=io['attention_mask']).last_hidden_state\n"
        "torch.testing.assert_close(out, io['expected'])\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pruned"), str(tmp_path / "io.safetensors")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
