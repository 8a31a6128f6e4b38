"""LoRA: merging equals the unmerged forward; PEFT-layout files round-trip; bad files are typed errors; LoRA on
compacted, masked and low-bit models."""

import copy
import json
import sys

import pytest
import torch
from torch import nn

import slimtorch.lora
from slimtorch import compact_, get_masks
from slimtorch.compact.layers import SlimMultiheadAttention
from slimtorch.errors import CheckpointError, ConfigError, NoMatchError, SlimWarning
from slimtorch.lora import LoRAConfig, add_lora_, load_lora_, lora_state_dict, merge_lora_, save_lora
from slimtorch.lowrank import LowRankConfig, factorize_
from slimtorch.quant import QuantConfig, quantize


def net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def _perturb_adapters(model):
    """B starts at zero; give it values so the adapters actually change the function."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


def test_fresh_adapters_leave_the_function_unchanged_and_only_they_train():
    model, x = net(), torch.randn(2, 3, 6, 6)
    ref = model(x)
    add_lora_(model, LoRAConfig(r=2, target_modules=("0", "3")))
    torch.testing.assert_close(model(x), ref)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{layer}.lora_{ab}.default.weight" for layer in ("0", "3") for ab in "AB"}


@pytest.mark.parametrize("base", ["float", "factorized", "int4", "binary"])
def test_merge_equals_unmerged_forward(base):
    model, x = net().eval(), torch.randn(4, 3, 6, 6)
    target = ("0", "3", "5")
    if base == "factorized":
        factorize_(model, LowRankConfig(rank=4, op_names=("3",)))
        target = ("0", "3.0", "3.1", "5")
    elif base == "int4":
        model = quantize(model, QuantConfig(method="int4_weight", op_names=("3",), group_size=16))
    elif base == "binary":  # a 1-bit conv as well as a 1-bit linear
        model = quantize(model, QuantConfig(method="binary_weight", op_names=("0", "3")))
    add_lora_(model, LoRAConfig(r=3, lora_alpha=6, target_modules=target))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):  # a few real training steps, so A and B are both away from their init
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    _perturb_adapters(model)
    with torch.no_grad():
        unmerged = model(x)
        merge_lora_(model)
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert type(model.get_submodule("3" if base != "factorized" else "3.1")) is nn.Linear


def test_peft_layout_round_trip(tmp_path):
    model, x = net(), torch.randn(2, 3, 6, 6)
    config = LoRAConfig(r=2, lora_alpha=4, target_modules=("3", "5"), use_rslora=True)
    add_lora_(model, config)
    _perturb_adapters(model)
    save_lora(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 2 and saved["target_modules"] == ["3", "5"]
    keys = set(lora_state_dict(model))
    assert "base_model.model.3.lora_A.weight" in keys and "base_model.model.5.lora_B.weight" in keys
    fresh = net()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora" not in k})
    load_lora_(fresh, tmp_path)
    torch.testing.assert_close(fresh(x), model(x))


def test_mismatched_adapter_is_refused_before_touching_the_model(tmp_path):
    small = nn.Sequential(nn.Linear(4, 4))
    add_lora_(small, LoRAConfig(r=2, target_modules=("0",)))
    save_lora(small, tmp_path)
    other = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_lora_(other, tmp_path)
    assert type(other[0]) is nn.Linear and other[0].weight.requires_grad
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["0"],
                                                              "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        load_lora_(nn.Sequential(nn.Linear(4, 4)), tmp_path)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_lora_(other, tmp_path / "missing")


def test_bad_targets_and_configs():
    with pytest.raises(NoMatchError, match="fc9"):
        add_lora_(net(), LoRAConfig(target_modules=("fc9",)))
    with pytest.raises(ConfigError, match="ReLU"):
        add_lora_(net(), LoRAConfig(target_modules=("1",)))
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        merge_lora_(net())
    with pytest.raises(ConfigError, match="'r'"):
        LoRAConfig(target_modules=("q",), r=0)
    cfg = LoRAConfig(target_modules=("query", "value"), r=4, lora_dropout=0.1)
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg
    assert LoRAConfig.from_peft(cfg.to_peft()) == cfg


def _train(model, x, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_lora_on_a_compacted_model_keeps_its_masks_and_its_adapters_travel(tmp_path):
    """Layers of per-layer sizes with the masks compaction kept: the adapters train on top, the masks stay on
    the base layers, the adapter file loads into another copy of the compacted model, and merging warns that the
    masked layer is dense again while computing what the adapted model computes."""
    model, x = net().eval(), torch.randn(4, 3, 6, 6)
    mask = torch.ones(8, 3, 3, 3, dtype=torch.bool)
    mask[:3] = False  # three filters go whole
    mask[3:, 0, 0, 0] = False  # and one weight of each kept filter stays masked
    compact_(model, {"0.weight": mask, "0.bias": torch.arange(8) >= 3}, example_inputs=x)
    assert model[0].out_channels == 5 and model[3].in_features == 5 * 36
    copy_of_compacted = copy.deepcopy(model)
    add_lora_(model, LoRAConfig(r=2, target_modules=("0", "3", "5")))
    assert isinstance(model[0], slimtorch.lora.LoRAConv2d) and isinstance(model[3], slimtorch.lora.LoRALinear)
    _train(model, x)
    _perturb_adapters(model)
    assert torch.equal(get_masks(model)["0.base_layer.weight"], mask[3:])
    assert not model[0].base_layer.weight[:, 0, 0, 0].any()
    save_lora(model, tmp_path)
    load_lora_(copy_of_compacted, tmp_path)
    with torch.no_grad():
        adapted = model(x)
        torch.testing.assert_close(copy_of_compacted(x), adapted)
        with pytest.warns(SlimWarning, match="no longer sparse"):
            merge_lora_(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-4)
    assert type(model[0]) is nn.Conv2d and model[0].out_channels == 5 and not get_masks(model)


def test_without_peft_every_lora_function_says_what_to_install(monkeypatch, tmp_path):
    model = net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` fails as if it were not installed
    config = LoRAConfig(target_modules=("3",))  # settings need no PEFT
    calls = [lambda: add_lora_(model, config), lambda: merge_lora_(model), lambda: save_lora(model, tmp_path / "a"),
             lambda: load_lora_(model, tmp_path), lambda: lora_state_dict(model), config.to_peft]
    for call in calls:
        with pytest.raises(ConfigError, match=r"pip install slimtorch\[peft\]"):
            call()
    with pytest.raises(ConfigError, match=r"pip install slimtorch\[peft\]"):
        slimtorch.lora.LoRALinear
    assert type(model[3]) is nn.Linear and not list(tmp_path.iterdir())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_adapters_are_added_in_one_call():
    """A second add_lora_ would leave two configs in one model, and a file that no loader could read back."""
    model = net()
    add_lora_(model, LoRAConfig(r=2, target_modules=("0",)))
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        add_lora_(model, LoRAConfig(r=4, target_modules=("5",)))
    assert type(model[5]) is nn.Linear and not model[5].weight.requires_grad


def test_merging_a_conv_keeps_its_padding_mode():
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")), torch.randn(2, 3, 5, 5)
    add_lora_(model, LoRAConfig(r=2, target_modules=("0",)))
    _perturb_adapters(model)
    with torch.no_grad():
        adapted = model(x)
        merge_lora_(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-4)


def test_merging_keeps_the_dtype():
    model, x = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16)
    add_lora_(model, LoRAConfig(r=2, target_modules=("0",)))
    _perturb_adapters(model)
    with torch.no_grad():
        adapted = model(x)
        merge_lora_(model)
        assert model[0].weight.dtype == torch.bfloat16
        torch.testing.assert_close(model(x), adapted, atol=0.05, rtol=0.02)


def test_attention_output_projections():
    """torch's nn.MultiheadAttention never calls its out_proj (an adapter there would change nothing): refused.
    The compacted attention calls it: the adapter changes the output and merges exactly."""
    x = torch.randn(2, 5, 16)
    plain = nn.MultiheadAttention(16, 2, batch_first=True)
    with pytest.raises(ConfigError, match="without calling it"):
        add_lora_(plain, LoRAConfig(r=2, target_modules=("out_proj",)))
    assert type(plain.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    slim = SlimMultiheadAttention(16, 2, batch_first=True).eval()
    slim.scaling = slim.head_dim ** -0.5
    with torch.no_grad():
        before = slim(x, x, x)[0]
        add_lora_(slim, LoRAConfig(r=2, target_modules=("out_proj",)))
        _perturb_adapters(slim)
        adapted = slim(x, x, x)[0]
        assert not torch.allclose(adapted, before)
        merge_lora_(slim)
        torch.testing.assert_close(slim(x, x, x)[0], adapted, atol=1e-5, rtol=1e-4)


def test_a_failure_inside_peft_leaves_the_model_as_it_was(monkeypatch):
    from peft.tuners.lora import LoraModel

    model = net()
    state, layers = {k: v.clone() for k, v in model.state_dict().items()}, list(model)
    real, calls = LoraModel._create_and_replace, []

    def fails_on_the_second_layer(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "_create_and_replace", fails_on_the_second_layer)
    with pytest.raises(ConfigError, match="PEFT could not add the adapters: RuntimeError: out of memory"):
        add_lora_(model, LoRAConfig(r=2, target_modules=("0", "3")))
    assert list(model) == layers and all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "peft_config") and not hasattr(model, "slimtorch_lora")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
