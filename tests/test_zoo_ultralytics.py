"""Ultralytics YOLO models built from their YAML files through the compaction oracle (tests/zoo.py), and a
compacted detector exported to ONNX and run in ONNX Runtime. Skipped when ``ultralytics`` is not installed."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("ultralytics")

import torch
from torch.utils._pytree import tree_leaves

from nets import randomize_
from slimtorch import compact_, compute_masks
from slimtorch.export import export_onnx, onnx_session, run_onnx
from zoo import check
from zoo_ultralytics import CASES, build_yolo

#: run by default (one detector, one segmenter); the rest with --zoo
DEFAULT = {"yolov8n", "yolo11n-seg"}


class NetworkAccess(BaseException):
    """Raised by the blocked network; a BaseException, so that no ``except Exception`` can swallow it."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise NetworkAccess(f"network access attempted: {args[:2]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in DEFAULT else [pytest.mark.zoo, pytest.mark.slow])
                                  for n in CASES])
def test_compacted_equals_masked(name: str) -> None:
    record = check(CASES[name])
    assert record["masked_channels_kept"] == []
    assert record["channels_removed"] == record["channels_requested"] > 0


def test_every_family_and_head_is_listed() -> None:
    assert {"yolov5nu", "yolov8n", "yolo11n", "yolov10n", "yolov8n-seg", "yolov8n-pose"} <= set(CASES)


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize("config", ["yolov8n.yaml", "yolo11n-seg.yaml", "yolov10n.yaml"])
def test_compacted_detector_runs_in_onnx_runtime(config: str, tmp_path) -> None:
    """Exported as Ultralytics exports (the head's ``export`` flag: the decoded boxes, no feature maps), at a
    fixed batch, checked on the example and on a fresh input: every output equal to PyTorch's."""
    model = build_yolo(config)
    randomize_(model)
    model.model[-1].export, model.model[-1].format = True, "onnx"
    g = torch.Generator().manual_seed(1)
    x, fresh = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    masks = compute_masks(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], example_inputs=x)
    compact_(model, masks, example_inputs=x)
    export_onnx(model, x, tmp_path / "yolo.onnx", dynamic_batch=False)
    got = run_onnx(onnx_session(tmp_path / "yolo.onnx"), fresh)
    with torch.no_grad():
        want = [t for t in tree_leaves(model(fresh)) if isinstance(t, torch.Tensor)]
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())))
