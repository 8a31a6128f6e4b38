"""The one training loop (slimtorch.recover.loop) and the step runner (slimtorch.recover.stages): fit, the
Evaluator, the LM's training and the workflows take their steps there."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimtorch.errors import CheckpointError, ConfigError, TraceError
from slimtorch.prune import Callback, Evaluator, GradualPruner, Schedule
from slimtorch.recover import TrainConfig, fit
from slimtorch.recover.loop import FunctionLR, Loop, StepModule
from slimtorch.recover.losses import causal_lm_loss, cross_entropy
from slimtorch.recover.stages import Work, run_steps


def _data(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


class _Recorder(Callback):
    """Counts the hooks and checks what each sees: gradients after backward, an optimizer step after it."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.calls = model, {"after_backward": 0, "after_step": 0, "after_epoch": 0}
        self.before = None

    def after_backward(self, batch):
        assert all(p.grad is not None for p in self.model.parameters())
        self.before = self.model[0].weight.detach().clone()
        self.calls["after_backward"] += 1

    def after_step(self, batch):
        assert not torch.equal(self.before, self.model[0].weight)  # the optimizer stepped in between
        self.calls["after_step"] += 1

    def after_epoch(self, epoch):
        assert epoch == self.calls["after_epoch"]
        self.calls["after_epoch"] += 1


def test_fit_tells_the_callbacks_of_every_step_and_epoch():
    model = _mlp()
    recorder = _Recorder(model)
    result = fit(model, _data(), TrainConfig(epochs=2, batch_size=16, lr=0.01), callbacks=[recorder])
    assert recorder.calls == {"after_backward": result.steps, "after_step": result.steps, "after_epoch": 2}


def test_fit_prunes_gradually_while_it_trains():
    model = _mlp()
    pruner = GradualPruner(model, [{"op_names": ["0"], "sparse_ratio": 0.5}], schedule=Schedule(kind="agp", start=0,
                                                                                               end=4))
    fit(model, _data(), TrainConfig(epochs=2, batch_size=16, lr=0.01), callbacks=[pruner])
    assert pruner.steps == 6 and pruner.sparsity == pytest.approx(0.5)
    weight = model.state_dict()["0.weight"]  # (masked: pruned entries are zeroed again on every use)
    assert int((weight == 0).sum()) == weight.numel() // 2


def test_fit_refuses_to_resume_a_run_with_callbacks(tmp_path):
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="cannot resume a run with callbacks"):
        fit(model, _data(), TrainConfig(epochs=1), checkpoint=tmp_path / "c.safetensors", resume=True,
            callbacks=[_Recorder(model)])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not (tmp_path / "c.safetensors").exists()


def test_a_checkpoint_of_a_run_with_callbacks_is_not_resumed_without_them(tmp_path):
    path = tmp_path / "c.safetensors"
    model = _mlp()
    fit(model, _data(), TrainConfig(epochs=1, batch_size=16), checkpoint=path, callbacks=[_Recorder(model)])
    with pytest.raises(CheckpointError, match="the callbacks acting during training"):
        fit(_mlp(), _data(), TrainConfig(epochs=1, batch_size=16), checkpoint=path, resume=True)
    fit(_mlp(), _data(), TrainConfig(epochs=1, batch_size=16), checkpoint=tmp_path / "d.safetensors")
    fit(_mlp(), _data(), TrainConfig(epochs=1, batch_size=16), checkpoint=tmp_path / "d.safetensors", resume=True)


def test_evaluator_trains_with_the_loops_guards():
    # the Evaluator (and every pruning method it drives) runs fit's steps: a diverging loss is an error naming
    # the step, not a model silently full of NaN; a batch the model cannot take is a TraceError naming it
    data = [(torch.full((8, 6), math.inf), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(ConfigError, match="at step 1 of epoch 1; the batch's inputs hold NaN or infinite values"):
        Evaluator(train_data=data).train_(_mlp())
    with pytest.raises(TraceError, match="training step 1 of epoch 1 failed"):
        Evaluator(train_data=[(torch.randn(8, 5), torch.zeros(8, dtype=torch.long))]).train_(_mlp())


def test_evaluator_max_steps_and_mode():
    model = _mlp().eval()
    recorder = _Recorder(model)
    batches = [(x, y) for x, y in zip(_data().tensors[0].split(8), _data().tensors[1].split(8), strict=True)]
    Evaluator(train_data=batches, lr=0.01).train_(model, epochs=3, max_steps=8, callbacks=[recorder])
    assert recorder.calls == {"after_backward": 8, "after_step": 8, "after_epoch": 1}  # the 2nd epoch cut short
    assert not model.training  # the mode it had


def test_clipping_and_a_schedule_written_as_a_function():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = []

    class Lr(Callback):
        def after_backward(self, batch):
            seen.append(opt.param_groups[0]["lr"])

    batches = [(x * 100, y) for x, y in zip(_data().tensors[0].split(8), _data().tensors[1].split(8), strict=True)]
    start = [p.detach().clone() for p in model.parameters()]
    loop = Loop(StepModule(model, cross_entropy), opt, scheduler=FunctionLR(opt, lambda step: 0.5 ** step),
                callbacks=[Lr()], max_grad_norm=0.25)
    loop.run(batches[:1])
    moved = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start, strict=True)])
    assert float(moved.norm()) == pytest.approx(0.25, rel=1e-4)  # lr 1 times the clipped gradient
    loop.run(batches[1:4])
    assert seen == [1.0, 0.5, 0.25, 0.125]


def test_the_loop_gives_a_hand_written_lm_loop_s_weights():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    a = transformers.LlamaForCausalLM(config).train()
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50, (4, 12), generator=g) for _ in range(5)]

    def lr_at(step):
        return 1e-2 * (step + 1) / 5

    opt = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    for step, batch in enumerate(batches):  # the reference: what train_lm ran before it used the loop
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = a(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(a.parameters(), 1.0)
        opt.step()
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    log = Loop(StepModule(b, causal_lm_loss), opt_b, scheduler=FunctionLR(opt_b, lr_at), max_grad_norm=1.0).run(
        batches)
    assert log.steps == 5 and len(log.step_losses) == 5
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_run_steps_measures_each_step_on_its_own_copy():
    net = _mlp()
    seen = []

    def zero_first(work: Work) -> str:
        with torch.no_grad():
            work.model[0].weight.zero_()
        return "zeroed"

    work = Work(model=net)
    out = run_steps(work, [("zero", zero_first), ("noop", lambda w: None)], copies=True, initial="start",
                    measure=lambda name, w, result: seen.append((name, w.model, result)))
    assert out == ["zeroed", None] and [s[0] for s in seen] == ["start", "zero", "noop"]
    assert seen[0][1] is net and bool(net[0].weight.abs().sum() > 0)  # the model given is untouched
    assert seen[1][1] is not seen[2][1] and bool((seen[1][1][0].weight == 0).all())
