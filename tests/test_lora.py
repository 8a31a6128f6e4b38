"""LoRA: merging equals the unmerged forward; PEFT-layout files round-trip; bad files are typed errors."""

import json

import pytest
import torch
from torch import nn

from slimtorch.errors import CheckpointError, ConfigError, NoMatchError
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
    assert trainable == {f"{layer}.lora_{ab}.weight" for layer in ("0", "3") for ab in "AB"}


@pytest.mark.parametrize("base", ["float", "factorized", "int4"])
def test_merge_equals_unmerged_forward(base):
    model, x = net().eval(), torch.randn(4, 3, 6, 6)
    target = ("0", "3", "5")
    if base == "factorized":
        factorize_(model, LowRankConfig(rank=4, op_names=("3",)))
        target = ("0", "3.0", "3.1", "5")
    elif base == "int4":
        model = quantize(model, QuantConfig(method="int4_weight", op_names=("3",), group_size=16))
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
