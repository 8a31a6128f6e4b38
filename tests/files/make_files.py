"""Write one file (or folder) of every save format, as the slimtorch on the path writes them, with what each
must compute when loaded again (``expected.safetensors``). ``tests/test_container.py`` loads the files an
earlier release wrote with today's code:

    PYTHONPATH=<that release>/src python tests/files/make_files.py tests/files/<its version>

Only public functions are used, so that any release can run it. The models are tiny (a few kB per file).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from slimtorch import apply_masks_, compact_, compute_masks
from slimtorch.io import save_compacted, save_masks
from slimtorch.lora import LoRAConfig, add_lora_, save_lora
from slimtorch.models.modelfile import save_model
from slimtorch.models.registry import ModelSpec, build_model
from slimtorch.quant import QuantConfig, quantize
from slimtorch.quant.saving import save_quantized
from slimtorch.recover.checkpoint import save_checkpoint

SPEC = ModelSpec(name="DigitsCNN", kwargs={"width": 4})
IMAGES = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
VECTORS = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
TOKENS = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(2))


def digits() -> nn.Module:
    torch.manual_seed(0)
    return build_model(SPEC).eval()


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(2)
    return BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                vocab_size=32, max_position_embeddings=16)).eval()


def pruned_files(out: Path, expected: dict[str, torch.Tensor]) -> None:
    """Masks, model files (masked, compacted), a compacted model's folder, a quantized model."""
    net = digits()
    masks = compute_masks(net, [{"op_names": ["down.0"], "sparse_ratio": 0.5}], example_inputs=IMAGES)
    save_masks(masks, out / "masks.safetensors")
    expected.update({f"masks.{k}": v for k, v in masks.items()})
    apply_masks_(net, masks)
    save_model(out / "model-masked.safetensors", net, SPEC)
    expected["model-masked"] = net(IMAGES)
    compact_(net, masks, example_inputs=IMAGES)
    save_model(out / "model-compacted.safetensors", net, SPEC)
    save_compacted(net, out / "compacted")
    expected["compacted"] = net(IMAGES)
    q = quantize(digits(), QuantConfig(method="dynamic_int8"))
    save_quantized(q, out / "quantized.safetensors")
    expected["quantized"] = q(IMAGES)


def training_files(out: Path, expected: dict[str, torch.Tensor]) -> None:
    """A training checkpoint (model and Adam state) and a LoRA adapter (PEFT's layout)."""
    net = mlp()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net(VECTORS).sum().backward()
    opt.step()
    save_checkpoint(out / "checkpoint.safetensors", modules={"model": net}, optimizer=opt, extra={"epoch": 1})
    expected["checkpoint"] = net(VECTORS)
    expected["checkpoint.exp_avg"] = opt.state[net[0].weight]["exp_avg"]
    tuned = mlp()
    add_lora_(tuned, LoRAConfig(r=2, target_modules=("0",)))
    with torch.no_grad():
        tuned[0].lora_B["default"].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    save_lora(tuned, out / "lora")
    expected["lora"] = tuned(VECTORS)


def hf_files(out: Path, expected: dict[str, torch.Tensor]) -> None:
    """A Hugging Face folder of a BERT with a head removed (its sizes recorded in config.json)."""
    from slimtorch.integrations.hf.compaction import compact_hf_, unit_masks
    from slimtorch.integrations.hf.folders import save_hf_folder

    bert = tiny_bert()
    compact_hf_(bert, unit_masks(bert, {"encoder.layer.0.attention": [1]}))
    save_hf_folder(bert, out / "hf")
    expected["hf"] = bert(input_ids=TOKENS).last_hidden_state


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    expected: dict[str, torch.Tensor] = {"images": IMAGES, "vectors": VECTORS, "tokens": TOKENS}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned_files(out, expected)
        hf_files(out, expected)
    training_files(out, expected)
    save_file({k: v.detach().contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
