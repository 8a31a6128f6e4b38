"""One-shot pruning of a causal LM that never holds the model: decoder layers are read one at a time from
the safetensors shards of a ``save_pretrained`` folder and written to a new folder one at a time.

The layers are read, pruned and written one at a time by :func:`slimtorch.integrations.hf.streaming.stream_layers`
(its docstring gives the memory model): the peak is about three times one layer (as stored, in float32,
the pruned copy) plus the calibration activations and one layer's statistics (Wanda: the ``(in,)`` squared
input norms; SparseGPT: one ``(in, in)`` ``X^T X`` at a time, float64), whatever the number of layers.
Magnitude pruning reads no statistics and runs no layer.

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

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.integrations.hf.streaming import Inputs, stream_layers
from slimtorch.prune.oneshot import ONE_SHOT_STATS, parse_one_shot, prune_layer_, run_layer

__all__ = ["StreamResult", "stream_one_shot_prune"]


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


def _one_shot_step(method: str, sparsity: float, nm: tuple[int, int] | None, needs: bool):
    """The step of :func:`stream_layers` that prunes one layer's linears and runs the pruned layer."""

    def step(index: int, layer: nn.Module, stored: dict[str, torch.Tensor], inputs: Inputs):
        dtypes = {v.dtype for k, v in stored.items() if k.endswith(".weight")}
        store_dtype = dtypes.pop() if len(dtypes) == 1 else None
        for name, (weight, _) in prune_layer_(layer, inputs, method, sparsity, nm, store_dtype=store_dtype).items():
            stored[f"{name}.weight"] = weight.to(stored[f"{name}.weight"].dtype)
        return stored, (run_layer(layer, inputs) if needs else inputs), None

    return step


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
    nm = parse_one_shot(method, sparsity, pattern)
    needs = ONE_SHOT_STATS.get(method, "full") != "none"
    if needs and calibration is None:
        raise ConfigError(f"{method!r} needs calibration token ids, a (samples, seq_len) int64 tensor; got None")
    run = stream_layers(source, output, _one_shot_step(method, sparsity, nm, needs),
                        settings={"method": method, "sparsity": sparsity, "pattern": pattern},
                        calibration=calibration if needs else None, batch_size=batch_size,
                        desc=f"{method} pruning, layer by layer")
    return StreamResult(run.output, method, sparsity if nm is None else 1 - nm[0] / nm[1], pattern, run.layers,
                        run.resumed_from, run.layer_seconds)
