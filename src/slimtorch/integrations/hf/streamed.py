"""One-shot pruning of a causal LM that never holds the model: decoder layers are read one at a time from
the safetensors shards of a ``save_pretrained`` folder and written to a new folder one at a time.

What is resident, and when (the memory model; ``L`` is one decoder layer's weights):

1. The calibration token ids are embedded (the embedding matrix is read once, in float32, then dropped)
   and the first layer's inputs are captured; the rest of the model is built on the meta device (no
   memory). Resident from here on: the calibration activations, ``samples x seq_len x hidden`` floats.
2. For each decoder layer: its tensors are read from the memory-mapped shards (``L`` in the stored
   dtype), copied into a float32 layer (``2L`` for float16 files), its linears' statistics measured on the
   activations (Wanda: the ``(in,)`` squared input norms; SparseGPT: each ``(in, in)`` ``X^T X`` in
   float64, one at a time after measuring), pruned, rounded to the stored dtype, and the activations run
   through the pruned layer to become the next layer's inputs. The layer is written as its own shard,
   the activations beside it, and a JSON record of the layers done; then everything of the layer is freed.
3. The tensors outside the decoder layers (embeddings, final norm, output head) are copied to the last
   shard, tensor by tensor; then the shard index and the folder's other files (config, tokenizer).

Peak: about three times one layer (stored, float32, pruned copies) plus the activations and one layer's
statistics, whatever the number of layers. Magnitude pruning reads no statistics and runs no layer.

The output loads with ``from_pretrained`` (no code from the folder) and equals what
:func:`slimtorch.prune.oneshot.one_shot_prune` computes on the whole model in memory. An interrupted run
(a crash, Ctrl-C, a full disk) is resumed by calling again with the same arguments: it goes on after the
last layer written. The folder is complete when its record ``slimtorch-stream.json`` is gone::

    >>> import tempfile, torch
    >>> from transformers import LlamaForCausalLM
    >>> from slimtorch.models.tiny_lm import TinyLMConfig, build_model
    >>> model = build_model(TinyLMConfig(vocab_size=64, hidden_size=32, layers=2, heads=4, kv_heads=2,
    ...                                  intermediate_size=64))
    >>> source, out = tempfile.mkdtemp(), tempfile.mkdtemp() + "/pruned"
    >>> model.save_pretrained(source)
    >>> run = stream_one_shot_prune(source, out, torch.randint(0, 64, (4, 16)), method="wanda", pattern="2:4")
    >>> pruned = LlamaForCausalLM.from_pretrained(out)
    >>> w = pruned.model.layers[1].mlp.up_proj.weight
    >>> run.layers, int((w.reshape(-1, 4) != 0).sum(dim=1).max())
    (2, 2)
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
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
from slimtorch.prune.oneshot import (
    ONE_SHOT_STATS,
    capture_layer_inputs,
    decoder_layers,
    parse_one_shot,
    prune_layer_,
    run_layer,
)

__all__ = ["RECORD", "ShardedWeights", "StreamResult", "meta_skeleton", "shard_name", "stream_one_shot_prune"]

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


@dataclass(frozen=True)
class StreamResult:
    """What a streamed run did: the layers pruned (``resumed_from`` of them were done before this call)
    and the seconds each layer took."""

    output: Path
    method: str
    sparsity: float
    pattern: str | None
    layers: int
    resumed_from: int
    layer_seconds: tuple[float, ...]


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


def _settings(source: Path, method: str, sparsity: float, pattern: str | None, batch_size: int,
              calibration: torch.Tensor | None) -> dict[str, Any]:
    """What a resumed run must share with the run it continues."""
    calib = None
    if calibration is not None:
        calib = {"shape": list(calibration.shape),
                 "sha256": hashlib.sha256(calibration.contiguous().numpy().tobytes()).hexdigest()}
    return {"source": str(source.resolve()), "method": method, "sparsity": sparsity, "pattern": pattern,
            "batch_size": batch_size, "calibration": calib}


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
    return {"settings": settings, "layers_done": 0, "seconds": [], "bytes": []}


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


def _load_layer(skeleton_layer: nn.Module, stored: dict[str, torch.Tensor], where: str) -> nn.Module:
    """A float32 copy of one decoder layer holding the ``stored`` tensors (names relative to the layer)."""
    layer = copy.deepcopy(skeleton_layer).to_empty(device="cpu")
    expected = set(layer.state_dict())
    if expected != set(stored) or len(expected) != len(list(layer.parameters())) + len(list(layer.buffers())):
        raise ConfigError(f"decoder layer {where!r} holds {sorted(stored)[:4]}..., its class expects "
                          f"{sorted(expected)[:4]}... (and no buffer outside its weights); streamed pruning needs "
                          "a LLaMA-shaped layer")
    layer.load_state_dict({k: v.float() for k, v in stored.items()}, strict=True)
    return layer.eval()


def _prune_one(index: int, count: int, layer_list: nn.ModuleList, prefix: str, weights: ShardedWeights,
               inputs: list[tuple[tuple, dict]], how: tuple[str, float, tuple[int, int] | None],
               output: Path) -> tuple[list[tuple[tuple, dict]], int]:
    """Read, prune and write decoder layer ``index`` (shard ``index`` of ``count + 1``); the next layer's
    inputs and the bytes written."""
    method, sparsity, nm = how
    start = f"{prefix}.{index}."
    stored = {k[len(start):]: weights.get(k) for k in weights.names() if k.startswith(start)}  # stored dtype
    layer = _load_layer(layer_list[index], stored, start[:-1])
    dtypes = {v.dtype for k, v in stored.items() if k.endswith(".weight")}
    store_dtype = dtypes.pop() if len(dtypes) == 1 else None
    for name, (weight, _) in prune_layer_(layer, inputs, method, sparsity, nm, store_dtype=store_dtype).items():
        stored[f"{name}.weight"] = weight.to(stored[f"{name}.weight"].dtype)
    shard = {start + k: v.contiguous() for k, v in stored.items()}
    atomic_write(output / shard_name(index, count + 1), lambda tmp: save_file(shard, tmp, metadata={"format": "pt"}))
    written = sum(v.numel() * v.element_size() for v in shard.values())
    needs_inputs = ONE_SHOT_STATS.get(method, "full") != "none" and index < count - 1
    return (run_layer(layer, inputs) if needs_inputs else inputs), written


def _finish(source: Path, output: Path, weights: ShardedWeights, prefix: str, count: int,
            record: dict[str, Any]) -> None:
    """The last shard (everything outside the decoder layers), the other files, the index; then the
    record and the activations go, which marks the folder complete."""
    rest = {k: weights.get(k).contiguous() for k in weights.names() if not k.startswith(prefix + ".")}
    last = shard_name(count, count + 1)
    atomic_write(output / last, lambda tmp: save_file(rest, tmp, metadata={"format": "pt"}))
    weight_map = {k: last for k in rest}
    for k in weights.names():
        if k.startswith(prefix + "."):
            weight_map[k] = shard_name(int(k[len(prefix) + 1:].split(".")[0]), count + 1)
    for file in sorted(source.iterdir()):
        if file.is_file() and file.suffix in _COPIED and file.name not in ("model.safetensors.index.json", RECORD):
            atomic_write(output / file.name, lambda tmp, file=file: shutil.copyfile(file, tmp))
    total = sum(record["bytes"]) + sum(v.numel() * v.element_size() for v in rest.values())
    settings = {k: record["settings"][k] for k in ("method", "sparsity", "pattern")}
    _write_json(output / "model.safetensors.index.json",
                {"metadata": {"total_size": total, "slimtorch_one_shot": settings}, "weight_map": weight_map})
    (output / RECORD).unlink()
    shutil.rmtree(output / _WORK, ignore_errors=True)


def stream_one_shot_prune(
    source: str | Path,
    output: str | Path,
    calibration: torch.Tensor | None = None,
    *,
    method: str = "wanda",
    sparsity: float = 0.5,
    pattern: str | None = None,
    batch_size: int = 16,
) -> StreamResult:
    """Prune every linear of every decoder layer of the causal LM in the ``save_pretrained`` folder
    ``source`` one layer at a time, writing the pruned model to the new folder ``output`` (one shard per
    layer). ``calibration``: token ids ``(samples, seq_len)`` (not needed by ``"magnitude"``). Calling it
    again with the same arguments after an interruption resumes after the last layer written. Arguments
    as :func:`slimtorch.prune.oneshot.one_shot_prune`; ``source`` is only read."""
    source, output = check_path(source, "the source folder"), check_path(output, "the output folder")
    nm = parse_one_shot(method, sparsity, pattern)
    needs = ONE_SHOT_STATS.get(method, "full") != "none"
    if needs and (not isinstance(calibration, torch.Tensor) or calibration.dim() != 2
                  or calibration.dtype != torch.long or not calibration.numel()):
        raise ConfigError(f"{method!r} needs calibration token ids, a (samples, seq_len) int64 tensor; got "
                          f"{type(calibration).__name__} {getattr(calibration, 'shape', '')}")
    if output.resolve() == source.resolve():
        raise ConfigError(f"the output folder must differ from the source folder {str(source)!r}")
    weights = ShardedWeights(source)
    skeleton = meta_skeleton(source, weights)
    prefix, layer_list = decoder_layers(skeleton)
    record = _start(output, _settings(source, method, sparsity, pattern, batch_size,
                                      calibration if needs else None))
    done = record["layers_done"]
    inputs: list[tuple[tuple, dict]] = []
    with torch.no_grad():
        if needs and done < len(layer_list):
            inputs = capture_layer_inputs(skeleton, layer_list[0], list(calibration.split(batch_size)))
            inputs = _resume_inputs(output, done, inputs) if done else inputs
        skeleton.get_input_embeddings().to("meta")  # the embedding is not needed any more
        bar = progress_bar(len(layer_list), desc=f"{method} pruning, layer by layer", initial=done)
        for index in range(done, len(layer_list)):
            start = time.perf_counter()
            inputs, written = _prune_one(index, len(layer_list), layer_list, prefix, weights, inputs,
                                         (method, sparsity, nm), output)
            record["seconds"].append(round(time.perf_counter() - start, 3))
            record["bytes"].append(written)
            record["layers_done"] = index + 1
            _save_progress(output, record, inputs if needs and index + 1 < len(layer_list) else None)
            bar.step(f"layer {index}: {record['seconds'][-1]:.1f} s")
        bar.close()
    _finish(source, output, weights, prefix, len(layer_list), record)
    return StreamResult(output, method, sparsity if nm is None else 1 - nm[0] / nm[1], pattern, len(layer_list),
                        done, tuple(record["seconds"]))
