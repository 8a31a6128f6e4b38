"""Run a recipe: every step in order, measured after each, with checkpoints for exact resume.

    >>> import tempfile
    >>> from slimtorch.recipes.runner import run_recipe
    >>> from slimtorch.recipes.schema import Recipe
    >>> prune = {"config_list": [{"op_names": ["down.0"], "sparse_ratio": 0.5}]}
    >>> recipe = Recipe.from_dict({"model": "DigitsCNN", "model_kwargs": {"width": 8},
    ...                            "data": {"dataset": "digits", "limit": 256},
    ...                            "steps": [{"train": {"epochs": 1}}, {"prune": prune}]})
    >>> result = run_recipe(recipe, tempfile.mkdtemp(), quiet=True)
    >>> [s.stage for s in result.stages], result.stages[-1].state
    (['initial', '1 train', '2 prune'], 'masked')

Training steps write ``checkpoints/<n>-<kind>.safetensors`` under the output folder; with ``resume=True``
finished steps are restored from theirs and an interrupted one continues where it stopped. Pruning and
compaction are deterministic, so they are simply computed again. A checkpoint records the recipe up to its
step (model, data, seed, every step's settings) besides what :func:`~slimtorch.recover.fit` records (the
model's architecture and masks, the data's content): a resume after any change before or in a
training step refuses that step's checkpoint with a :class:`~slimtorch.errors.CheckpointError` naming the
change. Pruning may follow compaction (prune, compact, prune, compact): the second round prunes the
compacted model. Under ``torchrun`` every process runs the recipe (training is data parallel) and process
0 writes the outputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimtorch.data.datasets import TensorSplit
from slimtorch.data.sources import load_dataset
from slimtorch.errors import ConfigError
from slimtorch.masks import get_masks, merge_masks
from slimtorch.models.modelfile import load_model
from slimtorch.models.registry import REFERENCE_MODELS, ModelSpec, build_model
from slimtorch.prune import compute_masks
from slimtorch.recipes.schema import Recipe, Step
from slimtorch.recover.distributed import dist_info
from slimtorch.recover.stages import Work, compact_step_, distill_, prune_step_, run_steps
from slimtorch.recover.trainer import FitResult, evaluate_accuracy, fit
from slimtorch.report import report

__all__ = ["MEASURE_BATCH", "STEP_RUNNERS", "RecipeResult", "StageResult", "register_step", "run_recipe"]

#: Test samples per batch for tracing, compaction checks, FLOPs and latency after every step.
MEASURE_BATCH = 32


@dataclass(frozen=True)
class StageResult:
    """The model after one step: its size, speed and test accuracy, and what training cost."""

    stage: str
    state: str
    params: int
    nonzero_params: int
    macs: int
    flops: int
    size_bytes: int
    latency_s: float | None
    accuracy: float
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    comm: dict[str, float] | None = None


@dataclass
class RecipeResult:
    """The measurements after every step, the final model and the last pruning round's masks (at the size
    of the model that round pruned: after a compaction they no longer fit the final model, whose own masks
    are :func:`~slimtorch.get_masks`'s)."""

    stages: list[StageResult]
    model: nn.Module
    spec: ModelSpec
    masks: dict[str, torch.Tensor]

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [asdict(s) for s in self.stages], "model": self.spec.to_dict()}


@dataclass(kw_only=True)
class _State(Work):
    """What the steps share: the model being transformed (:class:`~slimtorch.recover.stages.Work`: its masks, the
    teacher, a batch for tracing) and the recipe's data and seed."""

    spec: ModelSpec
    data: TensorSplit
    seed: int
    compacted: bool = False
    # what made the model so far (the recipe's model, data, seed and steps up to the current one): recorded in
    # every training checkpoint, so that a resume refuses a checkpoint of a run that got there differently
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def train_set(self) -> TensorDataset:
        return TensorDataset(self.data.x_train, self.data.y_train)

    @property
    def test_set(self) -> TensorDataset:
        return TensorDataset(self.data.x_test, self.data.y_test)

    @property
    def example(self) -> torch.Tensor:
        return self.example_inputs  # (B, C, H, W) a small batch of test samples for tracing and measuring


StepRunner = Callable[[_State, Step, Path, bool], FitResult | None]
STEP_RUNNERS: dict[str, StepRunner] = {}


def register_step(*kinds: str) -> Callable[[StepRunner], StepRunner]:
    """Register the function that runs steps of the given kinds."""

    def register(fn: StepRunner) -> StepRunner:
        for kind in kinds:
            STEP_RUNNERS[kind] = fn
        return fn

    return register


@register_step("train", "finetune")
def _train(state: _State, step: Step, checkpoint: Path, resume: bool) -> FitResult:
    assert step.train is not None
    return fit(state.model, state.train_set, step.train, eval_data=state.test_set, checkpoint=checkpoint,
               resume=resume, context=state.context)


@register_step("prune")
def _prune(state: _State, step: Step, checkpoint: Path, resume: bool) -> None:
    new = compute_masks(state.model, step.config_list, example_inputs=state.example, criterion=step.criterion,
                        seed=state.seed)
    # an earlier round's zeros stay; after a compaction the masks are the compacted model's (its own size)
    prune_step_(state, merge_masks(get_masks(state.model), new))


@register_step("compact")
def _compact(state: _State, step: Step, checkpoint: Path, resume: bool) -> None:
    masks = get_masks(state.model)  # the masks on the model now (a second round's are at the compacted size)
    if not masks:
        raise ConfigError("a compact step needs a prune step before it (there are no masks to compact)")
    compact_step_(state, masks)  # verified on real test samples
    state.compacted = True


def _teacher(state: _State, step: Step) -> nn.Module:
    if step.teacher != "dense":
        return load_model(step.teacher).model
    if state.teacher is None:
        raise ConfigError("distill with teacher 'dense' needs a prune step before it (the unpruned model is "
                          "the teacher); or set teacher: <saved model file>")
    return state.teacher


@register_step("distill")
def _distill(state: _State, step: Step, checkpoint: Path, resume: bool) -> FitResult:
    assert step.train is not None
    torch.manual_seed(state.seed)  # projections (and a teacher built from a file) start the same when resumed
    return distill_(state.model, _teacher(state, step), state.train_set, step.train, distill=step.distill,
                    example_inputs=state.example, eval_data=state.test_set, checkpoint=checkpoint, resume=resume,
                    context=state.context)


def _measure(state: _State, stage: str, result: FitResult | None) -> StageResult:
    accuracy = evaluate_accuracy(state.model, state.test_set)  # collective under DDP: every process
    # only process 0 reports (and times the model alone, not next to the other processes' timing runs)
    sizes: tuple[Any, ...] = ("", 0, 0, 0, 0, 0, None)
    if dist_info().is_main:
        rep = report(state.model, state.example, runs=10, warmup=2)
        sizes = (rep.state, rep.params, rep.nonzero_params, rep.macs, rep.flops, rep.size_bytes, rep.latency_s)
    if result is None:
        return StageResult(stage, *sizes, accuracy, 0.0)
    return StageResult(stage, *sizes, accuracy, result.train_seconds, [asdict(e) for e in result.epochs], result.comm)


def _initial_model(recipe: Recipe, data: TensorSplit) -> tuple[nn.Module, ModelSpec, dict[str, torch.Tensor]]:
    """The recipe's model: a saved file as it was saved, or a fresh one sized for the data."""
    if Path(recipe.model).suffix == ".safetensors" or Path(recipe.model).is_file():
        loaded = load_model(recipe.model)
        return loaded.model, loaded.spec, loaded.masks
    base = ModelSpec.parse(recipe.model)
    kwargs = dict(recipe.model_kwargs)
    ctor = REFERENCE_MODELS[base.name][0] if base.source == "reference" else None
    accepts_classes = ctor is None or "num_classes" in inspect.signature(ctor).parameters
    if accepts_classes and "num_classes" not in kwargs:
        kwargs["num_classes"] = len(data.classes)  # sized for the data, not for ImageNet
    spec = ModelSpec(name=base.name, source=base.source, kwargs=kwargs, input_shape=tuple(data.x_train.shape[1:]))
    return build_model(spec), spec, {}


def _check_fits(model: nn.Module, recipe: Recipe, example: torch.Tensor) -> None:
    """Fail before any training when the model cannot take the dataset's samples."""
    try:
        with torch.no_grad():
            model.eval()(example[:2])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"model {recipe.model!r} cannot run on {recipe.data.dataset} samples of shape "
            f"{tuple(example.shape[1:])} ({first}); pick a model for this data or set model_kwargs "
            "(e.g. in_channels, num_classes)"
        ) from None


def run_recipe(
    recipe: Recipe, out_dir: str | Path, *, data_dir: str | Path | None = None, resume: bool = False,
    quiet: bool = False,
) -> RecipeResult:
    """Run every step of ``recipe``; checkpoints go under ``out_dir/checkpoints``. ``data_dir`` overrides
    the recipe's. Returns the measurements after each step and the final model."""
    spec_data = recipe.data
    data = load_dataset(spec_data.dataset, data_dir=data_dir or spec_data.data_dir, limit=spec_data.limit,
                        normalize=spec_data.normalize, image_size=spec_data.image_size, seed=recipe.seed)
    torch.manual_seed(recipe.seed)
    model, spec, masks = _initial_model(recipe, data)
    _check_fits(model, recipe, data.x_test)
    state = _State(model=model, spec=spec, data=data, seed=recipe.seed, masks=dict(masks),
                   example_inputs=data.x_test[:MEASURE_BATCH])
    say = (lambda msg: None) if quiet or not dist_info().is_main else print
    made_of = {"model": recipe.model, "model_kwargs": dict(recipe.model_kwargs), "seed": recipe.seed,
               "data": {k: v for k, v in spec_data.to_dict().items() if k != "data_dir"}}  # (files may move)

    def runner(number: int, step: Step) -> Callable[[Work], FitResult | None]:
        def run(work: Work) -> FitResult | None:
            say(f"[{number}/{len(recipe.steps)}] {step.kind}")
            state.context = {"recipe": {**made_of, "steps": [s.to_dict() for s in recipe.steps[:number]]}}
            checkpoint = Path(out_dir) / "checkpoints" / f"{number:02d}-{step.kind}.safetensors"
            return STEP_RUNNERS[step.kind](state, step, checkpoint, resume)

        return run

    stages: list[StageResult] = []

    def measure(stage: str, work: Work, result: FitResult | None) -> None:
        stages.append(_measure(state, stage, result))
        s = stages[-1]
        if stage != "initial":
            say(f"      {s.state}: {s.params:,} params ({s.nonzero_params:,} non-zero), accuracy {s.accuracy:.2%}")

    steps = [(f"{n} {step.kind}", runner(n, step)) for n, step in enumerate(recipe.steps, start=1)]
    run_steps(state, steps, measure=measure, initial="initial")
    return RecipeResult(stages, state.model, spec, state.masks)
