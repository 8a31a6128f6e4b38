"""Saving and loading compacted Hugging Face models: ``save_pretrained`` files (safetensors + config.json).

The config records the kept sizes of every compacted block (``slimtorch_blocks``). Where one size holds
for every layer and the architecture has a config key for it (``intermediate_size``; LLaMA's and ViT's
``num_attention_heads``, ``num_key_value_heads`` and ``head_dim``), the config's own keys are updated
too, so plain ``from_pretrained`` rebuilds the model. Per-layer head counts (BERT, GPT-2 derive the head
width from the head count, and Hugging Face no longer supports ``pruned_heads``) need
:func:`load_hf_folder`, which builds the model from its config, shrinks every recorded block, then
loads the weights::

    >>> import tempfile, torch
    >>> from transformers import BertConfig, BertModel
    >>> from slimtorch.integrations.hf.compaction import compact_hf_, unit_masks
    >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                             intermediate_size=64)).eval()
    >>> compact_hf_(bert, unit_masks(bert, {"encoder.layer.1.attention": [0]}))
    >>> path = tempfile.mkdtemp()
    >>> save_hf_folder(bert, path)
    >>> again = load_hf_folder(path)
    >>> again.encoder.layer[1].attention.self.query.out_features
    24

:func:`load_hf_folder` is also the safe way to load any ``save_pretrained`` folder: it never runs code
from the folder (``auto_map`` entries and ``.py`` files are ignored, the class comes from ``transformers``
itself), reads weights from safetensors only (a pickled ``pytorch_model.bin`` is a CheckpointError), and
bounds the sizes in ``config.json`` before building anything. The layout is Hugging Face's; its files are
read by slimtorch's container first (kind ``hf``: bounded JSON, every weight file's safetensors header
checked, the same errors), then by ``from_pretrained``.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from slimtorch.atomic import atomic_folder
from slimtorch.checks import MAX_PARAMETERS, check_module, check_path
from slimtorch.compact.compact import replay_
from slimtorch.container import Kind, inspect_tensors, read_description, read_json, register_kind
from slimtorch.errors import CheckpointError, SlimError, SlimWarning
from slimtorch.integrations.hf.compaction import CONFIG_KEY, BlockPlan, shrink_block_
from slimtorch.integrations.hf.configs import ABSENT, BEFORE_KEY
from slimtorch.integrations.hf.units import find_blocks
from slimtorch.masks import COMPACTION_ATTR, is_masked, without_masks

__all__ = ["hf_folder_spec", "hf_weight_files", "load_hf_folder", "save_hf_folder", "shrink_to_config_"]


#: Files of an earlier save that a new one supersedes (weights, their shards and index): not kept beside it.
_WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json")

#: The compaction steps of a saved model (what each layer kept, the rewritten calls) and the config values they
#: changed, as they were before: the loader builds the original model, replays the steps, then loads the weights.
STEPS_FILE = "slimtorch_compaction.json"
STEPS_FORMAT = "slimtorch-hf-steps-v1"

#: The module and entry earlier versions wrote so that ``trust_remote_code`` could rebuild the shapes;
#: a save removes them from the config (nothing of ours runs code from a model folder).
_OLD_REMOTE_MODULE = "slimtorch_model"

HF = register_kind(Kind(
    name="hf", version=1, title="Hugging Face model folder", readable="safetensors file of a Hugging Face model",
    described="config", header=False, fix="save the model with save_hf_folder (or save_pretrained)"))


def save_hf_folder(model: nn.Module, path: str | Path) -> None:
    """Save a compacted Hugging Face model (or a SentenceTransformer around one) to ``path``.

    Weights go to safetensors through ``save_pretrained`` (``SentenceTransformer.save``), sizes to
    config.json (``slimtorch_blocks``), all files at once (:func:`slimtorch.atomic.atomic_folder`: a failed
    save leaves ``path`` as it was). :func:`load_hf_folder` rebuilds the model from those two files alone;
    no Python file is written, and no loader of ours runs code from a model folder. The folder holds no
    masks: those a compacted model keeps are saved apart with :func:`slimtorch.save_masks`.
    """
    check_module(model, "save_hf_folder")
    hf_model = model[0].auto_model if hasattr(model, "_first_module") else model  # a SentenceTransformer
    if is_masked(hf_model):
        if not getattr(hf_model, COMPACTION_ATTR, None):
            raise CheckpointError("the model still carries masks; compact it (compact_hf_) or remove_masks_ it first")
        with without_masks(hf_model) as masks:  # the zeros are saved; a Hugging Face folder holds no masks
            warnings.warn(f"the masks the compacted model keeps ({', '.join(sorted(masks)[:3])}...) are not saved "
                          "in a Hugging Face folder; save them with slimtorch.io.save_masks to keep those weights "
                          "at zero when training the reloaded model", SlimWarning, stacklevel=2)
            return save_hf_folder(model, path)
    config = hf_model.config
    old_map = getattr(config, "auto_map", None)
    if old_map is not None and _OLD_REMOTE_MODULE in str(old_map):
        del config.auto_map
    try:
        # every file at once (a temporary folder renamed into place): a failure leaves the folder as it was
        with atomic_folder(path, replaces=(*_WEIGHT_FILES, STEPS_FILE)) as staging:
            if hasattr(model, "_first_module"):
                model.save(str(staging))
            else:
                model.save_pretrained(str(staging))
            _write_steps(hf_model, staging)
    except BaseException:
        if old_map is not None and not hasattr(config, "auto_map"):
            config.auto_map = old_map  # (the model is left as it was too)
        raise


def _write_steps(model: nn.Module, folder: Path) -> None:
    info = getattr(model, COMPACTION_ATTR, None) or {}
    if info.get("steps"):
        text = json.dumps({"format": STEPS_FORMAT, "steps": info["steps"], BEFORE_KEY: info.get(BEFORE_KEY, {})})
        (Path(folder) / STEPS_FILE).write_text(text)


def _read_steps(path: Path) -> tuple[list[dict], dict[str, object]] | None:
    """The steps and original config values a save recorded (None: the folder has none), checked."""
    file = path / STEPS_FILE
    if not file.is_file():
        return None
    data = read_json(file, HF)  # (bounded in size; unreadable JSON is a CheckpointError)
    steps, before = (data.get("steps"), data.get(BEFORE_KEY)) if isinstance(data, dict) else (None, None)
    ok = data.get("format") == STEPS_FORMAT if isinstance(data, dict) else False
    ok = ok and isinstance(steps, list) and all(isinstance(st, dict) and isinstance(st.get("modules"), dict)
                                                and isinstance(st.get("fixes"), list) for st in steps)
    if not ok or not isinstance(before, dict) or not all(isinstance(k, str) for k in before):
        raise CheckpointError(f"{str(file)!r} is not a {STEPS_FORMAT} file: it was edited or belongs to another tool")
    _check_sizes(before, path)
    return steps, before


def _first_units(units: int, kv_units: int, kept: int, kept_kv: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Keep-indices that shrink a freshly built block to ``kept`` units (and ``kept_kv`` key/value heads):
    the first ones, the same number in every key/value group."""
    if not kv_units or not kept_kv:
        return tuple(range(kept)), ()
    group, per_group = units // kv_units, kept // kept_kv
    return tuple(g * group + h for g in range(kept_kv) for h in range(per_group)), tuple(range(kept_kv))


def _recorded_sizes(name: str, sizes: object, units: int, kv_units: int) -> tuple[int, int]:
    """The kept (units, key/value units) the config records for a block, checked against the block's sizes."""
    ok = isinstance(sizes, dict) and all(isinstance(sizes.get(k, 0), int) and not isinstance(sizes.get(k, 0), bool)
                                         for k in ("units", "kv_units"))
    kept, kept_kv = (sizes.get("units"), sizes.get("kv_units", 0)) if ok else (None, None)
    if not ok or kept is None or not 1 <= kept <= units or not 0 <= kept_kv <= kv_units:
        raise CheckpointError(f"the config's {CONFIG_KEY} entry for {name!r} is {sizes!r}; the block has {units} "
                              f"units and {kv_units} key/value units: the file was edited or belongs to another "
                              "model")
    return kept, kept_kv


def shrink_to_config_(model: nn.Module) -> None:
    """Shrink a model freshly built from a compacted config to the sizes its config records."""
    record = getattr(model.config, CONFIG_KEY, None) or {}
    specs = find_blocks(model)
    missing = sorted(set(record) - set(specs))
    if missing:
        raise CheckpointError(f"the config records compacted blocks the model lacks: {missing[:3]}")
    for name, sizes in record.items():
        spec = specs[name]
        kept, kept_kv = _recorded_sizes(name, sizes, spec.units, spec.kv_units)
        keep, keep_kv = _first_units(spec.units, spec.kv_units, kept, kept_kv)
        if len(keep) != spec.units or len(keep_kv) != spec.kv_units:
            shrink_block_(spec, BlockPlan(name, spec.kind, spec.units, keep, keep_kv))


_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
#: Config keys that size a model, and the largest value accepted for them (layer counts get a tighter bound:
#: building each layer takes time even on the meta device).
_SIZE_KEY = re.compile(r"(^n_|^num_|size$|dim$|_dim_|embd$|embeddings$|heads$|layers?$|inner$|positions$|experts$)")
_LAYER_KEY = re.compile(r"layers?$|^n_layer")
_MAX_SIZE, _MAX_LAYERS = 1 << 24, 4096


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files ``from_pretrained`` reads: ``model.safetensors``, or the shards its index names."""
    if (path / "model.safetensors").is_file() or not (path / "model.safetensors.index.json").is_file():
        return [path / "model.safetensors"]
    index = read_json(path / "model.safetensors.index.json", HF)
    shards = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(shards, dict) or not all(isinstance(s, str) and "/" not in s for s in shards.values()):
        raise CheckpointError(f"{str(path / 'model.safetensors.index.json')!r} has no valid 'weight_map' (names of "
                              f"shard files in the folder); {HF.fix}")
    return [path / name for name in sorted(set(shards.values()))]


def hf_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a ``save_pretrained`` folder, every header checked (nothing loaded)."""
    _check_files(path)
    return _weight_files(path)


def _check_weights(path: Path) -> None:
    """Every weight file's safetensors header (nothing loaded), before transformers reads them."""
    try:
        for file in _weight_files(path):
            inspect_tensors(file, HF)
    except CheckpointError as err:
        raise CheckpointError(f"the weights in {str(path)!r} are unreadable: {err}") from None


def _check_files(path: Path) -> None:
    """Weights from safetensors only: a folder holding only pickled weights is refused, never unpickled."""
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json, so it is no Hugging Face model folder; {HF.fix}")
    if any(path.glob("*.safetensors")):
        _check_weights(path)
        return
    pickles = sorted(p.name for pattern in _PICKLES for p in path.glob(pattern))
    if pickles:
        raise CheckpointError(f"{str(path)!r} holds pickled weights {pickles[:3]} and no safetensors file; slimtorch "
                              "never unpickles: convert them to safetensors where the file is trusted "
                              "(model.save_pretrained(folder) writes model.safetensors)")
    raise CheckpointError(f"{str(path)!r} holds no model.safetensors; save the model with save_hf_folder or "
                          "save_pretrained")


def _check_sizes(data: object, path: Path, where: str = "") -> None:
    """Refuse absurd sizes in config.json (every nested config included) before anything is built."""
    if isinstance(data, list):
        for item in data:
            _check_sizes(item, path, where)
        return
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        if isinstance(value, (dict, list)):
            _check_sizes(value, path, f"{where}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(f"{str(path / 'config.json')!r} sets {where}{key}={value}; a model's config holds "
                                  "finite numbers only (a NaN epsilon or scale makes every output NaN): the file "
                                  f"is corrupt or was edited; {HF.fix}")
        elif isinstance(value, int) and not isinstance(value, bool) and _SIZE_KEY.search(key):
            bound = _MAX_LAYERS if _LAYER_KEY.search(key) else _MAX_SIZE
            if not -1 <= value <= bound:
                raise CheckpointError(f"{str(path / 'config.json')!r} sets {where}{key}={value}, out of range "
                                      f"(at most {bound:,}); the file is corrupt or not a real model's config: "
                                      f"{HF.fix}")


def _read_config(path: Path) -> object:
    """The folder's config, parsed by the ``transformers`` class its ``model_type`` names (no remote code)."""
    import transformers

    data = read_description(path / "config.json", HF)  # a JSON object, of bounded size
    _check_sizes(data, path)
    if data.get("quantization_config") is not None:
        method = data["quantization_config"].get("quant_method") if isinstance(data["quantization_config"], dict) \
            else data["quantization_config"]
        raise CheckpointError(f"{str(path / 'config.json')!r} asks transformers to quantize the model while loading "
                              f"(quantization_config, {method!r}); load_hf_folder loads float models: remove the key, "
                              "then quantize with slimtorch.quantize")
    model_type = data.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise CheckpointError(f"{str(path)!r} has model_type={model_type!r}, which transformers does not define; "
                              "slimtorch never runs code from a model folder (auto_map / trust_remote_code): load "
                              "the model with its own library")
    try:
        return transformers.CONFIG_MAPPING[model_type].from_pretrained(str(path))
    except Exception as err:  # transformers raises many types on a bad config (AttributeError for a bad dtype, ...)
        raise CheckpointError(f"the config in {str(path)!r} is unreadable ({type(err).__name__}: {err})") from None


def _model_class(config: object, path: Path) -> type[nn.Module]:
    """``architectures[0]`` from the ``transformers`` package itself (never from the folder)."""
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0] or ""
    arch = arch if isinstance(arch, str) else ""
    model_class = getattr(transformers, arch, None) or getattr(transformers, arch.removeprefix("Slim"), None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise CheckpointError(f"cannot tell the model class of {str(path)!r} (architectures={arch!r} is no model "
                              "class of transformers); pass model_class=")
    return model_class


def _check_param_count(model_class: type[nn.Module], config: object, path: Path) -> None:

    try:
        with torch.device("meta"):
            params = sum(p.numel() for p in model_class(config).parameters())
    except Exception as err:  # the model's constructor may raise anything on a bad config (KeyError for an activation)
        raise CheckpointError(f"the config in {str(path)!r} does not build a {model_class.__name__}: "
                              f"{type(err).__name__}: {err}") from None
    if params > MAX_PARAMETERS:
        raise CheckpointError(f"the config in {str(path)!r} describes {params:,} parameters (at most "
                              f"{MAX_PARAMETERS:,}); the file is corrupt or not a real model's config")


def _check_replayed(model: nn.Module) -> None:
    """The sizes the config records for each block are the sizes the replayed steps gave it (an edited record
    would otherwise go unnoticed: the steps decide the shapes)."""
    record = getattr(model.config, CONFIG_KEY, None) or {}
    specs = find_blocks(model)
    for name, sizes in record.items():
        spec = specs.get(name)
        if spec is None:
            raise CheckpointError(f"the config records a compacted block the model lacks: {name!r}")
        kept, kept_kv = _recorded_sizes(name, sizes, spec.units, spec.kv_units)
        if (kept, kept_kv) != (spec.units, spec.kv_units):
            raise CheckpointError(f"the config's {CONFIG_KEY} entry for {name!r} is {sizes!r}, but the recorded "
                                  f"compaction steps leave it {spec.units} units and {spec.kv_units} key/value units: "
                                  "the file was edited")


def _set_keys(config: object, values: dict[str, object]) -> None:
    for key, value in values.items():
        if value == ABSENT:
            if key in vars(config):
                delattr(config, key)
        else:
            setattr(config, key, value)


def _shrinking_class(model_class: type[nn.Module], recorded: tuple[list[dict], dict] | None) -> type[nn.Module]:
    """A subclass of ``model_class`` whose constructor builds the compacted shapes, so that Hugging Face's own
    ``from_pretrained`` (key renaming, tied weights, safetensors) loads it: with ``recorded`` steps, the original
    model (the config's values before compaction) with the steps replayed; else the blocks shrunk to the sizes
    the config records."""

    def __init__(self: nn.Module, config: object, *args: object) -> None:
        if recorded is None:
            model_class.__init__(self, config, *args)
            shrink_to_config_(self)
            return
        steps, before = recorded
        compacted = {k: getattr(config, k, ABSENT) for k in before}
        _set_keys(config, before)
        try:
            model_class.__init__(self, config, *args)
        finally:
            _set_keys(config, compacted)
        try:
            with torch.device("cpu"):  # (the keep indices are read: from_pretrained may build the model on meta)
                replay_(self, steps)
        except SlimError:
            raise
        except Exception as err:  # (keep indices out of range, a module the model lacks...)
            raise CheckpointError(f"the recorded compaction steps do not fit {model_class.__name__}: "
                                  f"{type(err).__name__}: {err}") from None
        _check_replayed(self)

    namespace = {"__init__": __init__, "__module__": model_class.__module__, "slimtorch_base": model_class}
    return type(model_class.__name__, (model_class,), namespace)


def hf_folder_spec(path: str | Path) -> tuple[object, type[nn.Module]]:
    """The config and model class of a ``save_pretrained`` folder, checked as :func:`load_hf_folder` checks
    them (weights' headers, bounded sizes, a class of ``transformers`` itself); no weight is loaded."""
    path = check_path(path, "the model folder")
    _check_files(path)
    config = _read_config(path)
    model_class = _model_class(config, path)
    _check_param_count(model_class, config, path)
    return config, model_class


def load_hf_folder(path: str | Path, *, model_class: type[nn.Module] | None = None) -> nn.Module:
    """Load a model saved by :func:`save_hf_folder` (or any ``save_pretrained`` folder), in eval mode.
    ``model_class`` defaults to the config's ``architectures[0]`` from ``transformers``. Nothing from the
    folder runs, weights come from safetensors only, and the config's sizes are checked first."""
    from safetensors import SafetensorError

    path = check_path(path, "load_hf_folder's folder")
    _check_files(path)
    config = _read_config(path)
    recorded = _read_steps(path)
    model_class = model_class or _model_class(config, path)
    _check_param_count(model_class, config, path)
    try:
        model, info = _shrinking_class(model_class, recorded).from_pretrained(
            str(path), config=config, output_loading_info=True, use_safetensors=True)
    except SlimError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"the weights in {str(path)!r} are unreadable or do not fit the recorded sizes: "
                              f"{err}") from None
    except Exception as err:  # the config asks for what transformers cannot do here (an attention kernel, ...)
        raise CheckpointError(f"transformers cannot load {str(path)!r} as its config asks ({type(err).__name__}: "
                              f"{err}); fix config.json") from None
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(f"the weights in {str(path)!r} do not match the model: {problems}")
    loaded = {"loaded_from": str(path), "blocks": getattr(config, CONFIG_KEY, None) or {}}
    if recorded is not None:  # (a later compaction adds its steps to these, and a save writes them all)
        loaded.update(steps=recorded[0], **{BEFORE_KEY: recorded[1]})
    setattr(model, COMPACTION_ATTR, loaded)
    return model.eval()
