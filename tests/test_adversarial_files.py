"""Adversarial table for files and outputs: every corrupt, truncated, pickled, edited or wrong file given to a
loader, and every output target that cannot be replaced, gets a typed error with a message fragment, and the
model and the files on disk are byte-identical after the failure (:func:`adversarial.fails_cleanly`); the
unusual inputs that must work are checked after the failures.

Each row of ``FAILURES`` is ``(id, setup, error, fragment)``: ``setup(env)`` prepares the files in its own
folder and returns ``(call, models, paths)``; ``SUCCESSES`` rows are ``(id, check)``. Shared pieces are in
``adversarial_env.py``; resuming and the command line have their own tables (``test_adversarial_resume.py``,
``test_adversarial_cli.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from adversarial import files_state
from adversarial_env import (
    DIGITS,
    IMAGE,
    Env,
    edit_json,
    edit_safetensors,
    garble,
    make_net,
    make_originals,
    make_residual,
    pickle_over,
    read_only,
    read_only_folder,
    run_row,
    truncate,
)
from slimtorch import apply_masks_, get_masks, remove_masks_
from slimtorch.errors import CheckpointError, ConfigError
from slimtorch.io import load_compacted_, load_masks, save_compacted, save_masks
from slimtorch.lora import LoRAConfig, add_lora_, load_lora_, save_lora
from slimtorch.models.modelfile import load_model, save_model
from slimtorch.models.registry import build_model
from slimtorch.recover.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("originals")
    make_originals(root)
    return root


# -- loaders: corrupt, truncated, pickled, wrong files --------------------------------------------------------


def _masks(env: Env, make: Callable[[Env], Path]):
    path = make(env)
    return (lambda: load_masks(path)), [], [env.tmp]


def _model_file(env: Env, make: Callable[[Env], Path]):
    path = make(env)
    return (lambda: load_model(path)), [], [env.tmp]


def _header(name: str, key: str, value: Any):
    def make(env: Env) -> Path:
        return edit_safetensors(env.copy(name), lambda meta, tensors: meta.__setitem__(key, value))
    return make


def _tensors(name: str, change: Callable[[dict], None]):
    def make(env: Env) -> Path:
        return edit_safetensors(env.copy(name), lambda meta, tensors: change(tensors))
    return make


def _compaction(change: Callable[[dict], Any]):
    def make(env: Env) -> Path:
        return edit_safetensors(env.copy("compacted.safetensors"), lambda meta, tensors: meta.__setitem__(
            "compaction", json.dumps(change(json.loads(meta["compaction"])))))
    return make


def _bad_keeps(record: dict) -> dict:
    step = record["steps"][0]
    name = sorted(step["modules"])[0]
    key = sorted(step["modules"][name]["keeps"])[0]
    step["modules"][name]["keeps"][key] = [10_000_000]
    return record


def _folder(env: Env, change: Callable[[Path], Any], fresh: Callable[[], nn.Module] = make_residual):
    folder = env.copy("residual")
    change(folder)
    model = fresh()
    return (lambda: load_compacted_(model, folder)), [model], [env.tmp]


def _description(change: Callable[[dict], Any]):
    return lambda env: _folder(env, lambda folder: edit_json(folder / "compaction.json", change))


def _first_change(description: dict) -> dict:
    step = description["steps"][0]
    return step["modules"][sorted(step["modules"])[0]]


def _weights(change: Callable[[dict], None]):
    return lambda env: _folder(env, lambda folder: edit_safetensors(folder / "model.safetensors",
                                                                     lambda meta, tensors: change(tensors)))


def _missing_folder(env: Env):
    model = make_residual()
    return (lambda: load_compacted_(model, env.tmp / "none")), [model], [env.tmp]


def _compacted_already(env: Env):
    folder = env.copy("residual")
    model = make_residual()
    load_compacted_(model, folder)
    return (lambda: load_compacted_(model, folder)), [model], [env.tmp]


def _pop_first(tensors: dict) -> None:
    tensors.pop(sorted(tensors)[0])


def _to_double(tensors: dict) -> None:
    name = next(k for k, v in sorted(tensors.items()) if v.is_floating_point())
    tensors[name] = tensors[name].double()


LOADERS = [
    ("masks: missing file", lambda e: _masks(e, lambda e: e.tmp / "none.safetensors"), CheckpointError,
     "does not exist"),
    ("masks: a folder", lambda e: _masks(e, lambda e: e.copy("residual")), CheckpointError, "is a folder"),
    ("masks: garbage", lambda e: _masks(e, lambda e: garble(e.copy("masks.safetensors"))), CheckpointError,
     "not a readable safetensors mask file"),
    ("masks: truncated", lambda e: _masks(e, lambda e: truncate(e.copy("masks.safetensors"))), CheckpointError,
     "not a readable safetensors mask file"),
    ("masks: empty file", lambda e: _masks(e, lambda e: e.write("m.safetensors", b"")), CheckpointError,
     "not a readable safetensors mask file"),
    ("masks: pickled .pt", lambda e: _masks(e, lambda e: e.copy("pickled.pt")), CheckpointError,
     "not a readable safetensors mask file"),
    ("masks: a model file", lambda e: _masks(e, lambda e: e.copy("dense.safetensors")), CheckpointError,
     "non-bool tensors"),
    ("model file: missing", lambda e: _model_file(e, lambda e: e.tmp / "none.safetensors"), CheckpointError,
     "does not exist"),
    ("model file: garbage", lambda e: _model_file(e, lambda e: garble(e.copy("dense.safetensors"))),
     CheckpointError, "not a readable safetensors model file"),
    ("model file: truncated", lambda e: _model_file(e, lambda e: truncate(e.copy("masked.safetensors"))),
     CheckpointError, "not a readable safetensors model file"),
    ("model file: pickled .bin", lambda e: _model_file(e, lambda e: e.copy("pickled.pt", "model.bin")),
     CheckpointError, "not a readable safetensors model file"),
    ("model file: a masks file", lambda e: _model_file(e, lambda e: e.copy("masks.safetensors")), CheckpointError,
     "is not a slimtorch model file"),
    ("model file: a checkpoint", lambda e: _model_file(e, lambda e: e.copy("ck.safetensors")), CheckpointError,
     "is not a slimtorch model file"),
    ("model file: empty folder", lambda e: _model_file(e, lambda e: (e.tmp / "empty").mkdir() or e.tmp / "empty"),
     CheckpointError, "folder without compaction.json"),
    ("model file: spec not JSON", lambda e: _model_file(e, _header("dense.safetensors", "spec", "{width")),
     CheckpointError, "missing or corrupt model description"),
    ("model file: spec a list", lambda e: _model_file(e, _header("dense.safetensors", "spec", "[1, 2]")),
     CheckpointError, "missing or corrupt model description"),
    ("model file: unknown model name", lambda e: _model_file(
        e, _header("dense.safetensors", "spec", json.dumps({"name": "Resnet99"}))), CheckpointError, "Resnet99"),
    ("model file: spec kwargs of the wrong type", lambda e: _model_file(
        e, _header("dense.safetensors", "spec", json.dumps({"name": "DigitsCNN", "kwargs": {"width": "wide"}}))),
     CheckpointError, "cannot be built"),
    ("model file: unknown state", lambda e: _model_file(e, _header("dense.safetensors", "state", "quantum")),
     CheckpointError, "expected one of"),
    ("model file: an empty compaction record", lambda e: _model_file(e, _compaction(lambda r: {})), CheckpointError,
     "compaction record"),
    ("model file: compaction keeps out of range", lambda e: _model_file(e, _compaction(_bad_keeps)),
     CheckpointError, "compaction record"),
    ("model file: a mask of the wrong shape", lambda e: _model_file(e, _tensors(
        "masked.safetensors", lambda t: t.__setitem__("mask::down.0.weight", torch.ones(3, 3, dtype=torch.bool)))),
     CheckpointError, "does not fit a DigitsCNN"),
    ("model file: a weight missing", lambda e: _model_file(e, _tensors(
        "dense.safetensors", lambda t: t.pop("state::head.weight"))), CheckpointError, "does not fit a DigitsCNN"),
    ("model file: a weight of the wrong shape", lambda e: _model_file(e, _tensors(
        "compacted.safetensors", lambda t: t.__setitem__("state::head.weight", torch.zeros(10, 3)))),
     CheckpointError, "does not fit a DigitsCNN"),
    ("compacted folder: missing", _missing_folder, CheckpointError, "holds no compacted model"),
    ("compacted folder: weights truncated", lambda e: _folder(e, lambda f: truncate(f / "model.safetensors")),
     CheckpointError, "not a readable safetensors file"),
    ("compacted folder: weights garbage", lambda e: _folder(e, lambda f: garble(f / "model.safetensors")),
     CheckpointError, "not a readable safetensors file"),
    ("compacted folder: weights pickled", lambda e: _folder(e, lambda f: pickle_over(f / "model.safetensors")),
     CheckpointError, "not a readable safetensors file"),
    ("compacted folder: description not JSON", lambda e: _folder(
        e, lambda f: (f / "compaction.json").write_text("{steps: [")), CheckpointError, "not valid JSON"),
    ("compacted folder: description empty", lambda e: _folder(e, lambda f: (f / "compaction.json").write_text("")),
     CheckpointError, "not valid JSON"),
    ("compacted folder: description a list", _description(lambda d: [d]), CheckpointError,
     "is not a slimtorch-compacted-v1 description"),
    ("compacted folder: wrong format", _description(lambda d: {**d, "format": "other-v9"}), CheckpointError,
     "is not a slimtorch-compacted-v1 description"),
    ("compacted folder: steps missing", _description(lambda d: {k: v for k, v in d.items() if k != "steps"}),
     CheckpointError, "'steps' must be a list"),
    ("compacted folder: steps a mapping", _description(lambda d: {**d, "steps": {"0": d["steps"]}}),
     CheckpointError, "'steps' must be a list"),
    ("compacted folder: class a number", _description(lambda d: {**d, "class": 7}), CheckpointError,
     "'class' must be a str"),
    ("compacted folder: summary a string", _description(lambda d: {**d, "summary": "small"}), CheckpointError,
     "'summary' must be a dict"),
    ("compacted folder: masks a string", _description(lambda d: {**d, "masks": "fc.weight"}), CheckpointError,
     "'masks' must be a list"),
    ("compacted folder: masks of numbers", _description(lambda d: {**d, "masks": [1, 2]}), CheckpointError,
     "'masks' must list parameter names"),
    ("compacted folder: a mask of no parameter", _description(lambda d: {**d, "masks": [*d["masks"], "fc.nope"]}),
     CheckpointError, "does not match this model"),
    ("compacted folder: saved from another class", _description(lambda d: {**d, "class": "nets.Tokens"}),
     CheckpointError, "was saved from nets.Tokens"),
    ("compacted folder: step without modules", _description(lambda d: {**d, "steps": [{"fixes": []}]}),
     CheckpointError, "needs a 'modules' mapping"),
    ("compacted folder: fixes a string", _description(lambda d: {**d, "steps": [{**d["steps"][0], "fixes": "x"}]}),
     CheckpointError, "needs a 'modules' mapping and a 'fixes' list"),
    ("compacted folder: a change without kind", _description(lambda d: _first_change(d).pop("kind") and d),
     CheckpointError, "needs 'kind', 'keeps' and 'options'"),
    ("compacted folder: unknown shrink kind", _description(lambda d: _first_change(d).update(kind="warp") or d),
     CheckpointError, "no shrink function registered for 'warp'"),
    ("compacted folder: negative keep", _description(
        lambda d: [k.__setitem__(0, -1) for k in _first_change(d)["keeps"].values()] and d), CheckpointError,
     "list of indices >= 0"),
    ("compacted folder: fractional keep", _description(
        lambda d: [k.__setitem__(0, 0.5) for k in _first_change(d)["keeps"].values()] and d), CheckpointError,
     "list of indices >= 0"),
    ("compacted folder: keep out of range", _description(
        lambda d: [k.__setitem__(0, 10**12) for k in _first_change(d)["keeps"].values()] and d), CheckpointError,
     "does not match this model"),
    ("compacted folder: keeps repeated (wrong size)", _description(
        lambda d: [k.extend(k * 3) for k in _first_change(d)["keeps"].values()] and d), CheckpointError,
     "does not match this model"),
    ("compacted folder: a module of no model", _description(
        lambda d: d["steps"][0]["modules"].__setitem__("ghost", _first_change(d)) or d), CheckpointError,
     "does not match this model"),
    ("compacted folder: a layer's change removed", _description(
        lambda d: d["steps"][0]["modules"].pop(sorted(d["steps"][0]["modules"])[-1]) and d), CheckpointError,
     "do not fit"),
    ("compacted folder: a weight removed", _weights(_pop_first), CheckpointError, "missing keys"),
    ("compacted folder: an extra weight", _weights(lambda t: t.__setitem__("extra.weight", torch.ones(2))),
     CheckpointError, "unexpected keys ['extra.weight']"),
    ("compacted folder: a weight in float64", _weights(_to_double), CheckpointError, "torch.float64 in the file"),
    ("compacted folder: onto a compacted model", _compacted_already, CheckpointError,
     "needs a freshly built model"),
]


# -- outputs: read-only targets, symbolic links, folders where files go ----------------------------------------


def _masks_out(env: Env, target: Callable[[Env], Path]):
    path = target(env)
    return (lambda: save_masks({"w": torch.ones(2, dtype=torch.bool)}, path)), [], [env.tmp]


def _compacted_out(env: Env, target: Callable[[Env], Path]):
    model = make_residual()
    load_compacted_(model, env.originals / "residual")
    path = target(env)
    return (lambda: save_compacted(model, path)), [model], [env.tmp]


def _existing_save(env: Env, change: Callable[[Path], Any]) -> Path:
    folder = env.copy("residual", "out")
    change(folder)
    return folder


def _looped(env: Env) -> Path:
    os.symlink(env.tmp / "b", env.tmp / "a")
    os.symlink(env.tmp / "a", env.tmp / "b")
    return env.tmp / "a"


def _masked_not_compacted(env: Env):
    model = build_model(DIGITS)
    apply_masks_(model, load_masks(env.originals / "masks.safetensors"))
    return (lambda: save_compacted(model, env.tmp / "out")), [model], [env.tmp]


def _checkpoint_into(env: Env, folder: Path):
    model = make_net()
    return (lambda: save_checkpoint(folder / "ck.safetensors", modules={"model": model})), [model], [env.tmp]


def _lora_into(env: Env, folder: Path):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    add_lora_(model, LoRAConfig(r=2, target_modules=("0",)))
    return (lambda: save_lora(model, folder)), [model], [env.tmp]


def _model_into(env: Env, path: Path):
    loaded = load_model(env.originals / "compacted.safetensors")
    return (lambda: save_model(path, loaded.model, loaded.spec)), [loaded.model], [env.tmp]


def _lora_load(env: Env, change: Callable[[Path], Any]):
    folder = env.copy("lora")
    change(folder)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return (lambda: load_lora_(model, folder)), [model], [env.tmp]


OUTPUTS = [
    ("save_masks: over a read-only file", lambda e: _masks_out(e, lambda e: read_only(e.copy("masks.safetensors"))),
     ConfigError, "is read-only"),
    ("save_masks: into a read-only folder", lambda e: _masks_out(
        e, lambda e: read_only_folder(e) / "m.safetensors"),
     ConfigError, "is read-only"),
    ("save_masks: onto a folder", lambda e: _masks_out(e, lambda e: e.copy("residual")), ConfigError,
     "is a folder"),
    ("save_masks: under a file", lambda e: _masks_out(e, lambda e: e.write("plain", "x") / "m.safetensors"),
     ConfigError, "exists and is not a folder"),
    ("save_masks: through a link loop", lambda e: _masks_out(e, _looped), ConfigError, "leads nowhere"),
    ("save_compacted: into a read-only folder", lambda e: _compacted_out(
        e, lambda e: read_only(_existing_save(e, lambda f: None))), ConfigError, "is read-only"),
    ("save_compacted: over a read-only weights file", lambda e: _compacted_out(
        e, lambda e: _existing_save(e, lambda f: read_only(f / "model.safetensors"))), ConfigError, "is read-only"),
    ("save_compacted: a folder where the weights go", lambda e: _compacted_out(
        e, lambda e: _existing_save(e, lambda f: (f / "model.safetensors").unlink() or
                                    (f / "model.safetensors").mkdir())), ConfigError,
     "is a folder where an output file goes"),
    ("save_compacted: a link where the description goes", lambda e: _compacted_out(
        e, lambda e: _existing_save(e, lambda f: (f / "compaction.json").unlink() or
                                    os.symlink(e.tmp / "elsewhere.json", f / "compaction.json"))), ConfigError,
     "is a symbolic link"),
    ("save_compacted: onto a file", lambda e: _compacted_out(e, lambda e: e.write("out", "x")), ConfigError,
     "exists and is not a folder"),
    ("save_compacted: in a read-only parent", lambda e: _compacted_out(
        e, lambda e: read_only_folder(e) / "out"), ConfigError,
     "is read-only"),
    ("save_compacted: a masked model", _masked_not_compacted, CheckpointError, "carries pruning masks"),
    ("save_model: over a read-only file", lambda e: _model_into(e, read_only(e.copy("dense.safetensors"))),
     ConfigError, "is read-only"),
    ("save_checkpoint: into a read-only folder", lambda e: _checkpoint_into(
        e, read_only_folder(e)), ConfigError, "is read-only"),
    ("save_lora: into a read-only folder", lambda e: _lora_into(e, read_only(e.copy("lora"))), ConfigError,
     "is read-only"),
    ("save_lora: a folder where the config goes", lambda e: _lora_into(
        e, (lambda f: (f / "adapter_config.json").unlink() or (f / "adapter_config.json").mkdir() or f)(
            e.copy("lora"))), ConfigError, "is a folder where an output file goes"),
    ("load_lora_: config not JSON", lambda e: _lora_load(e, lambda f: (f / "adapter_config.json").write_text("{")),
     CheckpointError, "not a readable LoRA adapter folder"),
    ("load_lora_: weights pickled", lambda e: _lora_load(e, lambda f: pickle_over(f / "adapter_model.safetensors")),
     CheckpointError, "not a readable LoRA adapter folder"),
]


def _masks_value(value: Any, name: Any = "w"):
    def setup(env: Env):
        target = env.copy("masks.safetensors")
        return (lambda: save_masks({name: value}, target)), [], [env.tmp]
    return setup


def _meta_residual() -> nn.Module:
    with torch.device("meta"):
        return make_residual()


def _not_a_path(call: Callable[[Env], Any]):
    return lambda env: ((lambda: call(env)), [], [env.tmp])


ARGUMENTS = [
    ("save_masks: a mask of fractions (would be saved as True)", _masks_value(torch.full((2,), 0.5)), ConfigError,
     "must be bool or hold only 0 and 1"),
    ("save_masks: a NaN mask (would be saved as True)", _masks_value(torch.full((2,), float("nan"))), ConfigError,
     "must be bool or hold only 0 and 1"),
    ("save_masks: a mask as a list", _masks_value([True, False]), ConfigError, "must be a tensor, got list"),
    ("save_masks: a number as a name", _masks_value(torch.ones(2, dtype=torch.bool), name=0), ConfigError,
     "mask keys must be parameter names"),
    ("save_masks: a mask on the meta device", _masks_value(torch.ones(2, dtype=torch.bool, device="meta")),
     ConfigError, "meta device"),
    ("save_masks: a list of masks", _not_a_path(lambda e: save_masks([torch.ones(2)], e.tmp / "m.safetensors")),
     ConfigError, "must be a dict"),
    ("save_masks: path None", _not_a_path(lambda e: save_masks({}, None)), ConfigError,
     "must be a path (a non-empty str or pathlib.Path), got NoneType"),
    ("save_masks: path a number", _not_a_path(lambda e: save_masks({}, 5)), ConfigError, "got int 5"),
    ("load_masks: path None", _not_a_path(lambda e: load_masks(None)), ConfigError, "load_masks's path must be a path"),
    ("save_compacted: path None", lambda e: (lambda m: ((lambda: save_compacted(m, None)), [m], [e.tmp]))(
        make_residual()), ConfigError, "must be a path"),
    ("save_compacted: a state dict", _not_a_path(lambda e: save_compacted(make_residual().state_dict(),
                                                                          e.tmp / "out")),
     ConfigError, "torch.nn.Module, got OrderedDict"),
    ("load_compacted_: onto a model on the meta device", lambda e: (lambda m: (
        (lambda: load_compacted_(m, e.originals / "residual")), [m], [e.tmp]))(_meta_residual()), ConfigError,
     "meta device"),
    ("load_compacted_: onto a path", _not_a_path(lambda e: load_compacted_("model", e.originals / "residual")),
     ConfigError, "torch.nn.Module, got str"),
    ("load_model: path None", _not_a_path(lambda e: load_model(None)), ConfigError, "load_model's path"),
]


FAILURES = LOADERS + OUTPUTS + ARGUMENTS


@pytest.mark.parametrize(("setup", "error", "fragment"), [row[1:] for row in FAILURES],
                         ids=[row[0] for row in FAILURES])
def test_fails_cleanly(setup, error, fragment, originals, tmp_path):
    run_row(setup, error, fragment, Env(tmp_path / "case", originals))


# -- what must work --------------------------------------------------------------------------------------------


def _writes_through_a_linked_file(env: Env) -> None:
    target = env.copy("masks.safetensors")
    os.symlink(target, env.tmp / "link.safetensors")
    save_masks({"w": torch.zeros(3, dtype=torch.bool)}, env.tmp / "link.safetensors")
    assert (env.tmp / "link.safetensors").is_symlink() and set(load_masks(target)) == {"w"}


def _writes_into_a_linked_folder(env: Env) -> None:
    (env.tmp / "real").mkdir()
    os.symlink(env.tmp / "real", env.tmp / "out")
    model = make_residual()
    load_compacted_(model, env.originals / "residual")
    save_compacted(model, env.tmp / "out")
    assert (env.tmp / "out").is_symlink() and (env.tmp / "real" / "compaction.json").is_file()
    fresh = make_residual()
    load_compacted_(fresh, env.tmp / "out")
    with torch.no_grad():
        torch.testing.assert_close(fresh(IMAGE), model(IMAGE), rtol=0, atol=0)


def _saves_over_an_earlier_save(env: Env) -> None:
    folder = env.copy("residual", "out")
    model = make_residual()
    load_compacted_(model, folder)
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    save_compacted(model, folder)
    fresh = make_residual()
    load_compacted_(fresh, folder)
    assert torch.equal(fresh.fc.bias, model.fc.bias)


def _loads_a_description_without_masks(env: Env) -> None:
    folder = env.copy("residual")
    description = json.loads((folder / "compaction.json").read_text())
    assert description["masks"] == ["fc.weight"]  # what the original keeps, a fine-grained mask
    # an older description (no masks) of a model saved without them
    model = make_residual()
    load_compacted_(model, folder)
    remove_masks_(model)
    save_compacted(model, env.tmp / "plain")
    edit_json(env.tmp / "plain" / "compaction.json", lambda d: d.pop("masks") and d)
    fresh = make_residual()
    load_compacted_(fresh, env.tmp / "plain")
    assert get_masks(fresh) == {} and fresh.slimtorch_compaction


def _lora_into_a_folder_with_other_files(env: Env) -> None:
    folder = env.copy("lora")
    (folder / "README.md").write_text("notes")
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    add_lora_(model, LoRAConfig(r=2, target_modules=("0",)))
    save_lora(model, folder)
    assert (folder / "README.md").read_text() == "notes"
    fresh = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    load_lora_(fresh, folder)


def _hf_save_over_a_sharded_save(env: Env) -> None:
    """A new save replaces an earlier one's weight files (shards and index included); other files stay."""
    from transformers import BertConfig, BertModel

    from slimtorch.integrations.hf.folders import load_hf_folder as load_compacted
    from slimtorch.integrations.hf.folders import save_hf_folder as save_hf

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                vocab_size=32, max_position_embeddings=16)).eval()
    folder = env.tmp / "bert"
    bert.save_pretrained(folder, max_shard_size="5KB")  # an earlier save in shards
    (folder / "masks.safetensors").write_bytes(b"the user's own file")
    assert (folder / "model.safetensors.index.json").is_file()
    save_hf(bert, folder)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "masks.safetensors", "model.safetensors"], names
    x = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(load_compacted(folder)(x).last_hidden_state, bert(x).last_hidden_state)


SUCCESSES = [
    ("Hugging Face save_compacted over a sharded save", _hf_save_over_a_sharded_save),
    ("save_masks writes through a linked file", _writes_through_a_linked_file),
    ("save_compacted writes into a linked folder", _writes_into_a_linked_folder),
    ("save_compacted over an earlier save", _saves_over_an_earlier_save),
    ("load_compacted_ reads a description without masks", _loads_a_description_without_masks),
    ("save_lora into a folder with other files", _lora_into_a_folder_with_other_files),
]


@pytest.mark.parametrize("check", [row[1] for row in SUCCESSES], ids=[row[0] for row in SUCCESSES])
def test_works(check, originals, tmp_path):
    env = Env(tmp_path / "case", originals)
    env.tmp.mkdir()
    check(env)


# -- writes interrupted half-way: a full disk, a killed process. Every writer leaves the old files as they were ----


def _crash(argument: int):
    """A stand-in for a library writer: it writes half a file at its ``argument``-th argument (a file or a
    folder), then fails as a full disk does."""
    def write(*args: Any, **kwargs: Any) -> None:
        target = Path(args[argument])
        if target.is_dir() or not target.suffix:
            target.mkdir(parents=True, exist_ok=True)
            target = target / "config.json"
        target.write_bytes(b"half written")
        raise OSError(28, "No space left on device")
    return write


def _masked_digits(env: Env) -> tuple[nn.Module, Any]:
    loaded = load_model(env.originals / "masked.safetensors")
    return loaded.model, loaded.spec


def _interrupted_hf(env: Env) -> None:
    from transformers import BertConfig, BertModel

    from slimtorch.integrations.hf.folders import save_hf_folder as save_hf

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                vocab_size=32, max_position_embeddings=16))
    save_hf(bert, env.tmp / "bert")  # the earlier save the interrupted one would replace
    with_crash = {"transformers.PreTrainedModel.save_pretrained": _crash(1)}
    return (lambda: save_hf(bert, env.tmp / "bert")), with_crash


def _llm_cache(env: Env) -> None:
    from slimtorch.models import tiny_lm as llm

    cfg = llm.TinyLMConfig(vocab_size=32, hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32)

    class Tokenizer:
        def save(self, path: str) -> None:
            raise OSError(28, "No space left on device")

    trained = llm.TinyLM(llm.build_model(cfg), Tokenizer(), cfg, {})
    with_crash = {"slimtorch.models.tiny_lm.train_lm": lambda c: trained}
    return (lambda: llm.load_or_train_lm(cfg, root=env.tmp / "cache")), with_crash


def _writer(call: Callable[[Path], Any], target: Callable[[Env], Path], crashes: dict[str, Any]):
    """``call(path)`` over the file or folder ``target(env)`` prepares, with the library writers crashing."""
    def prepare(env: Env):
        path = target(env)
        return (lambda: call(path)), crashes
    return prepare


def _lora_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    add_lora_(model, LoRAConfig(r=2, target_modules=("0",)))
    return model


_FILE = {"safetensors.torch.save_file": _crash(1)}
INTERRUPTED = [
    ("save_masks", _writer(lambda p: save_masks({"w": torch.ones(2, dtype=torch.bool)}, p),
                           lambda e: e.copy("masks.safetensors"), _FILE)),
    ("save_compacted", lambda e: _writer(lambda p: save_compacted(_loaded_residual(e), p),
                                         lambda e: e.copy("residual", "out"),
                                         {"safetensors.torch.save_model": _crash(1)})(e)),
    ("save_model", lambda e: _writer(lambda p: save_model(p, *_masked_digits(e)),
                                     lambda e: e.copy("dense.safetensors"), _FILE)(e)),
    ("save_checkpoint", _writer(lambda p: save_checkpoint(p, modules={"model": make_net()}),
                                lambda e: e.copy("ck.safetensors"), _FILE)),
    ("save_lora", _writer(lambda p: save_lora(_lora_model(), p), lambda e: e.copy("lora"), _FILE)),
    ("Hugging Face save_compacted", _interrupted_hf),
    ("the trained-model cache", _llm_cache),
]


def _loaded_residual(env: Env) -> nn.Module:
    model = make_residual()
    load_compacted_(model, env.originals / "residual")
    return model


@pytest.mark.parametrize("prepare", [row[1] for row in INTERRUPTED], ids=[row[0] for row in INTERRUPTED])
def test_an_interrupted_write_leaves_the_files_as_they_were(prepare, originals, tmp_path):
    from unittest import mock

    env = Env(tmp_path / "case", originals)
    env.tmp.mkdir()
    call, crashes = prepare(env)
    before = files_state([env.tmp])
    with contextlib.ExitStack() as stack:
        for target, fake in crashes.items():
            stack.enter_context(mock.patch(target, fake))
        with pytest.raises(OSError, match="No space left on device"):
            call()
    assert files_state([env.tmp]) == before
