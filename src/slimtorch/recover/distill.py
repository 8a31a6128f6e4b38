"""Knowledge distillation: a pruned student learns from its unpruned teacher.

The loss is Hinton's: the KL divergence between the teacher's and the student's softened output
distributions (temperature ``T``, scaled by ``T**2`` so its gradients keep their size as ``T`` grows),
mixed with the task's cross-entropy, plus optional intermediate-feature matching (mean squared error,
through a learned 1x1 projection where pruning left the student narrower than the teacher)::

    >>> import torch
    >>> from torch import nn
    >>> from slimtorch.recover.distill import DistillConfig, Distiller
    >>> teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> student = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    >>> config = DistillConfig(temperature=4.0, alpha=0.7, features=(("0", "0"),), feature_weight=1.0)
    >>> loss_fn = Distiller(teacher, student, config, example_inputs=torch.randn(2, 4))
    >>> [tuple(p.shape) for p in loss_fn.parameters()]  # the projection: 5 student features -> 8 teacher ones
    [(8, 5), (8,)]
    >>> loss = loss_fn(student, torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    >>> loss.dim(), bool(loss > 0)
    (0, True)

A :class:`Distiller` is a ``loss_fn(model, x, y)``: it plugs into :func:`slimtorch.recover.fit` (the training
loop; :func:`slimtorch.recover.stages.distill_` builds one and fits), into
:func:`slimtorch.recover.finetune.train`, or into any loop of the user's. Its projections are parameters: give
them to the optimizer too (``fit`` does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.checks import check_module, check_number, run_model
from slimtorch.config import check_fields
from slimtorch.errors import ConfigError, NoMatchError, closest
from slimtorch.graph.run import temporary_mode

__all__ = ["CausalLMDistiller", "DistillConfig", "Distiller", "distill_loss", "feature_pairs"]


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """How the student learns from the teacher.

    Args:
        temperature: softens both output distributions (``T >= 1``; 1 is plain softmax).
        alpha: weight of the distillation term; the task loss gets ``1 - alpha``.
        features: ``(student_layer, teacher_layer)`` pairs whose outputs are matched.
        feature_weight: weight of the feature-matching term (the mean over pairs).
    """

    temperature: float = 4.0
    alpha: float = 0.7
    features: tuple[tuple[str, str], ...] = ()
    feature_weight: float = 1.0

    def __post_init__(self) -> None:
        check_number(self.temperature, "temperature (1 to 8 is usual)", low=0.0, low_open=True)
        check_number(self.alpha, "alpha (the weight of the distillation term)", low=0.0, high=1.0)
        check_number(self.feature_weight, "feature_weight", low=0.0)
        pairs = tuple(tuple(p) for p in self.features)
        if any(len(p) != 2 or not all(isinstance(n, str) for n in p) for p in pairs):
            raise ConfigError(f"features must be (student_layer, teacher_layer) name pairs, got {self.features!r}")
        object.__setattr__(self, "features", pairs)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "features": [list(p) for p in self.features]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DistillConfig:
        check_fields(cls, data, what="distillation")
        return cls(**{**data, "features": tuple(tuple(p) for p in data.get("features", ()))})


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.7,
) -> torch.Tensor:
    """``alpha * T**2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * cross_entropy(s, y)``.

    The KL term is averaged over the batch (``batchmean``: the true KL divergence per sample).

        >>> import torch
        >>> s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
        >>> round(float(distill_loss(s, t, torch.tensor([0]), temperature=1.0, alpha=1.0)), 4)
        1.5232
    """
    check_number(temperature, "temperature", low=0.0, low_open=True)
    check_number(alpha, "alpha", low=0.0, high=1.0)
    _check_logits(student_logits, teacher_logits, target, alpha)
    t = temperature
    # (B, classes) log-probabilities of the softened distributions
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    kd = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)
    if alpha == 1.0:
        return kd
    return alpha * kd + (1.0 - alpha) * F.cross_entropy(student_logits, target)


def _check_logits(student: Any, teacher: Any, target: Any, alpha: float) -> None:
    """Both outputs score the same classes for the same samples; integer labels name one of those classes."""
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise ConfigError(f"distillation compares logits: the student gave {type(student).__name__} and the teacher "
                          f"{type(teacher).__name__}; both models must return a (batch, classes) tensor")
    if student.shape != teacher.shape:
        raise ConfigError(f"the student's logits are {tuple(student.shape)} but the teacher's {tuple(teacher.shape)}; "
                          "distillation compares their distributions class by class, so both must score the same "
                          "classes for the same batch (a teacher for another task, or a student with another head?)")
    if alpha < 1.0 and isinstance(target, torch.Tensor) and not target.is_floating_point() and target.numel():
        classes = student.shape[-1]
        bad = (target >= classes) | ((target < 0) & (target != -100))  # (-100: cross_entropy's ignore_index)
        if bool(bad.any()):
            raise ConfigError(f"label {int(target[bad][0])} is not one of the {classes} classes the models score; "
                              "check the labels of the training data against the model's output size")


def _projection(student_shape: torch.Size, teacher_shape: torch.Size, pair: tuple[str, str]) -> nn.Module:
    """Maps student features to the teacher's width: 1x1 conv for (B, C, H, W), linear on the last dim else."""
    if student_shape == teacher_shape:
        return nn.Identity()
    if len(student_shape) == 4 and len(teacher_shape) == 4 and student_shape[2:] == teacher_shape[2:]:
        return nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1)
    if len(student_shape) == len(teacher_shape) and student_shape[:-1] == teacher_shape[:-1]:
        return nn.Linear(student_shape[-1], teacher_shape[-1])
    raise ConfigError(
        f"cannot match student layer {pair[0]!r} output {tuple(student_shape)} to teacher layer {pair[1]!r} "
        f"output {tuple(teacher_shape)}: only the channel (or last) dimension may differ; pick layers with "
        "the same spatial size"
    )


class _Capture:
    """Forward hook that keeps the latest output of a layer."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: object, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise ConfigError(f"{type(module).__name__} returns {type(output).__name__}, not a tensor; "
                              "match a layer that outputs one tensor")
        self.value = output


def _hook(model: nn.Module, name: str, role: str) -> tuple[_Capture, torch.utils.hooks.RemovableHandle]:
    names = dict(model.named_modules())
    if name not in names:
        raise NoMatchError(f"{role} has no layer {name!r}; {closest(name, names)}")
    capture = _Capture()
    return capture, names[name].register_forward_hook(capture)


class Distiller(nn.Module):
    """``loss_fn(student, x, y)``: distillation loss against a fixed teacher (see the module docstring).

    Args:
        teacher: the model to learn from, usually the unpruned one; it is put in eval mode and never
            trained (no gradients flow into it).
        student: the model that will be trained; feature hooks are installed on it (``close()`` removes them).
        config: temperature, mixing weight and the layers whose features are matched.
        example_inputs: one batch, needed when ``config.features`` is set (it sizes the projections).
    """

    def __init__(
        self, teacher: nn.Module, student: nn.Module, config: DistillConfig | None = None, *, example_inputs: Any = None
    ) -> None:
        super().__init__()
        check_module(teacher, "Distiller's teacher")
        check_module(student, "Distiller's student")
        if teacher is student:
            raise ConfigError("the teacher and the student are the same model object: it would learn from itself as "
                              "it trains. Keep a copy of the model before pruning (teacher = copy.deepcopy(model)) "
                              "and pass that as the teacher")
        if config is not None and not isinstance(config, DistillConfig):
            raise ConfigError(f"Distiller takes a DistillConfig, got a {type(config).__name__} ({config!r}); pass "
                              "DistillConfig.from_dict(config)")
        self.config = config or DistillConfig()
        # A plain list keeps the teacher out of this module's parameters, state dict and optimizer.
        self._teacher = [teacher]
        self._captures: list[tuple[_Capture, _Capture]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.projections = nn.ModuleList()
        if self.config.features:
            try:
                self._install(student, example_inputs)
            except Exception:
                self.close()  # a failure leaves no hook behind on either model
                raise
        teacher.eval()

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def _install(self, student: nn.Module, example_inputs: Any) -> None:
        if example_inputs is None:
            raise ConfigError("feature matching needs example_inputs (one batch) to size its projections")
        for pair in self.config.features:
            s_cap, s_handle = _hook(student, pair[0], "the student")
            self._handles.append(s_handle)
            t_cap, t_handle = _hook(self.teacher, pair[1], "the teacher")
            self._handles.append(t_handle)
            self._captures.append((s_cap, t_cap))
        # each module gets its own train/eval flag back afterwards
        with torch.no_grad(), temporary_mode(student, training=False), temporary_mode(self.teacher, training=False):
            run_model(student, example_inputs, "Distiller (student)")
            run_model(self.teacher, example_inputs, "Distiller (teacher)")
        for pair, (s_cap, t_cap) in zip(self.config.features, self._captures, strict=True):
            assert s_cap.value is not None and t_cap.value is not None
            self.projections.append(_projection(s_cap.value.shape, t_cap.value.shape, pair))
        first = next(student.parameters(), None)
        if first is not None:
            self.projections.to(first.device)

    def close(self) -> None:
        """Remove the feature hooks from student and teacher."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def feature_loss(self) -> torch.Tensor:
        """Mean over the matched pairs of the MSE between projected student and teacher features."""
        losses = []
        for projection, (s_cap, t_cap) in zip(self.projections, self._captures, strict=True):
            assert s_cap.value is not None and t_cap.value is not None
            losses.append(F.mse_loss(projection(s_cap.value), t_cap.value.detach()))
        return torch.stack(losses).mean()

    def forward(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        student_logits = student(x)
        cfg = self.config
        loss = distill_loss(student_logits, teacher_logits, y, temperature=cfg.temperature, alpha=cfg.alpha)
        if self._captures and cfg.feature_weight > 0:
            loss = loss + cfg.feature_weight * self.feature_loss()
        return loss


class CausalLMDistiller:
    """``loss_fn(student, x, y)`` for a causal language model learning from its unpruned self: at every position
    of the ``(B, T)`` token ids ``x``, the KL divergence between the teacher's and the student's softened
    next-token distributions (:func:`distill_loss`, averaged over the ``B * T`` positions, scaled by ``T**2``),
    plus ``1 - alpha`` times the next-token cross-entropy (``alpha=1``: the teacher alone). ``y`` is not read
    (the targets are ``x`` shifted by one), so a ``TensorDataset(ids, ids)`` is what :func:`~slimtorch.recover.fit`
    takes. The teacher's logits are computed on the fly, under ``no_grad``: nothing is stored between steps.

        >>> import copy, torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        >>> ids = torch.randint(0, 32, (2, 8))
        >>> loss = CausalLMDistiller(lm, DistillConfig(temperature=2.0, alpha=1.0))
        >>> round(float(loss(copy.deepcopy(lm), ids, ids)), 6)   # a copy of the teacher: nothing to learn
        0.0
    """

    def __init__(self, teacher: nn.Module, config: DistillConfig | None = None) -> None:
        check_module(teacher, "CausalLMDistiller's teacher")
        if config is not None and not isinstance(config, DistillConfig):
            raise ConfigError(f"CausalLMDistiller takes a DistillConfig, got a {type(config).__name__} ({config!r})")
        self.config = config or DistillConfig(temperature=2.0, alpha=1.0)
        if self.config.features:
            raise ConfigError(f"CausalLMDistiller matches next-token distributions only; features "
                              f"{list(self.config.features)} are not supported: leave DistillConfig.features empty")
        self.teacher = teacher.eval()

    def __call__(self, student: nn.Module, x: torch.Tensor, y: Any = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.is_floating_point():
            what = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"CausalLMDistiller needs a (batch, tokens) tensor of token ids, got {what}")
        if student is self.teacher:
            raise ConfigError("the teacher and the student are the same model object: keep the unpruned model "
                              "(or a copy of it) as the teacher")
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=x).logits  # (B, T, vocab)
        student_logits = student(input_ids=x).logits  # (B, T, vocab)
        # position t predicts token t + 1; the last position has no target (-100: ignored by the cross-entropy)
        target = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)  # (B, T)
        vocab = student_logits.shape[-1]
        return distill_loss(student_logits.reshape(-1, vocab).float(), teacher_logits.reshape(-1, vocab).float(),
                            target.reshape(-1), temperature=self.config.temperature, alpha=self.config.alpha)


def feature_pairs(pairs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Parse ``"student_layer=teacher_layer"`` strings (or one name used for both) into pairs.

        >>> feature_pairs(["layer1", "block.0=block.2"])
        (('layer1', 'layer1'), ('block.0', 'block.2'))
    """
    out = []
    for item in pairs:
        student, _, teacher = item.partition("=")
        if not student:
            raise ConfigError(f"bad feature pair {item!r}; write 'student_layer=teacher_layer' or one layer name")
        out.append((student, teacher or student))
    return tuple(out)

