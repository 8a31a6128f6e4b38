"""``fit``: training on a dataset of ``(x, y)`` samples, with seeded batches, checkpoints, exact resume and data
parallelism, its epochs run by the one training loop (:mod:`slimtorch.recover.loop`: the steps, their guards
and the pruning methods' callbacks).

    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import TensorDataset
    >>> from slimtorch.recover import TrainConfig, fit
    >>> data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    >>> result = fit(nn.Linear(4, 2), data, TrainConfig(epochs=2, batch_size=16, lr=0.1), eval_data=data)
    >>> len(result.epochs), result.steps, 0.0 <= result.accuracy <= 1.0
    (2, 8, True)

What it guarantees:

* **Deterministic**: the batch order of epoch ``e`` depends only on ``(seed, e)``, and the global
  torch RNG (dropout) is seeded from ``seed``, so two runs with one config give the same weights.
* **Nothing lost**: with ``checkpoint=path`` the full state (model, loss module such as a
  :class:`~slimtorch.recover.distill.Distiller`'s projections, optimizer, scheduler, RNG states,
  progress) is written atomically every ``checkpoint_every`` steps and after every epoch. With
  ``resume=True`` a killed run continues from there and ends with exactly the weights an uninterrupted
  run gives (same seed, deterministic CPU kernels). A checkpoint of another run (other settings, data,
  architecture, masks, loss or caller's context: :mod:`slimtorch.recover.identity`) is refused before
  anything is loaded.
* **Nothing half-done**: settings, data and the checkpoint path are checked before the first step; a step the
  data, model or loss cannot run is a TraceError naming it, a NaN or infinite loss (or weights) a ConfigError
  naming the step and its likely cause, and on any failure the model and the loss module get back the
  tensors and train/eval flags they had when ``fit`` was called (:mod:`slimtorch.recover.guards`).
* **Data parallel**: under ``torchrun`` (after :func:`~slimtorch.recover.distributed.init_distributed`)
  each process trains on its share of every batch under ``DistributedDataParallel``, optionally with
  top-k gradient compression (``grad_topk``); process 0 writes the checkpoints. With ``fsdp=True`` the model,
  its gradients and optimizer state are sharded over the processes instead (FSDP2, for a model one process
  cannot hold): the checkpoints hold the full state, gathered for process 0, and the model stays sharded
  after ``fit``, a failed one too (:func:`~slimtorch.recover.distributed.full_state_dict`
  gathers its weights).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from slimtorch.atomic import check_output_file
from slimtorch.errors import CheckpointError, ConfigError, SlimError
from slimtorch.prune.loop import Callback
from slimtorch.recover.batches import augment, batch_indices, evaluate_accuracy, fetch
from slimtorch.recover.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from slimtorch.recover.commhook import TopKState, register_topk_hook_
from slimtorch.recover.config import TrainConfig
from slimtorch.recover.distributed import (
    all_reduce_sum,
    dist_info,
    full_optimizer_state,
    full_state_dict,
    shard_fsdp_,
)
from slimtorch.recover.guards import Start, check_dataset, check_trainable
from slimtorch.recover.identity import differences, run_identity
from slimtorch.recover.loop import Loop, LoopState, StepModule
from slimtorch.recover.losses import pair_loss

__all__ = ["EpochStats", "FitResult", "TrainConfig", "evaluate_accuracy", "fit"]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float
    accuracy: float | None
    seconds: float
    #: CPU seconds of the process (all its threads) over the same steps; None for an epoch resumed from a
    #: checkpoint that did not record them
    cpu_seconds: float | None = None


@dataclass
class FitResult:
    """Per-epoch loss, accuracy and training seconds (evaluation excluded: wall-clock and CPU time), and the
    comm-hook byte counts."""

    epochs: list[EpochStats] = field(default_factory=list)
    steps: int = 0
    comm: dict[str, float] | None = None

    @property
    def train_seconds(self) -> float:
        return sum(e.seconds for e in self.epochs)

    @property
    def train_cpu_seconds(self) -> float | None:
        """CPU seconds of training (wall-clock seconds mislead on a shared machine); None if an epoch lacks them."""
        cpu = [e.cpu_seconds for e in self.epochs]
        return None if any(c is None for c in cpu) else sum(cpu)  # type: ignore[misc]

    @property
    def accuracy(self) -> float | None:
        return self.epochs[-1].accuracy if self.epochs else None

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": [asdict(e) for e in self.epochs], "steps": self.steps, "comm": self.comm,
                "train_seconds": self.train_seconds, "train_cpu_seconds": self.train_cpu_seconds,
                "accuracy": self.accuracy}


def _optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return None


class _Run:
    """One call of :func:`fit`: the objects it trains and how it saves and restores them."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, config: TrainConfig, n_samples: int,
                 identity: dict[str, Any], callbacks: Sequence[Callback]) -> None:
        self.info = dist_info()
        self.model, self.config, self.identity = model, config, identity
        self.step_module = StepModule(model, pair_loss(loss_fn))
        net: nn.Module | None = None
        self.hook: TopKState | None = None
        if config.fsdp:  # sharded in place: the step module runs as it is, gathering each block in turn
            shard_fsdp_(self.step_module, model)
        elif self.info.distributed:
            net = nn.parallel.DistributedDataParallel(self.step_module)
            if config.grad_topk:
                self.hook = register_topk_hook_(net, config.grad_topk)
        self.steps_per_epoch = len(batch_indices(n_samples, config, 0, self.info))
        self.optimizer = _optimizer(list(self.step_module.parameters()), config)
        self.scheduler = _scheduler(self.optimizer, config, config.epochs * self.steps_per_epoch)
        self.loop = Loop(self.step_module, self.optimizer, scheduler=self.scheduler, callbacks=callbacks, net=net)
        self.modules = {"model": model, **({"loss": loss_fn} if isinstance(loss_fn, nn.Module) else {})}
        self.wrote = False  # whether a checkpoint was written by this call

    def _gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if not self.info.distributed:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.info.world_size)]
        torch.distributed.all_gather(out, tensor)
        return out

    def _rank_tensors(self) -> dict[str, torch.Tensor]:
        """Per-process state (RNG, gradient residuals) of every process, gathered for process 0 to save."""
        tensors: dict[str, torch.Tensor] = {}
        for rank, state in enumerate(self._gather(torch.get_rng_state())):
            tensors[f"rng.{rank}"] = state
        if self.hook is not None:
            # every process holds a residual for every parameter once a step has run
            for name in sorted(self.hook.residuals):
                for rank, res in enumerate(self._gather(self.hook.residuals[name])):
                    tensors[f"residual.{rank}.{name}"] = res
        return tensors

    def _full_states(self) -> tuple[dict[str, Any], Any]:
        """The modules' and the optimizer's state, gathered whole for process 0 when they are sharded
        (collective under FSDP)."""
        if not self.config.fsdp:
            return dict(self.modules), self.optimizer
        root = full_state_dict(self.step_module)  # keys "model.<name>", "loss.loss_fn.<name>" (see StepModule)
        prefixes = {"model": "model.", "loss": "loss.loss_fn."}
        states = {key: {k[len(prefixes[key]):]: v for k, v in root.items() if k.startswith(prefixes[key])}
                  for key in self.modules}
        return states, full_optimizer_state(self.step_module, self.optimizer)

    def save(self, path: Path, progress_state: LoopState) -> None:
        tensors = self._rank_tensors()  # collective: every process takes part
        modules, optimizer = self._full_states()
        if not self.info.is_main:
            return
        _, plain = rng_state()
        extra = {"progress": asdict(progress_state), "config": self.config.to_dict(), "rng": plain,
                 "world_size": self.info.world_size, "comm": self.hook.stats() if self.hook else None,
                 "identity": self.identity}
        save_checkpoint(path, modules=modules, optimizer=optimizer, scheduler=self.scheduler,
                        extra=extra, extra_tensors=tensors)
        self.wrote = True

    def _check(self, path: Path, extra: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Refuse a checkpoint of another run, before anything is loaded: every recorded setting is compared."""
        saved = extra.get("identity")
        if not isinstance(saved, dict):
            raise CheckpointError(f"{str(path)!r} does not record what its run was made of (written by an older "
                                  "slimtorch?); delete it, or run without --resume (resume=False) to start afresh")
        changed = differences(saved, self.identity)
        if changed:
            raise CheckpointError(
                f"{str(path)!r} was written by another run; what differs: {'; '.join(changed)}. Resume with what "
                "that run had, or run without --resume (resume=False) to start afresh"
            )
        progress_keys = set(LoopState.__dataclass_fields__)
        saved_keys = set(extra["progress"]) | {"cpu_seconds"} if isinstance(extra.get("progress"), dict) else None
        if saved_keys != progress_keys \
                or not isinstance(extra.get("rng"), dict) or f"rng.{self.info.rank}" not in tensors:
            raise CheckpointError(f"{str(path)!r} lacks its progress or random states: it is corrupt; delete it, "
                                  "or run without --resume to start afresh")

    def restore(self, path: Path) -> LoopState:
        extra, tensors = load_checkpoint(path, modules=self.modules, optimizer=self.optimizer,
                                         scheduler=self.scheduler, check=lambda e, t: self._check(path, e, t))
        set_rng_state(tensors[f"rng.{self.info.rank}"], extra["rng"])
        if self.hook is not None:
            prefix = f"residual.{self.info.rank}."
            self.hook.residuals = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            counters = extra["comm"] or {}
            self.hook.dense_bytes, self.hook.sent_bytes = counters.get("dense_bytes", 0), counters.get("sent_bytes", 0)
        return LoopState(**{"cpu_seconds": None, **extra["progress"]})  # (older files lack cpu_seconds)


def _train_epoch(run: _Run, data: Dataset, state: LoopState, checkpoint: Path | None) -> None:
    """Train the rest of the current epoch (from ``state.step``), updating ``state`` as it goes."""
    todo = batch_indices(len(data), run.config, state.epoch, run.info)[state.step :]
    desc = f"epoch {state.epoch + 1}/{run.config.epochs}" if run.info.is_main else None
    every = run.config.checkpoint_every

    def load(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = fetch(data, index)
        return augment(x, run.config.augment), y

    def saved(state: LoopState, loss: float) -> None:
        if checkpoint is not None and every and state.global_step % every == 0:
            run.save(checkpoint, state)

    run.loop.run_epoch(todo, state, desc=desc, total=len(todo), fetch=load, on_step=saved)


def fit(
    model: nn.Module,
    train_data: Dataset,
    config: TrainConfig,
    *,
    loss_fn: LossFn | None = None,
    eval_data: Dataset | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    context: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Train ``model`` in place on ``(x, y)`` samples; see the module docstring.

    Args:
        model: trained in place (under DDP too: every process ends with the same weights).
        train_data: a map-style dataset of ``(x, y)``; a ``TensorDataset`` is batched without copying items.
        config: the hyper-parameters; ``config.seed`` seeds the batch order and torch's global RNG.
        loss_fn: ``loss_fn(model, x, y) -> loss``; cross-entropy by default. A module (such as a
            :class:`~slimtorch.recover.distill.Distiller`) has its parameters trained and checkpointed.
        eval_data: scored after every epoch (accuracy in the result).
        checkpoint: file to write the training state to (atomically).
        resume: continue from ``checkpoint`` if it exists (a finished run returns its result at once). The
            checkpoint must come from the same run: settings, data, model (architecture, masks, starting
            weights), loss and ``context`` are compared before anything is loaded, and any difference is a
            :class:`~slimtorch.errors.CheckpointError` naming it.
        context: what else decides the result (JSON-able, e.g. the recipe steps that made the model); it is
            recorded in the checkpoint and compared on resume.
        callbacks: pruning methods that act during training (:class:`slimtorch.prune.Callback`: gradual
            pruning, sparse training, movement scores...), told after every backward pass, optimizer step and
            epoch. Their own state is not in the checkpoint, so a run with callbacks cannot be resumed.
    """
    check_dataset(model, train_data)
    if not isinstance(config, TrainConfig):
        fix = "TrainConfig.from_dict(config)" if isinstance(config, Mapping) else "TrainConfig(epochs=1)"
        raise ConfigError(f"fit takes a TrainConfig, got {type(config).__name__} {config!r}; pass {fix}")
    if resume and checkpoint is None:
        raise ConfigError("resume=True needs a checkpoint path to resume from")
    if resume and callbacks:
        raise ConfigError("fit cannot resume a run with callbacks: their state (steps counted, masks, random "
                          "draws) is not in the checkpoint, so the resumed run would differ; run without resume")
    _check_fsdp(config, resume=resume, eval_data=eval_data, callbacks=callbacks)
    # a checkpoint that cannot be written fails now, not after the first epoch
    path = check_output_file(checkpoint) if checkpoint is not None else None
    identity = None
    if path is not None:  # the model as it starts: recorded in every checkpoint, compared on resume
        identity = run_identity(model, train_data, config.to_dict(), loss_fn=loss_fn, eval_data=eval_data,
                                world_size=dist_info().world_size, context=context, callbacks=callbacks)
    run = _Run(model, loss_fn, config, len(train_data), identity or {}, callbacks)
    check_trainable(run.step_module.parameters())
    start = Start(run.modules)
    try:
        state = _fit_epochs(run, train_data, eval_data, path, resume)
    except Exception as err:  # the model (and loss module) go back to what they were; the message says so
        start.restore()
        if isinstance(err, SlimError):
            err.args = (f"{err.args[0]}. The model was put back as it was before fit"
                        + (f"; the checkpoint {str(path)!r} it wrote stays" if run.wrote else ""), *err.args[1:])
        raise
    comm = run.hook.stats() if run.hook is not None else None
    return FitResult([EpochStats(**h) for h in state.history], state.global_step, comm)


def _check_fsdp(config: TrainConfig, *, resume: bool, eval_data: Dataset | None,
                callbacks: Sequence[Callback]) -> None:
    """What FSDP training does not do (yet), refused before the model is sharded."""
    if not config.fsdp:
        return
    refused = [(resume, "resume=True (the checkpoint holds the gathered state; fit does not shard it back)"),
               (eval_data is not None, "eval_data (score the gathered model after fit: full_state_dict)"),
               (bool(callbacks), "callbacks (pruning methods read and write whole weights; FSDP holds shards)")]
    for bad, what in refused:
        if bad:
            raise ConfigError(f"fit with fsdp=True does not take {what}; drop it, or train with fsdp=False")


def _fit_epochs(run: _Run, train_data: Dataset, eval_data: Dataset | None, path: Path | None,
                resume: bool) -> LoopState:
    if resume and path is not None and path.exists():
        state = run.restore(path)
    else:
        torch.manual_seed(run.config.seed + run.info.rank)
        state = LoopState()
    run.model.train()
    while state.epoch < run.config.epochs:
        _train_epoch(run, train_data, state, path)
        run.loop.end_epoch(state)  # every weight finite; the callbacks' after_epoch
        accuracy = evaluate_accuracy(run.model, eval_data) if eval_data is not None else None
        loss_sum, loss_count = all_reduce_sum([state.loss_sum, state.loss_count])
        stats = EpochStats(state.epoch, loss_sum / max(loss_count, 1), accuracy, state.seconds, state.cpu_seconds)
        state.history.append(asdict(stats))
        state = LoopState(epoch=state.epoch + 1, global_step=state.global_step, history=state.history)
        if path is not None:
            run.save(path, state)
    return state
