"""One small model of every timm family through the compaction oracle of tests/zoo.py (random weights, eval mode).
Skipped when ``timm`` is not installed."""

from __future__ import annotations

import pytest

pytest.importorskip("timm")

from zoo import check
from zoo_timm import CASES, MODELS

#: run by default (a CNN, a ViT, a weight-standardised ResNet, an LSTM-based model); the rest with --zoo
DEFAULT = {"resnet", "vision_transformer", "nfnet", "sequencer"}


def test_the_families_are_listed() -> None:
    assert len(MODELS) >= 90 and set(MODELS) >= DEFAULT


@pytest.mark.parametrize("family", [pytest.param(f, marks=[] if f in DEFAULT else [pytest.mark.zoo, pytest.mark.slow])
                                    for f in CASES])
def test_compacted_equals_masked(family: str) -> None:
    record = check(CASES[family])
    assert record["channels_removed"] > 0
