import math

import pytest
import torch
from torch import nn

from slimtorch.errors import ConfigError, NoMatchError
from slimtorch.recover import DistillConfig, Distiller, TrainConfig, distill_loss, fit
from slimtorch.recover.distill import feature_pairs


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_distill_loss_matches_a_hand_computation():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 1.0, 0.0], [1.0, 0.0, 2.0]]
    target = [1, 2]
    t, alpha = 2.0, 0.6
    kl = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p = _softmax([v / t for v in t_row])
        q = _softmax([v / t for v in s_row])
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    kl /= len(student)  # batchmean
    ce = -sum(math.log(_softmax(row)[y]) for row, y in zip(student, target, strict=True)) / len(student)
    expected = alpha * t * t * kl + (1 - alpha) * ce
    got = distill_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(target), temperature=t, alpha=alpha)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_distill_loss_limits():
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    ce = nn.functional.cross_entropy(s, y)
    torch.testing.assert_close(distill_loss(s, t, y, alpha=0.0), ce)
    assert float(distill_loss(t, t, y, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)  # same logits: no divergence
    # the teacher is a fixed target: no gradient reaches it
    t.requires_grad_(True)
    s.requires_grad_(True)
    distill_loss(s, t, y).backward()
    assert t.grad is None and s.grad is not None


def test_config_validates_and_round_trips():
    cfg = DistillConfig(temperature=3.0, alpha=0.5, features=[["a", "b"]], feature_weight=0.1)
    assert cfg.features == (("a", "b"),)
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="alpha"):
        DistillConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(temperature=0)
    with pytest.raises(ConfigError, match=r"unknown distillation key.*'temp'"):
        DistillConfig.from_dict({"temp": 2})
    assert feature_pairs(["x=y", "z"]) == (("x", "y"), ("z", "z"))


def _cnn(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 3))


def test_feature_matching_projects_narrower_student_to_teacher_width():
    teacher, student = _cnn(8), _cnn(4)
    x = torch.randn(2, 1, 6, 6)
    distiller = Distiller(teacher, student, DistillConfig(features=(("0", "0"), ("4", "4"))), example_inputs=x)
    conv, same = distiller.projections
    assert isinstance(conv, nn.Conv2d) and (conv.in_channels, conv.out_channels, conv.kernel_size) == (4, 8, (1, 1))
    assert isinstance(same, nn.Identity)  # logits have the same width: nothing to learn
    loss = distiller(student, torch.randn(3, 1, 6, 6), torch.tensor([0, 1, 2]))
    loss.backward()
    assert conv.weight.grad is not None and student[0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    distiller.close()
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks


def test_feature_matching_errors_name_the_problem():
    teacher, student = _cnn(8), _cnn(4)
    x = torch.randn(2, 1, 6, 6)
    with pytest.raises(NoMatchError, match=r"'conv9'.*closest"):
        Distiller(teacher, student, DistillConfig(features=(("conv9", "0"),)), example_inputs=x)
    with pytest.raises(ConfigError, match="only the channel"):
        Distiller(teacher, student, DistillConfig(features=(("0", "2"),)), example_inputs=x)
    with pytest.raises(ConfigError, match="example_inputs"):
        Distiller(teacher, student, DistillConfig(features=(("0", "0"),)))


def test_distillation_moves_the_student_towards_the_teacher():
    torch.manual_seed(0)
    teacher, student = _cnn(8), _cnn(4)
    x = torch.randn(96, 1, 6, 6)
    with torch.no_grad():
        y = teacher(x).argmax(dim=1)
    data = torch.utils.data.TensorDataset(x, y)
    distiller = Distiller(teacher, student, DistillConfig(temperature=2.0, alpha=1.0))

    def divergence() -> float:
        with torch.no_grad():
            return float(distill_loss(student(x), teacher(x), y, temperature=2.0, alpha=1.0))

    before = divergence()
    fit(student, data, TrainConfig(epochs=15, batch_size=32, lr=0.02), loss_fn=distiller)
    assert divergence() < 0.5 * before


def test_prune_and_distill_learns_from_the_unpruned_model():
    from slimtorch import compute_masks
    from slimtorch.recover import prune_and_distill_

    torch.manual_seed(0)
    model = _cnn(8)
    x = torch.randn(128, 1, 6, 6)
    with torch.no_grad():
        unpruned = model(x)
    y = unpruned.argmax(dim=1)
    masks = compute_masks(model, [{"op_names": ["0"], "sparse_ratio": 0.5}])
    result = prune_and_distill_(model, masks, torch.utils.data.TensorDataset(x, y),
                                TrainConfig(epochs=10, batch_size=32, lr=0.01), distill=DistillConfig(alpha=1.0))
    assert int((model[0].weight.abs().sum(dim=(1, 2, 3)) == 0).sum()) == 4  # still pruned
    assert result.epochs[-1].loss < 0.5 * result.epochs[0].loss  # the divergence from the teacher shrinks


def test_prune_and_distill_compacts_with_example_inputs():
    from slimtorch import compute_masks
    from slimtorch.recover import prune_and_distill_
    from slimtorch.report import model_state

    torch.manual_seed(0)
    model = _cnn(8)
    x = torch.randn(64, 1, 6, 6)
    y = torch.randint(0, 3, (64,))
    masks = compute_masks(model, [{"op_names": ["0"], "sparse_ratio": 0.5}], example_inputs=x[:4])
    before = sum(p.numel() for p in model.parameters())
    prune_and_distill_(model, masks, torch.utils.data.TensorDataset(x, y), TrainConfig(epochs=1, batch_size=32),
                       example_inputs=x[:4])
    assert model_state(model) == "compacted" and model[0].out_channels == 4
    assert sum(p.numel() for p in model.parameters()) < before
