"""The one container every save format uses (:mod:`slimtorch.container`), kind by kind: a round trip, and a corrupt
header, a file of another kind, a newer version, a truncated file, an edited description and a pickle, each a
CheckpointError that names the file and the fix, with the model and the files as they were
(:func:`adversarial.fails_cleanly`). Files written by slimtorch 0.1.0 (``tests/files/0.1.0``, before files
recorded their writer) load and compute what they computed. The reader's bounds, the header every writer
records, and the table of formats in docs/architecture.md are checked last.

The files come from ``tests/files/make_files.py`` (the script that wrote the 0.1.0 ones), run with today's code.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import slimtorch
from adversarial import fails_cleanly
from adversarial_env import Env, edit_json, edit_safetensors, truncate
from slimtorch import container
from slimtorch.errors import CheckpointError
from slimtorch.io import load_compacted_, load_masks
from slimtorch.lora import load_lora_
from slimtorch.models.modelfile import load_model
from slimtorch.quant.saving import load_quantized
from slimtorch.recover.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("make_files", ROOT / "files" / "make_files.py")
make_files = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_files)
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("originals")
    make_files.main(root)
    return root


# -- the kinds: how each is opened, where its header and weights are, what its refusals name ---------------------


def _load_hf(path: Path) -> nn.Module:
    from slimtorch.integrations.hf.folders import load_hf_folder

    return load_hf_folder(path)


def _open_masks(p: Path):
    return (lambda: load_masks(p)), []


def _open_model(p: Path):
    return (lambda: load_model(p)), []


def _open_compacted(p: Path):
    fresh = make_files.digits()
    return (lambda: load_compacted_(fresh, p)), [fresh]


def _open_quantized(p: Path):
    template = make_files.digits()
    return (lambda: load_quantized(template, p)), [template]


def _open_checkpoint(p: Path):
    net = make_files.mlp()
    opt = torch.optim.Adam(net.parameters(), lr=0.5)
    return (lambda: load_checkpoint(p, modules={"model": net}, optimizer=opt)), [net]


def _open_lora(p: Path):
    base = make_files.mlp()
    return (lambda: load_lora_(base, p)), [base]


def _open_hf(p: Path):
    return (lambda: _load_hf(p)), []


@dataclass(frozen=True)
class Subject:
    """A kind as the tests see it: its artefact among the originals, how to load it, the file holding its
    header ("" for the artefact itself) and its weights, a fragment of the fix its refusals name, and an edit
    of its description that must be refused (with the fragment of that refusal)."""

    artefact: str
    open: Callable[[Path], tuple[Callable[[], Any], list[nn.Module]]]
    header: str
    weights: str
    fix: str
    edit: Callable[[Path], Any]
    edited: str


def _meta(key: str, change: Callable[[Any], Any]):
    """Edit one JSON field of a safetensors file's header."""
    def edit(meta: dict, tensors: dict) -> None:
        meta[key] = json.dumps(change(json.loads(meta[key])))
    return lambda p: edit_safetensors(p, edit)


def _set(data: dict, key: str, value: Any) -> dict:
    data[key] = value
    return data


SUBJECTS = {
    "masks": Subject("masks.safetensors", _open_masks, "", "", "save_masks",
                     lambda p: edit_safetensors(p, lambda m, t: t.update({k: v.to(torch.uint8) for k, v in t.items()})),
                     "holds non-bool tensors"),
    "model": Subject("model-compacted.safetensors", _open_model, "", "", "save_model",
                     lambda p: edit_safetensors(p, lambda m, t: m.pop("compaction")), "compaction record"),
    "compacted": Subject("compacted", _open_compacted, "compaction.json", "model.safetensors", "save_compacted",
                         lambda p: edit_json(p / "compaction.json", lambda d: d["steps"][0].pop("modules") and d),
                         "needs a 'modules' mapping"),
    "quantized": Subject("quantized.safetensors", _open_quantized, "", "", "save_quantized",
                         _meta("quantization", lambda r: r["config"].update(method="int3") or r),
                         "quantization config is invalid"),
    "checkpoint": Subject("checkpoint.safetensors", _open_checkpoint, "", "", "start afresh",
                          _meta("meta", lambda m: _set(m["optimizer"], "param_groups", "all") and m),
                          "'optimizer' needs a 'plain' mapping and a list of 'param_groups'"),
    "lora": Subject("lora", _open_lora, "adapter_config.json", "adapter_model.safetensors", "save_lora",
                    lambda p: edit_json(p / "adapter_config.json", lambda d: _set(d, "r", 0)), "'r'"),
    "hf": Subject("hf", _open_hf, "config.json", "model.safetensors", "save_hf_folder",
                  lambda p: edit_json(p / "config.json", lambda d: _set(d, "hidden_size", 2**40)), "out of range"),
}
SINGLE_FILES = ("masks", "model", "quantized", "checkpoint")  # the header is the safetensors file's own
OTHER_KIND = {"masks": "checkpoint", "model": "quantized", "quantized": "model", "checkpoint": "masks",
              "compacted": "model"}


def _kinds(names=tuple(SUBJECTS)):
    """Parameters for the kinds ``names``; Hugging Face's only where transformers is installed."""
    skip = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
    return [pytest.param(n, id=n, marks=[skip] if n == "hf" else []) for n in names]


# -- what a good file must load to ----------------------------------------------------------------------------


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to the order of float sums (the files were written with other thread counts than tests use)."""
    torch.testing.assert_close(a, b)


def check_loads(root: Path, kind: str) -> None:
    """The artefact of ``kind`` in ``root`` loads and computes what ``root/expected.safetensors`` says."""
    expected = load_file(str(root / "expected.safetensors"))
    images, vectors = expected["images"], expected["vectors"]
    path = root / SUBJECTS[kind].artefact
    with torch.no_grad():
        if kind == "masks":
            masks = load_masks(path)
            assert masks.keys() == {k[6:] for k in expected if k.startswith("masks.")}
            assert all(torch.equal(v, expected[f"masks.{k}"]) for k, v in masks.items())
        elif kind == "model":
            for name, key in (("model-compacted", "compacted"), ("model-masked", "model-masked")):
                _close(load_model(root / f"{name}.safetensors").model.eval()(images), expected[key])
        elif kind == "compacted":
            fresh = make_files.digits()
            load_compacted_(fresh, path)
            _close(fresh(images), expected["compacted"])
        elif kind == "quantized":
            _close(load_quantized(make_files.digits(), path)(images), expected["quantized"])
        elif kind == "lora":
            base = make_files.mlp()
            load_lora_(base, path)
            _close(base(vectors), expected["lora"])
        elif kind == "hf":
            _close(_load_hf(path)(input_ids=expected["tokens"]).last_hidden_state, expected["hf"])
    if kind == "checkpoint":
        net = make_files.mlp()
        opt = torch.optim.Adam(net.parameters(), lr=0.5)
        extra, _ = load_checkpoint(path, modules={"model": net}, optimizer=opt)
        assert extra == {"epoch": 1} and opt.param_groups[0]["lr"] == 0.01
        assert torch.equal(opt.state[net[0].weight]["exp_avg"], expected["checkpoint.exp_avg"])
        with torch.no_grad():
            _close(net(vectors), expected["checkpoint"])


@pytest.mark.parametrize("kind", _kinds())
def test_round_trip(kind, originals):
    check_loads(originals, kind)


@pytest.mark.parametrize("kind", _kinds())
def test_files_of_slimtorch_0_1_0_still_load(kind):
    """Version 1 of every kind, as 0.1.0 wrote it (no ``slimtorch`` entry in the header yet), reads as before."""
    old = ROOT / "files" / "0.1.0"
    if kind in SINGLE_FILES:
        with safe_open(str(old / SUBJECTS[kind].artefact), framework="pt") as f:
            assert f.metadata()["format"] == f"slimtorch-{kind}-v1" and "slimtorch" not in f.metadata()
    check_loads(old, kind)


# -- refusals -----------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: the proof that a loader unpickled the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _corrupt_header(file: Path) -> None:
    """Garble the JSON header of a safetensors file (same length: the 8-byte size before it still fits)."""
    raw = bytearray(file.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    raw[8 : 8 + size] = b"{" + b"#" * (size - 1)
    file.write_bytes(bytes(raw))


def _set_format(file: Path, fmt: str) -> None:
    if file.suffix == ".json":
        edit_json(file, lambda d: _set(d, "format", fmt))
    else:
        edit_safetensors(file, lambda meta, t: meta.__setitem__("format", fmt))


@dataclass(frozen=True)
class Case:
    """How to break a good artefact of a kind: ``change(env, artefact) -> the file the error must name``."""

    change: Callable[[Env, Path], Path]
    fragment: Callable[[str], str]
    names_fix: bool = True


def _header_file(kind: str, artefact: Path) -> Path:
    return artefact / SUBJECTS[kind].header if SUBJECTS[kind].header else artefact


def _weights_file(kind: str, artefact: Path) -> Path:
    return artefact / SUBJECTS[kind].weights if SUBJECTS[kind].weights else artefact


def _corrupt(env: Env, kind: str, artefact: Path) -> Path:
    header = _header_file(kind, artefact)
    _corrupt_header(header) if header.suffix == ".safetensors" else header.write_text('{"format": [')
    return header


def _other_kind(env: Env, kind: str, artefact: Path) -> Path:
    if kind in OTHER_KIND:  # the header says another kind
        _set_format(_header_file(kind, artefact), f"slimtorch-{OTHER_KIND[kind]}-v1")
        return _header_file(kind, artefact)
    shutil.rmtree(artefact)  # a folder of another layout where the adapter or the model should be
    shutil.copytree(env.originals / ("compacted" if kind == "lora" else "lora"), artefact)
    return artefact


def _newer(env: Env, kind: str, artefact: Path) -> Path:
    _set_format(_header_file(kind, artefact), f"slimtorch-{kind}-v{container.kinds()[kind].version + 1}")
    return _header_file(kind, artefact)


def _truncated(env: Env, kind: str, artefact: Path) -> Path:
    return truncate(_weights_file(kind, artefact))


def _edited(env: Env, kind: str, artefact: Path) -> Path:
    SUBJECTS[kind].edit(artefact)
    return _weights_file(kind, artefact) if kind == "masks" else _header_file(kind, artefact)


def _pickled(env: Env, kind: str, artefact: Path) -> Path:
    weights = _weights_file(kind, artefact)
    weights.write_bytes(pickle.dumps(_Payload(env.tmp / "unpickled")))
    return weights


_TITLES = {"masks": "mask file", "model": "slimtorch model file", "quantized": "slimtorch quantized model file",
           "checkpoint": "slimtorch checkpoint", "compacted": "slimtorch-compacted-v1 description"}
CASES = {
    "corrupt header": Case(lambda e, k, a: _corrupt(e, k, a),
                           lambda k: "not valid JSON" if SUBJECTS[k].header else "is not a readable"),
    "another kind": Case(lambda e, k, a: _other_kind(e, k, a),
                         lambda k: {"lora": "adapter_config.json' does not exist", "hf": "has no config.json"}.get(
                             k, f"is not a {_TITLES.get(k)}: it is a")),
    "a newer version": Case(lambda e, k, a: _newer(e, k, a), lambda k: "was written by a newer slimtorch",
                            names_fix=False),
    "truncated": Case(lambda e, k, a: _truncated(e, k, a), lambda k: "readable"),
    "an edited description": Case(lambda e, k, a: _edited(e, k, a), lambda k: SUBJECTS[k].edited),
    "a pickle": Case(lambda e, k, a: _pickled(e, k, a), lambda k: "never unpickles"),
}
#: external layouts (PEFT's, Hugging Face's) have no slimtorch format to be newer than
ROWS = [pytest.param(kind, case, id=f"{kind}: {case}", marks=param.marks)
        for case in CASES for param in _kinds() for kind in [param.values[0]]
        if not (case == "a newer version" and kind in ("lora", "hf"))]


@pytest.mark.parametrize(("kind", "case"), ROWS)
def test_refused_with_the_file_and_the_fix(kind, case, originals, tmp_path):
    env = Env(tmp_path / "case", originals)
    env.tmp.mkdir()
    artefact = env.copy(SUBJECTS[kind].artefact)
    named = CASES[case].change(env, kind, artefact)
    call, models = SUBJECTS[kind].open(artefact)
    err = fails_cleanly(call, CheckpointError, CASES[case].fragment(kind), models=models, paths=[env.tmp])
    assert str(named) in str(err)
    if CASES[case].names_fix:
        assert SUBJECTS[kind].fix in str(err)
    else:
        assert "upgrade slimtorch" in str(err)
    assert not (env.tmp / "unpickled").exists()


def _rename_tensor(old: str, new: str):
    return lambda p: edit_safetensors(p, lambda meta, t: t.__setitem__(new, t.pop(old)))


EDITS = [  # edits that used to escape as untyped errors, or to fail after part of the file was loaded
    ("quantized: record not JSON", "quantized",
     lambda p: edit_safetensors(p, lambda meta, t: meta.__setitem__("quantization", "{oops")),
     "has a missing or corrupt quantization record: 'quantization' is not valid JSON"),
    ("checkpoint: an optimizer tensor of no parameter", "checkpoint",
     _rename_tensor("optim.0.exp_avg", "optim.first.exp_avg"), "belong to no saved module"),
    ("model: a tensor of no state dict", "model", _rename_tensor("state::head.weight", "head.weight"),
     "neither 'state::<key>', bool 'mask::<parameter>' nor 'sparse::<parameter>::<part>'"),
    ("compacted: a class that is no string", "compacted",
     lambda p: edit_json(p / "compaction.json", lambda d: _set(d, "class", ["nn.Sequential"])),
     "'class' must be a str"),
]


@pytest.mark.parametrize(("kind", "edit", "fragment"), [row[1:] for row in EDITS], ids=[row[0] for row in EDITS])
def test_edited_files_are_refused_before_anything_is_loaded(kind, edit, fragment, originals, tmp_path):
    env = Env(tmp_path / "case", originals)
    env.tmp.mkdir()
    artefact = env.copy(SUBJECTS[kind].artefact)
    edit(artefact)
    call, models = SUBJECTS[kind].open(artefact)
    err = fails_cleanly(call, CheckpointError, fragment, models=models, paths=[env.tmp])
    assert SUBJECTS[kind].fix in str(err)


# -- the reader's bounds, the header writers record, the documented table -----------------------------------------


def test_sizes_are_bounded_before_anything_is_parsed(originals, monkeypatch):
    monkeypatch.setattr(container, "MAX_HEADER_BYTES", 200)
    fails_cleanly(lambda: load_model(originals / "model-compacted.safetensors"), CheckpointError,
                  "has a header of")
    fresh = make_files.digits()
    fails_cleanly(lambda: load_compacted_(fresh, originals / "compacted"), CheckpointError, "bytes (at most 200)",
                  models=[fresh])
    monkeypatch.setattr(container, "MAX_HEADER_BYTES", 64 << 20)
    monkeypatch.setattr(container, "MAX_TENSORS", 3)
    fails_cleanly(lambda: load_masks(originals / "model-masked.safetensors"), CheckpointError, "tensors (at most 3)")


@pytest.mark.parametrize("kind", [*SINGLE_FILES, "compacted"])
def test_every_file_records_its_kind_version_and_writer(kind, originals):
    path = _header_file(kind, originals / SUBJECTS[kind].artefact)
    if path.suffix == ".json":
        header = json.loads(path.read_text())
    else:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata()
    assert header["format"] == f"slimtorch-{kind}-v1" and header["slimtorch"] == slimtorch.__version__


def test_the_docs_table_lists_every_kind():
    import slimtorch.lora  # (each module registers its kinds)
    import slimtorch.models.modelfile
    import slimtorch.quant.saving
    import slimtorch.recover.checkpoint

    if HAS_TRANSFORMERS:
        import slimtorch.integrations.hf.folders  # noqa: F401
    text = (ROOT.parent / "docs" / "architecture.md").read_text().split("## File formats", 1)[1].split("\n## ", 1)[0]
    documented = {m for line in text.splitlines() if line.startswith("| `") for m in re.findall(r"^\| `(\w+)`", line)}
    assert documented == set(container.kinds()) | ({"hf"} if not HAS_TRANSFORMERS else set())


def test_a_kind_needs_a_name_the_format_can_carry():
    with pytest.raises(slimtorch.ConfigError, match="lower-case word"):
        container.register_kind(container.Kind(name="My-Kind", version=1, title="file", fix="none"))
    assert "My-Kind" not in container.kinds()
