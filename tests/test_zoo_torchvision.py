"""torchvision's detection, segmentation, video and optical-flow models (no weights, eval mode) through the
compaction oracle of tests/zoo.py: the compacted model equals the masked one, selections pinned (see there).

The classifiers have their own matrix (tests/test_matrix.py)."""

from __future__ import annotations

import pytest

from zoo import check
from zoo_torchvision import CASES, DETECTION, FLOW, SEGMENTATION, VIDEO

#: run by default (a detector, a segmenter, a video model: the quickest of each); the rest with --zoo
DEFAULT = {"fasterrcnn_mobilenet_v3_large_320_fpn", "lraspp_mobilenet_v3_large", "r3d_18"}


def _param(name: str) -> object:
    return pytest.param(name, marks=[] if name in DEFAULT else [pytest.mark.zoo, pytest.mark.slow])


def test_every_kind_is_listed() -> None:
    assert len(DETECTION) >= 10 and len(SEGMENTATION) >= 5 and len(VIDEO) >= 6 and len(FLOW) == 2
    assert set(CASES) >= DEFAULT


@pytest.mark.parametrize("name", [_param(n) for n in CASES])
def test_compacted_equals_masked(name: str) -> None:
    record = check(CASES[name])
    assert record["masked_channels_kept"] == []
    assert record["channels_removed"] == record["channels_requested"] > 0
