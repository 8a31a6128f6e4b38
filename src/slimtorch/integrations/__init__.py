"""Integrations with third-party model libraries: the rules, shrink functions and hooks their layers need.

An integration registers what it adds to the engine (:func:`~slimtorch.graph.register_module_rule`,
:func:`~slimtorch.compact.register_shrink`, :data:`~slimtorch.compact.compact.AFTER_COMPACTION`) when it is
imported; the graph and compaction never import it. Importing its library can take seconds, so this package
only adds a trace preparer (:data:`~slimtorch.graph.rules.TRACE_PREPARERS`) that imports the integration the
first time a model is traced while its library is loaded: a model of that library cannot exist before.

    >>> from slimtorch.graph.rules import TRACE_PREPARERS
    >>> register_loaded in TRACE_PREPARERS
    True
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from slimtorch.graph.rules import TRACE_PREPARERS

__all__ = ["register_loaded"]


def register_loaded(model: Any) -> None:
    """Import the integration of each supported library that is loaded (once; later calls cost a lookup)."""
    if "transformers" in sys.modules and "slimtorch.integrations.hf" not in sys.modules:
        with contextlib.suppress(ImportError):  # (a broken or too old transformers: its models trace without)
            from slimtorch.integrations import hf  # noqa: F401  (registers the Hugging Face rules)


TRACE_PREPARERS.append(register_loaded)
