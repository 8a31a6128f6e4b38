"""Shared test set-up: deterministic seeds, one intra-op thread per worker, the local data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SLIMTORCH_DATA_DIR", REPO.parent / "shared" / "data"))

# Tests run in parallel workers (pytest -n 2) on small machines: one thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def data_dir() -> Path:
    """The folder with mnist_*.npz and cifar10_*.npz; tests that need it skip when it is absent."""
    if not (DATA_DIR / "mnist_test.npz").is_file():
        pytest.skip(f"local datasets not found in {DATA_DIR} (set SLIMTORCH_DATA_DIR)")
    return DATA_DIR


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--zoo", action="store_true", default=False,
                     help="also run the full model-zoo matrices (tests marked zoo: tens of minutes single-core)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``zoo`` (every model of a zoo through the compaction oracle) run with ``--zoo`` only; a
    few models of each zoo run without it, so that the default suite still covers every zoo."""
    if config.getoption("--zoo"):
        return
    skip = pytest.mark.skip(reason="a model-zoo matrix: run with --zoo (make zoo)")
    for item in items:
        if "zoo" in item.keywords:
            item.add_marker(skip)
