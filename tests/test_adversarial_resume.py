"""Adversarial table for resuming training: a checkpoint of another run (a change of any recorded setting)
or a broken checkpoint is a CheckpointError naming it, and the model, the loss module and the files are
unchanged (:func:`adversarial.fails_cleanly`); resuming the same run works from any starting weights.

Rows are ``(id, setup, error, fragment)`` as in ``test_adversarial_files.py``; shared pieces are in
``adversarial_env.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from adversarial_env import (
    CONFIG,
    Env,
    edit_safetensors,
    garble,
    make_data,
    make_distiller,
    make_net,
    make_originals,
    pickle_over,
    run_row,
    truncate,
)
from slimtorch import apply_masks_
from slimtorch.errors import CheckpointError
from slimtorch.recover import TrainConfig, fit
from slimtorch.recover.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("originals")
    make_originals(root)
    return root


# -- every recorded setting, and broken checkpoints ----------------------------------------------------


def _resume(env: Env, *, config: TrainConfig = CONFIG, data: TensorDataset | None = None, eval_data=None,
            net: Callable[[], nn.Module] = make_net, masks: bool = False, context=None, name: str = "ck.safetensors",
            loss: Callable[[nn.Module], Any] | None = None, break_file: Callable[[Path], Any] | None = None):
    path = env.copy(name)
    if break_file is not None:
        break_file(path)
    model = net()
    if masks:
        apply_masks_(model, {"0.weight": torch.rand(model[0].weight.shape) > 0.5})
    loss_fn = loss(model) if loss is not None else None
    modules = [model] + ([loss_fn] if isinstance(loss_fn, nn.Module) else [])
    call = lambda: fit(model, data or make_data(), config, loss_fn=loss_fn, eval_data=eval_data,  # noqa: E731
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
    model = make_net()
    opt = torch.optim.SGD([{"params": [model[0].weight]}, {"params": [model[0].bias, model[2].weight,
                                                                      model[2].bias]}], lr=0.1)
    return (lambda: load_checkpoint(path, modules={"model": model}, optimizer=opt)), [model], [env.tmp]


RESUMES = [
    *[(f"resume: settings.{key} changed", lambda e, key=key, value=value: _resume(e, config=_setting(**{key: value})),
       CheckpointError, f"settings.{key} (") for key, value in SETTINGS.items()],
    ("resume: other training samples", lambda e: _resume(e, data=make_data(seed=9)), CheckpointError,
     "the training data (same size, other samples or order)"),
    ("resume: fewer training samples", lambda e: _resume(e, data=make_data(n=32)), CheckpointError,
     "the training data (48 samples in the checkpoint, 32 now)"),
    ("resume: evaluation data added", lambda e: _resume(e, eval_data=make_data(n=16)), CheckpointError,
     "the evaluation data (none in the checkpoint, given now)"),
    ("resume: the model is masked now", lambda e: _resume(e, masks=True), CheckpointError, "the model's masks"),
    ("resume: another architecture", lambda e: _resume(e, net=lambda: make_net(width=10)), CheckpointError,
     "the model's architecture"),
    ("resume: a caller's context changed", lambda e: _resume(e, context={"stage": 2}), CheckpointError,
     "stage (None in the checkpoint, 2 now)"),
    ("resume: distillation instead of cross-entropy", lambda e: _resume(e, loss=make_distiller), CheckpointError,
     "the loss"),
    ("resume: distillation temperature changed", lambda e: _resume(
        e, name="distill.safetensors", loss=lambda m: make_distiller(m, temperature=4.0)), CheckpointError, "the loss"),
    ("resume: another teacher", lambda e: _resume(
        e, name="distill.safetensors", loss=lambda m: make_distiller(m, teacher_seed=6)), CheckpointError, "the loss"),
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




@pytest.mark.parametrize(("setup", "error", "fragment"), [row[1:] for row in RESUMES], ids=[row[0] for row in RESUMES])
def test_fails_cleanly(setup, error, fragment, originals, tmp_path):
    run_row(setup, error, fragment, Env(tmp_path / "case", originals))


# -- what must work --------------------------------------------------------------------------------------------


def _resumes_the_same_run_with_any_starting_weights(env: Env) -> None:
    path = env.copy("ck.safetensors")
    torch.manual_seed(123)
    other_start = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))  # other weights: replaced
    result = fit(other_start, make_data(), CONFIG, checkpoint=path, resume=True)
    reference = make_net()
    fit(reference, make_data(), CONFIG)
    assert result.steps == 3
    for a, b in zip(other_start.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def _resumes_a_distillation(env: Env) -> None:
    path = env.copy("distill.safetensors")
    student = make_net()
    assert fit(student, make_data(), CONFIG, loss_fn=make_distiller(student), checkpoint=path, resume=True).steps == 3


SUCCESSES = [
    ("resume of the same run with any starting weights", _resumes_the_same_run_with_any_starting_weights),
    ("resume of the same distillation", _resumes_a_distillation),
]


@pytest.mark.parametrize("check", [row[1] for row in SUCCESSES], ids=[row[0] for row in SUCCESSES])
def test_works(check, originals, tmp_path):
    env = Env(tmp_path / "case", originals)
    env.tmp.mkdir()
    check(env)
