"""A resume continues the same run or refuses, before anything is loaded: the checkpoint records the
settings, the data, the model's architecture and masks, the loss and what made the model (a recipe's steps)."""

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from adversarial import fails_cleanly
from slimtorch import apply_masks_
from slimtorch.cli.main import main
from slimtorch.errors import CheckpointError
from slimtorch.recover import TrainConfig, fit
from slimtorch.recover.checkpoint import read_checkpoint

CONFIG = TrainConfig(epochs=2, batch_size=16, lr=0.01, seed=0)


def _data(n: int = 64, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture
def finished(tmp_path):
    path = tmp_path / "ck.safetensors"
    fit(_net(), _data(), CONFIG, checkpoint=path)
    return path


def test_another_dataset_is_refused_not_returned(finished):
    for other, fragment in ((_data(seed=2), "training data (same size, other samples"),
                            (_data(n=48), "training data (64 samples in the checkpoint, 48 now)")):
        net = _net()
        fails_cleanly(lambda net=net, other=other: fit(net, other, CONFIG, checkpoint=finished, resume=True),
                      CheckpointError, fragment, models=[net], paths=[finished])


def test_changed_settings_load_nothing_into_the_model(finished):
    net = _net()
    other = TrainConfig.from_dict({**CONFIG.to_dict(), "lr": 0.5})
    fails_cleanly(lambda: fit(net, _data(), other, checkpoint=finished, resume=True), CheckpointError,
                  "settings.lr (0.01 in the checkpoint, 0.5 now)", models=[net], paths=[finished])


def test_other_masks_are_refused(finished):
    net = _net()
    apply_masks_(net, {"0.weight": torch.rand(16, 6) > 0.5})
    fails_cleanly(lambda: fit(net, _data(), CONFIG, checkpoint=finished, resume=True), CheckpointError,
                  "the model's masks", models=[net], paths=[finished])


def test_the_same_run_resumes_and_records_what_it_was(finished):
    net = _net()
    result = fit(net, _data(), CONFIG, checkpoint=finished, resume=True)
    assert result.steps == 8
    _, meta = read_checkpoint(finished)
    identity = meta["extra"]["identity"]
    assert identity["train_data"]["size"] == 64 and identity["settings"]["lr"] == 0.01


RECIPE = """
model: DigitsCNN
model_kwargs: {{width: 4}}
data: {{dataset: digits, limit: 128}}
steps:
  - prune: {{config_list: [{{op_names: [down.0], sparse_ratio: 0.5}}], criterion: {criterion}}}
  - finetune: {{epochs: 1, batch_size: 32}}
"""


def _cli(*argv) -> None:
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    if code:
        text = err.getvalue()
        assert code == 2 and len(text.strip().splitlines()) == 1, text
        raise SystemExit(text)


def test_recipe_resume_after_changing_the_criterion_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(criterion="l1"))
    out = tmp_path / "run"
    _cli("recipe", recipe, "--out", out, "--threads", "1")
    before = json.loads((out / "report.json").read_text())
    recipe.write_text(RECIPE.format(criterion="l2"))
    fails_cleanly(lambda: _cli("recipe", recipe, "--out", out, "--resume", "--threads", "1"), SystemExit,
                  "recipe.steps[0].prune.criterion ('l1' in the checkpoint, 'l2' now)", paths=[out])
    recipe.write_text(RECIPE.format(criterion="l1"))
    _cli("recipe", recipe, "--out", out, "--resume", "--threads", "1")  # the same recipe resumes
    after = json.loads((out / "report.json").read_text())
    assert after["stages"][-1]["accuracy"] == before["stages"][-1]["accuracy"]


class _ImageData(torch.utils.data.Dataset):
    """A dataset of PIL images (not a TensorDataset): digested by 16 samples spread over it."""

    def __init__(self, scale: int) -> None:
        self.scale = scale

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int):
        import numpy as np
        from PIL import Image

        return Image.fromarray(np.full((4, 4, 3), i * self.scale, dtype=np.uint8)), i % 3


def test_a_dataset_of_images_has_a_stable_identity():
    from slimtorch.recover.identity import dataset_identity

    # (an image's repr holds its memory address: the digest must come from its pixels)
    assert dataset_identity(_ImageData(1)) == dataset_identity(_ImageData(1))
    assert dataset_identity(_ImageData(1))["content"] != dataset_identity(_ImageData(2))["content"]


def test_a_run_started_before_fsdp_existed_resumes(tmp_path):
    """A new TrainConfig field at its default is left out of the run's identity: a checkpoint whose recorded
    settings predate the field (here ``fsdp``) still resumes; one with the field switched on is another run."""
    recorded = CONFIG.to_dict()
    assert "fsdp" not in recorded and TrainConfig.from_dict(recorded) == CONFIG
    assert TrainConfig(epochs=2, batch_size=16, lr=0.01, seed=0, fsdp=True).to_dict()["fsdp"] is True
    path = tmp_path / "ck.safetensors"
    first = fit(_net(), _data(), CONFIG, checkpoint=path)
    _, meta = read_checkpoint(path)
    assert '"fsdp"' not in json.dumps(meta), "the checkpoint records what a run before the field recorded"
    resumed = fit(_net(), _data(), CONFIG, checkpoint=path, resume=True)
    assert resumed.epochs == first.epochs
