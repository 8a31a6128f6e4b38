"""Structured pruning of LLaMA-shaped causal LMs, streamed layer by layer: attention heads (grouped-query
groups respected), FFN neurons, whole decoder layers. The model is never held: each layer is read, scored
on the calibration activations, cut and written as its own shard by
:func:`slimtorch.integrations.hf.streaming.stream_layers` (its docstring gives the memory model), so the
compaction never holds two copies of the model, nor one.

Importance, measured on the inputs of the output projections (``o_proj`` for heads, ``down_proj`` for
neurons) as the calibration tokens pass through the layer, its earlier layers already pruned:

- ``"flap"`` (FLAP, An et al. 2024): the fluctuation of an input channel, its variance over the tokens,
  times the squared norm of its weight column; a head sums its channels.
- ``"wanda"`` (Wanda-sp, the structured Wanda of FLAP's comparison): the channel's L2 norm over the tokens
  times its column's norm.

Bias compensation (FLAP): the removed channels' mean contribution ``W[:, removed] @ mean(X[removed])``
becomes the output projection's bias, so each layer's mean output is kept. LLaMA's linears then carry
biases (``attention_bias`` and ``mlp_bias`` in the config; zero for ``q/k/v/gate/up``).

Grouped-query attention (more query heads than key/value heads): the same number of query heads is kept in
every group and the key/value heads stay; multi-head attention loses whole heads (q, k, v and o). Every
layer keeps the same counts, so the config's own sizes describe the output and ``from_pretrained`` loads it
(which needs the hidden size to be a multiple of the head count: :func:`kept_counts` rounds down to one).

Whole layers (:func:`block_influence`, :func:`stream_drop_layers`): a layer's block influence (ShortGPT, Men
et al. 2024) is one minus the mean cosine similarity of its input and output hidden states; the layers that
change the hidden states least are dropped.

    >>> import tempfile, torch
    >>> from transformers import LlamaForCausalLM
    >>> from slimtorch.models.tiny_lm import TinyLMConfig, build_model
    >>> model = build_model(TinyLMConfig(vocab_size=64, hidden_size=32, layers=2, heads=4, kv_heads=2,
    ...                                  intermediate_size=64))
    >>> source, out = tempfile.mkdtemp(), tempfile.mkdtemp() + "/pruned"
    >>> model.save_pretrained(source)
    >>> run = stream_structured_prune(source, out, torch.randint(0, 64, (4, 16)), heads=0.5, neurons=0.25)
    >>> small = LlamaForCausalLM.from_pretrained(out)
    >>> small.config.num_attention_heads, small.config.num_key_value_heads, small.config.intermediate_size
    (2, 2, 48)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from slimtorch.atomic import atomic_folder, check_path
from slimtorch.errors import ConfigError
from slimtorch.integrations.hf.folders import hf_folder_spec
from slimtorch.integrations.hf.streaming import (
    Inputs,
    ShardedWeights,
    check_calibration,
    load_layer,
    meta_skeleton,
    stream_layers,
)
from slimtorch.prune.oneshot import capture_layer_inputs, decoder_layers, run_layer

__all__ = ["IMPORTANCES", "StructuredResult", "block_influence", "kept_counts", "stream_drop_layers",
           "stream_structured_prune"]

IMPORTANCES = ("flap", "wanda")
INDEX = "model.safetensors.index.json"
_OUTPUTS = ("self_attn.o_proj", "mlp.down_proj")  # whose input channels are the units (heads, neurons)


@dataclass(frozen=True)
class StructuredResult:
    """Kept query heads, key/value heads and FFN neurons of every layer (indices into the original)."""

    output: Path
    heads: tuple[tuple[int, ...], ...]
    kv_heads: tuple[tuple[int, ...], ...]
    neurons: tuple[tuple[int, ...], ...]
    layer_seconds: tuple[float, ...]


def kept_counts(config: Any, heads: float, neurons: float) -> tuple[int, int, int]:
    """(query heads, key/value heads, neurons) every layer keeps when ``heads`` and ``neurons`` of them
    are pruned: with grouped-query attention the same number of query heads in every group. transformers'
    ``LlamaConfig`` needs ``hidden_size`` to be a multiple of ``num_attention_heads`` (even with an
    explicit ``head_dim``), so the heads kept are rounded down to the nearest such count (32 heads of
    width 4096 at 25% keep 16, not 24)."""
    for name, value in (("heads", heads), ("neurons", neurons)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be a fraction in [0, 1), got {value!r}")
    h, kv, inter, hidden = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size,
                            config.hidden_size)
    group = h // kv
    kept_neurons = max(1, round(inter * (1 - neurons)))
    if group > 1:
        per_group = max(1, round(group * (1 - heads)))
        per_group = max(g for g in range(1, per_group + 1) if hidden % (kv * g) == 0)
        return kv * per_group, kv, kept_neurons
    kept = max(1, round(h * (1 - heads)))
    kept = max(k for k in range(1, kept + 1) if hidden % k == 0)
    return kept, kept, kept_neurons


def _channel_stats(layer: nn.Module, inputs: Inputs) -> dict[str, list]:
    """Per output projection: [sum of x (in,), sum of x^2 (in,), tokens] over the calibration, float64."""
    acc = {name: [0.0, 0.0, 0] for name in _OUTPUTS}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
            acc[name][0] = acc[name][0] + x.sum(dim=0)
            acc[name][1] = acc[name][1] + x.pow(2).sum(dim=0)
            acc[name][2] += x.shape[0]

        return hook

    handles = [layer.get_submodule(name).register_forward_hook(make_hook(name)) for name in _OUTPUTS]
    try:
        run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return acc


def _scores(weight: torch.Tensor, stats: list, importance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-channel importance (in,), per-channel mean input (in,)) of an output projection (out, in)."""
    total, squares, n = stats
    mean = total / n
    column = weight.double().pow(2).sum(dim=0)  # (in,): squared norm of each input channel's weights
    if importance == "flap":
        variance = (squares - n * mean.pow(2)).clamp_min(0) / max(n - 1, 1)
        return variance * column, mean
    return squares.sqrt() * column.sqrt(), mean


def _kept_heads(scores: torch.Tensor, heads: int, kv: int, keep_q: int, keep_kv: int) -> tuple[torch.Tensor, ...]:
    """Kept query and key/value heads (sorted) from per-head scores (heads,)."""
    if keep_kv == kv and heads // kv > 1:  # grouped-query: the best keep_q / kv queries of every group
        by_group = scores.reshape(kv, heads // kv)  # (kv, group)
        top = by_group.topk(keep_q // kv, dim=1).indices.sort(dim=1).values
        return (top + torch.arange(kv)[:, None] * (heads // kv)).flatten(), torch.arange(kv)
    kept = scores.topk(keep_q).indices.sort().values
    return kept, kept


def _channels(units: torch.Tensor, width: int) -> torch.Tensor:
    """Channel indices of kept units of ``width`` channels each (heads: head_dim), in order."""
    return (units[:, None] * width + torch.arange(width)[None]).flatten()


#: The linears a layer cuts: (index set, dimension): "q" the kept query heads' channels, "kv" the kept
#: key/value heads' channels, "n" the kept neurons.
_CUTS = {"self_attn.q_proj": ("q", 0), "self_attn.k_proj": ("kv", 0), "self_attn.v_proj": ("kv", 0),
         "self_attn.o_proj": ("q", 1), "mlp.gate_proj": ("n", 0), "mlp.up_proj": ("n", 0), "mlp.down_proj": ("n", 1)}


def _compensate_(proj: nn.Linear, mean: torch.Tensor, kept: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FLAP's bias compensation on the float32 layer (removed columns zeroed, their mean contribution
    added to the bias, rounded to the stored ``dtype``): the masked equivalent of the cut projection,
    which computes the next layer's inputs. Returns the new bias (out,) in ``dtype``."""
    removed = torch.ones(proj.in_features, dtype=torch.bool)
    removed[kept] = False
    bias = proj.weight.double()[:, removed] @ mean[removed]  # (out,)
    if proj.bias is not None:
        bias = bias + proj.bias.double()
    bias = bias.to(dtype)
    proj.weight[:, removed] = 0
    proj.bias = nn.Parameter(bias.float(), requires_grad=False)
    return bias


def _structured_step(config: Any, counts: tuple[int, int, int], importance: str, compensate: bool):
    """The step of :func:`stream_layers` that scores, cuts and (masked) runs one decoder layer."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    width = getattr(config, "head_dim", None) or config.hidden_size // heads

    def step(index: int, layer: nn.Module, stored: dict[str, torch.Tensor], inputs: Inputs):
        stats = _channel_stats(layer, inputs)
        o_proj, down = layer.get_submodule("self_attn.o_proj"), layer.get_submodule("mlp.down_proj")
        head_scores, head_mean = _scores(o_proj.weight, stats["self_attn.o_proj"], importance)
        q_heads, kv_heads = _kept_heads(head_scores.reshape(heads, width).sum(dim=1), heads, kv, *counts[:2])
        neuron_scores, neuron_mean = _scores(down.weight, stats["mlp.down_proj"], importance)
        kept = {"q": _channels(q_heads, width), "kv": _channels(kv_heads, width),
                "n": neuron_scores.topk(counts[2]).indices.sort().values}
        dtype = stored["self_attn.o_proj.weight"].dtype
        out = {k: v for k, v in stored.items() if k.rpartition(".")[0] not in _CUTS}  # the norms
        for name, (which, dim) in _CUTS.items():
            out[f"{name}.weight"] = stored[f"{name}.weight"].index_select(dim, kept[which])
            if dim == 0:
                bias = stored.get(f"{name}.bias")
                out[f"{name}.bias"] = bias.index_select(0, kept[which]) if bias is not None else None
        for name, mean, which in (("self_attn.o_proj", head_mean, "q"), ("mlp.down_proj", neuron_mean, "n")):
            proj = layer.get_submodule(name)
            if compensate:
                out[f"{name}.bias"] = _compensate_(proj, mean, kept[which], dtype)
            else:
                proj.weight[:, torch.ones(proj.in_features, dtype=torch.bool).index_fill_(0, kept[which], False)] = 0
                out[f"{name}.bias"] = stored.get(f"{name}.bias")
        for name, (which, _) in _CUTS.items():  # biases everywhere (config: attention_bias, mlp_bias), or nowhere
            if out[f"{name}.bias"] is None and compensate:
                out[f"{name}.bias"] = torch.zeros(len(kept[which]), dtype=dtype)
        out = {k: v for k, v in out.items() if v is not None}
        note = {"heads": q_heads.tolist(), "kv_heads": kv_heads.tolist(), "neurons": kept["n"].tolist()}
        return out, run_layer(layer, inputs), note

    return step


def stream_structured_prune(
    source: str | Path,
    output: str | Path,
    calibration: torch.Tensor,
    *,
    heads: float = 0.2,
    neurons: float = 0.2,
    importance: str = "flap",
    bias_compensation: bool = True,
    batch_size: int = 16,
) -> StructuredResult:
    """Remove the fraction ``heads`` of every layer's attention heads and ``neurons`` of its FFN neurons
    from the LLaMA-shaped causal LM in the ``save_pretrained`` folder ``source``, one layer in memory at a
    time, scored on ``calibration`` token ids ``(samples, seq_len)``; the smaller model goes to the new
    folder ``output`` (``from_pretrained`` loads it). Resumable as
    :func:`slimtorch.integrations.hf.streaming.stream_layers`; ``source`` is only read."""
    if importance not in IMPORTANCES:
        raise ConfigError(f"unknown importance {importance!r}; available: {list(IMPORTANCES)}")
    check_calibration(calibration, "structured pruning")
    config, _ = hf_folder_spec(source)
    if not all(hasattr(config, k) for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")):
        raise ConfigError(f"{type(config).__name__} has no num_attention_heads / num_key_value_heads / "
                          "intermediate_size; structured LLM pruning needs a LLaMA-shaped model")
    counts = kept_counts(config, heads, neurons)
    update = {"num_attention_heads": counts[0], "num_key_value_heads": counts[1], "intermediate_size": counts[2],
              "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads}
    if bias_compensation:
        update.update(attention_bias=True, mlp_bias=True)
    settings = {"method": f"structured {importance}", "heads": heads, "neurons": neurons,
                "bias_compensation": bias_compensation}
    run = stream_layers(source, output, _structured_step(config, counts, importance, bias_compensation),
                        settings=settings, calibration=calibration, batch_size=batch_size, config_update=update,
                        desc=f"structured {importance}, layer by layer")
    return StructuredResult(run.output, *(tuple(tuple(n[k]) for n in run.notes) for k in ("heads", "kv_heads",
                                                                                            "neurons")),
                            run.layer_seconds)


def block_influence(source: str | Path, calibration: torch.Tensor, *, batch_size: int = 16) -> list[float]:
    """Every decoder layer's block influence (one minus the mean cosine similarity of its input and output
    hidden states over the calibration tokens), reading one layer at a time; nothing is written."""
    check_calibration(calibration, "block influence")
    weights = ShardedWeights(source)
    skeleton = meta_skeleton(source, weights)
    prefix, layer_list = decoder_layers(skeleton)
    influence = []
    with torch.no_grad():
        inputs = capture_layer_inputs(skeleton, layer_list[0], list(calibration.split(batch_size)))
        for index, skeleton_layer in enumerate(layer_list):
            where = f"{prefix}.{index}."
            stored = {k[len(where):]: weights.get(k) for k in weights.names() if k.startswith(where)}
            after = run_layer(load_layer(skeleton_layer, stored, where[:-1]), inputs)
            cosines = [nn.functional.cosine_similarity(a[0][0], b[0][0], dim=-1).flatten()  # (B * T,)
                       for a, b in zip(inputs, after, strict=True)]
            influence.append(1.0 - float(torch.cat(cosines).double().mean()))
            inputs = after
            del stored  # freed before the next layer is read
    return influence


def stream_drop_layers(source: str | Path, output: str | Path, drop: list[int]) -> None:
    """Write the model of ``source`` without the decoder layers ``drop`` (indices) to the new folder
    ``output``, the others renumbered, one layer's tensors in memory at a time; all files at once."""
    source, output = check_path(source, "the source folder"), check_path(output, "the output folder")
    config, model_class = hf_folder_spec(source)
    count = config.num_hidden_layers
    if not drop or len(set(drop)) != len(drop) or not all(isinstance(i, int) and 0 <= i < count for i in drop) \
            or len(drop) >= count:
        raise ConfigError(f"drop must name distinct layers in [0, {count}) and leave one, got {drop!r}")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"the output folder {str(output)!r} exists and is not empty; choose a new folder")
    with torch.device("meta"):
        prefix, _ = decoder_layers(model_class(config))
    weights, kept = ShardedWeights(source), [i for i in range(count) if i not in drop]
    shards = [(f"{prefix}.{old}.", f"{prefix}.{new}.") for new, old in enumerate(kept)] + [(None, None)]
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_folder(output) as staging:
        for number, (old, new) in enumerate(shards):
            name = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {new + k[len(old):]: weights.get(k) for k in weights.names() if k.startswith(old)} if old else \
                {k: weights.get(k) for k in weights.names() if not k.startswith(prefix + ".")}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            total += sum(v.numel() * v.element_size() for v in tensors.values())
            del tensors  # freed before the next layer is read
        for file in sorted(source.iterdir()):  # the tokenizer and generation config (never code)
            if file.suffix in (".json", ".txt", ".model", ".jinja") and file.name not in ("config.json", INDEX):
                shutil.copyfile(file, staging / file.name)
        data = json.loads((source / "config.json").read_text())
        data["num_hidden_layers"] = len(kept)
        if isinstance(data.get("layer_types"), list):
            data["layer_types"] = [data["layer_types"][i] for i in kept]
        (staging / "config.json").write_text(json.dumps(data, indent=2))
        index = {"metadata": {"total_size": total, "slimtorch_dropped_layers": sorted(drop)}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
