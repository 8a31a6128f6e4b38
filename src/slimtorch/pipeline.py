"""The combined pipeline: prune -> compact -> recover -> quantize -> export, measured after every stage.

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.pipeline import PipelineConfig, run_pipeline
    >>> from slimtorch.quant import QuantConfig
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    >>> x = torch.randn(8, 16)
    >>> config = PipelineConfig(config_list=({"op_names": ["0"], "sparse_ratio": 0.5},),
    ...                         quant=QuantConfig(method="dynamic_int8"), onnx=False, runs=2)
    >>> result = run_pipeline(net, x, config, score=lambda m: float(m(x).abs().mean()))
    >>> [(s.stage, s.params) for s in result.stages]
    [('dense', 676), ('prune', 676), ('compact', 340), ('quantize', 340)]

Every stage works on a copy (the model given is never changed) and is measured the same way:
parameters (quantized weights included), saved size, the caller's quality score, and the median
latency on ``example_inputs`` with the thread count set (all stages timed together at the end,
round-robin, so that they share a busy machine's load alike). Compaction is :func:`slimtorch.compact_` (traced
graph) or :func:`slimtorch.integrations.hf.compaction.compact_hf_` (heads and FFN neurons of Hugging Face blocks);
recovery is any ``recover(student, teacher) -> description`` function, e.g. :func:`distil_recovery`.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimtorch.config import check_fields, parse_config_list
from slimtorch.errors import ConfigError
from slimtorch.export import OnnxModule, export_onnx
from slimtorch.graph.run import call_model
from slimtorch.masks import is_masked, remove_masks_
from slimtorch.prune.pruner import compute_masks
from slimtorch.quant import QuantConfig, quant_info, quantize
from slimtorch.quant.onnx import quantize_onnx
from slimtorch.recover import fit
from slimtorch.recover.stages import Step, Work, compact_step_, distill_, prune_step_, run_steps
from slimtorch.report import count_params, model_state, saved_size

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from slimtorch.recover import DistillConfig, TrainConfig

__all__ = ["COMPACTORS", "PipelineConfig", "PipelineResult", "Stage", "distil_recovery", "run_pipeline"]

COMPACTORS = ("graph", "hf", "none")
#: Methods ONNX Runtime can apply to an exported float file (slimtorch.quant.onnx).
_ONNX_METHODS = ("dynamic_int8", "static_int8", "int4_weight", "fp16")

Recover = Callable[[nn.Module, nn.Module], str]


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """What each stage does.

    Args:
        config_list: the pruning targets (an NNI-style config list).
        criterion: registered pruning criterion.
        compactor: ``"graph"`` (:func:`slimtorch.compact_`), ``"hf"`` (Hugging Face heads/FFN) or
            ``"none"`` (the model stays masked: exactly as large and slow as the dense one).
        quant: the PyTorch quantization stage (None: skipped).
        onnx: export the recovered float model (parity checked in ONNX Runtime) and, when ``quant`` is a
            method ONNX Runtime has, quantize the file with it.
        threads, runs: for the latency measurement.
    """

    config_list: tuple[Mapping[str, Any], ...]
    criterion: str = "l1"
    compactor: str = "graph"
    quant: QuantConfig | None = field(default_factory=lambda: QuantConfig(method="dynamic_int8"))
    onnx: bool = True
    threads: int = 1
    runs: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "config_list", tuple(dict(e) for e in self.config_list))
        parse_config_list(list(self.config_list))  # a bad config fails here, before any stage runs
        if self.compactor not in COMPACTORS:
            raise ConfigError(f"compactor must be one of {COMPACTORS}, got {self.compactor!r}")
        if self.threads < 1 or self.runs < 1:
            raise ConfigError(f"need threads >= 1 and runs >= 1, got {self.threads} and {self.runs}")

    def to_dict(self) -> dict[str, Any]:
        return {"config_list": [dict(e) for e in self.config_list], "criterion": self.criterion,
                "compactor": self.compactor, "quant": self.quant.to_dict() if self.quant else None,
                "onnx": self.onnx, "threads": self.threads, "runs": self.runs}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineConfig:
        check_fields(cls, data, what="pipeline")
        quant = data.get("quant", {"method": "dynamic_int8"})
        return cls(**{**data, "config_list": tuple(data.get("config_list", ())),
                      "quant": QuantConfig.from_dict(quant) if quant is not None else None})


@dataclass
class Stage:
    """One measured stage; ``model`` is the model after it (an ONNX Runtime session for ONNX stages).
    ``latency_s`` is the median call, ``latency_best_s`` the fastest (what the model costs when the
    machine leaves it alone)."""

    stage: str
    state: str
    params: int
    size_bytes: int
    latency_s: float
    quality: float
    note: str
    model: nn.Module = field(repr=False)
    latency_best_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("stage", "state", "params", "size_bytes", "latency_s",
                                              "latency_best_s", "quality", "note")}


@dataclass
class PipelineResult:
    stages: list[Stage]
    masks: dict[str, torch.Tensor]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(f"no stage {name!r}; ran {[s.stage for s in self.stages]}")

    def to_markdown(self, quality: str = "quality") -> str:
        """One row per stage; speed-up and size against the first (dense) stage. Latency and speed-up
        are given for the median call and, in parentheses, for the fastest one."""
        base = self.stages[0]
        lines = [f"| stage | state | params | size | latency median (best) | speed-up median (best) | {quality} "
                 "| what ran |", "|---|---|---:|---:|---:|---:|---:|---|"]
        for s in self.stages:
            best = base.latency_best_s / s.latency_best_s if s.latency_best_s else float("nan")
            lines.append(f"| {s.stage} | {s.state} | {s.params / 1e6:.3f} M | {s.size_bytes / 1e6:.2f} MB "
                         f"({s.size_bytes / base.size_bytes:.2f}x) | {s.latency_s * 1e3:.1f} "
                         f"({s.latency_best_s * 1e3:.1f}) ms | {base.latency_s / s.latency_s:.2f}x ({best:.2f}x) | "
                         f"{s.quality:.4f} | {_cell(s.note)} |")
        return "\n".join(lines)


def _cell(text: str) -> str:
    """``text`` inside a Markdown table cell: a bare ``|`` (as in ``max |diff|``) would end the cell."""
    return text.replace("|", "\\|")


def distil_recovery(train_data: Dataset, train: TrainConfig, distill: DistillConfig | None) -> Recover:
    """A ``recover`` step for :func:`run_pipeline`: :func:`slimtorch.recover.fit` with a
    :class:`~slimtorch.recover.Distiller` (``distill``: a ``DistillConfig``; None: plain fine-tuning
    with cross-entropy). ``train_data`` is a dataset of ``(x, y)``; ``train`` a ``TrainConfig``."""
    def recover(student: nn.Module, teacher: nn.Module) -> str:
        if distill is None:
            fit(student, train_data, train)
            return f"fine-tune {train.epochs} epoch(s), cross-entropy"
        distill_(student, teacher, train_data, train, distill=distill)
        return f"distil {train.epochs} epoch(s) from the dense model (T={distill.temperature}, alpha={distill.alpha})"

    return recover


@dataclass(frozen=True)
class _Derived:
    """What a step measures when it leaves the model alone: a quantized copy, an ONNX Runtime session."""

    model: nn.Module
    note: str
    onnx_of: nn.Module | None = None  # the float model an ONNX Runtime session was exported from
    size: int | None = None


class _Meter:
    """Measures every stage the same way."""

    def __init__(self, example_inputs: Any, score: Callable[[nn.Module], float], config: PipelineConfig) -> None:
        self.example_inputs, self.score, self.config = example_inputs, score, config
        self.stages: list[Stage] = []

    def __call__(self, stage: str, model: nn.Module, note: str, *, onnx_of: nn.Module | None = None,
                 size: int | None = None) -> None:
        """``onnx_of``: the float model an ONNX Runtime ``model`` was exported from (its state and params)."""
        model.eval()
        info = quant_info(model)
        state = model_state(onnx_of if onnx_of is not None else model)
        state += f", {info.method} ({info.kernels} kernels)" if info else (", ONNX Runtime" if onnx_of else "")
        params = count_params(onnx_of if onnx_of is not None else model)
        with torch.no_grad():
            quality = float(self.score(model))
        # latency_s is filled in by time_all(), once every stage exists
        self.stages.append(Stage(stage, state, params, saved_size(model) if size is None else size, 0.0,
                                 quality, note, model))

    def measure(self, stage: str, work: Work, outcome: str | _Derived | None) -> None:
        """After a step: the model it made, or the one it derived (quantized, exported) from the model."""
        if isinstance(outcome, _Derived):
            self(stage, outcome.model, outcome.note, onnx_of=outcome.onnx_of, size=outcome.size)
        else:
            self(stage, work.model, "as given" if outcome is None else outcome)

    def time_all(self) -> None:
        """Median latency of every stage's model, timed round-robin (one call of each per round): on a
        shared machine the load changes over minutes, and interleaving gives every stage the same share
        of it, so the ratios between stages hold even where the absolute times drift."""
        old_threads = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)
        times: list[list[float]] = [[] for _ in self.stages]
        try:
            with torch.inference_mode():
                for stage in self.stages:
                    for _ in range(3):  # warm-up: first calls allocate and pick kernels
                        call_model(stage.model, self.example_inputs)
                for _ in range(self.config.runs):
                    for stage, seconds in zip(self.stages, times, strict=True):
                        start = time.perf_counter()
                        call_model(stage.model, self.example_inputs)
                        seconds.append(time.perf_counter() - start)
        finally:
            torch.set_num_threads(old_threads)
        for stage, seconds in zip(self.stages, times, strict=True):
            stage.latency_s, stage.latency_best_s = statistics.median(seconds), min(seconds)


def _float(model: nn.Module) -> nn.Module:
    work = copy.deepcopy(model)
    if is_masked(work):
        remove_masks_(work)  # the zeros stay in the weights: quantization and export see plain layers
    return work.eval()


def _prune(work: Work, config: PipelineConfig) -> str:
    graph = config.compactor == "graph"  # coupled (group-consistent) masks need the traced graph
    masks = compute_masks(work.model, list(config.config_list), criterion=config.criterion,
                          example_inputs=work.example_inputs if graph else None)
    prune_step_(work, masks)
    return f"{config.criterion} masks"


def _compact(work: Work, compactor: str) -> str:
    if compactor == "graph":
        compact_step_(work, work.masks)
        return "slimtorch.compact_ (traced graph, verified against the masked model)"
    from slimtorch.integrations.hf.compaction import compact_hf_

    compact_hf_(work.model, work.masks, example_inputs=work.example_inputs)
    return "compact_hf_ (heads and FFN neurons removed by slimtorch.compact_, verified; config updated)"


def _quantize(work: Work, quant: QuantConfig, calibration: list[Any] | None) -> _Derived:
    q = quantize(_float(work.model), quant, calibration=calibration, example_inputs=work.example_inputs)
    info = quant_info(q)
    return _Derived(q, f"{quant.method} by {info.backend}" if info else quant.method)


class _Onnx:
    """The ONNX stages: the float model exported (parity checked), then that file quantized by ONNX Runtime."""

    def __init__(self, config: PipelineConfig, calibration: list[Any] | None, folder: str) -> None:
        self.config, self.calibration, self.folder = config, calibration, folder
        self.path = os.path.join(folder, "float.onnx")
        self.model: nn.Module | None = None  # the float model exported (set by export, which runs first)

    def export(self, work: Work) -> _Derived:
        self.model = _float(work.model)
        check = export_onnx(self.model, work.example_inputs, self.path, atol=1e-3)
        return _Derived(OnnxModule(check.path, threads=self.config.threads),
                        f"torch.export -> ONNX, max |diff| to PyTorch {check.max_abs_diff:.1e}", self.model,
                        check.size_bytes)

    def quantize(self, work: Work) -> _Derived:
        assert self.config.quant is not None and self.model is not None
        method = self.config.quant.method
        path = os.path.join(self.folder, f"{method}.onnx")
        quantize_onnx(self.path, path, QuantConfig(method=method), calibration=self.calibration)
        return _Derived(OnnxModule(path, threads=self.config.threads), f"{method} by ONNX Runtime on the exported file",
                        self.model, os.path.getsize(path))


def _steps(config: PipelineConfig, recover: Recover | None, calibration: list[Any] | None,
           folder: str) -> list[tuple[str, Step]]:
    """The stages after the dense one, in order: each runs on a copy of the model the one before made."""
    steps: list[tuple[str, Step]] = [("prune", lambda w: _prune(w, config))]
    if config.compactor != "none":
        steps.append(("compact", lambda w: _compact(w, config.compactor)))
    if recover is not None:
        steps.append(("recover", lambda w: recover(w.model, w.teacher)))
    if config.quant is not None:
        quant = config.quant
        steps.append(("quantize", lambda w: _quantize(w, quant, calibration)))
    if config.onnx:
        onnx = _Onnx(config, calibration, folder)
        steps.append(("export", onnx.export))
        if config.quant is not None and config.quant.method in _ONNX_METHODS:
            steps.append(("quantize (ONNX Runtime)", onnx.quantize))
    return steps


def run_pipeline(
    model: nn.Module,
    example_inputs: Any,
    config: PipelineConfig,
    *,
    score: Callable[[nn.Module], float],
    recover: Recover | None = None,
    calibration: Iterable[Any] | None = None,
) -> PipelineResult:
    """Run every stage on copies of ``model`` and measure each (see the module docstring). Pure.

    Args:
        model: the trained float model; not changed.
        example_inputs: one batch (tensor, tuple or dict of keyword inputs): tracing, export and latency.
        config: what each stage does.
        score: quality of a model (accuracy, cosine similarity to the dense model...), higher is better.
        recover: ``recover(student, teacher) -> description`` trains the compacted student in place (the
            teacher is the dense model); None skips the stage.
        calibration: model inputs for static int8 (PyTorch and ONNX Runtime).
    """
    batches = list(calibration) if calibration is not None else None
    meter = _Meter(example_inputs, score, config)
    dense = copy.deepcopy(model).eval()
    work = Work(model=dense, example_inputs=example_inputs, teacher=dense)
    with tempfile.TemporaryDirectory() as folder:  # ONNX Runtime sessions hold their files in memory
        run_steps(work, _steps(config, recover, batches, folder), measure=meter.measure, initial="dense",
                  copies=True)
    meter.time_all()
    return PipelineResult(meter.stages, work.masks)
