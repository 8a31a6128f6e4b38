"""Run under ``torchrun --nproc_per_node 2``: trains a small MLP on digits with DDP, once with the dense
all-reduce and once with the top-k gradient hook, and saves what the tests compare (process 0 only)."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from slimtorch.data import load_digits
from slimtorch.recover import TrainConfig, fit
from slimtorch.recover.distributed import init_distributed, shutdown_distributed

EPOCHS = 6


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def config(topk: float) -> TrainConfig:
    # plain SGD: error feedback is the classic EF-SGD; momentum would amplify the delayed coordinates
    return TrainConfig(epochs=EPOCHS, batch_size=64, lr=0.2, optimizer="sgd", momentum=0.0, schedule="cosine",
                       grad_topk=topk)


def digits() -> tuple[TensorDataset, TensorDataset]:
    """Digits with 1280 training images: 20 full batches, so each process gets exactly half of every one."""
    data = load_digits(seed=0)
    return TensorDataset(data.x_train[:1280], data.y_train[:1280]), TensorDataset(data.x_test, data.y_test)


def main(out: Path, topk: float) -> None:
    info = init_distributed()
    torch.set_num_threads(1)
    train, test = digits()
    results = {"world_size": info.world_size}
    for name, ratio in (("dense", 0.0), ("topk", topk)):
        model = mlp()
        result = fit(model, train, config(ratio), eval_data=test)
        results[name] = result.to_dict()
        if info.is_main:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors"))
    if info.is_main:
        (out / "results.json").write_text(json.dumps(results))
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]))
