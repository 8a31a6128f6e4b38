"""Adversarial table for the pruning API: masks from config lists (compute_masks, select_modules), the masks
themselves (apply_masks_, get_masks, sparsity_table), the methods that prune during training (GradualPruner,
DynamicSparsity, LotteryTicket), sensitivity and statistics, and the NNI names (compat.nni).

Each case runs on fresh small models (:class:`Ctx`). A failing case must raise its typed error with the message
fragment and leave every model of the context exactly as it was (:func:`adversarial.fails_cleanly`); ``setup``
runs first (what the user did before: its changes are part of the state compared). A succeeding case must leave
the models as they were unless it says it changes them, and its ``check`` must hold.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from adversarial import assert_same_state, fails_cleanly, model_state
from slimtorch import (
    DynamicSparsity,
    Evaluator,
    GradualPruner,
    LotteryTicket,
    QuantConfig,
    Schedule,
    apply_masks_,
    collect_stats,
    compact_,
    compute_masks,
    get_masks,
    is_masked,
    quantize,
    remove_masks_,
    sensitivity_analysis,
    sparsity_table,
)
from slimtorch.compat.nni import (
    AGPPruner,
    L1NormPruner,
    ModelSpeedup,
    MovementPruner,
    TaylorFOWeightPruner,
)
from slimtorch.errors import ConfigError, NoMatchError, TraceError
from slimtorch.prune import register_criterion

NAN, INF = float("nan"), float("inf")
HALF = [{"op_names": ["0"], "sparse_ratio": 0.5}]
CHANNELS = [{"op_names": ["0"], "sparse_ratio": 0.5, "granularity": "out_channel"}]


class Ctx:
    """Small models in eval mode, inputs and batches; ``arg`` holds what ``setup`` returned."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
        self.cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
        self.two = TwoInputs().eval()
        self.x, self.img = torch.randn(4, 8), torch.randn(2, 3, 8, 8)
        self.batches = [(torch.randn(4, 8), torch.randint(0, 4, (4,))) for _ in range(2)]
        self.arg: Any = None

    def models(self) -> list[nn.Module]:
        return [self.mlp, self.cnn, self.two]


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x, pair):
        y, scale = pair
        return self.c(torch.relu(self.a(x)) + self.b(y) * scale)


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Ctx], Any]
    error: type[BaseException] | None
    fragment: str = ""
    check: Callable[[Ctx, Any], Any] | None = None
    setup: Callable[[Ctx], Any] | None = None
    changes: bool = False  # a success that changes the models on purpose (their state is not compared)


def _nan(t: torch.Tensor, index: tuple = (0, 0), value: float = NAN) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def _nan_weight(ctx: Ctx) -> None:
    with torch.no_grad():
        ctx.mlp[0].weight[3, 2] = NAN


def _meta_mlp() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@register_criterion("adversarial_wrong_shape")
def _wrong_shape(units: torch.Tensor, ctx: Any) -> torch.Tensor:
    return units.abs().sum()  # one number for the layer, not one per unit


def _loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _sparsity(masks: dict[str, torch.Tensor], name: str) -> float:
    return 1.0 - float(masks[name].float().mean())


COMPUTE = [
    Case("compute_masks: NaN in the example inputs", lambda c: compute_masks(
        c.cnn, HALF, example_inputs=_nan(c.img, (0, 1, 2, 3))), ConfigError,
         "example_inputs holds 1 NaN and 0 infinite values"),
    Case("compute_masks: an infinity in the example inputs", lambda c: compute_masks(
        c.cnn, HALF, example_inputs=_nan(c.img, (1, 0, 0, 0), -INF)), ConfigError, "0 NaN and 1 infinite"),
    Case("compute_masks: NaN in a nested input", lambda c: compute_masks(
        c.two, [{"op_names": ["a"], "sparse_ratio": 0.5}],
        example_inputs=(torch.randn(3, 4), (torch.randn(3, 4), torch.full((3, 1), NAN)))), ConfigError,
         "example_inputs[1][1] holds 3 NaN"),
    Case("compute_masks: NaN in a keyword input", lambda c: compute_masks(
        c.two, [{"op_names": ["a"], "sparse_ratio": 0.5}],
        example_inputs={"x": torch.randn(3, 4), "pair": (torch.randn(3, 4), torch.tensor([[INF]]))}),
         ConfigError, "example_inputs['pair'][1] holds 0 NaN and 1 infinite"),
    Case("compute_masks: a NaN weight", lambda c: compute_masks(c.mlp, HALF), ConfigError,
         "its weight holds 1 NaN or infinite values", setup=_nan_weight),
    Case("compute_masks: seed as text", lambda c: compute_masks(c.mlp, HALF, criterion="random", seed="a"),
         ConfigError, "seed must be an integer"),
    Case("compute_masks: a model on the meta device", lambda c: compute_masks(_meta_mlp(), HALF), ConfigError,
         "meta device"),
    Case("compute_masks: an int8 model", lambda c: compute_masks(
        quantize(c.mlp, QuantConfig(method="dynamic_int8")), HALF), ConfigError, "quantized (dynamic_int8)"),
    Case("compute_masks: a criterion giving one score per layer", lambda c: compute_masks(
        c.mlp, HALF, criterion="adversarial_wrong_shape"), ConfigError, "one score per unit"),
    Case("compute_masks: the exclusions remove every selected layer", lambda c: compute_masks(
        c.mlp, [{"op_types": ["Linear"], "sparse_ratio": 0.5}, {"op_names": ["0", "2"], "exclude": True}]),
         NoMatchError, "selects no layer"),
    Case("compute_masks: a name of a torch.compile'd model", lambda c: compute_masks(torch.compile(c.mlp), HALF),
         NoMatchError, "_orig_mod.0"),
    Case("compute_masks: the later of two entries for one layer wins", lambda c: compute_masks(
        c.mlp, [{"op_names": ["0"], "sparse_ratio": 0.5}, {"op_names": ["0"], "sparse_ratio": 0.25}],
        criterion="magnitude"), None, check=lambda c, m: _sparsity(m, "0.weight") == 0.25),
    Case("compute_masks: fine masks of a bfloat16 model", lambda c: compute_masks(
        c.mlp.to(torch.bfloat16), HALF, criterion="magnitude"), None,
         check=lambda c, m: _sparsity(m, "0.weight") == 0.5, changes=True),
]

MASKS = [
    Case("apply_masks_: a model on the meta device", lambda c: apply_masks_(
        _meta_mlp(), {"0.weight": torch.ones(16, 8, dtype=torch.bool)}), ConfigError, "meta device"),
    Case("apply_masks_: the second mask does not fit (nothing applied)", lambda c: apply_masks_(c.mlp, {
        "0.weight": torch.zeros(16, 8, dtype=torch.bool), "2.weight": torch.ones(3, dtype=torch.bool)}),
         ConfigError, "has shape (3,)"),
    Case("apply_masks_: masks given as a list", lambda c: apply_masks_(c.mlp, [torch.ones(16, 8)]), ConfigError,
         "must be a dict"),
    Case("get_masks: not a model", lambda c: get_masks({"0.weight": 1}), ConfigError, "torch.nn.Module, got dict"),
    Case("remove_masks_: not a model", lambda c: remove_masks_("model.safetensors"), ConfigError,
         "torch.nn.Module, got str"),
    Case("is_masked: not a model", lambda c: is_masked(None), ConfigError, "torch.nn.Module, got NoneType"),
    Case("sparsity_table: a mask of another shape", lambda c: sparsity_table(
        c.mlp, {"0.weight": torch.ones(2, dtype=torch.bool)}), ConfigError, "has shape (2,)"),
    Case("sparsity_table: a name of no parameter", lambda c: sparsity_table(
        c.mlp, {"9.weight": torch.ones(2, dtype=torch.bool)}), NoMatchError, "'9.weight'"),
    Case("sparsity_table: a mask of fractions", lambda c: sparsity_table(
        c.mlp, {"0.weight": torch.full((16, 8), 0.5)}), ConfigError, "only 0 and 1"),
    Case("get_masks: of an int8 copy of a masked model", lambda c: get_masks(
        quantize(c.mlp, QuantConfig(method="dynamic_int8"))), None, check=lambda c, m: m == {},
         setup=lambda c: apply_masks_(c.mlp, compute_masks(c.mlp, HALF, criterion="magnitude"))),
]


def _rigl_half_backward(ctx: Ctx) -> DynamicSparsity:
    """RigL over two layers, after a backward pass that reached only the first one."""
    sparse = DynamicSparsity(ctx.mlp, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], regrow="gradient", every=1)
    ctx.mlp[0](ctx.x).sum().backward()  # layer 2 gets no gradient
    return sparse


def _ticket_then_compacted(ctx: Ctx) -> LotteryTicket:
    ticket = LotteryTicket(ctx.mlp, CHANNELS, rounds=2, example_inputs=ctx.x)
    ticket.next_round_()
    compact_(ctx.mlp, get_masks(ctx.mlp), example_inputs=ctx.x)
    return ticket


def _schedule(**kw: Any) -> Schedule:
    return Schedule(kind="agp", start=0, end=2, **kw)


DURING_TRAINING = [
    Case("GradualPruner: the schedule as a dict", lambda c: GradualPruner(
        c.mlp, HALF, schedule={"kind": "agp", "end": 4}), ConfigError, "Schedule.from_dict"),
    Case("GradualPruner: no schedule", lambda c: GradualPruner(c.mlp, HALF, schedule=None), ConfigError,
         "schedule must be a Schedule"),
    Case("GradualPruner: regrow as text", lambda c: GradualPruner(c.mlp, HALF, schedule=_schedule(), regrow="yes"),
         ConfigError, "regrow must be True or False"),
    Case("GradualPruner: stats a number", lambda c: GradualPruner(
        c.mlp, HALF, schedule=_schedule(), criterion="taylor", stats=5), ConfigError, "StatsTracker or a function"),
    Case("GradualPruner: NaN example inputs", lambda c: GradualPruner(
        c.mlp, CHANNELS, schedule=_schedule(), example_inputs=_nan(c.x)), ConfigError,
         "GradualPruner: example_inputs holds 1 NaN"),
    Case("GradualPruner: every step beyond the end", lambda c: Schedule(kind="agp", start=0, end=2, every=10**9),
         None, check=lambda c, s: [s.is_pruning_step(i) for i in range(4)] == [True, False, True, False]),
    Case("DynamicSparsity: drop_fraction as text", lambda c: DynamicSparsity(c.mlp, HALF, drop_fraction="0.3"),
         ConfigError, "drop_fraction must be a finite number"),
    Case("DynamicSparsity: NaN drop_fraction", lambda c: DynamicSparsity(c.mlp, HALF, drop_fraction=NAN),
         ConfigError, "drop_fraction"),
    Case("DynamicSparsity: end as text", lambda c: DynamicSparsity(c.mlp, HALF, end="5"), ConfigError,
         "end (None or a step count) must be an integer"),
    Case("DynamicSparsity: seed as text", lambda c: DynamicSparsity(c.mlp, HALF, seed="x"), ConfigError,
         "seed must be an integer"),
    Case("DynamicSparsity: RigL step with one layer's gradient missing", lambda c: c.arg.step(), ConfigError,
         "dense gradient of '2.weight'", setup=_rigl_half_backward),
    Case("LotteryTicket: NaN example inputs", lambda c: LotteryTicket(
        c.mlp, CHANNELS, rounds=2, example_inputs=_nan(c.x)), ConfigError, "LotteryTicket: example_inputs holds"),
    Case("LotteryTicket: compacted between rounds", lambda c: c.arg.next_round_(), ConfigError,
         "changed since the rewind point: '0.weight' is (11, 8) now, (16, 8) then", setup=_ticket_then_compacted),
    Case("LotteryTicket: rounds as a float", lambda c: LotteryTicket(c.mlp, HALF, rounds=2.0), ConfigError,
         "rounds must be an integer"),
]

STATS = [
    Case("sensitivity_analysis: an empty config list", lambda c: sensitivity_analysis(
        c.mlp, lambda m: 1.0, config_list=[]), ConfigError, "the config list is empty"),
    Case("collect_stats: a batch of the wrong width", lambda c: collect_stats(
        c.mlp, [(torch.randn(2, 5), torch.tensor([0, 1]))], loss_fn=_loss), TraceError,
         "collect_stats batch 0: the model cannot run on (float32[2, 5], int64[2])"),
    Case("collect_stats: a NaN batch", lambda c: collect_stats(
        c.mlp, [c.batches[0], (_nan(c.x), torch.tensor([0, 1, 2, 3]))], loss_fn=_loss), ConfigError,
         "collect_stats batch 1 hold NaN"),
    Case("collect_stats: a loss that is not a scalar", lambda c: collect_stats(
        c.mlp, c.batches, loss_fn=lambda m, b: m(b[0])), ConfigError, "loss_fn must return a scalar tensor"),
    Case("collect_stats: no batches at all", lambda c: collect_stats(c.mlp, None, keys=("mean_activation",)),
         ConfigError, "or a list of them), got NoneType"),
    Case("collect_stats: one tensor instead of batches", lambda c: collect_stats(
        c.mlp, c.x, keys=("mean_activation",)), ConfigError, "or a list of them), got Tensor"),
    Case("Evaluator: no training data", lambda c: Evaluator(train_data=None), ConfigError,
         "train_data must be an iterable"),
    Case("Evaluator: infinite learning rate", lambda c: Evaluator(train_data=c.batches, lr=INF), ConfigError,
         "lr must be a finite number"),
    Case("Evaluator: a loss that is not a function", lambda c: Evaluator(train_data=c.batches, loss_fn="ce"),
         ConfigError, "loss_fn must be a function"),
]


def _compressed_twice(ctx: Ctx) -> bool:
    pruner = L1NormPruner(ctx.mlp, HALF)
    first = dict(pruner.compress()[1])
    second = pruner.compress()[1]
    return all(torch.equal(first[k], second[k]) for k in first)


NNI = [
    Case("nni: an unknown mode", lambda c: L1NormPruner(c.mlp, HALF, mode="fast"), ConfigError,
         "mode must be 'normal' or 'dependency_aware'"),
    Case("nni: dependency_aware without dummy_input", lambda c: L1NormPruner(c.mlp, HALF, mode="dependency_aware"),
         ConfigError, "needs dummy_input"),
    Case("nni: show_pruned_weights before compress", lambda c: L1NormPruner(c.mlp, HALF).show_pruned_weights(),
         ConfigError, "call compress() first"),
    Case("nni: a state dict as the model", lambda c: L1NormPruner(c.mlp.state_dict(), HALF), ConfigError,
         "torch.nn.Module, got OrderedDict"),
    Case("nni: TaylorFO with no evaluator", lambda c: TaylorFOWeightPruner(c.mlp, HALF, None), ConfigError,
         "evaluator must be a slimtorch Evaluator"),
    Case("nni: TaylorFO with zero training batches", lambda c: TaylorFOWeightPruner(
        c.mlp, HALF, Evaluator(train_data=c.batches), training_batches=0), ConfigError, "training_batches"),
    Case("nni: TaylorFO with training batches as text", lambda c: TaylorFOWeightPruner(
        c.mlp, HALF, Evaluator(train_data=c.batches), training_batches="4"), ConfigError, "training_batches"),
    Case("nni: movement pruning cooling down before warming up (no hook left)", lambda c: MovementPruner(
        c.mlp, HALF, Evaluator(train_data=c.batches), 1, 5, 2), ConfigError, "end > start"),
    Case("nni: AGP over zero iterations", lambda c: AGPPruner(c.mlp, HALF, Evaluator(train_data=c.batches),
                                                              total_iteration=0), ConfigError, "end > start"),
    Case("nni: ModelSpeedup with masks as a list", lambda c: ModelSpeedup(c.mlp, c.x, [c.mlp[0].weight > 0]),
         ConfigError, "masks must be a dict or a safetensors file path"),
    Case("nni: ModelSpeedup of a function", lambda c: ModelSpeedup(lambda t: t, c.x, {}), ConfigError,
         "torch.nn.Module, got function"),
    Case("nni: compress twice gives the same masks", _compressed_twice, None, check=lambda c, same: same,
         changes=True),
]

CASES = COMPUTE + MASKS + DURING_TRAINING + STATS + NNI


@pytest.mark.filterwarnings("ignore::UserWarning")  # coupled-pruning shortfalls, torch.compile notes: not tested here
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_adversarial_pruning(case: Case) -> None:
    ctx = Ctx()
    if case.setup is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ctx.arg = case.setup(ctx)
    if case.error is not None:
        fails_cleanly(lambda: case.call(ctx), case.error, case.fragment, models=ctx.models())
        return
    before = [model_state(m) for m in ctx.models()]
    result = case.call(ctx)
    if not case.changes:
        for state, model in zip(before, ctx.models(), strict=True):
            assert_same_state(state, model_state(model))
    assert case.check is None or case.check(ctx, result) in (None, True), case.id


def test_the_table_covers_enough_cases() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(CASES) >= 55
    assert sum(c.error is None for c in CASES) >= 5
