"""Typed errors and warnings. Every user-facing failure raises one of these with the bad value and the fix.

Hierarchy::

    SlimError
    ├── ConfigError (also ValueError)      a config list / argument is malformed or out of range
    ├── NoMatchError (also ConfigError)    a selector matches no module; names the closest real ones
    ├── UnsupportedOpError                 the dependency graph meets an op whose channel rule is unknown
    ├── TraceError                         the model could not be traced with the given example inputs
    ├── CompactionError                    masks cannot be turned into a smaller model (e.g. a layer emptied)
    ├── CheckpointError (also ValueError)  a saved file is corrupt, truncated or does not match the model
    └── ExportError                        a model cannot be exported (or its export does not reproduce it)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "CheckpointError",
    "CompactionError",
    "ConfigError",
    "ExportError",
    "NoMatchError",
    "SlimError",
    "SlimWarning",
    "TraceError",
    "UnsupportedOpError",
    "closest",
]


class SlimError(Exception):
    """Base class of every error slimtorch raises on purpose."""


class ConfigError(SlimError, ValueError):
    """A config list entry or argument is malformed, out of range or inconsistent."""


class NoMatchError(ConfigError):
    """A selector (op name, op type, partial name) matches no module of the model."""


class UnsupportedOpError(SlimError):
    """The dependency graph met an op whose effect on channels it does not know."""


class TraceError(SlimError):
    """The model could not be run or traced with the example inputs given."""


class CompactionError(SlimError):
    """The masks cannot be turned into a smaller model (e.g. they would empty a layer)."""


class CheckpointError(SlimError, ValueError):
    """A saved file is corrupt, truncated, of the wrong format or does not match the model."""


class ExportError(SlimError):
    """The model cannot go through torch.export / ONNX as it is; the message names the alternative."""


class SlimWarning(UserWarning):
    """Something was done differently from what was asked; the message says what and by how much."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """Format the candidates closest to ``name`` for an error message ("did you mean ...")."""
    pool = list(candidates)
    near = difflib.get_close_matches(name, pool, n=n, cutoff=0.4)
    if not near:
        near = [c for c in pool if name.lower() in c.lower() or c.lower() in name.lower()][:n]
    if not near:
        return f"no similar names; some real ones: {pool[:n]}"
    return f"closest real names: {near}"
