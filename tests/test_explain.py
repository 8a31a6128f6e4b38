"""No silent no-op: every channel the masks zero whole that compaction keeps is counted, per parameter, with the
reason, in a SlimWarning and in ``model.slimtorch_compaction["masked_channels_kept"]``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nets import randomize_
from slimtorch import apply_masks_, compact_, compute_masks
from slimtorch.errors import SlimWarning


def _rows(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return keep.reshape(-1, *[1] * (weight.dim() - 1)).expand_as(weight).clone()


def _compact(model: nn.Module, masks: dict, x: torch.Tensor) -> list[str]:
    """Compact (checked against the masked model on ``x``); the warnings' texts."""
    ref = copy.deepcopy(model)
    apply_masks_(ref, masks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compact_(model, masks, example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    return [str(w.message) for w in caught if issubclass(w.category, SlimWarning)]


class TwoBranches(nn.Module):
    """A plain branch (``a`` -> ``b``) and a residual one (``c`` + ``d``, read by ``e``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.c, self.d, self.e = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.c(x)
        return self.b(F.relu(self.a(x))) + self.e(y + self.d(y))


def test_coupled_channels_that_stay_are_counted_although_others_go():
    """Masks that remove channels of one layer and zero coupled channels of another: the second part stays, and
    is said (before, only a compaction that removed nothing said anything)."""
    model, x = TwoBranches().eval(), torch.randn(2, 3, 6, 6)
    keep = torch.arange(8) >= 3
    masks = {"a.weight": _rows(model.a.weight, keep), "a.bias": keep, "b.weight": keep[None, :, None, None]
             .expand_as(model.b.weight).clone(), "d.weight": _rows(model.d.weight, keep), "d.bias": keep}
    (message,) = _compact(model, masks, x)
    assert model.a.out_channels == 5 and model.d.out_channels == 8
    assert "removed 3 channels, and kept 3 that the masks zero whole: 3 output channels of 'd.weight' (coupled" in \
        message and "'c.weight', 'e.weight' keep" in message
    kept = model.slimtorch_compaction["masked_channels_kept"]
    assert [(k["parameter"], k["side"], k["channels"]) for k in kept] == [("d.weight", "output", 3)]


class StandardisedConv(nn.Conv2d):
    """A convolution whose weight is standardised per output channel in forward (as timm's ScaledStdConv2d)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_weight_standardised_layers_are_named_with_the_reason():
    model = nn.Sequential(StandardisedConv(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    keep = torch.arange(8) % 2 == 0
    (message,) = _compact(model, {"0.weight": _rows(model[0].weight, keep), "0.bias": keep}, x)
    assert message.startswith("compaction removed no channel: the masks zero whole channels that must stay: 4 "
                              "output channels of '0.weight' (its layer computes the weight it applies in forward")
    assert "ScaledStdConv2d" in message and "the masks zero no whole channel" not in message
    (kept,) = model.slimtorch_compaction["masked_channels_kept"]
    assert kept["parameter"] == "0.weight" and kept["channels"] == 4


def test_a_norm_over_the_channels_keeps_them_with_the_reason():
    """An RMS norm computed by hand over a Linear's channels: its mean counts a masked channel although it is zero
    there, and would count one less once it is removed: the channels stay, and the reason says why."""

    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            y = self.a(x)
            return self.b(y / y.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt())

    model, x = Normed().eval(), torch.randn(3, 4)
    keep = torch.arange(8) < 5
    (message,) = _compact(model, {"a.weight": _rows(model.a.weight, keep), "a.bias": keep}, x)
    assert "3 output channels of 'a.weight' (mean over channels (its result depends on how many there are)" in message


def test_whole_masks_say_nothing_and_record_nothing_kept():
    model = TwoBranches().eval()
    x = torch.randn(2, 3, 6, 6)
    randomize_(model)
    masks = compute_masks(model, [{"op_names": ["a", "c"], "sparse_ratio": 0.5}], example_inputs=x)
    assert _compact(model, masks, x) == []
    assert model.slimtorch_compaction["masked_channels_kept"] == []


@pytest.mark.parametrize("entries", [3, 12])
def test_the_warning_names_the_first_parameters_and_counts_the_rest(entries):
    """A model with many blocked layers: the warning stays readable, the record lists them all."""
    layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(entries))

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return torch.stack([layer(x) for layer in self.layers])  # every output reaches the model output

    model, x = Heads().eval(), torch.randn(2, 4)
    keep = torch.arange(4) < 2
    masks = {f"layers.{i}.weight": _rows(layer.weight, keep) for i, layer in enumerate(layers)}
    (message,) = _compact(model, masks, x)
    assert len(model.slimtorch_compaction["masked_channels_kept"]) == entries
    assert ("more entries" in message) == (entries > 8)
