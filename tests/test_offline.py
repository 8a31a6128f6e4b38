"""Nothing downloads: every model the registry knows builds with the network blocked, pretrained weights
(backbones included) are refused, and sizes read from files or arguments are bounded before allocating."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torchvision

from slimtorch.cli.main import main
from slimtorch.errors import CheckpointError, ConfigError
from slimtorch.models.modelfile import load_model, save_model
from slimtorch.models.registry import ModelSpec, build_model, model_names


class NetworkAccess(BaseException):
    """Raised by the blocked network; a BaseException, so that no ``except Exception`` can swallow it."""


@pytest.fixture
def no_network(monkeypatch):
    """Sockets refuse to connect, and torchvision's weight loader refuses too (a weight file already in
    the local torch hub cache would otherwise load without touching the network)."""

    def refuse(*args, **kwargs):
        raise NetworkAccess(f"network access attempted: {args[:2]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)


def _meta_params(spec: ModelSpec) -> int | None:
    """Parameters of the model built on the meta device, or None when its constructor needs real tensors."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in build_model(spec).parameters())
    except (RuntimeError, NotImplementedError):
        return None


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # googlenet / inception_v3 init notices
def test_every_registry_name_builds_with_the_network_blocked(no_network):
    names = model_names()
    assert "torchvision:fcn_resnet50" in names and "MnistNet" in names
    for name in names:
        spec = ModelSpec.parse(name)
        params = _meta_params(spec)  # the builder ran: a download would have raised NetworkAccess
        if params is None or params < 30_000_000:  # real builds for all but the largest
            model = build_model(spec)
            assert sum(p.numel() for p in model.parameters()) == (params or sum(p.numel() for p in model.parameters()))


def test_segmentation_and_detection_builders_get_no_backbone_weights(no_network):
    for name in ("fcn_resnet50", "deeplabv3_mobilenet_v3_large", "ssdlite320_mobilenet_v3_large"):
        with torch.device("meta"):
            build_model(ModelSpec.parse(name))


def test_cli_report_of_a_segmentation_model_stays_offline(no_network, capsys):
    code = main(["report", "fcn_resnet50", "--runs", "0", "--input-shape", "3,32,32", "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["params"] > 30_000_000


@pytest.mark.parametrize("kwargs", [{"weights": "DEFAULT"}, {"weights_backbone": "DEFAULT"}, {"pretrained": True}])
def test_pretrained_weights_are_refused(no_network, kwargs):
    with pytest.raises(ConfigError, match="never downloads"):
        ModelSpec(name="fcn_resnet50", source="torchvision", kwargs=kwargs)


def test_absurd_sizes_are_refused_before_allocating(no_network):
    with pytest.raises(ConfigError, match="out of range"):
        ModelSpec(name="resnet18", source="torchvision", kwargs={"num_classes": 10**12})
    with pytest.raises(ConfigError, match="values per sample"):
        ModelSpec(name="MnistNet", input_shape=(1, 10**6, 10**6))
    # each argument in range, the model too large: found on the meta device, nothing allocated
    spec = ModelSpec(name="BookCNN", kwargs={"num_classes": 2**24})
    with pytest.raises(ConfigError, match="parameters"):
        build_model(spec)


def test_a_model_file_with_absurd_sizes_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(path, build_model(ModelSpec(name="DigitsCNN", kwargs={"width": 4})), ModelSpec(name="DigitsCNN"))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    for spec in ({"name": "DigitsCNN", "source": "reference", "kwargs": {"width": 2**40}, "input_shape": [1, 8, 8]},
                 {"name": "DigitsCNN", "source": "reference", "kwargs": {}, "input_shape": [1, 10**5, 10**5]},
                 {"name": "DigitsCNN", "source": "reference", "kwargs": {}, "input_shape": "1,8,8"},
                 {"name": 3, "source": "reference", "kwargs": {}, "input_shape": [1, 8, 8]}):
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata={"format": "slimtorch-model-v1", "spec": json.dumps(spec),
                                               "state": "dense"})
        with pytest.raises(CheckpointError, match="bad.safetensors"):
            load_model(bad)
