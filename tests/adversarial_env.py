"""What the adversarial tables of files, outputs, resume and the command line share: the original files each
row starts from (made once per module, copied into the row's own folder), the ways to break them, and the
command-line runner (a failure must exit with code 2 and one line)."""

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

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from adversarial import fails_cleanly
from nets import Residual
from slimtorch import apply_masks_, compact_, compute_masks
from slimtorch.cli.main import main
from slimtorch.io import save_compacted, save_masks
from slimtorch.lora import LoRAConfig, add_lora_, save_lora
from slimtorch.models.modelfile import save_model
from slimtorch.models.registry import ModelSpec, build_model
from slimtorch.recover import TrainConfig, fit
from slimtorch.recover.distill import DistillConfig, Distiller

IMAGE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
DIGITS = ModelSpec(name="DigitsCNN", kwargs={"width": 4})
CONFIG = TrainConfig(epochs=1, batch_size=16, lr=0.01, checkpoint_every=2)


# -- the files every row starts from (made once, copied into each row's folder) ---------------------------------


def make_data(n: int = 48, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def make_net(width: int = 12) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))


def make_residual() -> nn.Module:
    torch.manual_seed(0)
    return Residual().eval()


def make_distiller(student: nn.Module, temperature: float = 2.0, teacher_seed: int = 5) -> Distiller:
    torch.manual_seed(teacher_seed)
    teacher = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    return Distiller(teacher, student, DistillConfig(temperature=temperature))


def make_originals(root: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        residual = make_residual()
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
    fit(make_net(), make_data(), CONFIG, checkpoint=root / "ck.safetensors")
    student = make_net()
    fit(student, make_data(), CONFIG, loss_fn=make_distiller(student), checkpoint=root / "distill.safetensors")
    lora_net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    add_lora_(lora_net, LoRAConfig(r=2, target_modules=("0",)))
    save_lora(lora_net, root / "lora")
    torch.save({"weight": torch.ones(2)}, root / "pickled.pt")  # what a pickled file looks like: never loaded


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


def run_row(setup: Callable[[Env], Any], error: type[BaseException], fragment: str, env: Env) -> None:
    """One failure row: prepare its files, then check that the call fails cleanly."""
    env.tmp.mkdir()
    call, models, paths = setup(env)
    try:
        fails_cleanly(call, error, fragment, models=models, paths=paths)
    finally:  # (read-only folders would keep pytest from cleaning up)
        for p in [env.tmp, *env.tmp.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                os.chmod(p, 0o755)
