"""Pieces the subcommands share: one-line argument errors, model and shape arguments, threads, output files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, NoReturn

import torch

from slimtorch.atomic import atomic_write
from slimtorch.data.sources import DATASETS
from slimtorch.errors import ConfigError
from slimtorch.io import load_masks
from slimtorch.masks import apply_masks_, check_masks
from slimtorch.models.modelfile import LoadedModel, load_model
from slimtorch.models.registry import ModelSpec, build_model, check_sample_shape

__all__ = [
    "OneLineParser",
    "add_data_args",
    "add_threads_arg",
    "apply_threads",
    "non_negative_int",
    "parse_shape",
    "positive_int",
    "resolve_model",
    "write_json",
    "write_text",
]

MODEL_HELP = ("a reference model (BookCNN, MnistNet, DigitsCNN), a torchvision model (resnet18 or "
              "torchvision:resnet18, untrained), or a saved slimtorch model file (.safetensors)")


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the usage and the error on several lines; here it is one line saying what to do."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` -> ``(3, 32, 32)``: the shape of one sample, without the batch dimension."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; write one sample's shape, e.g. 3,32,32") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; sizes must be positive, e.g. 3,32,32")
    try:
        return check_sample_shape(shape)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a number >= {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is fastest for tiny models "
                             "on a busy machine)")


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def add_data_args(parser: argparse.ArgumentParser, *, default: str | None = None) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default=default,
                        help="digits ships with scikit-learn; mnist and cifar10 are read from the .npz files of "
                             "--data-dir; imagefolder from a train/ + test/ (or val/) tree in --data-dir")
    parser.add_argument("--data-dir", default=None, help="folder with the local dataset files")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="use only the first N samples of each split (quick runs)")


def resolve_model(text: str, *, input_shape: tuple[int, ...] | None = None, masks: str | None = None) -> LoadedModel:
    """A model from the command line: a saved file as saved, a name freshly built; ``masks`` (a file)
    is applied on top."""
    path = Path(text)
    if path.suffix in {".pt", ".pth", ".pkl", ".bin", ".ckpt"}:
        raise ConfigError(f"{text!r} looks like a pickled file; slimtorch never loads pickles: save the model "
                          "with slimtorch (a .safetensors model file) or give a model name")
    if path.suffix == ".safetensors" or path.is_file() or (path / "compaction.json").is_file():
        loaded = load_model(path)
        if input_shape is not None:
            loaded.spec = ModelSpec.from_dict({**loaded.spec.to_dict(), "input_shape": list(input_shape)})
    else:
        spec = ModelSpec.parse(text)
        spec = ModelSpec(name=spec.name, source=spec.source, input_shape=input_shape)
        loaded = LoadedModel(build_model(spec), spec, "dense", {})
    if masks is not None:
        extra = load_masks(masks)
        check_masks(loaded.model, extra)
        apply_masks_(loaded.model, extra)
        loaded.masks = {**loaded.masks, **extra}
        loaded.state = "masked" if loaded.state == "dense" else loaded.state
    return loaded


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2))
