"""Progress bars on long work: tqdm when installed and the output is a terminal, silent otherwise."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress"]

T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str = "", total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar on an interactive terminal (``SLIMTORCH_PROGRESS=1`` forces it on,
    ``=0`` off)."""
    setting = os.environ.get("SLIMTORCH_PROGRESS")
    show = sys.stderr.isatty() if setting is None else setting == "1"
    if show:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            show = False
    if not show:
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
