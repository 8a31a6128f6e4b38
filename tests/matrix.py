"""The torchvision matrix: every classification model, random weights, 50% L1 channel masks on its convs
(the classifier excepted), checked against the masked model, the implied parameter count and a save/load
round trip. Shared by tests/test_matrix.py and runnable alone to time each model:

    PYTHONPATH=src:tests python tests/matrix.py [names...]
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
import warnings

import torch
import torchvision
from torch import nn

from nets import assert_shapes_trace_exact, randomize_, run
from slimtorch import apply_masks_, compact_, compute_masks
from slimtorch.io import load_compacted_, save_compacted
from slimtorch.prune.coupled import implied_param_count

MODELS = torchvision.models.list_models(module=torchvision.models)

#: the smallest square input each family runs on (default 32): pooling stacks and fixed windows need more
SIZES = {"alexnet": 63, "inception_v3": 75, "maxvit_t": 224, "vit_h_14": 28}
#: constructor arguments that shrink the input a model accepts without changing its layers
KWARGS = {"vit_b_16": {"image_size": 32}, "vit_l_16": {"image_size": 32}, "vit_b_32": {"image_size": 32},
          "vit_l_32": {"image_size": 32}, "vit_h_14": {"image_size": 28}}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model with random weights and random BatchNorm statistics, in eval mode, and an input batch."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {})).eval()
    randomize_(model)
    size = SIZES.get(name, 32)
    return model, torch.randn(2, 3, size, size)


def classifier(model: nn.Module) -> str:
    """The last Linear or Conv2d: the layer that produces the class scores."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]


#: small models also checked in train mode (BatchNorm on batch statistics, dropout off for comparability)
TRAIN_MODE = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "densenet121", "efficientnet_b0"]


def check_train_mode(name: str) -> None:
    """Compaction in train mode: the result stays in train mode and matches the masked model there."""
    model, x = build(name)
    model, x = model.double(), x.double()  # train-mode BatchNorm on a batch of 2 amplifies float32 rounding
    for m in model.modules():
        m.train(not isinstance(m, nn.Dropout) and type(m).__name__ != "StochasticDepth")
    config = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}, {"exclude": True, "op_names": [classifier(model)]}]
    masks = compute_masks(model, config, example_inputs=x)
    ref = copy.deepcopy(model)
    apply_masks_(ref, masks)
    compact_(model, masks, example_inputs=x)
    assert [m.training for m in model.modules()] == [m.training for m in ref.modules()]
    with torch.no_grad():
        torch.testing.assert_close(run(model, x), run(ref, x), rtol=1e-7, atol=1e-7)
    assert sum(p.numel() for p in model.parameters()) == implied_param_count(ref, masks)


def check(name: str, folder: str) -> dict[str, float]:
    """Run every check on one model; returns the timings (seconds) of its stages (and ``shapes_only``: 1
    when pruning's graph came from the shapes-only trace, 0 when that fell back to a real one)."""
    times, t = {}, time.perf_counter()
    model, x = build(name)
    times["build"], t = time.perf_counter() - t, time.perf_counter()
    times["shapes_only"] = float(assert_shapes_trace_exact(model, x))
    t = time.perf_counter()
    config = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}, {"exclude": True, "op_names": [classifier(model)]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers that do not run in eval mode (aux heads) are reported, not pruned
        masks = compute_masks(model, config, example_inputs=x)
    times["masks"], t = time.perf_counter() - t, time.perf_counter()
    ref = copy.deepcopy(model)
    apply_masks_(ref, masks)
    before = sum(p.numel() for p in model.parameters())
    compact_(model, masks, example_inputs=x)
    times["compact"], t = time.perf_counter() - t, time.perf_counter()
    with torch.no_grad():
        got = run(model, x)
        want = run(ref, x)
        # float32 sums in a different order: the tolerance follows the output scale (random BN statistics
        # make some outputs large, inception_v3's reach 1e4)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(want.abs().max())))
    after = sum(p.numel() for p in model.parameters())
    assert after == implied_param_count(ref, masks) < before
    del ref
    save_compacted(model, folder)
    fresh = torchvision.models.get_model(name, weights=None, **KWARGS.get(name, {})).eval()
    load_compacted_(fresh, folder)
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, x), got, rtol=0, atol=0)
    times["save_load"] = time.perf_counter() - t
    return times


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[1:] or MODELS:
        start = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as folder:
                times = check(name, folder)
            status = " ".join(f"{k}={v:.1f}" for k, v in times.items())
        except Exception as err:  # a timing script: report and go on
            status = f"FAIL {type(err).__name__}: {str(err)[:300]}"
        print(f"{name:22s} {time.perf_counter() - start:7.1f}s {status}", flush=True)
