"""Progress bars on long work: tqdm when installed and the output is a terminal, silent otherwise."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["Bar", "progress", "progress_bar"]

T = TypeVar("T")


def _shown() -> bool:
    setting = os.environ.get("SLIMTORCH_PROGRESS")
    return sys.stderr.isatty() if setting is None else setting == "1"


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


class Bar:
    """A bar advanced by hand (``step``), with a note after it (the last step's time, say); silent when
    progress is not shown."""

    def __init__(self, total: int, desc: str, initial: int = 0) -> None:
        self._bar = None
        if _shown():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            # redrawn at every step (a step is a layer: seconds), so that every step's note is shown
            self._bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, mininterval=0)

    def step(self, note: str = "") -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def progress_bar(total: int, *, desc: str = "", initial: int = 0) -> Bar:
    """A :class:`Bar` of ``total`` steps, ``initial`` of them done already (a resumed run)."""
    return Bar(total, desc, initial)
