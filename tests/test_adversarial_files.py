"""Adversarial table for files, outputs, resume and the command line: every bad input gets a typed error with
a message fragment, and the model and the files on disk are byte-identical after the failure
(:func:`adversarial.fails_cleanly`); the unusual inputs that must work are checked after the failures.

Each row of ``FAILURES`` is ``(id, setup, error, fragment)``: ``setup(env)`` prepares the files in its own
folder and returns ``(call, models, paths)``; ``SUCCESSES`` rows are ``(id, check)``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from adversarial import fails_cleanly
from nets import Residual
from slimtorch import apply_masks_, compact_, compute_masks, get_masks
from slimtorch.cli.main import main
from slimtorch.errors import CheckpointError, ConfigError
from slimtorch.io import load_compacted_, load_masks, save_compacted, save_masks
from slimtorch.lora import LoRAConfig, add_lora_, load_lora_, save_lora
from slimtorch.models.modelfile import load_model, save_model
from slimtorch.models.registry import ModelSpec, build_model
from slimtorch.recover import TrainConfig, fit
from slimtorch.recover.checkpoint import load_checkpoint, save_checkpoint
from slimtorch.recover.distill import DistillConfig, Distiller

IMAGE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
DIGITS = ModelSpec(name="DigitsCNN", kwargs={"width": 4})
CONFIG = TrainConfig(epochs=1, batch_size=16, lr=0.01, checkpoint_every=2)


# -- the files every row starts from (made once, copied into each row's folder) ---------------------------------


def _data(n: int = 48, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _net(width: int = 12) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))


def _residual() -> nn.Module:
    torch.manual_seed(0)
    return Residual().eval()


def _distiller(student: nn.Module, temperature: float = 2.0, teacher_seed: int = 5) -> Distiller:
    torch.manual_seed(teacher_seed)
    teacher = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    return Distiller(teacher, student, DistillConfig(temperature=temperature))


def _make_originals(root: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        residual = _residual()
        masks = compute_masks(residual, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5},
                                         {"op_names": ["fc"], "exclude": True}], example_inputs=IMAGE)
        masks["fc.weight"] = torch.rand(residual.fc.weight.shape, generator=torch.Generator().manual_seed(3)) > 0.3
        compact_(residual, masks, example_inputs=IMAGE)  # fc keeps a fine-grained mask
        save_compacted(residual, root / "residual")
        digits, x = build_model(DIGITS).eval(), torch.randn(4, 1, 8, 8)
        save_model(root / "dense.safetensors", digits, DIGITS)
        digit_masks = compute_masks(digits, [{"op_names": ["down.0"], "sparse_ratio": 0.5}], example_inputs=x)
        save_masks(digit_masks, root / "masks.safetensors")
        apply_masks_(digits, digit_masks)
        save_model(root / "masked.safetensors", digits, DIGITS)
        compact_(digits, digit_masks, example_inputs=x)
        save_model(root / "compacted.safetensors", digits, DIGITS)
    fit(_net(), _data(), CONFIG, checkpoint=root / "ck.safetensors")
    student = _net()
    fit(student, _data(), CONFIG, loss_fn=_distiller(student), checkpoint=root / "distill.safetensors")
    lora_net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    add_lora_(lora_net, LoRAConfig(r=2, target_modules=("0",)))
    save_lora(lora_net, root / "lora")
    torch.save({"weight": torch.ones(2)}, root / "pickled.pt")  # what a pickled file looks like: never loaded


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("originals")
    _make_originals(root)
    return root


@dataclass
class Env:
    """One row's folder, with copies of the original files and helpers to break them."""

    tmp: Path
    originals: Path

    def copy(self, name: str, as_name: str | None = None) -> Path:
        source, target = self.originals / name, self.tmp / (as_name or name)
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
        return target

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path


def truncate(path: Path) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def garble(path: Path) -> Path:
    path.write_bytes(bytes(range(256)) * 3)
    return path


def pickle_over(path: Path) -> Path:
    torch.save({"weight": torch.ones(2)}, path)
    return path


def edit_json(path: Path, change: Callable[[Any], Any]) -> Path:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data) or data))
    return path


def edit_safetensors(path: Path, change: Callable[[dict, dict], None]) -> Path:
    """Rewrite a safetensors file after ``change(metadata, tensors)`` edited them in place."""
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    change(metadata, tensors)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_only(path: Path) -> Path:
    os.chmod(path, 0o555 if path.is_dir() else 0o444)
    return path


def read_only_folder(env: Env) -> Path:
    (env.tmp / "ro").mkdir()
    return read_only(env.tmp / "ro")


def cli(*argv: Any) -> None:
    """Run the command line; a failure must exit with code 2 and one line, which becomes the SystemExit."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            code = exit_.code
    if code:
        text = err.getvalue()
        assert code == 2 and len(text.strip().splitlines()) == 1, text
        raise SystemExit(text)


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


def _folder(env: Env, change: Callable[[Path], Any], fresh: Callable[[], nn.Module] = _residual):
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
    model = _residual()
    return (lambda: load_compacted_(model, env.tmp / "none")), [model], [env.tmp]


def _compacted_already(env: Env):
    folder = env.copy("residual")
    model = _residual()
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


# -- resume: every recorded setting, and broken checkpoints ----------------------------------------------------


def _resume(env: Env, *, config: TrainConfig = CONFIG, data: TensorDataset | None = None, eval_data=None,
            net: Callable[[], nn.Module] = _net, masks: bool = False, context=None, name: str = "ck.safetensors",
            loss: Callable[[nn.Module], Any] | None = None, break_file: Callable[[Path], Any] | None = None):
    path = env.copy(name)
    if break_file is not None:
        break_file(path)
    model = net()
    if masks:
        apply_masks_(model, {"0.weight": torch.rand(model[0].weight.shape) > 0.5})
    loss_fn = loss(model) if loss is not None else None
    modules = [model] + ([loss_fn] if isinstance(loss_fn, nn.Module) else [])
    call = lambda: fit(model, data or _data(), config, loss_fn=loss_fn, eval_data=eval_data,  # noqa: E731
                       checkpoint=path, resume=True, context=context)
    return call, modules, [env.tmp]


def _setting(**change: Any) -> TrainConfig:
    return TrainConfig.from_dict({**CONFIG.to_dict(), **change})


SETTINGS = {"epochs": 2, "batch_size": 8, "lr": 0.1, "weight_decay": 0.01, "optimizer": "sgd", "momentum": 0.5,
            "schedule": "cosine", "seed": 3, "checkpoint_every": 3, "grad_topk": 0.1, "augment": "flip"}


def _with_meta(change: Callable[[dict], None]):
    def rewrite(path: Path) -> None:
        def edit(meta: dict, tensors: dict) -> None:
            inner = json.loads(meta["meta"])
            change(inner)
            meta["meta"] = json.dumps(inner)
        edit_safetensors(path, edit)
    return rewrite


def _other_optimizer_groups(env: Env):
    path = env.copy("ck.safetensors")
    model = _net()
    opt = torch.optim.SGD([{"params": [model[0].weight]}, {"params": [model[0].bias, model[2].weight,
                                                                      model[2].bias]}], lr=0.1)
    return (lambda: load_checkpoint(path, modules={"model": model}, optimizer=opt)), [model], [env.tmp]


RESUMES = [
    *[(f"resume: settings.{key} changed", lambda e, key=key, value=value: _resume(e, config=_setting(**{key: value})),
       CheckpointError, f"settings.{key} (") for key, value in SETTINGS.items()],
    ("resume: other training samples", lambda e: _resume(e, data=_data(seed=9)), CheckpointError,
     "the training data (same size, other samples or order)"),
    ("resume: fewer training samples", lambda e: _resume(e, data=_data(n=32)), CheckpointError,
     "the training data (48 samples in the checkpoint, 32 now)"),
    ("resume: evaluation data added", lambda e: _resume(e, eval_data=_data(n=16)), CheckpointError,
     "the evaluation data (none in the checkpoint, given now)"),
    ("resume: the model is masked now", lambda e: _resume(e, masks=True), CheckpointError, "the model's masks"),
    ("resume: another architecture", lambda e: _resume(e, net=lambda: _net(width=10)), CheckpointError,
     "the model's architecture"),
    ("resume: a caller's context changed", lambda e: _resume(e, context={"stage": 2}), CheckpointError,
     "stage (None in the checkpoint, 2 now)"),
    ("resume: distillation instead of cross-entropy", lambda e: _resume(e, loss=_distiller), CheckpointError,
     "the loss"),
    ("resume: distillation temperature changed", lambda e: _resume(
        e, name="distill.safetensors", loss=lambda m: _distiller(m, temperature=4.0)), CheckpointError, "the loss"),
    ("resume: another teacher", lambda e: _resume(
        e, name="distill.safetensors", loss=lambda m: _distiller(m, teacher_seed=6)), CheckpointError, "the loss"),
    ("resume: cross-entropy instead of distillation", lambda e: _resume(e, name="distill.safetensors"),
     CheckpointError, "the loss"),
    ("resume: checkpoint garbage", lambda e: _resume(e, break_file=garble), CheckpointError,
     "not a readable checkpoint"),
    ("resume: checkpoint truncated", lambda e: _resume(e, break_file=truncate), CheckpointError,
     "not a readable checkpoint"),
    ("resume: checkpoint pickled", lambda e: _resume(e, break_file=pickle_over), CheckpointError,
     "not a readable checkpoint"),
    ("resume: a model file as checkpoint", lambda e: _resume(e, name="dense.safetensors"), CheckpointError,
     "is not a slimtorch checkpoint"),
    ("resume: description not JSON", lambda e: _resume(e, break_file=lambda p: edit_safetensors(
        p, lambda meta, t: meta.__setitem__("meta", "{oops"))), CheckpointError, "missing or corrupt description"),
    ("resume: no record of its run", lambda e: _resume(e, break_file=_with_meta(
        lambda m: m["extra"].pop("identity"))), CheckpointError, "does not record what its run was made of"),
    ("resume: progress missing", lambda e: _resume(e, break_file=_with_meta(
        lambda m: m["extra"].pop("progress"))), CheckpointError, "lacks its progress or random states"),
    ("resume: optimizer groups differ", _other_optimizer_groups, CheckpointError,
     "optimizer state for other parameters"),
]


# -- outputs: read-only targets, symbolic links, folders where files go ----------------------------------------


def _masks_out(env: Env, target: Callable[[Env], Path]):
    path = target(env)
    return (lambda: save_masks({"w": torch.ones(2, dtype=torch.bool)}, path)), [], [env.tmp]


def _compacted_out(env: Env, target: Callable[[Env], Path]):
    model = _residual()
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
    model = _net()
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


# -- the command line: exit code 2 and one line, nothing half-written ------------------------------------------


def _cli_case(*argv: Any, prepare: Callable[[Env], None] | None = None):
    def setup(env: Env):
        if prepare is not None:
            prepare(env)
        args = [str(a).format(tmp=env.tmp, orig=env.originals) for a in argv]
        return (lambda: cli(*args)), [], [env.tmp]
    return setup


def _pruned_out(env: Env, change: Callable[[Path], Any]) -> None:
    cli("prune", "MnistNet", "--sparsity", "0.3", "--out", env.tmp / "o", "--runs", "0")
    change(env.tmp / "o")


def _wrong_shape_masks(env: Env) -> None:
    save_masks({"down.0.weight": torch.ones(3, 3, dtype=torch.bool)}, env.tmp / "bad.safetensors")


RECIPE = """model: DigitsCNN
model_kwargs: {{width: 4}}
data: {{dataset: digits, limit: 64}}
steps:
  - prune: {{config_list: [{{op_names: [down.0], sparse_ratio: 0.5}}], criterion: {criterion}}}
  - finetune: {{epochs: 1, batch_size: 32}}
"""


def _recipe_ran_then_changed(env: Env) -> None:
    (env.tmp / "r.yaml").write_text(RECIPE.format(criterion="l1"))
    cli("recipe", env.tmp / "r.yaml", "--out", env.tmp / "run", "--threads", "1")
    (env.tmp / "r.yaml").write_text(RECIPE.format(criterion="l2"))


COMMANDS = [
    ("cli: prune --runs -1", _cli_case("prune", "MnistNet", "--sparsity", "0.5", "--out", "{tmp}/o", "--runs", "-1"),
     SystemExit, "expected a number >= 0, got -1"),
    ("cli: compact --runs -1", _cli_case("compact", "{orig}/masked.safetensors", "--out", "{tmp}/o", "--runs", "-1"),
     SystemExit, "expected a number >= 0, got -1"),
    ("cli: report --runs -5", _cli_case("report", "MnistNet", "--runs", "-5"), SystemExit,
     "expected a number >= 0, got -5"),
    ("cli: prune --batch-size 0", _cli_case("prune", "MnistNet", "--sparsity", "0.5", "--out", "{tmp}/o",
                                            "--batch-size", "0"), SystemExit, "expected a number >= 1, got 0"),
    ("cli: prune --out a read-only folder", _cli_case(
        "prune", "MnistNet", "--sparsity", "0.5", "--out", "{tmp}/ro", "--runs", "0",
        prepare=lambda e: read_only_folder(e)), SystemExit,
     "is read-only"),
    ("cli: prune --out a file", _cli_case("prune", "MnistNet", "--sparsity", "0.5", "--out", "{tmp}/f", "--runs",
                                          "0", prepare=lambda e: e.write("f", "x")), SystemExit,
     "exists and is not a folder"),
    ("cli: prune --out with a folder where report.md goes", _cli_case(
        "prune", "MnistNet", "--sparsity", "0.6", "--out", "{tmp}/o", "--runs", "0",
        prepare=lambda e: _pruned_out(e, lambda o: (o / "report.md").unlink() or (o / "report.md").mkdir())),
     SystemExit, "is a folder where an output file goes"),
    ("cli: prune --out with a read-only model file", _cli_case(
        "prune", "MnistNet", "--sparsity", "0.6", "--out", "{tmp}/o", "--runs", "0",
        prepare=lambda e: _pruned_out(e, lambda o: read_only(o / "model.safetensors"))), SystemExit, "is read-only"),
    ("cli: prune --out with a link where masks go", _cli_case(
        "prune", "MnistNet", "--sparsity", "0.6", "--out", "{tmp}/o", "--runs", "0",
        prepare=lambda e: _pruned_out(e, lambda o: (o / "masks.safetensors").unlink() or os.symlink(
            e.tmp / "x", o / "masks.safetensors"))), SystemExit, "is a symbolic link"),
    ("cli: prune a pickled .bin", _cli_case("prune", "{tmp}/m.bin", "--sparsity", "0.5", "--out", "{tmp}/o",
                                            prepare=lambda e: e.copy("pickled.pt", "m.bin")), SystemExit,
     "never loads pickles"),
    ("cli: prune a truncated model file", _cli_case(
        "prune", "{tmp}/masked.safetensors", "--sparsity", "0.5", "--out", "{tmp}/o", "--runs", "0",
        prepare=lambda e: truncate(e.copy("masked.safetensors"))), SystemExit, "not a readable safetensors"),
    ("cli: prune a dangling link", _cli_case(
        "prune", "{tmp}/link.safetensors", "--sparsity", "0.5", "--out", "{tmp}/o", "--runs", "0",
        prepare=lambda e: os.symlink(e.tmp / "gone.safetensors", e.tmp / "link.safetensors")), SystemExit,
     "does not exist"),
    ("cli: compact a dense model file", _cli_case("compact", "{orig}/dense.safetensors", "--out", "{tmp}/o",
                                                  "--runs", "0"), SystemExit, "has no masks to compact"),
    ("cli: compact a compacted file without masks", _cli_case(
        "compact", "{orig}/compacted.safetensors", "--out", "{tmp}/o", "--runs", "0"), SystemExit,
     "has no masks to compact"),
    ("cli: compact with garbage masks", _cli_case(
        "compact", "DigitsCNN", "--masks", "{tmp}/g.safetensors", "--out", "{tmp}/o", "--runs", "0",
        prepare=lambda e: garble(e.copy("masks.safetensors", "g.safetensors"))), SystemExit,
     "not a readable safetensors mask file"),
    ("cli: compact with masks of the wrong shape", _cli_case(
        "compact", "DigitsCNN", "--masks", "{tmp}/bad.safetensors", "--out", "{tmp}/o", "--runs", "0",
        prepare=_wrong_shape_masks), SystemExit, "has shape (3, 3)"),
    ("cli: compact with a model file as masks", _cli_case(
        "compact", "DigitsCNN", "--masks", "{orig}/dense.safetensors", "--out", "{tmp}/o", "--runs", "0"),
     SystemExit, "non-bool tensors"),
    ("cli: compact --out a read-only model file", _cli_case(
        "compact", "{orig}/masked.safetensors", "--out", "{tmp}/c", "--runs", "0",
        prepare=lambda e: read_only(e.copy("residual", "c") / "model.safetensors")), SystemExit, "is read-only"),
    ("cli: report a masks file", _cli_case("report", "{orig}/masks.safetensors", "--runs", "0"), SystemExit,
     "is not a slimtorch model file"),
    ("cli: report with masks of another model", _cli_case("report", "MnistNet", "--masks", "{orig}/masks.safetensors",
                                                           "--runs", "0"), SystemExit, "names no parameter"),
    ("cli: report --out a file", _cli_case("report", "MnistNet", "--runs", "0", "--out", "{tmp}/f",
                                           prepare=lambda e: e.write("f", "x")), SystemExit,
     "exists and is not a folder"),
    ("cli: recipe --out a file", _cli_case("recipe", "{tmp}/r.yaml", "--out", "{tmp}/f", prepare=lambda e: (
        e.write("f", "x"), e.write("r.yaml", RECIPE.format(criterion="l1")))), SystemExit,
     "exists and is not a folder"),
    ("cli: recipe with a pickled model", _cli_case("recipe", "{tmp}/r.yaml", "--out", "{tmp}/o", prepare=lambda e: (
        e.copy("pickled.pt", "m.pt"), e.write("r.yaml", RECIPE.format(criterion="l1").replace(
            "model: DigitsCNN", f"model: {e.tmp / 'm.pt'}")))), SystemExit, "not a readable safetensors model file"),
    ("cli: recipe --resume after changing the criterion", _cli_case(
        "recipe", "{tmp}/r.yaml", "--out", "{tmp}/run", "--resume", "--threads", "1",
        prepare=_recipe_ran_then_changed), SystemExit,
     "recipe.steps[0].prune.criterion ('l1' in the checkpoint, 'l2' now)"),
]

FAILURES = LOADERS + RESUMES + OUTPUTS + COMMANDS


@pytest.mark.parametrize(("setup", "error", "fragment"), [row[1:] for row in FAILURES],
                         ids=[row[0] for row in FAILURES])
def test_fails_cleanly(setup, error, fragment, originals, tmp_path):
    env = Env(tmp_path / "case", originals)
    env.tmp.mkdir()
    call, models, paths = setup(env)
    try:
        fails_cleanly(call, error, fragment, models=models, paths=paths)
    finally:  # (read-only folders would keep pytest from cleaning up)
        for p in [env.tmp, *env.tmp.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                os.chmod(p, 0o755)


# -- what must work --------------------------------------------------------------------------------------------


def _replaces_every_output_and_keeps_other_files(env: Env) -> None:
    _pruned_out(env, lambda o: (o / "notes.txt").write_text("mine"))
    before = json.loads((env.tmp / "o" / "report.json").read_text())
    cli("prune", "MnistNet", "--sparsity", "0.6", "--out", env.tmp / "o", "--runs", "0")
    assert json.loads((env.tmp / "o" / "report.json").read_text()) != before
    assert (env.tmp / "o" / "notes.txt").read_text() == "mine" and sorted(p.name for p in env.tmp.iterdir()) == ["o"]


def _writes_through_a_linked_file(env: Env) -> None:
    target = env.copy("masks.safetensors")
    os.symlink(target, env.tmp / "link.safetensors")
    save_masks({"w": torch.zeros(3, dtype=torch.bool)}, env.tmp / "link.safetensors")
    assert (env.tmp / "link.safetensors").is_symlink() and set(load_masks(target)) == {"w"}


def _writes_into_a_linked_folder(env: Env) -> None:
    (env.tmp / "real").mkdir()
    os.symlink(env.tmp / "real", env.tmp / "out")
    model = _residual()
    load_compacted_(model, env.originals / "residual")
    save_compacted(model, env.tmp / "out")
    assert (env.tmp / "out").is_symlink() and (env.tmp / "real" / "compaction.json").is_file()
    fresh = _residual()
    load_compacted_(fresh, env.tmp / "out")
    with torch.no_grad():
        torch.testing.assert_close(fresh(IMAGE), model(IMAGE), rtol=0, atol=0)


def _saves_over_an_earlier_save(env: Env) -> None:
    folder = env.copy("residual", "out")
    model = _residual()
    load_compacted_(model, folder)
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    save_compacted(model, folder)
    fresh = _residual()
    load_compacted_(fresh, folder)
    assert torch.equal(fresh.fc.bias, model.fc.bias)


def _loads_a_description_without_masks(env: Env) -> None:
    folder = env.copy("residual")
    description = json.loads((folder / "compaction.json").read_text())
    assert description["masks"] == ["fc.weight"]  # what the original keeps, a fine-grained mask
    # an older description (no masks) of a model saved without them
    model = _residual()
    load_compacted_(model, folder)
    from slimtorch import remove_masks_
    remove_masks_(model)
    save_compacted(model, env.tmp / "plain")
    edit_json(env.tmp / "plain" / "compaction.json", lambda d: d.pop("masks") and d)
    fresh = _residual()
    load_compacted_(fresh, env.tmp / "plain")
    assert get_masks(fresh) == {} and fresh.slimtorch_compaction


def _resumes_the_same_run_with_any_starting_weights(env: Env) -> None:
    path = env.copy("ck.safetensors")
    torch.manual_seed(123)
    other_start = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))  # other weights: replaced
    result = fit(other_start, _data(), CONFIG, checkpoint=path, resume=True)
    reference = _net()
    fit(reference, _data(), CONFIG)
    assert result.steps == 3
    for a, b in zip(other_start.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def _resumes_a_distillation(env: Env) -> None:
    path = env.copy("distill.safetensors")
    student = _net()
    assert fit(student, _data(), CONFIG, loss_fn=_distiller(student), checkpoint=path, resume=True).steps == 3


def _prunes_and_compacts_twice(env: Env) -> None:
    cli("prune", "{}".format(env.originals / "compacted.safetensors"), "--sparsity", "0.5", "--out", env.tmp / "p",
        "--runs", "0")
    cli("compact", env.tmp / "p" / "model.safetensors", "--out", env.tmp / "c", "--runs", "0")
    first = load_model(env.originals / "compacted.safetensors")
    again = load_model(env.tmp / "c" / "model.safetensors")
    assert again.model.down[0].out_channels < first.model.down[0].out_channels
    assert len(again.model.slimtorch_compaction["steps"]) == 2


def _report_into_an_existing_folder(env: Env) -> None:
    (env.tmp / "r").mkdir()
    (env.tmp / "r" / "keep.txt").write_text("x")
    cli("report", env.originals / "masked.safetensors", "--runs", "0", "--out", env.tmp / "r")
    assert sorted(p.name for p in (env.tmp / "r").iterdir()) == ["keep.txt", "layers.png", "report.json", "report.md"]


def _lora_into_a_folder_with_other_files(env: Env) -> None:
    folder = env.copy("lora")
    (folder / "README.md").write_text("notes")
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    add_lora_(model, LoRAConfig(r=2, target_modules=("0",)))
    save_lora(model, folder)
    assert (folder / "README.md").read_text() == "notes"
    fresh = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    load_lora_(fresh, folder)


SUCCESSES = [
    ("cli prune replaces every output at once and keeps other files", _replaces_every_output_and_keeps_other_files),
    ("save_masks writes through a linked file", _writes_through_a_linked_file),
    ("save_compacted writes into a linked folder", _writes_into_a_linked_folder),
    ("save_compacted over an earlier save", _saves_over_an_earlier_save),
    ("load_compacted_ reads a description without masks", _loads_a_description_without_masks),
    ("resume of the same run with any starting weights", _resumes_the_same_run_with_any_starting_weights),
    ("resume of the same distillation", _resumes_a_distillation),
    ("cli prune and compact a compacted file", _prunes_and_compacts_twice),
    ("cli report into an existing folder", _report_into_an_existing_folder),
    ("save_lora into a folder with other files", _lora_into_a_folder_with_other_files),
]


@pytest.mark.parametrize("check", [row[1] for row in SUCCESSES], ids=[row[0] for row in SUCCESSES])
def test_works(check, originals, tmp_path):
    env = Env(tmp_path / "case", originals)
    env.tmp.mkdir()
    check(env)


def test_the_table_is_large_enough():
    assert len(FAILURES) + len(SUCCESSES) >= 70
