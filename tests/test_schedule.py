import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch import get_masks, is_masked
from slimtorch.errors import ConfigError
from slimtorch.prune.iterative import GradualPruner
from slimtorch.prune.loop import Callback, Evaluator
from slimtorch.prune.schedule import SCHEDULES, Schedule, register_schedule
from slimtorch.prune.stats import StatsTracker


def test_agp_is_cubic_exactly():
    agp = Schedule(kind="agp", start=0, end=4)
    # 0.8 * (1 - (1 - t/4)^3) for t = 0..4, then held.
    expected = [0.0, 0.8 * (1 - 0.75**3), 0.8 * (1 - 0.5**3), 0.8 * (1 - 0.25**3), 0.8, 0.8]
    assert [agp.sparsity(t, 0.8) for t in range(6)] == pytest.approx(expected, abs=1e-12)


def test_linear_with_warmup_and_interval():
    linear = Schedule(kind="linear", start=3, end=9, every=2)
    got = [linear.sparsity(t, 0.6) for t in range(11)]
    # Warm-up until 3; steps at 3, 5, 7, 9 reach 0, 1/3, 2/3, 1 of the final; held in between.
    assert got == pytest.approx([0, 0, 0, 0, 0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6])
    assert [t for t in range(11) if linear.is_pruning_step(t)] == [3, 5, 7, 9]


def test_one_shot_and_exponential():
    once = Schedule(kind="one_shot", start=2, end=2)
    assert [once.sparsity(t, 0.5) for t in range(4)] == [0.0, 0.0, 0.5, 0.5]
    geo = Schedule(kind="exponential", start=0, end=2)
    assert [geo.sparsity(t, 0.75) for t in range(3)] == pytest.approx([0.0, 0.5, 0.75])  # keep 1, 1/2, 1/4


def test_an_uneven_interval_still_ends_at_the_final_sparsity():
    s = Schedule(kind="linear", start=0, end=5, every=2)
    assert [t for t in range(7) if s.is_pruning_step(t)] == [0, 2, 4, 5]
    assert [s.sparsity(t, 1.0) for t in (2, 4, 5)] == pytest.approx([0.4, 0.8, 1.0])


def test_bad_schedules():
    with pytest.raises(ConfigError, match="unknown schedule 'cubicc'"):
        Schedule(kind="cubicc")
    with pytest.raises(ConfigError, match="end > start.*one_shot"):
        Schedule(kind="agp", start=3, end=3)
    with pytest.raises(ConfigError, match="'every' must be >= 1"):
        Schedule(every=0)
    assert Schedule.from_dict(Schedule(kind="linear", end=7).to_dict()) == Schedule(kind="linear", end=7)


def test_registering_a_schedule():
    register_schedule("half_then_all")(lambda p, final: final if p >= 1 else final / 2)
    try:
        s = Schedule(kind="half_then_all", start=0, end=2)
        assert [s.sparsity(t, 0.8) for t in range(3)] == [0.4, 0.4, 0.8]
    finally:
        del SCHEDULES["half_then_all"]


def _zeros(net):
    return int((net[0].weight == 0).sum())


def test_gradual_pruner_reaches_each_step_exactly_and_never_unprunes():
    net = nn.Sequential(nn.Linear(10, 10))
    pruner = GradualPruner(net, [{"op_types": ["Linear"], "sparse_ratio": 0.8}],
                           schedule=Schedule(kind="agp", start=0, end=4), criterion="random")
    counts, previous = [], torch.ones(10, 10, dtype=torch.bool)
    for _ in range(5):
        pruner.step()
        mask = get_masks(net)["0.weight"]
        assert not (mask & ~previous).any()  # pruned weights stay pruned, even with a random criterion
        previous = mask
        counts.append(_zeros(net))
    # Per step: round-half-up of 100 * 0.8 * (1 - (1 - t/4)^3) = 46.25, 70, 78.75, 80, 80.
    assert counts == [46, 70, 79, 80, 80]
    assert pruner.sparsity == pytest.approx(0.8)


def test_regrowth_lets_pruned_weights_come_back_until_finish():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4))
    pruner = GradualPruner(net, [{"op_types": ["Linear"], "sparse_ratio": 0.5}],
                           schedule=Schedule(kind="linear", start=0, end=2), regrow=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(8, 6)
    pruner.step()
    assert _zeros(net) == 6 and not is_masked(net)  # zeroed once, no hooks
    opt.zero_grad()
    net(x).pow(2).sum().backward()
    opt.step()
    assert _zeros(net) < 6  # the optimizer grew them back
    pruner.step()
    pruner.finish_()
    assert is_masked(net) and _zeros(net) == 12
    opt.zero_grad()
    net(x).pow(2).sum().backward()
    opt.step()
    net(x)
    assert _zeros(net) == 12  # now for good


def _toy_task(n=64):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def test_run_lets_the_library_drive_rounds():
    torch.manual_seed(0)
    data = _toy_task()
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    pruner = GradualPruner(net, [{"op_names": ["0"], "sparse_ratio": 0.5}], schedule=Schedule(kind="linear", end=2),
                           criterion="l1")
    pruner.run_(Evaluator(train_data=data, eval_data=data, lr=0.05), finetune_epochs=1, warmup_epochs=1)
    assert [row["sparsity"] for row in pruner.history] == pytest.approx([0.25, 0.5])
    assert all(0.0 <= row["metric"] <= 1.0 for row in pruner.history)
    assert int((~net[0].weight.any(dim=1)).sum()) == 8  # 8 of 16 neurons


def test_data_driven_criterion_reads_its_tracker():
    torch.manual_seed(0)
    data = _toy_task()
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    cfg = [{"op_names": ["0"], "sparse_ratio": 0.5}]
    with pytest.raises(ConfigError, match="needs statistics \\['grad_sq'\\].*StatsTracker"):
        GradualPruner(net, cfg, schedule=Schedule(kind="one_shot", end=0), criterion="taylor").prune_to_(1)
    tracker = StatsTracker(net, keys=("grad_sq",), config_list=cfg)
    pruner = GradualPruner(net, cfg, schedule=Schedule(kind="linear", end=2), criterion="taylor", stats=tracker)
    Evaluator(train_data=data).train_(net, epochs=1, max_steps=2, callbacks=[pruner])
    assert pruner.sparsity == pytest.approx(0.5) and tracker.stats() == {}  # read and reset at each step
    tracker.close()


def test_gradual_methods_reject_fixed_sparsities():
    net = nn.Sequential(nn.Linear(8, 8))
    for entry in ({"sparse_threshold": 0.1}, {"granularity": "2:4"}):
        with pytest.raises(ConfigError, match="gradual methods need 'sparse_ratio' or 'total_sparsity'"):
            GradualPruner(net, [{"op_types": ["Linear"], **entry}], schedule=Schedule(end=2))


def test_evaluator_validates_and_calls_callbacks_in_order():
    calls = []

    class Spy(Callback):
        def after_backward(self, batch):
            calls.append("backward")

        def after_step(self, batch):
            calls.append("step")

        def after_epoch(self, epoch):
            calls.append(f"epoch{epoch}")

    net = nn.Linear(8, 2)
    Evaluator(train_data=_toy_task(32), loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1])).train_(
        net, epochs=2, callbacks=[Spy()]
    )
    assert calls == ["backward", "step", "backward", "step", "epoch0", "backward", "step", "backward", "step", "epoch1"]
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        Evaluator(train_data=[], optimizer="lion")
    with pytest.raises(ConfigError, match="no eval_data"):
        Evaluator(train_data=[]).evaluate(net)
