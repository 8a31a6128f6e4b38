"""Layer removal in plain chains: a layer (a conv or Linear with the norm and activation after it) goes where
its output has its input's shape; the model without it is exactly the chain built without those children."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch import ConfigError, NoMatchError, report
from slimtorch.prune.depth import block_drop_loss, block_influence, chain_layers, drop_blocks_, plan_block_drop


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),     # 0-2: 3 -> 8 channels, stays
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),     # 3-5: shape kept, can go
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),  # 6-9: halves, stays
        )
        self.classifier = nn.Sequential(
            nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))  # (N, 8 * 4 * 4)


def _chain() -> tuple[Chain, torch.Tensor]:
    torch.manual_seed(0)
    net = Chain().eval()
    with torch.no_grad():
        for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return net, torch.randn(4, 3, 8, 8)


def test_chain_layers_are_the_shape_keeping_spans():
    net, x = _chain()
    assert chain_layers(net, x) == ["features.3-5", "classifier.2-4"]
    assert net.training is False


def test_a_dropped_span_leaves_exactly_the_chain_without_it():
    net, x = _chain()
    before = report(net, x, runs=0).params
    metric = torch.no_grad()(lambda m: float(m(x).square().mean()))
    predicted = block_drop_loss(net, ["features.3-5", "classifier.2-4"], metric)
    drop_blocks_(net, ["features.3-5", "classifier.2-4"])
    without = Chain().eval()
    without.load_state_dict(net.state_dict(), strict=False)
    without.features = nn.Sequential(*[m for i, m in enumerate(net.features) if i not in (3, 4, 5)])
    without.classifier = nn.Sequential(*[m for i, m in enumerate(net.classifier) if i not in (2, 3, 4)])
    with torch.no_grad():
        torch.testing.assert_close(net(x), without(x), rtol=0, atol=0)
    gone = 8 * 8 * 9 + 8 + 2 * 8 + 64 * 64 + 64
    after = report(net, x, runs=0)
    assert after.state == "compacted" and after.params == before - gone
    assert net.slimtorch_compaction["dropped_blocks"] == ["features.3-5", "classifier.2-4"]
    # skipping each span alone predicted what dropping it does
    fresh, _ = _chain()
    drop_blocks_(fresh, ["features.3-5"])
    assert predicted["features.3-5"] == metric(_chain()[0]) - metric(fresh)


def test_an_identity_layer_scores_lowest_and_goes_first():
    net, x = _chain()
    with torch.no_grad():  # conv 3 passes its input through, BatchNorm 4 is the identity (up to eps)
        conv, bn = net.features[3], net.features[4]
        conv.weight.copy_(nn.init.dirac_(torch.empty_like(conv.weight)))
        conv.bias.zero_()
        bn.running_mean.zero_(), bn.running_var.fill_(1.0), bn.weight.fill_(1.0), bn.bias.zero_()
    scores = block_influence(net, chain_layers(net, x), [x])
    assert scores["features.3-5"] < 1e-6 < scores["classifier.2-4"]
    assert plan_block_drop(scores, count=1) == ["features.3-5"]


@pytest.mark.parametrize(("names", "error", "words"), [
    (["features.3-12"], NoMatchError, "no span"),
    (["classifier.0.3-4"], NoMatchError, "no span"),
    (["features.3-5", "features.4"], ConfigError, "overlap"),
    (["features.6-9"], ConfigError, "maps \\(4, 8, 8, 8\\) to \\(4, 8, 4, 4\\)"),
])
def test_bad_spans_are_refused_and_change_nothing(names, error, words):
    net, x = _chain()
    children = list(net.features) + list(net.classifier)
    with pytest.raises(error, match=words):
        if error is ConfigError and "maps" in words:
            block_influence(net, names, [x])
        else:
            drop_blocks_(net, names)
    assert list(net.features) + list(net.classifier) == children
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
