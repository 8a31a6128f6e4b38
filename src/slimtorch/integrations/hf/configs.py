"""A compacted Hugging Face model's config: the kept sizes of every block, and the config's own size keys where
they describe the compacted shapes, so that plain ``from_pretrained`` rebuilds the model.

Hugging Face configs hold one size per kind of block (``intermediate_size``, ``num_attention_heads``...), and many
architectures derive other sizes from them (the head width from the hidden size and the head count). A key is
therefore set only when every block it sizes agrees, the config class accepts the value, and a model built from
the new config (on the meta device: shapes only) has the compacted shapes in those blocks. The values the keys
had before are kept (``config_before``), so that a loader can rebuild the original model and replay the
compaction on it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from slimtorch.integrations.hf.units import BlockSpec

__all__ = ["ABSENT", "BEFORE_KEY", "CONFIG_KEY", "base_class", "fit_config_", "sync_config_"]

#: Config attribute holding the kept sizes of every compacted block (read back by the loader).
CONFIG_KEY = "slimtorch_blocks"
#: Key of ``model.slimtorch_compaction`` holding the config values compaction changed, as they were first.
BEFORE_KEY = "config_before"


def base_class(model: nn.Module) -> type[nn.Module]:
    """The ``transformers`` class of ``model`` (a loader's subclass that shrinks itself names its base)."""
    return getattr(type(model), "slimtorch_base", type(model))


def _settable(config: Any, key: str) -> bool:
    """The config has ``key`` as a size: an int, or None where it derives the size (GPT-2's ``n_inner``, the
    ``head_dim`` of configs that compute it from the hidden size)."""
    return bool(key) and isinstance(getattr(config, key, ""), (int, type(None)))


def _key_of(config: Any, spec: BlockSpec) -> str | None:
    """The config key holding the size of ``spec``'s units."""
    key = spec.config_keys.get("units", "")
    return key if _settable(config, key) else None


def _updates(config: Any, specs: Mapping[str, BlockSpec]) -> Iterator[tuple[dict[str, int], list[BlockSpec]]]:
    """Per config key, the update its blocks agree on and those blocks."""
    groups: dict[tuple[str, str], list[BlockSpec]] = {}
    for spec in specs.values():
        key = _key_of(config, spec)
        if key is not None:
            groups.setdefault((spec.kind, key), []).append(spec)
    for (_kind, key), members in groups.items():
        sizes = {(s.units, s.kv_units) for s in members}
        if len(sizes) != 1:
            continue
        units, kv_units = sizes.pop()
        update = {key: units}
        keys = members[0].config_keys
        if _settable(config, keys.get("kv_units", "")):
            update[keys["kv_units"]] = kv_units or units
        width = getattr(members[0].module, "head_dim", None)
        if keys.get("width") and isinstance(width, int):  # (set even where the config lacks it: many models read
            update[keys["width"]] = width                # it when given, ``getattr(config, "head_dim", ...)``)
        yield update, members


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Building a model from a config logs notes (tied weights, defaults); they say nothing here."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fits(model: nn.Module, update: dict[str, int], names: list[str]) -> bool:
    """Whether a model built from its config with ``update`` has ``model``'s shapes in the parameters ``names``."""
    config = model.config
    try:  # the config class validates itself (e.g. hidden size a multiple of the head count)
        new = type(config).from_dict({**config.to_dict(), **update})
        with _quiet(), torch.device("meta"):
            fresh = base_class(model)(new)
        return all(fresh.get_parameter(n).shape == model.get_parameter(n).shape for n in names)
    except Exception:  # any refusal: the sizes stay recorded in slimtorch_blocks only
        return False


#: what ``config_before`` holds for a key the config did not have
ABSENT = {"absent": True}


def fit_config_(model: nn.Module, update: dict[str, int], names: list[str], before: dict[str, Any]) -> bool:
    """Set the config keys of ``update`` if a model built from the config then has ``model``'s shapes in the
    parameters ``names``; ``before`` gets the first value of every key changed (:data:`ABSENT` for a key the
    config did not have). Returns whether it did."""
    changed = {k: v for k, v in update.items() if getattr(model.config, k, ABSENT) != v}
    if not changed or not _fits(model, update, names):
        return False
    for key, value in changed.items():
        before.setdefault(key, getattr(model.config, key, ABSENT))
        setattr(model.config, key, value)
    return True


def sync_config_(model: nn.Module, specs: Mapping[str, BlockSpec], record: dict[str, dict],
                 before: dict[str, Any], *, keys: bool = True) -> None:
    """Record every block's current sizes in the config (``slimtorch_blocks``), and (``keys``) set the config's
    own size keys where they describe the compacted blocks; ``before`` gets the first value of every key
    changed. (A model whose compaction rewrites calls at run time gets no keys: a config cannot say so.)"""
    config = model.config
    for name, spec in specs.items():
        record.setdefault(name, {}).update(units=spec.units, kv_units=spec.kv_units)
    setattr(config, CONFIG_KEY, record)
    if not keys:
        return
    for update, members in _updates(config, specs):
        names = [f"{spec.prefix}.{s.param}" if spec.prefix else s.param
                 for spec in members for s in (*spec.producers, *spec.consumers)]
        fit_config_(model, update, names, before)
