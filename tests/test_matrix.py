"""Every torchvision classification model through the compaction oracle (see tests/matrix.py).

The slow ones (marked) are the large models: their cost is building, copying and saving hundreds of
millions of random weights, not the graph. Each run also times its stages for `python tests/matrix.py`.
"""

import pytest

from matrix import MODELS, TRAIN_MODE, check, check_train_mode

#: models that take more than ~8 s single-core (building, copying and saving their weights dominate)
SLOW = {
    "convnext_base", "convnext_large", "densenet161", "densenet201", "efficientnet_b7", "efficientnet_v2_l",
    "efficientnet_v2_m", "maxvit_t", "regnet_x_16gf", "regnet_x_32gf", "regnet_x_8gf", "regnet_y_128gf",
    "regnet_y_16gf", "regnet_y_32gf", "regnet_y_8gf", "resnet101", "resnet152", "resnext101_32x8d",
    "resnext101_64x4d", "resnext50_32x4d", "swin_b", "swin_s", "swin_v2_b", "swin_v2_s", "vgg11", "vgg11_bn",
    "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14",
    "vit_l_16", "vit_l_32", "wide_resnet101_2", "wide_resnet50_2",
}


#: over 600M parameters: the check holds the model, its masked copy and the compacted weights (~10 GB)
GIANT = {"regnet_y_128gf", "vit_h_14"}


def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return float("inf")  # not Linux: let the test try


def _param(name):
    marks = [pytest.mark.slow] if name in SLOW else []
    if name in GIANT:
        marks.append(pytest.mark.skipif(_available_gib() < 16, reason="needs ~16 GiB of free memory"))
    return pytest.param(name, marks=marks)


def test_the_matrix_lists_every_model():
    assert len(MODELS) >= 80 and set(MODELS) >= SLOW


@pytest.mark.parametrize("name", [_param(n) for n in MODELS])
def test_compacted_equals_masked(name, tmp_path):
    check(name, str(tmp_path))


@pytest.mark.parametrize("name", TRAIN_MODE)
def test_train_mode(name):
    check_train_mode(name)
