"""The engine of streamed work on a causal LM that never holds the model: decoder layers are read one at a
time from the safetensors shards of a ``save_pretrained`` folder, transformed by a step function, and
written to a new folder as one shard each; the calibration activations travel from layer to layer.

What is resident, and when (``L`` is one decoder layer's weights):

1. The calibration token ids are embedded (the embedding matrix is read once, in float32, then dropped)
   and the first layer's inputs are captured; the rest of the model is built on the meta device (no
   memory). Resident from here on: the calibration activations, ``samples x seq_len x hidden`` floats.
2. For each decoder layer: its tensors are read from the memory-mapped shards (``L`` in the stored dtype)
   and copied into a float32 layer (``2L`` more for float16 files); the step measures, prunes and runs the
   layer on the activations (which become the next layer's inputs); the tensors it returns are written as
   the layer's own shard, the activations beside them, and a JSON record of the layers done; then all of
   the layer is freed.
3. The tensors outside the decoder layers (embeddings, final norm, output head) are copied to the last
   shard; then the shard index and the folder's other files (config, with the step's changes; tokenizer).

An interrupted run (a crash, Ctrl-C, a full disk) is resumed by calling again with the same arguments: it
goes on after the last layer written. The folder is complete when its record ``slimtorch-stream.json`` is
gone; it loads with ``from_pretrained`` (nothing from the folder is run).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from slimtorch.atomic import atomic_write, check_output_folder, check_path
from slimtorch.errors import CheckpointError, ConfigError
from slimtorch.integrations.hf.folders import hf_folder_spec, hf_weight_files
from slimtorch.progress import progress_bar
from slimtorch.prune.oneshot import capture_layer_inputs, decoder_layers

__all__ = ["RECORD", "Inputs", "LayerStep", "ShardedWeights", "StreamRun", "check_calibration", "load_layer",
           "meta_skeleton", "shard_name",
           "stream_layers"]

#: The progress record of an unfinished run, in the output folder (removed when the folder is complete).
RECORD = "slimtorch-stream.json"
_WORK = ".slimtorch-stream"  # the activations between layers, in the output folder
_COPIED = (".json", ".txt", ".model", ".jinja")  # the folder's other files (config, tokenizer); never code


class ShardedWeights:
    """The tensors of a ``save_pretrained`` folder by name, each read on demand from its memory-mapped
    safetensors shard (headers checked first; nothing is loaded until asked for)."""

    def __init__(self, path: str | Path) -> None:
        self.files: dict[str, Path] = {}
        for file in hf_weight_files(check_path(path, "the model folder")):
            with safe_open(str(file), "pt") as f:
                self.files.update(dict.fromkeys(f.keys(), file))

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.files[key]), "pt") as f:
            return f.get_tensor(key)


def shard_name(index: int, count: int) -> str:
    """Hugging Face's shard file name (``model-00001-of-00005.safetensors``, 0-based ``index``)."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def meta_skeleton(source: str | Path, weights: ShardedWeights) -> nn.Module:
    """The folder's model built on the meta device, but for a real float32 input embedding and rotary
    position tables: enough to embed tokens and capture the first decoder layer's inputs."""
    config, model_class = hf_folder_spec(source)
    with torch.device("meta"):
        model = model_class(config).eval()
    emb = model.get_input_embeddings()
    key = next(name for name, p in model.named_parameters() if p is emb.weight)
    if key not in weights.files:
        raise CheckpointError(f"the folder {str(source)!r} lacks the input embedding {key!r}")
    emb.weight = nn.Parameter(weights.get(key).float(), requires_grad=False)
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):  # buffers computed at init: rebuilt on the CPU
            parent = model.get_submodule(name.rpartition(".")[0])
            setattr(parent, name.rpartition(".")[2], type(module)(config=config))
    return model


def _start(output: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The progress record of an unfinished run of the same settings in ``output``, or a new one (the
    folder must be new or empty)."""
    path = output / RECORD
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"the progress record {str(path)!r} is unreadable ({err}); delete {str(output)!r} "
                                  "and start again") from None
        if record.get("settings") != settings:
            raise ConfigError(f"{str(output)!r} holds an unfinished run with other settings "
                              f"({record.get('settings')}); resume it with those, or delete the folder")
        return record
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"the output folder {str(output)!r} exists and is not empty; choose a new folder")
    check_output_folder(output)
    output.mkdir(parents=True, exist_ok=True)
    return {"settings": settings, "layers_done": 0, "seconds": [], "bytes": [], "names": [], "notes": []}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


def _save_progress(output: Path, record: dict[str, Any], inputs: list[tuple[tuple, dict]] | None) -> None:
    """The activations after the last layer done, then the record naming them; the older ones removed."""
    done = record["layers_done"]
    work = output / _WORK
    work.mkdir(exist_ok=True)
    if inputs is not None:
        hidden = {f"batch.{j}": args[0].contiguous() for j, (args, _) in enumerate(inputs)}
        atomic_write(work / f"activations-{done}.safetensors", lambda tmp: save_file(hidden, tmp))
    _write_json(output / RECORD, record)
    for old in work.glob("activations-*.safetensors"):
        if old.name != f"activations-{done}.safetensors":
            old.unlink()


def _resume_inputs(output: Path, done: int, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """The captured inputs with the hidden states replaced by those saved after layer ``done - 1``."""
    path = output / _WORK / f"activations-{done}.safetensors"
    try:
        with safe_open(str(path), "pt") as f:
            hidden = [f.get_tensor(f"batch.{j}") for j in range(len(inputs))]
    except Exception as err:  # safetensors raises its own error types on a missing or damaged file
        raise CheckpointError(f"the saved activations {str(path)!r} are unreadable ({err}); delete "
                              f"{str(output)!r} and start again") from None
    if any(h.shape != args[0].shape for h, (args, _) in zip(hidden, inputs, strict=True)):
        raise CheckpointError(f"the saved activations {str(path)!r} do not fit the calibration batches")
    return [((h, *args[1:]), kwargs) for h, (args, kwargs) in zip(hidden, inputs, strict=True)]


def load_layer(skeleton_layer: nn.Module, stored: dict[str, torch.Tensor], where: str) -> nn.Module:
    """A float32 copy of one decoder layer holding the ``stored`` tensors (names relative to the layer),
    filled one tensor at a time (cast while copied: no float32 copy of the layer beside the layer)."""
    layer = copy.deepcopy(skeleton_layer).to_empty(device="cpu")
    own = layer.state_dict()  # the layer's own tensors, detached
    if set(own) != set(stored) or len(own) != len(list(layer.parameters())) + len(list(layer.buffers())):
        raise ConfigError(f"decoder layer {where!r} holds {sorted(stored)[:4]}..., its class expects "
                          f"{sorted(own)[:4]}... (and no buffer outside its weights); streamed pruning needs "
                          "a LLaMA-shaped layer")
    for name, tensor in stored.items():
        if own[name].shape != tensor.shape:  # (copy_ would broadcast)
            raise ConfigError(f"{where}.{name} is {tuple(tensor.shape)} in the folder, its layer expects "
                              f"{tuple(own[name].shape)}; the folder does not match its config.json")
        own[name].copy_(tensor)
    return layer.eval()



Inputs = list[tuple[tuple, dict]]  # the (args, kwargs) a decoder layer receives, one entry per batch
#: ``step(index, layer, stored, inputs) -> (tensors, next inputs, note)``: ``layer`` is a float32 copy of
#: decoder layer ``index`` holding ``stored`` (its tensors as saved, names relative to the layer);
#: ``tensors`` are what the output's layer holds (same naming, any shapes and dtypes), ``note`` anything
#: JSON that the record keeps (kept indices, a score).
LayerStep = Callable[[int, nn.Module, dict[str, torch.Tensor], Inputs], tuple[dict[str, torch.Tensor], Inputs, Any]]


@dataclass(frozen=True)
class StreamRun:
    """What a streamed run did: its layers (``resumed_from`` of them done before this call), the seconds
    each layer took and each layer's note."""

    output: Path
    layers: int
    resumed_from: int
    layer_seconds: tuple[float, ...]
    notes: tuple[Any, ...]


def _identity(source: Path, settings: dict[str, Any], calibration: torch.Tensor | None,
              batch_size: int) -> dict[str, Any]:
    """What a resumed run must share with the run it continues."""
    calib = None
    if calibration is not None:
        calib = {"shape": list(calibration.shape), "batch_size": batch_size,
                 "sha256": hashlib.sha256(calibration.contiguous().numpy().tobytes()).hexdigest()}
    return {"source": str(source.resolve()), **settings, "calibration": calib}


def check_calibration(calibration: torch.Tensor | None, what: str) -> None:
    if (not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long
            or not calibration.numel()):
        raise ConfigError(f"{what} needs calibration token ids, a (samples, seq_len) int64 tensor; got "
                          f"{type(calibration).__name__} {getattr(calibration, 'shape', '')}")


def _write_layer(output: Path, name: str, tensors: dict[str, torch.Tensor]) -> int:
    shard = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(output / name, lambda tmp: save_file(shard, tmp, metadata={"format": "pt"}))
    return sum(v.numel() * v.element_size() for v in shard.values())


def _finish(source: Path, output: Path, weights: ShardedWeights, prefix: str, record: dict[str, Any],
            config_update: dict[str, Any]) -> None:
    """The last shard (everything outside the decoder layers), the other files, the index; then the
    record and the activations go, which marks the folder complete."""
    count = record["layers_done"]
    rest = {k: weights.get(k) for k in weights.names() if not k.startswith(prefix + ".")}
    last = shard_name(count, count + 1)
    total = sum(record["bytes"]) + _write_layer(output, last, rest)
    weight_map = dict.fromkeys(rest, last)
    for index, names in enumerate(record["names"]):
        weight_map.update({f"{prefix}.{index}.{name}": shard_name(index, count + 1) for name in names})
    for file in sorted(source.iterdir()):
        if file.is_file() and file.suffix in _COPIED and file.name not in ("model.safetensors.index.json", RECORD):
            atomic_write(output / file.name, lambda tmp, file=file: shutil.copyfile(file, tmp))
    if config_update:
        config = json.loads((source / "config.json").read_text())
        _write_json(output / "config.json", {**config, **config_update})
    _write_json(output / "model.safetensors.index.json",
                {"metadata": {"total_size": total, "slimtorch_stream": record["settings"]}, "weight_map": weight_map})
    (output / RECORD).unlink()
    shutil.rmtree(output / _WORK, ignore_errors=True)


def _first_inputs(skeleton: nn.Module, first: nn.Module, calibration: torch.Tensor | None, batch_size: int,
                  output: Path, done: int) -> Inputs:
    """The first layer's inputs, or those saved after layer ``done - 1`` of a resumed run."""
    if calibration is None:
        return []
    inputs = capture_layer_inputs(skeleton, first, list(calibration.split(batch_size)))
    return _resume_inputs(output, done, inputs) if done else inputs


def stream_layers(
    source: str | Path,
    output: str | Path,
    step: LayerStep,
    *,
    settings: dict[str, Any],
    calibration: torch.Tensor | None = None,
    batch_size: int = 16,
    config_update: dict[str, Any] | None = None,
    desc: str = "layer by layer",
) -> StreamRun:
    """Run ``step`` on every decoder layer of the ``save_pretrained`` folder ``source``, one layer in
    memory at a time, writing the new model to the new folder ``output``; the calibration token ids
    ``(samples, seq_len)`` are embedded and handed from layer to layer (None: the steps get no inputs).
    ``settings`` (JSON) name the run: a resumed run must have the same. ``config_update``: keys of
    config.json the output changes (sizes of a compacted model)."""
    source, output = check_path(source, "the source folder"), check_path(output, "the output folder")
    if calibration is not None:
        check_calibration(calibration, settings.get("method", "this method"))
    if output.resolve() == source.resolve():
        raise ConfigError(f"the output folder must differ from the source folder {str(source)!r}")
    weights = ShardedWeights(source)
    skeleton = meta_skeleton(source, weights)
    prefix, layer_list = decoder_layers(skeleton)
    record = _start(output, _identity(source, settings, calibration, batch_size))
    done, count = record["layers_done"], len(layer_list)
    with torch.no_grad():
        inputs = _first_inputs(skeleton, layer_list[0], calibration, batch_size, output, done) if done < count else []
        skeleton.get_input_embeddings().to("meta")  # the embedding is not needed any more
        bar = progress_bar(count, desc=desc, initial=done)
        for index in range(done, count):
            start, where = time.perf_counter(), f"{prefix}.{index}."
            stored = {k[len(where):]: weights.get(k) for k in weights.names() if k.startswith(where)}  # stored dtype
            tensors, inputs, note = step(index, load_layer(layer_list[index], stored, where[:-1]), stored, inputs)
            record["bytes"].append(_write_layer(output, shard_name(index, count + 1),
                                                {where + k: v for k, v in tensors.items()}))
            record["names"].append(sorted(tensors))
            record["notes"].append(note)
            record["seconds"].append(round(time.perf_counter() - start, 3))
            record["layers_done"] = index + 1
            _save_progress(output, record, inputs if calibration is not None and index + 1 < count else None)
            bar.step(f"layer {index}: {record['seconds'][-1]:.1f} s")
            del stored, tensors  # freed before the next layer is read, not when its tensors replace them
        bar.close()
    _finish(source, output, weights, prefix, record, config_update or {})
    return StreamRun(output, count, done, tuple(record["seconds"]), tuple(record["notes"]))
