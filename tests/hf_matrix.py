"""The Hugging Face matrix: one tiny model (hidden 32, two layers, random weights, no download) of every family
people prune, checked three ways against the masked model:

* ``linear``: half the outputs of every Linear layer masked (``compute_masks``, L1), compacted;
* ``units``: whole heads of every attention block and a quarter of every FFN's neurons (each expert's own, in a
  mixture of experts) masked (``unit_masks``), compacted, saved (``save_hf_folder``) and loaded back
  (``load_hf_folder``, and plain ``from_pretrained`` where the config states the sizes);
* ``experts`` (mixtures of experts): one expert of every block removed (``prune_experts_``) against the model
  run with it disabled, saved and loaded back.

Each compacted model computes what the masked one does on inputs it never saw, and has the parameter count the
masks imply. Shared by tests/test_hf_matrix.py and runnable alone to print the table:

    PYTHONPATH=src:tests python tests/hf_matrix.py [families...]
"""

from __future__ import annotations

import copy
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import transformers as T
from torch import nn
from torch.utils._pytree import tree_leaves

import slimtorch
from slimtorch.integrations.hf.compaction import example_inputs_for, unit_masks
from slimtorch.integrations.hf.configs import base_class
from slimtorch.integrations.hf.folders import load_hf_folder, save_hf_folder
from slimtorch.integrations.hf.moe import disabled_experts, moe_blocks, prune_experts_
from slimtorch.integrations.hf.units import BlockSpec, find_blocks
from slimtorch.prune.coupled import implied_param_count

V = 64  # vocabulary
_ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=V)
_DEC = dict(_ENC, num_key_value_heads=2)
_SEQ2SEQ = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=64, decoder_ffn_dim=48, vocab_size=V, max_position_embeddings=32, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=V, decoder_start_token_id=0)
_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
               patch_size=8)
_MOE = dict(_DEC, num_experts_per_tok=2)
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

#: family -> (kind, builder)
FAMILIES: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "bert": ("encoder", lambda: T.BertModel(T.BertConfig(**_ENC))),
    "roberta": ("encoder", lambda: T.RobertaModel(T.RobertaConfig(**_ENC, pad_token_id=1))),
    "xlm-roberta": ("encoder", lambda: T.XLMRobertaModel(T.XLMRobertaConfig(**_ENC, pad_token_id=1))),
    "electra": ("encoder", lambda: T.ElectraModel(T.ElectraConfig(**_ENC, embedding_size=16))),
    "distilbert": ("encoder", lambda: T.DistilBertModel(T.DistilBertConfig(dim=32, n_layers=2, n_heads=4,
                                                                           hidden_dim=64, vocab_size=V))),
    "albert": ("encoder", lambda: T.AlbertModel(T.AlbertConfig(**_ENC, embedding_size=16))),
    "deberta-v2": ("encoder", lambda: T.DebertaV2Model(T.DebertaV2Config(
        **_ENC, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16, position_buckets=8))),
    "deberta-v3": ("encoder", lambda: T.DebertaV2Model(T.DebertaV2Config(
        **_ENC, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16, position_buckets=8,
        share_att_key=True, norm_rel_ebd="layer_norm"))),
    "mpnet": ("encoder", lambda: T.MPNetModel(T.MPNetConfig(**_ENC))),
    "t5": ("encoder-decoder", lambda: T.T5ForConditionalGeneration(T.T5Config(**_T5))),
    "mt5": ("encoder-decoder", lambda: T.MT5ForConditionalGeneration(T.MT5Config(**_T5))),
    "bart": ("encoder-decoder", lambda: T.BartForConditionalGeneration(T.BartConfig(**_SEQ2SEQ))),
    "mbart": ("encoder-decoder", lambda: T.MBartForConditionalGeneration(T.MBartConfig(**_SEQ2SEQ))),
    "marian": ("encoder-decoder", lambda: T.MarianMTModel(T.MarianConfig(**_SEQ2SEQ))),
    "whisper": ("audio", lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
        **{k: v for k, v in _SEQ2SEQ.items() if k != "max_position_embeddings"}, num_mel_bins=8,
        max_source_positions=16, max_target_positions=16))),
    "clip": ("vision", lambda: T.CLIPModel(T.CLIPConfig(
        text_config=dict(_ENC, max_position_embeddings=16, **_IDS), vision_config=_VISION, projection_dim=16))),
    "vit": ("vision", lambda: T.ViTModel(T.ViTConfig(**_VISION))),
    "deit": ("vision", lambda: T.DeiTModel(T.DeiTConfig(**_VISION))),
    "swin": ("vision", lambda: T.SwinModel(T.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[1, 1],
                                                        num_heads=[2, 4], window_size=4))),
    "gpt2": ("decoder", lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V,
                                                               n_positions=32, bos_token_id=1, eos_token_id=2))),
    "gpt-neox": ("decoder", lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**_ENC, **_IDS))),
    "bloom": ("decoder", lambda: T.BloomForCausalLM(T.BloomConfig(hidden_size=32, n_layer=2, n_head=4,
                                                                  vocab_size=V, **_IDS))),
    "falcon": ("decoder", lambda: T.FalconForCausalLM(T.FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=V, multi_query=True, **_IDS))),
    "falcon-gqa": ("decoder", lambda: T.FalconForCausalLM(T.FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, vocab_size=V,
        new_decoder_architecture=True, **_IDS))),
    "phi3": ("decoder", lambda: T.Phi3ForCausalLM(T.Phi3Config(**_DEC, **_IDS))),
    "phi": ("decoder", lambda: T.PhiForCausalLM(T.PhiConfig(**_ENC, **_IDS))),
    "opt": ("decoder", lambda: T.OPTForCausalLM(T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                            ffn_dim=64, vocab_size=V, word_embed_proj_dim=16,
                                                            max_position_embeddings=32, **_IDS))),
    "llama": ("decoder", lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DEC, **_IDS))),
    "mistral": ("decoder", lambda: T.MistralForCausalLM(T.MistralConfig(**_DEC, **_IDS))),
    "qwen2": ("decoder", lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_DEC, **_IDS))),
    "qwen3": ("decoder", lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**_DEC, head_dim=8, **_IDS))),
    "gemma": ("decoder", lambda: T.GemmaForCausalLM(T.GemmaConfig(**_DEC, head_dim=8, **_IDS))),
    "gemma2": ("decoder", lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**_DEC, head_dim=8, **_IDS))),
    "mixtral": ("moe", lambda: T.MixtralForCausalLM(T.MixtralConfig(**_MOE, num_local_experts=4, **_IDS))),
    "qwen2-moe": ("moe", lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
        **_MOE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64, **_IDS))),
    "olmoe": ("moe", lambda: T.OlmoeForCausalLM(T.OlmoeConfig(**_MOE, num_experts=4, **_IDS))),
}

#: more families, beyond the ones people name most: each compacts exactly or is refused with a typed error
EXTRA: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "camembert": ("encoder", lambda: T.CamembertModel(T.CamembertConfig(**_ENC, pad_token_id=1))),
    "roformer": ("encoder", lambda: T.RoFormerModel(T.RoFormerConfig(**_ENC, embedding_size=32))),
    "megatron-bert": ("encoder", lambda: T.MegatronBertModel(T.MegatronBertConfig(**_ENC))),
    "ernie": ("encoder", lambda: T.ErnieModel(T.ErnieConfig(**_ENC))),
    "pegasus": ("encoder-decoder", lambda: T.PegasusForConditionalGeneration(T.PegasusConfig(**_SEQ2SEQ))),
    "m2m100": ("encoder-decoder", lambda: T.M2M100ForConditionalGeneration(T.M2M100Config(**_SEQ2SEQ))),
    "blenderbot": ("encoder-decoder", lambda: T.BlenderbotForConditionalGeneration(T.BlenderbotConfig(**_SEQ2SEQ))),
    "umt5": ("encoder-decoder", lambda: T.UMT5ForConditionalGeneration(T.UMT5Config(**_T5))),
    "longt5": ("encoder-decoder", lambda: T.LongT5ForConditionalGeneration(T.LongT5Config(**_T5))),
    "speech2text": ("audio", lambda: T.Speech2TextForConditionalGeneration(T.Speech2TextConfig(
        **_SEQ2SEQ, input_feat_per_channel=8, num_conv_layers=2, conv_channels=16, max_source_positions=32))),
    "wav2vec2": ("audio", lambda: T.Wav2Vec2Model(T.Wav2Vec2Config(
        **_ENC, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, do_stable_layer_norm=True))),
    "beit": ("vision", lambda: T.BeitModel(T.BeitConfig(**_VISION, use_relative_position_bias=True))),
    "dinov2": ("vision", lambda: T.Dinov2Model(T.Dinov2Config(**_VISION))),
    "siglip": ("vision", lambda: T.SiglipModel(T.SiglipConfig(
        text_config=dict(_ENC, max_position_embeddings=16), vision_config=_VISION))),
    "gpt-j": ("decoder", lambda: T.GPTJForCausalLM(T.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                                vocab_size=V, n_positions=32, **_IDS))),
    "gpt-bigcode": ("decoder", lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(
        n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=32, multi_query=True, **_IDS))),
    "gpt-bigcode-mha": ("decoder", lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(
        n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=32, multi_query=False, **_IDS))),
    "codegen": ("decoder", lambda: T.CodeGenForCausalLM(T.CodeGenConfig(
        n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=V, n_positions=32, n_ctx=32, **_IDS))),
    "xglm": ("decoder", lambda: T.XGLMForCausalLM(T.XGLMConfig(d_model=32, num_layers=2, attention_heads=4,
                                                               ffn_dim=64, vocab_size=V, max_position_embeddings=32))),
    "mpt": ("decoder", lambda: T.MptForCausalLM(T.MptConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=V,
                                                            expansion_ratio=2, max_seq_len=32))),
    "stablelm": ("decoder", lambda: T.StableLmForCausalLM(T.StableLmConfig(**_DEC, **_IDS))),
    "starcoder2": ("decoder", lambda: T.Starcoder2ForCausalLM(T.Starcoder2Config(**_DEC, **_IDS))),
    "granite": ("decoder", lambda: T.GraniteForCausalLM(T.GraniteConfig(**_DEC, **_IDS))),
    "cohere": ("decoder", lambda: T.CohereForCausalLM(T.CohereConfig(**_DEC, **_IDS))),
    "olmo2": ("decoder", lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**_DEC, **_IDS))),
    "gemma3": ("decoder", lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_DEC, head_dim=8, **_IDS))),
    "smollm3": ("decoder", lambda: T.SmolLM3ForCausalLM(T.SmolLM3Config(**_DEC, **_IDS))),
    "glm4": ("decoder", lambda: T.Glm4ForCausalLM(T.Glm4Config(**_DEC, head_dim=8, **_IDS))),
    "data2vec-text": ("encoder", lambda: T.Data2VecTextModel(T.Data2VecTextConfig(**_ENC, pad_token_id=1))),
    "mobilebert": ("encoder", lambda: T.MobileBertModel(T.MobileBertConfig(
        **_ENC, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16))),
    "bigbird": ("encoder", lambda: T.BigBirdModel(T.BigBirdConfig(**_ENC, attention_type="original_full"))),
    "esm": ("encoder", lambda: T.EsmModel(T.EsmConfig(**_ENC, pad_token_id=1, mask_token_id=2,
                                                     position_embedding_type="rotary"))),
    "mt5-encoder": ("encoder", lambda: T.MT5EncoderModel(T.MT5Config(**_T5))),
    "hubert": ("audio", lambda: T.HubertModel(T.HubertConfig(
        **_ENC, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4))),
    "dinov2-registers": ("vision", lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**_VISION))),
    "vit-msn": ("vision", lambda: T.ViTMSNModel(T.ViTMSNConfig(**_VISION))),
    "yolos": ("vision", lambda: T.YolosModel(T.YolosConfig(**dict(_VISION, image_size=[16, 16]),
                                                           num_detection_tokens=2))),
    "persimmon": ("decoder", lambda: T.PersimmonForCausalLM(T.PersimmonConfig(**_ENC, **_IDS))),
    "olmo": ("decoder", lambda: T.OlmoForCausalLM(T.OlmoConfig(**_DEC, **_IDS))),
    "nemotron": ("decoder", lambda: T.NemotronForCausalLM(T.NemotronConfig(**_DEC, **_IDS))),
    "gpt-oss": ("moe", lambda: T.GptOssForCausalLM(T.GptOssConfig(**_DEC, num_local_experts=4, num_experts_per_tok=2,
                                                                   head_dim=8, **_IDS))),
    "deepseek-v3": ("moe", lambda: T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
        **_DEC, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
        n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8, **_IDS))),
    "qwen3-moe": ("moe", lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
        **_MOE, num_experts=4, moe_intermediate_size=32, head_dim=8, **_IDS))),
    "granitemoe": ("moe", lambda: T.GraniteMoeForCausalLM(T.GraniteMoeConfig(**_MOE, num_local_experts=4, **_IDS))),
    "phimoe": ("moe", lambda: T.PhimoeForCausalLM(T.PhimoeConfig(**_MOE, num_local_experts=4, **_IDS))),
}
ALL = {**FAMILIES, **EXTRA}

#: families whose attention cannot lose heads (the layout says why): the masks on heads stay, with a warning
REFUSED_HEADS = {n: "normalises the channels of every head together" for n in ("olmoe", "olmo2")}
#: families whose heads are decided once for all layers of a stack (a position bias computed once and shared)
SHARED_HEADS = {"t5", "mt5", "mpnet", "albert"}


def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Random values for every constant parameter (zero biases, LayerNorm weights of 1), so that a dropped bias or
    a wrong scale cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = ALL[name][1]().eval()
    randomize_(model)
    return model


def fresh_inputs(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs the compaction never saw: other values, another batch size and length."""
    torch.manual_seed(seed)
    out = example_inputs_for(model, batch=3, length=6)
    for key, value in out.items():
        if key.endswith("input_ids"):
            out[key] = torch.randint(1, int(value.max()) + 2, value.shape)
        elif value.is_floating_point():
            out[key] = torch.randn_like(value)
    return out


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return [t for t in tree_leaves(out.to_tuple() if hasattr(out, "to_tuple") else out)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor], exact: bool = False) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-5 * max(1.0, float(b.abs().max()))}
        torch.testing.assert_close(a, b, **tol)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linear_names(model: nn.Module) -> list[str]:
    """Every Linear layer (HF's ``Conv1D``, a Linear stored (in, out), too)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, T.pytorch_utils.Conv1D))]


def orphaned(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Parameters of the key/value heads all of whose query heads the masks remove (grouped-query attention):
    compaction removes such a head too, as it serves no query head, although the masks need not say so."""
    total = 0
    for spec in find_blocks(model).values():
        if spec.kind != "attention" or not spec.kv_units:
            continue
        q = next(s for s in spec.producers if not s.kv)
        mask = masks.get(f"{spec.prefix}.{q.param}")
        for g in range(spec.kv_units):
            heads = range(g * spec.group, (g + 1) * spec.group)
            if mask is None or any(bool(mask.movedim(q.dim, 0)[q.positions(h)].any()) for h in heads):
                continue
            for s in (s for s in spec.producers if s.kv):  # (what the masks keep of its rows)
                m = masks.get(f"{spec.prefix}.{s.param}")
                p = model.get_parameter(f"{spec.prefix}.{s.param}")
                total += s.width * p.numel() // p.shape[s.dim] if m is None else int(m.movedim(s.dim, 0)[
                    s.positions(g)].sum())
    return total


def shared_bias(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Parameters of a relative position bias outside the attention blocks (MPNet's encoder computes one for every
    layer, BEiT's layers one each and pass it in) whose head columns go with heads removed in every block it
    reaches: compaction removes them too, though the blocks' masks do not name them."""
    specs = [s for s in find_blocks(model).values() if s.kind == "attention"]
    total = 0
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        scope = owner.rpartition(".")[0]
        if not name.endswith(("relative_attention_bias.weight", "relative_position_bias_table")) or any(
                name.startswith(f"{s.name}.") for s in specs) or hasattr(model.get_submodule(scope), "q"):
            continue  # (an attention's own bias, or one of an attention the matrix does not prune)
        reached = [s for s in specs if s.name.startswith(f"{scope}.")]
        outs = [masks.get(f"{s.prefix}.{s.consumers[0].param}") for s in reached]
        gone = [h for h in range(p.shape[1]) if reached and all(
            o is not None and not bool(o.movedim(1, 0)[s.consumers[0].positions(h)].any())
            for o, s in zip(outs, reached, strict=True))]
        total += len(gone) * p.shape[0]
    return total


def check_linear(name: str) -> dict[str, Any]:
    """Half the outputs of every Linear layer masked, compacted: == masked, parameters as the masks imply."""
    model = build(name)
    x = example_inputs_for(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (coupled pruning says what it could not prune: residual streams, heads)
        masks = slimtorch.compute_masks(model, [{"op_names": linear_names(model), "sparse_ratio": 0.5}],
                                        example_inputs=x)
        ref = copy.deepcopy(model)
        slimtorch.apply_masks_(ref, masks)
        before = count(model)
        slimtorch.compact_(model, masks, example_inputs=x)
    inputs = fresh_inputs(model)
    assert_same(outputs(model, inputs), outputs(ref, inputs))
    after = count(model)
    assert after == implied_param_count(ref, masks) - orphaned(ref, masks)
    assert after < before or name in REFUSED_HEADS  # (its only Linear layers are its attention's)
    return {"linear_before": before, "linear_after": after}


def chosen_units(spec: BlockSpec) -> list[int]:
    """Heads: one per key/value group (one in all, without groups); FFN neurons: every fourth (an expert's
    neurons: every fourth from its own start, so that experts lose different neurons)."""
    if spec.kind == "attention":
        return [1] if spec.kv_units in (0, spec.units) else [g * spec.group + 1 for g in range(spec.kv_units)]
    start = int(spec.name.rpartition("[")[2].rstrip("]")) % 4 if spec.name.endswith("]") else 0
    return list(range(start, spec.units, 4))


def check_units(name: str, folder: str) -> dict[str, Any]:
    """Heads and FFN neurons masked block by block, compacted, saved, loaded."""
    model = build(name)
    specs = find_blocks(model)
    heads = [s for s in specs.values() if s.kind == "attention"]
    ffn = [s for s in specs.values() if s.kind == "ffn"]
    masks = unit_masks(model, {s.name: chosen_units(s) for s in specs.values()})
    ref = copy.deepcopy(model)
    slimtorch.apply_masks_(ref, masks)
    before = count(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slimtorch.compact_(model, masks, example_inputs=example_inputs_for(model))
    inputs = fresh_inputs(model)
    want = outputs(ref, inputs)
    assert_same(outputs(model, inputs), want)
    after = count(model)
    kept = [str(w.message) for w in caught if issubclass(w.category, slimtorch.SlimWarning)]
    if name not in REFUSED_HEADS:
        assert after == implied_param_count(ref, masks) - shared_bias(ref, masks) < before, kept
    else:
        assert any(REFUSED_HEADS[name] in w for w in kept), kept
    pruned = model.slimtorch_compaction.get("pruned_heads", {})
    result = {"heads": len(heads), "ffn": len(ffn), "units_before": before, "units_after": after,
              "pruned_heads": sum(len(v) for v in pruned.values())}
    result.update(check_folder(model, folder, inputs))
    return result


def check_folder(model: nn.Module, folder: str, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Saved and loaded by our loader (exact); plain ``from_pretrained`` where the config states the sizes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the masks a compacted model keeps are not saved in a folder)
        save_hf_folder(model, folder)
    want = outputs(model, inputs)
    again = load_hf_folder(folder)
    assert count(again) == count(model)
    assert_same(outputs(again, inputs), want, exact=True)
    try:
        plain = base_class(model).from_pretrained(folder).eval()
    except Exception:  # the config cannot state per-layer sizes: the shapes do not fit it
        return {"from_pretrained": False}
    assert_same(outputs(plain, inputs), want, exact=True)
    return {"from_pretrained": True}


def check_experts(name: str, folder: str) -> dict[str, Any]:
    """One expert of every block removed: == the model run with it disabled; saved and loaded."""
    model = build(name)
    gone = {block: [1] for block in moe_blocks(model)}
    inputs = fresh_inputs(model)
    with disabled_experts(model, gone):
        want = outputs(model, inputs)
    before = count(model)
    prune_experts_(model, gone)
    assert_same(outputs(model, inputs), want)
    return {"experts_removed": len(gone), "experts_params": (before, count(model)),
            **{f"experts_{k}": v for k, v in check_folder(model, folder, inputs).items()}}


def check(name: str) -> dict[str, Any]:
    result: dict[str, Any] = {"kind": ALL[name][0]}
    result.update(check_linear(name))
    with tempfile.TemporaryDirectory() as folder:
        result.update(check_units(name, folder))
    if ALL[name][0] == "moe":
        with tempfile.TemporaryDirectory() as folder:
            result.update(check_experts(name, folder))
    return result


def outcome(err: BaseException | None) -> str:
    """``exact``; ``typed error`` (refused with one of slimtorch's errors, the model untouched); ``failing``."""
    if err is None:
        return "exact"
    return "typed error" if isinstance(err, slimtorch.SlimError) else "failing"


def _row(family: str) -> tuple[str, str]:
    try:
        r = check(family)
    except Exception as err:  # a script that prints a table: report and go on
        return outcome(err), f"{type(err).__name__}: {str(err)[:200]}"
    return "exact", (f"{r['heads']} | {r['ffn']} | {r['linear_before']:,} -> {r['linear_after']:,} | "
                     f"{r['units_before']:,} -> {r['units_after']:,} | {r['pruned_heads']} | "
                     f"{'exact' if r['from_pretrained'] else 'per-layer sizes'}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    T.logging.disable_progress_bar()
    print("| family | named | kind | outcome | heads blocks | FFN blocks | linear 50%: params | units: params | "
          "pruned heads | plain from_pretrained | seconds |")
    print("|---|---|---|---|---:|---:|---|---|---:|---|---:|")
    counts: dict[tuple[str, str], int] = {}
    for family in sys.argv[1:] or ALL:
        start = time.perf_counter()
        result, row = _row(family)
        named = "named" if family in FAMILIES else "more"
        counts[(named, result)] = counts.get((named, result), 0) + 1
        print(f"| {family} | {named} | {ALL[family][0]} | {result} | {row} | {time.perf_counter() - start:.1f} |",
              flush=True)
    for named in ("named", "more"):
        total = sum(n for (k, _), n in counts.items() if k == named)
        print(f"{named}: {total} families: " + ", ".join(f"{counts.get((named, r), 0)} {r}"
                                                      for r in ("exact", "typed error", "failing")))
