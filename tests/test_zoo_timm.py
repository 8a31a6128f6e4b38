"""One small model of every timm family through the compaction oracle of tests/zoo.py (random weights, eval mode).
Skipped when ``timm`` is not installed."""

from __future__ import annotations

import pytest

pytest.importorskip("timm")

from zoo import Case, check
from zoo_timm import CASES, MODELS, build_timm

#: run by default (a CNN, a ViT, an MLP-mixer); the rest with --zoo
DEFAULT = {"resnet", "vision_transformer", "mlp_mixer"}


def test_the_families_are_listed() -> None:
    assert len(MODELS) >= 90 and set(MODELS) >= DEFAULT


@pytest.mark.parametrize("family", [pytest.param(f, marks=[] if f in DEFAULT else [pytest.mark.zoo, pytest.mark.slow])
                                    for f in CASES])
def test_compacted_equals_masked(family: str) -> None:
    check(CASES[family])


@pytest.mark.zoo
@pytest.mark.slow
def test_weight_standardised_convs_keep_their_channels_and_say_so() -> None:
    """An NF-ResNet's convolutions standardise their weights over the input channels in forward, so the masked
    input channels must stay: the compacted model equals the masked one, and the warning and the record say
    which channels stay."""
    check(Case(lambda: build_timm("nf_resnet26", 32, {}), keeps=True))
