"""LoRA and PEFT read each other's adapters: one saved by slimtorch loads into ``peft.PeftModel`` and computes
the same, and one saved by PEFT loads with ``load_lora_`` and computes the same (a tiny BERT built from its
config, and a conv net PEFT knows as a custom model)."""

import copy
import json

import pytest
import torch
from torch import nn

from slimtorch.errors import CheckpointError
from slimtorch.lora import LoRAConfig, add_lora_, load_lora_, save_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                     vocab_size=40, max_position_embeddings=16)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    return transformers.BertModel(config).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    return net, torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


CASES = {
    "bert": (_bert, ("query", "value", "intermediate.dense")),
    "cnn": (_cnn, ("0", "3")),
}


def _run(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _perturb(model: nn.Module) -> None:
    """B starts at zero: give every adapter weight values so that a wrong placement shows in the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_adapter_saved_here_loads_into_peft(tmp_path, case):
    make, targets = CASES[case]
    model, inputs = make()
    base = copy.deepcopy(model)
    add_lora_(model, LoRAConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=True))
    _perturb(model)
    save_lora(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert theirs.peft_config["default"].use_rslora
    torch.testing.assert_close(_run(theirs, inputs), _run(model, inputs))
    assert _run(model, inputs).sub(_run(make()[0], inputs)).abs().max() > 1e-3  # the adapters do change it


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_adapter_saved_by_peft_loads_here(tmp_path, case):
    make, targets = CASES[case]
    model, inputs = make()
    base = copy.deepcopy(model)
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=16, target_modules=list(targets)))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    load_lora_(base, tmp_path)
    assert base.slimtorch_lora["lora_alpha"] == 16 and sorted(base.slimtorch_lora["target_modules"]) == sorted(targets)
    torch.testing.assert_close(_run(base, inputs), _run(theirs, inputs))


@pytest.mark.parametrize("setting", [
    {"use_dora": True}, {"alora_invocation_tokens": [5, 6]}, {"init_lora_weights": "pissa"},
    {"target_modules": ".*query"}, {"exclude_modules": ".*key"}, {"layers_to_transform": [0]}, {"lora_bias": True},
])
def test_peft_settings_that_change_what_an_adapter_computes_are_refused(tmp_path, setting):
    """Every such setting is named; loading it as plain LoRA would compute something else without a word."""
    model, _ = _bert()
    (tmp_path / "adapter").mkdir()
    config = LoRAConfig(r=2, target_modules=("query",)).to_peft() | setting
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=next(iter(setting))):
        load_lora_(model, tmp_path / "adapter")
    assert not hasattr(model, "slimtorch_lora") and all(p.requires_grad for p in model.parameters())


def test_a_pickled_peft_adapter_is_never_read(tmp_path):
    model, _ = _bert()
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["query"]))
    theirs.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    with pytest.raises(CheckpointError, match="adapter_model.bin, a pickle, which is never read"):
        load_lora_(model, tmp_path)
    assert not hasattr(model, "slimtorch_lora")
