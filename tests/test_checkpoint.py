import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from slimtorch.cli.main import main
from slimtorch.errors import CheckpointError, ConfigError
from slimtorch.recover import TrainConfig, fit
from slimtorch.recover.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _data(n: int = 120) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 3))


CONFIG = TrainConfig(epochs=3, batch_size=16, lr=0.01, schedule="cosine", checkpoint_every=4, augment="none")


def test_resume_after_an_interruption_gives_the_same_weights(tmp_path, monkeypatch):
    torch.manual_seed(3)
    reference = _net()
    expected = fit(reference, _data(), CONFIG)

    torch.manual_seed(3)
    interrupted = _net()
    import slimtorch.recover.trainer as trainer

    real_fetch, calls = trainer.fetch, []

    def dying_fetch(data, index):
        calls.append(1)
        if len(calls) == 14:  # mid-epoch 2, two steps after the checkpoint at step 12
            raise KeyboardInterrupt
        return real_fetch(data, index)

    monkeypatch.setattr(trainer, "fetch", dying_fetch)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, _data(), CONFIG, checkpoint=tmp_path / "ck.safetensors")
    monkeypatch.setattr(trainer, "fetch", real_fetch)
    _, meta = read_checkpoint(tmp_path / "ck.safetensors")
    (done,) = meta["extra"]["progress"]["history"]  # the first epoch, finished before the kill
    assert done["cpu_seconds"] > 0 and done["seconds"] > 0
    torch.manual_seed(99)  # a different process state: everything must come from the checkpoint
    resumed = _net()
    result = fit(resumed, _data(), CONFIG, checkpoint=tmp_path / "ck.safetensors", resume=True)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [e.loss for e in result.epochs] == [e.loss for e in expected.epochs]
    # training time, wall-clock and CPU, survives the kill: the first epoch's is the one measured before it
    assert result.epochs[0].cpu_seconds == done["cpu_seconds"] and result.epochs[0].seconds == done["seconds"]
    assert all(e.cpu_seconds > 0 for e in result.epochs) and result.train_cpu_seconds == pytest.approx(
        sum(e.cpu_seconds for e in result.epochs))
    # a finished run resumes to its result at once
    again = fit(_net(), _data(), CONFIG, checkpoint=tmp_path / "ck.safetensors", resume=True)
    assert again.steps == result.steps and again.epochs == result.epochs


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    net = _net()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, modules={"model": net}, extra={"epoch": 1})
    import safetensors.torch

    def dying_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, modules={"model": net}, extra={"epoch": 2})
    _, meta = read_checkpoint(path)
    assert meta["extra"] == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]  # no temporary file left behind


def test_bad_checkpoints_are_typed_errors(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.safetensors")
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, modules={"model": _net()})
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(path, modules={"model": nn.Linear(6, 3)})
    fit(_net(), _data(), CONFIG, checkpoint=path)
    other = TrainConfig.from_dict({**CONFIG.to_dict(), "lr": 0.5})
    with pytest.raises(CheckpointError, match=r"settings.lr \(0.01 in the checkpoint, 0.5 now\)"):
        fit(_net(), _data(), other, checkpoint=path, resume=True)
    with pytest.raises(ConfigError, match="checkpoint path"):
        fit(_net(), _data(), CONFIG, resume=True)


def test_a_checkpoint_without_cpu_seconds_still_resumes(tmp_path):
    """Files written before training recorded CPU seconds resume; their epochs' CPU time is unknown (None)."""
    from slimtorch.recover.checkpoint import write_checkpoint

    path = tmp_path / "ck.safetensors"
    one = TrainConfig.from_dict({**CONFIG.to_dict(), "epochs": 1})
    fit(_net(), _data(), one, checkpoint=path)
    tensors, meta = read_checkpoint(path)
    progress = meta["extra"]["progress"]
    del progress["cpu_seconds"]
    for epoch in progress["history"]:
        del epoch["cpu_seconds"]
    write_checkpoint(path, tensors, meta)
    result = fit(_net(), _data(), one, checkpoint=path, resume=True)
    assert result.epochs[0].cpu_seconds is None and result.train_cpu_seconds is None
    assert result.epochs[0].seconds > 0


RECIPE = """
model: DigitsCNN
model_kwargs: {width: 8}
data: {dataset: digits, limit: 512}
steps:
  - train: {epochs: 3, batch_size: 16, lr: 0.003, checkpoint_every: 8}
  - prune: {config_list: [{op_names: [down.0], sparse_ratio: 0.5}]}
  - compact: {}
  - distill: {epochs: 1, batch_size: 32, lr: 0.001, temperature: 4.0}
"""


@pytest.mark.slow
def test_killed_cli_run_resumes_to_the_same_model(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    killed_out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "slimtorch", "recipe", str(recipe), "--out", str(killed_out), "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = killed_out / "checkpoints" / "01-train.safetensors"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    _, meta = read_checkpoint(checkpoint)
    assert meta["extra"]["progress"]["epoch"] < 3  # it really died mid-training
    assert not (killed_out / "model.safetensors").exists()

    assert main(["recipe", str(recipe), "--out", str(killed_out), "--resume", "--threads", "1"]) == 0
    assert main(["recipe", str(recipe), "--out", str(tmp_path / "straight"), "--threads", "1"]) == 0
    resumed = load_file(str(killed_out / "model.safetensors"))
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert tuple(straight["state::down.0.weight"].shape) == (8, 8, 3, 3)  # compacted: 16 filters -> 8
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
