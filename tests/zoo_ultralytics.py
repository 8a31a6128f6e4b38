"""Ultralytics YOLO models built from their YAML files (no weights), for the oracle of tests/zoo.py: detection
(v3u to 26, RT-DETR), segmentation, pose, oriented boxes and classification heads.

Nothing reaches the network: ``YOLO_OFFLINE`` is set before Ultralytics is imported (it otherwise resolves two
host names as it loads), and the tests run with sockets blocked. The YAML files ship with the package.
"""

from __future__ import annotations

import os

os.environ.setdefault("YOLO_OFFLINE", "1")  # (before the import: Ultralytics checks the network as it loads)

from typing import Any

import torch
from torch import nn
from ultralytics.nn import tasks
from ultralytics.utils import LOGGER

from zoo import Case

#: the smallest scale of each family and head (``n``; RT-DETR's smallest is ``l``)
CONFIGS = [
    "yolov3-tinyu.yaml", "yolov5nu.yaml", "yolov6n.yaml", "yolov8n.yaml", "yolov8n-ghost.yaml", "yolov8n-p2.yaml",
    "yolov9t.yaml", "yolov10n.yaml", "yolo11n.yaml", "yolo12n.yaml", "yolo26n.yaml", "rtdetr-l.yaml",
    "yolov8n-seg.yaml", "yolo11n-seg.yaml", "yolov8n-pose.yaml", "yolo11n-pose.yaml", "yolov8n-obb.yaml",
    "yolo11n-obb.yaml", "yolov8n-cls.yaml", "yolo11n-cls.yaml",
]

#: the model class of each head, by the suffix of its file's name (none: detection)
_TASKS = {"-seg": tasks.SegmentationModel, "-pose": tasks.PoseModel, "-obb": tasks.OBBModel,
          "-cls": tasks.ClassificationModel}


def build_yolo(config: str) -> nn.Module:
    """The model a YAML file describes, random weights, eval mode (Ultralytics' own logging silenced)."""
    suffix = "-" + config.removesuffix(".yaml").rpartition("-")[2]
    cls = tasks.RTDETRDetectionModel if "rtdetr" in config else _TASKS.get(suffix, tasks.DetectionModel)
    level = LOGGER.level
    LOGGER.setLevel("ERROR")
    try:
        torch.manual_seed(0)
        return cls(config, verbose=False).eval()
    finally:
        LOGGER.setLevel(level)


def _builder(config: str) -> Any:
    def build() -> tuple[nn.Module, Any, Any]:
        g = torch.Generator().manual_seed(1)
        return build_yolo(config), torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)

    return build


CASES = {config.removesuffix(".yaml"): Case(_builder(config)) for config in CONFIGS}
