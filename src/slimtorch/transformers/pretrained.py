"""Saving and loading compacted Hugging Face models: ``save_pretrained`` files (safetensors + config.json).

The config records the kept sizes of every compacted block (``slimtorch_blocks``). Where one size holds
for every layer and the architecture has a config key for it (``intermediate_size``; LLaMA's and ViT's
``num_attention_heads``, ``num_key_value_heads`` and ``head_dim``), the config's own keys are updated
too, so plain ``from_pretrained`` rebuilds the model. Per-layer head counts (BERT, GPT-2 derive the head
width from the head count, and Hugging Face no longer supports ``pruned_heads``) need
:func:`load_compacted`, which builds the model from its config, shrinks every recorded block, then
loads the weights (no pickle)::

    >>> import tempfile, torch
    >>> from transformers import BertConfig, BertModel
    >>> from slimtorch.transformers.hf import compact_hf_, unit_masks
    >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                             intermediate_size=64)).eval()
    >>> compact_hf_(bert, unit_masks(bert, {"encoder.layer.1.attention": [0]}))
    >>> path = tempfile.mkdtemp()
    >>> save_compacted(bert, path)
    >>> again = load_compacted(path)
    >>> again.encoder.layer[1].attention.self.query.out_features
    24
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from torch import nn

from slimtorch.errors import CheckpointError, SlimWarning
from slimtorch.prune.masks import is_masked, without_masks
from slimtorch.report import COMPACTION_ATTR
from slimtorch.transformers.blocks import find_blocks
from slimtorch.transformers.hf import CONFIG_KEY, BlockPlan, shrink_block_

__all__ = ["load_compacted", "save_compacted", "shrink_to_config_"]


_REMOTE_FILE = "slimtorch_model.py"
_REMOTE_CODE = """\"\"\"Rebuilds a model compacted by slimtorch: after the usual construction from the config,
every block shrinks to the size config.slimtorch_blocks records; Hugging Face then loads the weights.\"\"\"

from transformers import {base}

from slimtorch.transformers.pretrained import shrink_to_config_


class Slim{base}({base}):
    def __init__(self, config, *args):
        super().__init__(config, *args)
        shrink_to_config_(self)
"""
_AUTO_MAPPINGS = (
    ("AutoModel", "MODEL_MAPPING_NAMES"),
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
)


def _auto_class(model_class: type) -> str | None:
    """The ``transformers`` Auto class that maps a config to ``model_class`` (e.g. AutoModelForCausalLM)."""
    from transformers.models.auto import modeling_auto

    for auto_name, table in _AUTO_MAPPINGS:
        for value in getattr(modeling_auto, table, {}).values():
            if model_class.__name__ in ((value,) if isinstance(value, str) else tuple(value)):
                return auto_name
    return None


def _config_rebuilds_shapes(model: nn.Module) -> bool:
    """True when building the model class from its config alone gives every parameter its current shape."""
    import torch

    with torch.device("meta"):
        fresh = type(model)(model.config)
    shapes = {k: p.shape for k, p in fresh.named_parameters()}
    return all(shapes.get(k) == p.shape for k, p in model.named_parameters())


def save_compacted(model: nn.Module, path: str | Path) -> None:
    """Save a compacted Hugging Face model (or a SentenceTransformer around one) to ``path``.

    Weights go to safetensors through ``save_pretrained`` (``SentenceTransformer.save``), sizes to
    config.json. When the config cannot describe the sizes (per-layer head counts), a small
    ``slimtorch_model.py`` and an ``auto_map`` entry are written as well, so that Hugging Face's own
    ``from_pretrained(path, trust_remote_code=True)`` and ``SentenceTransformer(path,
    trust_remote_code=True)`` rebuild it; :func:`load_compacted` needs neither.
    """
    path = Path(path)
    hf_model = model[0].auto_model if hasattr(model, "_first_module") else model  # a SentenceTransformer
    if is_masked(hf_model):
        if not getattr(hf_model, COMPACTION_ATTR, None):
            raise CheckpointError("the model still carries masks; compact it (compact_hf_) or remove_masks_ it first")
        with without_masks(hf_model) as masks:  # the zeros are saved; a Hugging Face folder holds no masks
            warnings.warn(f"the masks the compacted model keeps ({', '.join(sorted(masks)[:3])}...) are not saved "
                          "in a Hugging Face folder; save them with slimtorch.io.save_masks to keep those weights "
                          "at zero when training the reloaded model", SlimWarning, stacklevel=2)
            return save_compacted(model, path)
    config = hf_model.config
    auto = None if _config_rebuilds_shapes(hf_model) else _auto_class(type(hf_model))
    if auto is not None:
        config.auto_map = {auto: f"{_REMOTE_FILE[:-3]}.Slim{type(hf_model).__name__}"}
    elif hasattr(config, "auto_map") and _REMOTE_FILE[:-3] in str(config.auto_map):
        del config.auto_map
    if hasattr(model, "_first_module"):
        model.save(str(path))
    else:
        model.save_pretrained(str(path))
    if auto is not None:
        (path / _REMOTE_FILE).write_text(_REMOTE_CODE.format(base=type(hf_model).__name__))


def _first_units(units: int, kv_units: int, kept: int, kept_kv: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Keep-indices that shrink a freshly built block to ``kept`` units (and ``kept_kv`` key/value heads):
    the first ones, the same number in every key/value group."""
    if not kv_units or not kept_kv:
        return tuple(range(kept)), ()
    group, per_group = units // kv_units, kept // kept_kv
    return tuple(g * group + h for g in range(kept_kv) for h in range(per_group)), tuple(range(kept_kv))


def shrink_to_config_(model: nn.Module) -> None:
    """Shrink a model freshly built from a compacted config to the sizes its config records."""
    record = getattr(model.config, CONFIG_KEY, None) or {}
    specs = find_blocks(model)
    missing = sorted(set(record) - set(specs))
    if missing:
        raise CheckpointError(f"the config records compacted blocks the model lacks: {missing[:3]}")
    for name, sizes in record.items():
        spec = specs[name]
        keep, keep_kv = _first_units(spec.units, spec.kv_units, int(sizes["units"]), int(sizes.get("kv_units", 0)))
        if len(keep) != spec.units or len(keep_kv) != spec.kv_units:
            shrink_block_(spec, BlockPlan(name, spec.kind, spec.units, keep, keep_kv))


def _shrinking_class(model_class: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``model_class`` whose constructor shrinks the blocks to the config's recorded sizes,
    so that Hugging Face's own ``from_pretrained`` (key renaming, tied weights, safetensors) loads it."""

    def __init__(self: nn.Module, config: object, *args: object) -> None:
        model_class.__init__(self, config, *args)
        shrink_to_config_(self)

    return type(model_class.__name__, (model_class,), {"__init__": __init__, "__module__": model_class.__module__})


def load_compacted(path: str | Path, *, model_class: type[nn.Module] | None = None) -> nn.Module:
    """Load a model saved by :func:`save_compacted` (in eval mode). ``model_class`` defaults to the
    config's ``architectures[0]`` from ``transformers``."""
    import transformers
    from safetensors import SafetensorError

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json; is it a save_pretrained folder?")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise CheckpointError(f"the config in {str(path)!r} is unreadable ({err})") from None
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0] or ""
        model_class = getattr(transformers, arch, None) or getattr(transformers, arch.removeprefix("Slim"), None)
        if model_class is None:
            raise CheckpointError(f"cannot tell the model class of {str(path)!r} (architectures={arch!r}); pass "
                                  "model_class=")
    try:
        model, info = _shrinking_class(model_class).from_pretrained(str(path), config=config, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"the weights in {str(path)!r} are unreadable or do not fit the recorded sizes: "
                              f"{err}") from None
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(f"the weights in {str(path)!r} do not match the model: {problems}")
    setattr(model, COMPACTION_ATTR, {"loaded_from": str(path), "blocks": getattr(config, CONFIG_KEY, None) or {}})
    return model.eval()
