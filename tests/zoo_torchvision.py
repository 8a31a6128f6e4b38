"""torchvision beyond classifiers: detection, segmentation, video and optical flow models, built with no weights
(``weights=None, weights_backbone=None``) at small input sizes, for the oracle of tests/zoo.py.

Detectors take a list of images of any sizes and return a list of dicts; their score thresholds are set to 0 and
their detections to 10 per image, so that random weights give detections to compare (with the defaults, random
class scores fall below the thresholds and every output is empty).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.video import mvit

from zoo import Case

DETECTION = torchvision.models.list_models(module=torchvision.models.detection)
SEGMENTATION = torchvision.models.list_models(module=torchvision.models.segmentation)
VIDEO = torchvision.models.list_models(module=torchvision.models.video)
FLOW = torchvision.models.list_models(module=torchvision.models.optical_flow)


def _detection_kwargs(name: str) -> dict[str, Any]:
    if name.startswith(("retinanet", "fcos", "ssd")):
        kwargs: dict[str, Any] = {"score_thresh": 0.0, "detections_per_img": 10}
    else:  # the R-CNNs
        kwargs = {"box_score_thresh": 0.0, "box_detections_per_img": 10}
    if not name.startswith("ssd"):  # (SSDs resize to their fixed size)
        kwargs.update(min_size=64, max_size=96)
    return kwargs


def _images(seed: int) -> tuple[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)],)


@contextlib.contextmanager
def _small_mvit(size: int, frames: int) -> Iterator[None]:
    """MViT's builders fix the input size (224 x 224, 16 frames) its position encodings are made for; the same
    layers are made for a smaller input by giving the size to the function they call."""
    original = mvit._mvit

    def small(**kwargs: Any) -> nn.Module:
        return original(**{**kwargs, "spatial_size": (size, size), "temporal_size": frames})

    mvit._mvit = small
    try:
        yield
    finally:
        mvit._mvit = original


def _builder(name: str) -> Any:
    def build() -> tuple[nn.Module, Any, Any]:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        if name in DETECTION:
            model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **_detection_kwargs(name))
            return model.eval(), _images(1), _images(2)
        if name in SEGMENTATION:
            model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
            return model.eval(), torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
        if name in FLOW:  # (RAFT needs feature maps of 16 x 16 at least: images of 128 x 128)
            pair = [torch.rand(1, 3, 128, 128, generator=g) for _ in range(4)]
            return torchvision.models.get_model(name, weights=None).eval(), tuple(pair[:2]), tuple(pair[2:])
        shape = {"s3d": (1, 3, 16, 224, 224), "mvit_v1_b": (1, 3, 4, 64, 64), "mvit_v2_s": (1, 3, 4, 64, 64)}.get(
            name, (1, 3, 8, 32, 32))
        with _small_mvit(shape[-1], shape[2]) if name.startswith("mvit") else contextlib.nullcontext():
            model = torchvision.models.get_model(name, weights=None)
        return model.eval(), torch.randn(shape, generator=g), torch.randn(shape, generator=g)

    return build


#: RAFT reads the size of its recurrent hidden state from an attribute (``update_block.hidden_state_size``) to
#: split the context encoder's output: the layers making those channels are left out
_RAFT_HIDDEN = {name: ["context_encoder.conv"] + [f"update_block.recurrent_block.convgru{i}.conv{g}"
                                                 for i in ((1,) if name == "raft_small" else (1, 2)) for g in "zrq"]
                for name in FLOW}

CASES = {name: Case(_builder(name), op_types=("Conv2d", "Conv3d", "Linear"), exclude=_RAFT_HIDDEN.get(name, []))
         for name in DETECTION + SEGMENTATION + VIDEO + FLOW}
