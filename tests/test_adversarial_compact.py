"""Adversarial table for compaction: bad masks, bad example inputs and odd models.

Each case builds ``(model, example_inputs, masks)``. A case with an ``error`` must raise that typed error with the
message fragment and leave the model exactly as it was (:func:`adversarial.fails_cleanly`); any other case must
compact, and the compacted model must compute what the masked model computes on fresh inputs, with and without
the check.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adversarial import fails_cleanly
from nets import Grouped, Recurrent, Shuffle, randomize_, run
from slimtorch import apply_masks_, compact_, compute_masks
from slimtorch.errors import CompactionError, ConfigError, NoMatchError, SlimWarning, TraceError, UnsupportedOpError

X = (2, 3, 8, 8)


@dataclass
class Case:
    make: Callable[[], tuple[nn.Module, Any, Any]]
    error: type[BaseException] | None = None
    fragment: str = ""
    verify: tuple[bool, ...] = (True, False)
    warns: str | None = None  # a SlimWarning the compaction must give (a success)
    fresh: Callable[[Any], Any] | None = None  # fresh inputs like the example ones (default: random normal)
    kwargs: dict | None = None  # more arguments of compact_


class Op(nn.Module):
    """conv (3 -> 8) -> ``fn`` -> conv (c -> 4), ``c`` found by running ``fn``."""

    def __init__(self, fn: Callable, *, bias: bool = True) -> None:
        super().__init__()
        self.a, self.fn = nn.Conv2d(3, 8, 3, padding=1, bias=bias), fn
        with torch.no_grad():
            width = fn(self.a(torch.zeros(X))).shape[1]
        self.b = nn.Conv2d(width, 4, 3)

    def forward(self, x):
        return self.b(self.fn(self.a(x)))


def _net() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    randomize_(net)
    return net


def _rows(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return keep.reshape(-1, *[1] * (weight.dim() - 1)).expand_as(weight).clone()


def _half(model: nn.Module, *names: str, x: Any = None, ratio: float = 0.5) -> dict[str, torch.Tensor]:
    """Group-consistent masks (what a pruner gives) on the layers ``names``."""
    x = torch.randn(X) if x is None else x
    return compute_masks(model, [{"op_names": list(names), "sparse_ratio": ratio}], example_inputs=x)


def _keep(n: int = 8) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[1::2] = False
    return keep


def _on_net(masks: Callable[[nn.Module], Any], x: Any = None) -> Callable:
    def make():
        net = _net()
        return net, torch.randn(X) if x is None else x(), masks(net)

    return make


def _on_op(fn: Callable, *, x: Any = None, **kw: Any) -> Callable:
    def make():
        torch.manual_seed(0)
        model = Op(fn, **kw).eval()
        inputs = torch.randn(X) if x is None else x
        return model, inputs, _half(model, "a", x=inputs)

    return make


def _with(x: Callable[[torch.Tensor], Any]) -> Callable:
    """The conv net, group masks on its first layer, example inputs made by ``x`` from a normal batch."""

    def make():
        net = _net()
        return net, x(torch.randn(X)), _half(net, "0")

    return make


def _set(t: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


# -- models -----------------------------------------------------------------------------------------------------


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x, scale):
        return self.b(torch.relu(self.a(x))) * scale


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(self.b(self.a(x).relu()).relu())


class TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.mix(self.embed(tokens))))


class WeightInArithmetic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(6, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x).relu()
        return self.c(h) + (h @ self.a.weight).sum(-1, keepdim=True)


class Branch(nn.Module):
    """Chooses by a value of its channels (the sum of squares: always taken, whatever the input)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(6, 4, 3)

    def forward(self, x):
        y = self.a(x)
        y = y[:, :6] if (y * y).sum() >= 0 else y[:, 2:]
        return self.b(y)


class Buffers(nn.Module):
    def __init__(self, integer: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3)
        scale = (torch.arange(8) % 3).reshape(1, 8, 1, 1)
        self.register_buffer("scale", scale if integer else scale.float() + 0.5)

    def forward(self, x):
        return self.b(self.a(x) * self.scale)


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3)
        self.shift = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x):
        y = self.a(x)
        y.relu_()
        y.add_(self.shift)
        y.mul_(2.0)
        return self.b(y)


class FailsMidForward(nn.Module):
    """Runs ``ok_calls`` times, then raises inside its forward (between its layers)."""

    def __init__(self, ok_calls: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)
        self.ok_calls, self.calls = ok_calls, 0

    def forward(self, x):
        y = self.a(x)
        self.calls += 1
        if self.calls > self.ok_calls:
            raise ValueError("the sensor is unplugged")
        return self.b(y)


class Outputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return {"logits": y.flatten(1), "pooled": (y.mean((2, 3)), None, 3)}


class LogOfNegative(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return torch.log(self.b(torch.relu(self.a(x))))


class Exp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return torch.exp(self.b(torch.relu(self.a(x))) * 1e3)


class Fft(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.fft.fft(self.a(x)).real)


class SameCallTwoSizes(nn.Module):
    """One module called on two tensors whose channels compact differently, at a hard-coded size."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.cut = Cut()
        self.c = nn.Linear(8, 2)

    def forward(self, x):
        return self.c(self.cut(self.a(x)) + self.cut(self.b(x)).flip(1))


class Cut(nn.Module):
    def forward(self, y):
        return y[:, :8].mean((2, 3))


class Attention(nn.Module):
    def __init__(self, sdpa: bool) -> None:
        super().__init__()
        self.inp, self.out, self.sdpa = nn.Linear(4, 8), nn.Linear(8, 3), sdpa
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        y = self.inp(x)
        y = F.scaled_dot_product_attention(y, y, y) if self.sdpa else self.mha(y, y, y)[0]
        return self.out(y)


class Lstm(nn.Module):
    def __init__(self, **kw: Any) -> None:
        super().__init__()
        self.inp, self.rnn = nn.Linear(4, 8), nn.LSTM(8, 6, batch_first=True, **kw)
        self.out = nn.Linear(self.rnn.proj_size or 6, 2)

    def forward(self, x):
        return self.out(self.rnn(self.inp(x))[0])


class LstmWithState(Lstm):
    def forward(self, x):
        h = torch.zeros(1, x.shape[0], 6)
        return self.out(self.rnn(self.inp(x), (h, h))[0])


class SharedConv(nn.Module):
    """One conv applied to two tensors (its weight read twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.shared, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(self.shared(y) + self.shared(y.flip(1)))


def _tokens(shape=(2, 5, 4)) -> torch.Tensor:
    return torch.randn(shape)


def _model(model_fn: Callable, names: tuple[str, ...], x: Callable[[], Any], *, ratio: float = 0.5,
           masked: bool = False) -> Callable:
    def make():
        torch.manual_seed(0)
        model = model_fn().eval()
        randomize_(model)
        inputs = x()
        masks = compute_masks(model, [{"op_names": list(names), "sparse_ratio": ratio}], example_inputs=inputs)
        if masked:
            apply_masks_(model, masks)
        return model, inputs, masks

    return make


def _by_hand(model_fn: Callable, layer: str, x: Callable[[], Any]) -> Callable:
    """Half the output rows of ``layer`` masked (for models no pruner can trace)."""

    def make():
        torch.manual_seed(0)
        model = model_fn().eval()
        weight = model.get_submodule(layer).weight
        return model, x(), {f"{layer}.weight": _rows(weight, _keep(weight.shape[0]))}

    return make


def _tied_columns() -> tuple[nn.Module, Any, Any]:
    """The masks a pruner gives the same model with its weights untied: the embedding's channels go."""
    torch.manual_seed(0)
    model, untied = TiedHead().eval(), TiedHead().eval()
    untied.load_state_dict(model.state_dict())
    untied.head.weight = nn.Parameter(model.head.weight.detach().clone())
    tokens = torch.randint(0, 10, (2, 5))
    return model, tokens, compute_masks(untied, [{"op_names": ["embed", "mix"], "sparse_ratio": 0.5}],
                                        example_inputs=tokens)


def _nan_rows() -> tuple[nn.Module, Any, Any]:
    net = _net()
    masks = _half(net, "0")
    gone = torch.nonzero(~masks["0.weight"].flatten(1).any(1)).flatten()
    with torch.no_grad():
        net[0].weight[gone] = float("nan")
        net[3].weight[:, gone] = float("inf")
    return net, torch.randn(X), masks


def _inf_kept_weight() -> tuple[nn.Module, Any, Any]:
    net = _net()
    masks = _half(net, "0")
    kept = int(torch.nonzero(masks["0.weight"].flatten(1).any(1))[0])
    with torch.no_grad():
        net[3].weight[0, kept, 0, 0] = float("inf")
    return net, torch.randn(X), masks


def _masked_and_emptied() -> tuple[nn.Module, Any, Any]:
    model, x, _ = _model(_net, ("0",), lambda: torch.randn(X), masked=True)()
    return model, x, {"0.weight": torch.zeros(8, 3, 3, 3, dtype=torch.bool)}


def _hooked() -> tuple[nn.Module, Any, Any]:
    net = _net()
    net[0].register_forward_hook(lambda m, i, o: None)
    net[3].register_forward_pre_hook(lambda m, i: None)
    return net, torch.randn(X), _half(net, "0")


def _twice() -> tuple[nn.Module, Any, Any]:
    net = _net()
    x = torch.randn(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compact_(net, _half(net, "0", x=x), example_inputs=x)
    return net, x, _half(net, "0", x=x)


def _frozen() -> tuple[nn.Module, Any, Any]:
    net = _net().requires_grad_(False)
    return net, torch.randn(X), _half(net, "0")


def _double() -> tuple[nn.Module, Any, Any]:
    net = _net().double()
    x = torch.randn(X, dtype=torch.float64)
    return net, x, _half(net, "0", x=x)


def _training() -> tuple[nn.Module, Any, Any]:
    net = _net().train()
    return net, torch.randn(X), _half(net, "0")


CASES: dict[str, Case] = {
    # -- bad masks ------------------------------------------------------------------------------------------
    "mask/wrong_shape": Case(_on_net(lambda n: {"0.weight": torch.ones(8, 3, 3, dtype=torch.bool)}), ConfigError,
                             "has shape (8, 3, 3)"),
    "mask/transposed": Case(_on_net(lambda n: {"0.weight": torch.ones(3, 8, 3, 3, dtype=torch.bool)}), ConfigError,
                            "but the parameter has (8, 3, 3, 3)"),
    "mask/zero_dim": Case(_on_net(lambda n: {"0.weight": torch.tensor(True)}), ConfigError, "has shape ()"),
    "mask/fractions": Case(_on_net(lambda n: {"0.weight": torch.full((8, 3, 3, 3), 0.5)}), ConfigError,
                           "bool or hold only 0 and 1"),
    "mask/twos": Case(_on_net(lambda n: {"0.weight": torch.full((8, 3, 3, 3), 2)}), ConfigError,
                      "bool or hold only 0 and 1"),
    "mask/nan": Case(_on_net(lambda n: {"0.weight": torch.full((8, 3, 3, 3), float("nan"))}), ConfigError,
                     "bool or hold only 0 and 1"),
    "mask/nested_list": Case(_on_net(lambda n: {"0.weight": [[True] * 3] * 8}), ConfigError, "must be a tensor"),
    "mask/numpy": Case(_on_net(lambda n: {"0.weight": np.ones((8, 3, 3, 3), dtype=bool)}), ConfigError,
                       "must be a tensor, got ndarray"),
    "mask/unknown_name": Case(_on_net(lambda n: {"conv9.weight": torch.ones(1)}), NoMatchError,
                              "'conv9.weight' names no parameter"),
    "mask/typo": Case(_on_net(lambda n: {"0.wieght": torch.ones(8, 3, 3, 3)}), NoMatchError, "closest real names"),
    "mask/buffer_name": Case(_on_net(lambda n: {"1.running_mean": torch.ones(8, dtype=torch.bool)}), NoMatchError,
                             "'1.running_mean' names no parameter"),
    "mask/int_key": Case(_on_net(lambda n: {0: n[0].weight > 0}), ConfigError, "mask keys must be parameter names"),
    "mask/not_a_dict": Case(_on_net(lambda n: [n[0].weight > 0]), ConfigError, "must be a dict"),
    "mask/none": Case(_on_net(lambda n: None), ConfigError, "got NoneType"),
    "mask/meta": Case(_on_net(lambda n: {"0.weight": torch.ones(8, 3, 3, 3, dtype=torch.bool, device="meta")}),
                      ConfigError, "meta device"),
    "mask/sparse": Case(_on_net(lambda n: {"0.weight": torch.ones(8, 3, 3, 3).to_sparse()}), ConfigError,
                        "dense tensors"),
    "mask/empties_a_layer": Case(_on_net(lambda n: {"0.weight": torch.zeros(8, 3, 3, 3, dtype=torch.bool)}),
                                 CompactionError, "every output channel of '0.weight'"),
    "mask/empties_a_layer_by_its_inputs": Case(
        _on_net(lambda n: {"3.weight": torch.zeros(4, 8, 3, 3, dtype=torch.bool)}), CompactionError,
        "cannot be emptied"),
    "mask/empties_a_group": Case(_on_net(lambda n: {
        "0.weight": torch.zeros(8, 3, 3, 3, dtype=torch.bool), "0.bias": torch.zeros(8, dtype=torch.bool),
        "3.weight": torch.zeros(4, 8, 3, 3, dtype=torch.bool)}), CompactionError, "cannot be emptied"),
    "mask/all_kept": Case(_on_net(lambda n: {k: torch.ones_like(p, dtype=torch.bool)
                                              for k, p in n.named_parameters()})),
    "mask/empty_dict": Case(_on_net(lambda n: {})),
    "mask/bias_only": Case(_on_net(lambda n: {"0.bias": _keep()}), warns="removed no channel"),
    "mask/batchnorm_only": Case(_on_net(lambda n: {"1.weight": _keep(), "1.bias": _keep()}),
                                warns="removed no channel"),
    "mask/integer_zero_one": Case(_on_net(lambda n: {k: v.long() for k, v in _half(n, "0").items()})),
    "mask/float_zero_one": Case(_on_net(lambda n: {k: v.float() for k, v in _half(n, "0").items()})),
    "mask/single_weights": Case(_on_net(lambda n: {"3.weight": torch.rand(4, 8, 3, 3) > 0.5}),
                                warns="removed no channel"),
    "mask/last_layer_rows": Case(_on_net(lambda n: {"3.weight": _rows(n[3].weight, _keep(4))}),
                                 warns="reaches the model output"),
    "mask/first_layer_rows_only": Case(_on_net(lambda n: {"0.weight": _rows(n[0].weight, _keep())})),
    "mask/group_masks": Case(_on_net(lambda n: _half(n, "0"))),
    "mask/ninety_percent": Case(_on_net(lambda n: _half(n, "0", ratio=0.9))),
    # -- bad or odd example inputs --------------------------------------------------------------------------
    "inputs/one_nan": Case(_with(lambda x: _set(x, (0, 1, 2, 3), float("nan"))), ConfigError,
                           "example_inputs holds 1 NaN"),
    "inputs/all_nan": Case(_with(lambda x: torch.full_like(x, float("nan"))), ConfigError, "NaN values"),
    "inputs/inf": Case(_with(lambda x: _set(x, (1, 0, 0, 0), float("inf"))), CompactionError,
                       "non-finite values at example_inputs", verify=(True,)),
    "inputs/minus_inf": Case(_with(lambda x: _set(x, (0, 2, 5, 5), -float("inf"))), CompactionError,
                             "NaN or infinite values", verify=(True,)),
    "inputs/wrong_channels": Case(_with(lambda x: torch.randn(2, 4, 8, 8)), TraceError, "failed to run"),
    "inputs/wrong_rank": Case(_with(lambda x: torch.randn(2, 3)), TraceError, "failed to run"),
    "inputs/too_small": Case(_with(lambda x: torch.randn(2, 3, 2, 2)), TraceError, "failed to run"),
    "inputs/integers": Case(_with(lambda x: x.long()), TraceError, "failed to run"),
    "inputs/float64": Case(_with(lambda x: x.double()), TraceError, "failed to run"),
    "inputs/complex": Case(_with(lambda x: x.to(torch.complex64)), TraceError, "failed to run"),
    "inputs/empty_batch": Case(_with(lambda x: x[:0]), ConfigError, "is empty (shape (0, 3, 8, 8))"),
    "inputs/meta": Case(_with(lambda x: x.to("meta")), ConfigError, "meta device"),
    "inputs/none": Case(_with(lambda x: None), TraceError, "failed to run"),
    "inputs/list": Case(_with(lambda x: [x]), TraceError, "failed to run"),
    "inputs/string": Case(_with(lambda x: "an image"), TraceError, "failed to run"),
    "inputs/extra_argument": Case(_with(lambda x: (x, x)), TraceError, "failed to run"),
    "inputs/batch_of_one": Case(_with(lambda x: x[:1])),
    "inputs/requires_grad": Case(_with(lambda x: x.requires_grad_())),
    "inputs/large_values": Case(_with(lambda x: x * 1e4)),
    # -- odd models ------------------------------------------------------------------------------------------
    "model/roll": Case(_on_op(lambda y: torch.roll(y, 1, dims=1))),
    "model/roll_and_cat": Case(_on_op(lambda y: torch.cat([y, torch.roll(y, 2, 1)], 1))),
    "model/roll_flattened": Case(_on_op(lambda y: torch.roll(y, 5))),
    "model/flip": Case(_on_op(lambda y: y.flip(1))),
    "model/channel_shuffle": Case(_on_op(lambda y: F.channel_shuffle(y, 2))),
    "model/shufflenet_unit": Case(_model(Shuffle, ("inp.0",), lambda: torch.randn(X))),
    "model/slice_of_channels": Case(_on_op(lambda y: y[:, 2:6])),
    "model/slice_with_step": Case(_on_op(lambda y: y[:, ::2])),
    "model/gather_computed_indices": Case(_on_op(lambda y: y.gather(1, y.mean((2, 3), keepdim=True).argmax(1, True)
                                                                    .expand_as(y)))),
    "model/index_select_buffer": Case(_on_op(lambda y: y.index_select(1, torch.tensor([7, 0, 3, 3])))),
    "model/arange_positions": Case(_on_op(lambda y: y * torch.arange(y.shape[1], dtype=y.dtype).view(1, -1, 1, 1))),
    "model/grouped_convs": Case(_model(Grouped, ("body.0.0", "body.1"), lambda: torch.randn(X))),
    "model/in_place_ops": Case(_model(InPlace, ("a",), lambda: torch.randn(X))),
    "model/float_buffer_per_channel": Case(_model(lambda: Buffers(False), ("a",), lambda: torch.randn(X))),
    "model/integer_buffer_per_channel": Case(_model(lambda: Buffers(True), ("a",), lambda: torch.randn(X))),
    "model/tied_linear": Case(_model(Tied, ("a", "b", "c"), lambda: torch.randn(3, 6))),
    # a pruner leaves the channels of a tied weight alone (compaction could not shrink one of its names)...
    "model/tied_embedding_head": Case(_model(TiedHead, ("embed", "mix"), lambda: torch.randint(0, 10, (2, 5))),
                                      fresh=lambda x: torch.randint(0, 10, x.shape)),
    # ...and masks that ask for it anyway are refused, naming the tie
    "model/tied_embedding_head_by_hand": Case(_tied_columns, CompactionError, "'embed.weight' = 'head.weight'"),
    "model/weight_in_arithmetic": Case(_model(WeightInArithmetic, ("a",), lambda: torch.randn(3, 6)),
                                       CompactionError, "used directly in arithmetic"),
    "model/data_dependent_branch": Case(_model(Branch, ("a",), lambda: torch.randn(X)), warns="Python values"),
    "model/lstm": Case(_model(Recurrent, ("emb", "rnn"), lambda: torch.randint(0, 20, (2, 5))),
                       fresh=lambda x: torch.randint(0, 20, x.shape)),
    "model/gru": Case(_model(lambda: Recurrent(nn.GRU), ("emb",), lambda: torch.randint(0, 20, (2, 5))),
                      fresh=lambda x: torch.randint(0, 20, x.shape)),
    "model/lstm_inputs": Case(_model(Lstm, ("inp",), _tokens)),
    "model/lstm_initial_state": Case(_model(LstmWithState, ("inp",), _tokens)),
    "model/lstm_projections": Case(_by_hand(lambda: Lstm(proj_size=3), "inp", _tokens), UnsupportedOpError,
                                   "LSTM (packed input or projections)"),
    "model/multihead_attention": Case(_model(lambda: Attention(False), ("inp",), _tokens)),
    "model/sdpa_default_scale": Case(_model(lambda: Attention(True), ("inp",), _tokens)),
    "model/unknown_op": Case(_by_hand(Fft, "a", lambda: torch.randn(2, 3)), UnsupportedOpError, "fft_fft"),
    "model/unknown_op_kept": Case(_by_hand(Fft, "a", lambda: torch.randn(2, 3)), warns="unknown op 'fft_fft'",
                                  kwargs={"unknown_ops": "keep"}),
    "model/fails_mid_forward": Case(lambda: (FailsMidForward(0), torch.randn(X),
                                             {"a.weight": _rows(torch.empty(8, 3, 3, 3), _keep())}),
                                    TraceError, "the sensor is unplugged"),
    "model/fails_in_the_check": Case(lambda: (FailsMidForward(1), torch.randn(X),
                                              {"a.weight": _rows(torch.empty(8, 3, 3, 3), _keep())}),
                                     CompactionError, "the sensor is unplugged", verify=(True,)),
    "model/dict_and_tuple_outputs": Case(_model(Outputs, ("a",), lambda: torch.randn(X))),
    "model/nan_outputs": Case(_model(LogOfNegative, ("a",), lambda: torch.randn(X)), CompactionError,
                              "although the example inputs are finite", verify=(True,)),
    "model/overflowing_outputs": Case(_model(Exp, ("a",), lambda: torch.randn(X)), CompactionError,
                                      "NaN or infinite values", verify=(True,)),
    "model/nan_in_pruned_weights": Case(_nan_rows),
    "model/inf_in_a_kept_weight": Case(_inf_kept_weight, CompactionError, "although the example inputs are finite",
                                       verify=(True,)),
    "model/masked_already": Case(_model(_net, ("0",), lambda: torch.randn(X), masked=True)),
    "model/masked_and_emptied": Case(_masked_and_emptied, CompactionError, "cannot be emptied"),
    "model/user_hooks": Case(_hooked),
    "model/compacted_twice": Case(_twice),
    "model/frozen": Case(_frozen),
    "model/float64": Case(_double),
    "model/train_mode": Case(_training),
    "model/shared_conv_called_twice": Case(_model(SharedConv, ("a", "shared"), lambda: torch.randn(X))),
    "model/one_call_two_sizes": Case(_model(SameCallTwoSizes, ("a",), lambda: torch.randn(X))),
    "model/squeeze_batch_of_one": Case(_on_op(lambda y: y.mean((2, 3), keepdim=True).squeeze()
                                              .reshape(y.shape[0], -1, 1, 1).expand(-1, -1, 6, 6),
                                              x=torch.randn(1, 3, 8, 8))),
    "model/layer_norm_computed_shape": Case(_on_op(lambda y: F.layer_norm(y.transpose(1, 3), y.shape[1:2])
                                                   .transpose(1, 3))),
    "model/group_norm_functional": Case(_on_op(lambda y: F.group_norm(y, 4))),
    "model/reflect_pad_over_channels": Case(_on_op(lambda y: F.pad(y.flatten(2).transpose(1, 2), (1, 1),
                                                         mode="reflect").transpose(1, 2)
                                                   .reshape(y.shape[0], -1, *y.shape[2:]))),
    # -- arguments ----------------------------------------------------------------------------------------------
    "args/model_is_a_function": Case(lambda: (lambda t: t, torch.randn(X), {}), ConfigError, "torch.nn.Module"),
    "args/unknown_ops_policy": Case(_on_net(lambda n: _half(n, "0")), ConfigError, "unknown_ops must be",
                                    kwargs={"unknown_ops": "ignore"}),
}
CASES["inputs/second_input_nan"] = Case(
    lambda: (lambda m, x, k: (m, (x[0], torch.tensor([float("nan")])), k))(
        *_model(TwoInputs, ("a",), lambda: (torch.randn(X), torch.ones(1)))()),
    ConfigError, "example_inputs[1] holds 1 NaN")
CASES["inputs/dict_input_nan"] = Case(
    lambda: (lambda m, x, k: (m, {"x": _set(x[0], (0, 0, 0, 0), float("nan")), "scale": x[1]}, k))(
        *_model(TwoInputs, ("a",), lambda: (torch.randn(X), torch.ones(1)))()),
    ConfigError, "example_inputs['x'] holds 1 NaN")
CASES["inputs/keyword_inputs"] = Case(
    lambda: (lambda m, x, k: (m, {"x": x[0], "scale": x[1]}, k))(
        *_model(TwoInputs, ("a",), lambda: (torch.randn(X), torch.ones(1)))()),
    fresh=lambda x: {"x": torch.randn_like(x["x"]), "scale": x["scale"]})
CASES["args/verify_not_a_flag"] = Case(_on_net(lambda n: _half(n, "0")), ConfigError, "verify must be True or False",
                                       verify=("no",))


# -- more odd models and inputs: what a user may hand to compaction ------------------------------------------------


class NestedInputs(nn.Module):
    """Takes ``(x, (y, scale))``: a tuple nested in the positional inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x, pair):
        y, scale = pair
        return self.c(torch.relu(self.a(x)) + self.b(y) * scale)


class DictOfDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, *, inputs):
        return self.c(torch.relu(self.a(inputs["x"])))


class SpectralConsumer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.utils.parametrizations.spectral_norm(nn.Conv2d(8, 4, 3))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class WeightNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3))
        self.b = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class FreeScale(nn.Module):
    """A free per-channel parameter through ``exp`` (no layer owns it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.g, self.c = nn.Linear(4, 8), nn.Parameter(torch.randn(8)), nn.Linear(8, 2)

    def forward(self, x):
        return self.c(torch.relu(self.a(x)) * self.g.exp())


class NonTensorOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return {"logits": self.c(torch.relu(self.a(x))), "count": 3, "scale": 0.5}


def _on_meta() -> tuple[nn.Module, Any, Any]:
    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    return net, torch.randn(X), {"0.weight": _rows(torch.empty(8, 3, 3, 3), _keep())}


def _quantized() -> tuple[nn.Module, Any, Any]:
    from slimtorch import QuantConfig, quantize

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    return quantize(mlp, QuantConfig(method="dynamic_int8")), torch.randn(3, 6), {}


def _in_dtype(dtype: torch.dtype) -> Callable:
    def make():
        net = _net().to(dtype)
        x = torch.randn(X).to(dtype)
        return net, x, _half(net, "0", x=x)

    return make


def _weight_normed_all_kept() -> tuple[nn.Module, Any, Any]:
    torch.manual_seed(0)
    model = WeightNormed().eval()
    return model, torch.randn(X), {"a.parametrizations.weight.original1": torch.ones(8, 3, 3, 3, dtype=torch.bool)}


def _op_by_hand(fn: Callable) -> Callable:
    """:class:`Op` with half the output rows of its first conv masked by hand (no pruner can trace ``fn``)."""

    def make():
        torch.manual_seed(0)
        model = Op(fn).eval()
        return model, torch.randn(X), {"a.weight": _rows(model.a.weight, _keep())}

    return make


def _fresh_low_precision(x: Any) -> Any:
    return torch.randn(x.shape).to(x.dtype)


CASES.update({
    "model/meta_device": Case(_on_meta, ConfigError, "meta device"),
    "model/quantized_int8": Case(_quantized, ConfigError, "the model is quantized (dynamic_int8)"),
    "model/bfloat16": Case(_in_dtype(torch.bfloat16), fresh=_fresh_low_precision),
    "model/float16": Case(_in_dtype(torch.float16), fresh=_fresh_low_precision),
    "model/spectral_norm_consumer": Case(_by_hand(SpectralConsumer, "a", lambda: torch.randn(X)), UnsupportedOpError,
                                         "weight computed in forward"),
    "model/weight_norm_layer_all_kept": Case(_weight_normed_all_kept),
    "model/free_parameter_through_exp": Case(_model(FreeScale, ("a",), lambda: torch.randn(3, 4))),
    "model/non_tensor_outputs": Case(_model(NonTensorOutputs, ("a",), lambda: torch.randn(3, 4))),
    "model/topk_over_channels": Case(_op_by_hand(lambda y: y.topk(3, dim=1).values), warns="topk over channels"),
    "model/sort_over_channels": Case(_op_by_hand(lambda y: y.sort(dim=1).values), warns="sort over channels"),
    "model/cumsum_over_channels": Case(_on_op(lambda y: y.cumsum(1))),
    "model/softmax_over_channels": Case(_on_op(lambda y: torch.softmax(y, 1))),
    "model/normalize_over_channels": Case(_on_op(lambda y: F.normalize(y, dim=1))),
    "model/minus_channel_mean": Case(_on_op(lambda y: y - y.mean(1, keepdim=True))),
    "model/pad_channels_with_ones": Case(_on_op(lambda y: F.pad(y, (0, 0, 0, 0, 1, 1), value=1.0))),
    "model/pixel_shuffle": Case(_on_op(lambda y: F.pixel_shuffle(y, 2))),
    "model/index_by_buffer_positions": Case(_on_op(lambda y: y[:, torch.tensor([0, 2, 4, 6])])),
    "inputs/nested_tuple": Case(_model(NestedInputs, ("a",), lambda: (torch.randn(3, 4), (torch.randn(3, 4),
                                                                                           torch.randn(3, 1)))),
                                fresh=lambda x: (torch.randn(3, 4), (torch.randn(3, 4), x[1][1]))),
    "inputs/nested_tuple_nan": Case(lambda: (lambda m, x, k: (m, (x[0], (x[1][0], torch.full((3, 1), float("nan")))),
                                                               k))(*_model(NestedInputs, ("a",), lambda: (
                                        torch.randn(3, 4), (torch.randn(3, 4), torch.randn(3, 1))))()),
                                    ConfigError, "example_inputs[1][1] holds 3 NaN"),
    "inputs/dict_of_dict_keywords": Case(_model(DictOfDict, ("a",), lambda: {"inputs": {"x": torch.randn(3, 4)}}),
                                         fresh=lambda x: {"inputs": {"x": torch.randn(3, 4)}}),
})


def _fresh(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.randn_like(x) if x.is_floating_point() else x.clone()
    if isinstance(x, tuple):
        return tuple(_fresh(t) for t in x)
    return x


def _compacts_to_the_masked_model(case: Case, verify: bool) -> None:
    model, x, masks = case.make()
    ref = copy.deepcopy(model)
    apply_masks_(ref, masks)
    before = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compact_(model, masks, example_inputs=x, verify=verify, **(case.kwargs or {}))
    said = [str(w.message) for w in caught if issubclass(w.category, SlimWarning)]
    if case.warns is not None:
        assert any(case.warns in s for s in said), said
    assert sum(p.numel() for p in model.parameters()) <= before
    fresh = (case.fresh or _fresh)(x)
    with torch.no_grad():
        torch.testing.assert_close(run(model, fresh), run(ref, fresh), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_case(name):
    case = CASES[name]
    for verify in case.verify:
        if case.error is None:
            _compacts_to_the_masked_model(case, verify)
            continue
        model, x, masks = case.make()
        models = [model] if isinstance(model, nn.Module) else []
        fails_cleanly(lambda m=model, k=masks, i=x, v=verify: compact_(m, k, example_inputs=i, verify=v,
                                                                        **(case.kwargs or {})),
                      case.error, case.fragment, models=models)


def test_the_table_is_large_and_mixed():
    failing = [c for c in CASES.values() if c.error is not None]
    assert len(CASES) >= 120 and len(failing) >= 35 and len(CASES) - len(failing) >= 50
