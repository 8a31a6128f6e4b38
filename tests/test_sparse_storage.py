"""Masked weights stored sparse: exact round trips through model files, refusals of corrupt files, and the
stored size that report gives."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from slimtorch import CheckpointError, ConfigError, apply_masks_, compact_, compute_masks, report
from slimtorch.container import read_file
from slimtorch.masks import get_masks
from slimtorch.models.modelfile import MODEL, load_model, save_model
from slimtorch.models.registry import ModelSpec, build_model
from slimtorch.sparse import SparseFormatError, decode_sparse, encode_sparse

FINE = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.9, "granularity": "fine"}]
NM = [{"op_types": ["Conv2d", "Linear"], "granularity": "2:4"}, {"op_names": ["conv1"], "exclude": True}]


def _masked(config: list[dict], name: str = "MnistNet") -> tuple[nn.Module, ModelSpec]:
    spec = ModelSpec(name=name)
    torch.manual_seed(0)
    net = build_model(spec).eval()
    apply_masks_(net, compute_masks(net, config, criterion="magnitude"))
    return net, spec


def _same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("config", [FINE, NM], ids=["fine", "2:4"])
@pytest.mark.parametrize("layout", ["bitmask", "csr", "auto"])
def test_saved_sparse_loads_as_the_masked_model_exactly(tmp_path, config, layout):
    net, spec = _masked(config)
    save_model(tmp_path / "net.safetensors", net, spec, sparse=layout)
    loaded = load_model(tmp_path / "net.safetensors")
    assert loaded.state == "masked"
    _same(loaded.model, net)
    masks = get_masks(net)
    assert sorted(loaded.masks) == sorted(masks) and all(torch.equal(loaded.masks[k], masks[k]) for k in masks)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), net(x), rtol=0, atol=0)
    stored = read_file(tmp_path / "net.safetensors", MODEL)
    assert stored.version == 2 and not any(k.startswith("mask::") for k in stored.tensors)
    assert set(stored.description["sparse"]) == set(masks)


def test_sparse_file_is_smaller_and_dense_files_stay_version_1(tmp_path):
    net, spec = _masked(FINE)
    save_model(tmp_path / "dense.safetensors", net, spec)
    save_model(tmp_path / "sparse.safetensors", net, spec, sparse="auto")
    assert read_file(tmp_path / "dense.safetensors", MODEL).version == 1  # older readers still read it
    dense, sparse = ((tmp_path / f"{n}.safetensors").stat().st_size for n in ("dense", "sparse"))
    assert sparse < 0.15 * dense


def test_a_kept_weight_that_is_zero_stays_kept():
    weight = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    for layout in ("bitmask", "csr"):
        parts, entry = encode_sparse(weight, mask, layout)
        assert len(parts["values"]) == 3
        back, back_mask = decode_sparse(parts, entry)
        assert torch.equal(back, weight) and torch.equal(back_mask, mask)


def test_auto_picks_the_smaller_layout():
    weight = torch.randn(8, 512)
    assert encode_sparse(weight, torch.rand(8, 512) < 0.5, "auto")[1]["layout"] == "bitmask"
    very = torch.zeros(8, 512, dtype=torch.bool)
    very[0, :3] = True  # 99.9% sparse: 3 column indices and 9 row offsets cost less than 512 bytes of bitmask
    assert encode_sparse(weight, very, "auto")[1]["layout"] == "csr"
    with pytest.raises(ConfigError, match="sparse layout"):
        encode_sparse(weight, very, "coo")


def test_compacted_model_keeps_its_masks_sparse(tmp_path):
    spec = ModelSpec(name="MnistNet")
    torch.manual_seed(0)
    net = build_model(spec).eval()
    x = torch.randn(2, 1, 28, 28)
    compact_(net, compute_masks(net, [{"op_names": ["conv1"], "sparse_ratio": 0.5}], example_inputs=x),
             example_inputs=x)
    apply_masks_(net, compute_masks(net, [{"op_names": ["fc1"], "sparse_ratio": 0.8, "granularity": "fine"}]))
    save_model(tmp_path / "c.safetensors", net, spec, sparse="bitmask")
    loaded = load_model(tmp_path / "c.safetensors")
    assert loaded.state == "compacted"
    _same(loaded.model, net)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), net(x), rtol=0, atol=0)


def _rewrite(path, change) -> None:
    """Re-save ``path`` with ``change(tensors, metadata)`` applied: a file safetensors still reads."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = safetensors.torch.load_file(str(path))
    change(tensors, metadata)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def _flip_bit(tensors, metadata):
    key = next(k for k in tensors if k.endswith("::bitmask"))
    tensors[key][0] ^= 1  # one more (or fewer) kept position than stored values


def _bad_column(tensors, metadata):
    key = next(k for k in tensors if k.endswith("::col_indices"))
    tensors[key][0] = 1 << 30


def _bad_shape(tensors, metadata):
    sparse = json.loads(metadata["sparse"])
    name = next(iter(sparse))
    sparse[name]["shape"] = [3, 3]
    metadata["sparse"] = json.dumps(sparse)


def _huge_shape(tensors, metadata):
    sparse = json.loads(metadata["sparse"])
    name = next(iter(sparse))
    sparse[name]["shape"] = [sparse[name]["shape"][0], 1 << 30]  # CSR: no part grows with the columns
    metadata["sparse"] = json.dumps(sparse)


def _missing_part(tensors, metadata):
    del tensors[next(k for k in tensors if k.endswith("::values"))]


def _unlisted(tensors, metadata):
    metadata["sparse"] = json.dumps({})


@pytest.mark.parametrize(("layout", "change", "words"), [
    ("bitmask", _flip_bit, "keeps"), ("csr", _bad_column, "column indices"), ("bitmask", _bad_shape, "bitmask"),
    ("csr", _huge_shape, "in the file, \\[20, 1, 5, 5\\] in the model"), ("csr", _missing_part, "parts"),
    ("bitmask", _unlisted, "no sparse parameter"),
])
def test_corrupt_sparse_file_is_a_checkpoint_error(tmp_path, layout, change, words):
    net, spec = _masked(FINE)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / "net.safetensors"
    save_model(path, net, spec, sparse=layout)
    _rewrite(path, change)
    with pytest.raises(CheckpointError, match=words) as err:
        load_model(path)
    assert "net.safetensors" in str(err.value)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_truncated_sparse_file_is_a_checkpoint_error(tmp_path):
    net, spec = _masked(FINE)
    path = tmp_path / "net.safetensors"
    save_model(path, net, spec, sparse="auto")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a readable"):
        load_model(path)


def test_a_failed_save_leaves_the_file_as_it_was(tmp_path):
    net, spec = _masked(FINE)
    path = tmp_path / "net.safetensors"
    save_model(path, net, spec, sparse="bitmask")
    old = path.read_bytes()
    with pytest.raises(ConfigError, match="sparse layout"):
        save_model(path, net, spec, sparse="dense please")
    assert path.read_bytes() == old


def test_decode_refuses_values_that_do_not_fit_their_positions():
    parts, entry = encode_sparse(torch.randn(4, 4), torch.eye(4, dtype=torch.bool), "bitmask")
    with pytest.raises(SparseFormatError, match="keeps 4 positions but stores 3"):
        decode_sparse({**parts, "values": parts["values"][:3]}, entry)


def test_report_counts_masked_weights_as_stored_sparse():
    """A 90%-masked MLP reported 342,000 B against 273,744 B dense: the bool masks were added to dense weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 86), nn.ReLU(), nn.Linear(86, 10))
    x = torch.randn(2, 784)
    dense = report(net, x, runs=0)
    apply_masks_(net, compute_masks(net, [{"op_types": ["Linear"], "sparse_ratio": 0.9, "granularity": "fine"}],
                                    criterion="magnitude"))
    masked = report(net, x, runs=0)
    assert dense.size_bytes == dense.dense_size_bytes == masked.dense_size_bytes
    assert masked.size_bytes < 0.15 * dense.size_bytes
    assert f"(dense {dense.size_bytes / 1e3:.2f}kB)" in masked.to_markdown()
