"""The seeds' NNI code runs on slimtorch with its import changed, and nothing else.

The book chapter on model simplification and NNI's compression examples are read from the seed folder
(``../shared/seeds``, or ``SLIMTORCH_SEEDS_DIR``; the tests skip without it). Every fenced block is taken
as written; the only change to the code is in its import lines (``nni.compression.pytorch`` ->
``slimtorch.compat.nni``, ``nni.compression`` -> ``slimtorch.compat.nni.compression``). Three defects of
the pages' rendering are undone, not the code: non-breaking spaces for indentation, a line break lost
between two statements (``CNN()print(``), and printed output run into the code that printed it
(``print(...)2122186``): that output is checked against what the code prints here. Blocks that are not
Python (``pip install``, log lines, printed models) are named, and the printed models are compared with ours.

What the seeds use but define elsewhere (the book's ``CNN`` and ``count_parameters``, its CIFAR-10
``train_loader``, the fine-tuned BERT of the NNI example) is given on small random data: the code runs,
its numbers are not the seeds'.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.compat.nni import L1NormPruner, ModelSpeedup, MovementPruner, TaylorWeightPruner
from slimtorch.errors import NoMatchError
from slimtorch.models import BookCNN
from slimtorch.prune.loop import Evaluator

SEEDS = Path(os.environ.get("SLIMTORCH_SEEDS_DIR", Path(__file__).resolve().parents[2] / "shared" / "seeds"))
FENCE = re.compile(r"^[ \t]*```(\w*)[ \t]*\n(.*?)\n[ \t]*```", re.S | re.M)


def seed_text(marker: str) -> str:
    """The seed document containing ``marker`` (files are named by hash, so found by content)."""
    found = [p for p in sorted(SEEDS.glob("*.txt")) if marker in p.read_text(encoding="utf-8")]
    if not found:
        pytest.skip(f"no seed document with {marker!r} in {SEEDS} (set SLIMTORCH_SEEDS_DIR)")
    return found[0].read_text(encoding="utf-8")


def change_imports(code: str) -> str:
    """The one change a reader makes: the NNI package in import lines becomes slimtorch's."""
    def fix(line: str) -> str:
        if not re.match(r"\s*(from|import)\s+nni\b", line):
            return line
        line = re.sub(r"\bnni\.compression\.pytorch\b", "slimtorch.compat.nni", line)
        return re.sub(r"\bnni\.compression\b", "slimtorch.compat.nni.compression", line)

    return "\n".join(fix(line) for line in code.splitlines())


def undo_rendering(code: str) -> tuple[str, list[str]]:
    """Code with plain spaces and lost line breaks restored, and the printed output the page ran into it (lines
    of digits)."""
    code = re.sub(r"\)(print\()", r")\n\1", code.replace("\xa0", " "))
    lines, printed = [], []
    for line in code.splitlines():
        if (match := re.fullmatch(r"(.*\))(\d+)", line)) is not None:  # print(...)2122186: code, then its output
            lines.append(match[1])
            printed.append(match[2])
        elif re.fullmatch(r"\d+", line.strip()):
            printed.append(line.strip())
        else:
            lines.append(line)
    return "\n".join(lines), printed


def blocks(text: str) -> list[str]:
    return [textwrap.dedent(m[2]) for m in FENCE.finditer(text)]


def is_python(code: str) -> bool:
    try:
        compile(code, "<seed>", "exec")
    except SyntaxError:
        return False
    return True


def run(code: str, namespace: dict) -> list[str]:
    """Run one block (imports changed, rendering undone); check the output the page shows, return the rest."""
    code, shown = undo_rendering(change_imports(code))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<seed block>", "exec"), namespace)
    printed = out.getvalue().split()
    assert printed[: len(shown)] == shown, (code, printed, shown)
    return printed


def count_parameters(model: nn.Module) -> int:
    """The book's helper (defined in its chapter 1 notebook): trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cifar_loader(batches: int = 2, size: int = 8) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(batches * size, 3, 32, 32, generator=gen), torch.randint(0, 10, (batches * size,), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=size)


def mlp_with_layer4() -> nn.Module:
    """The overview's "model": its config list excludes a Linear named ``layer4`` (the output layer)."""
    return nn.Sequential(OrderedDict(
        layer1=nn.Linear(32, 64), relu1=nn.ReLU(), layer2=nn.Linear(64, 64), relu2=nn.ReLU(),
        layer3=nn.Linear(64, 32), relu3=nn.ReLU(), layer4=nn.Linear(32, 10),
    ))


def test_the_book_chapter_runs_with_the_import_changed():
    code_blocks = blocks(seed_text("from nni.compression.pytorch import pruning, speedup"))
    python = [b for b in code_blocks if is_python(undo_rendering(b)[0])]
    others = [b for b in code_blocks if b not in python]
    assert [b.split()[0] for b in others] == ["pip", "[2023-09-23"]  # the install command, NNI's log lines
    # The overview, on a model with a `layer4` (its config excludes one), then the CIFAR-10 CNN.
    namespace = {"__name__": "__seed__", "model": mlp_with_layer4(), "CNN": BookCNN,
                 "count_parameters": count_parameters, "train_loader": cifar_loader()}
    overview, rest = python[:5], python[5:]
    assert "layer4" in overview[1] and "ModelSpeedup" in overview[3]
    for index, code in enumerate(overview):
        if index == 3:  # the text between: `compress()` returns the masks; an input sample is needed
            _, namespace["masks"] = namespace["pruner"].compress()
            namespace["input_sample"] = torch.randn(4, 32)
        run(code, namespace)
    small = namespace["model"]
    assert [small.layer1.out_features, small.layer2.out_features, small.layer3.out_features] == [45, 45, 22]
    assert small.layer4.out_features == 10 and small(torch.randn(2, 32)).shape == (2, 10)
    printed = [run(code, namespace) for code in rest]
    assert printed[0] == ["2122186"] and printed[2] == ["1059306"]  # the chapter's own figures
    cnn = namespace["model"]
    assert cnn.layer1[0].out_channels == 16 and cnn.layer2[0].out_channels == 32
    assert cnn(next(iter(namespace["train_loader"]))[0]).shape == (8, 10)
    # The quiz's config list: 25% of the convolutions, the one in `layer2` excluded.
    _, masks = L1NormPruner(BookCNN(), namespace["config_list"]).compress()
    assert sorted(masks) == ["layer1.0.bias", "layer1.0.weight"]
    assert int(masks["layer1.0.weight"].flatten(1).any(dim=1).sum()) == 24


def _normalised(printed: str) -> str:
    return re.sub(r"\s+", " ", printed).strip()


def test_nni_example_pruning_and_speedup_run_with_the_import_changed():
    text = seed_text("TaylorWeightPruner")
    code_blocks = blocks(text)
    net_code = next(b for b in code_blocks if b.startswith("class Net"))
    config_code = next(b for b in code_blocks if b.startswith("config_list") and "fc2" in b)
    wrapped, sped_up = (b for b in code_blocks if b.lstrip().startswith("Net("))
    # The example leaves out its imports; these are the import lines it needs.
    namespace = {"__name__": "__seed__", "nn": nn, "F": F, "torch": torch}
    run(net_code, namespace)
    run(config_code, namespace)
    model = namespace["Net"]()
    pruner = L1NormPruner(model, namespace["config_list"])
    _, masks = pruner.compress()
    pruner._unwrap_model()
    ModelSpeedup(model, torch.rand(3, 1, 28, 28), masks).speedup_model()
    assert _normalised(str(model)) == _normalised(sped_up)  # the printed model after speed-up, exactly
    assert "PrunerModuleWrapper" in wrapped  # NNI wraps the layers while pruning; slimtorch masks them in place
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.fixture
def tiny_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    path = tmp_path / "finetuned_model_state.pth"
    torch.save(model.state_dict(), path)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (4, 12), generator=gen),
             "labels": torch.randint(0, 3, (4,), generator=gen)} for _ in range(2)]
    evaluator = Evaluator(train_data=data, loss_fn=lambda m, batch: m(**batch).loss, lr=1e-3)
    return transformers.BertForSequenceClassification(config), str(path), evaluator


def test_nni_example_transformer_configs_run_with_the_import_changed(tiny_bert):
    """The BERT example's code: loading the fine-tuned weights, the attention config list (Movement pruner), the
    FFN config list (TaylorWeightPruner). Its FFN layer name lacks a dot (`layer{i}` for `layer.{i}`): NNI
    would prune nothing and say nothing; slimtorch names the layer meant."""
    model, path, evaluator = tiny_bert
    code_blocks = blocks(seed_text("TaylorWeightPruner"))
    load, attention, ffn = (next(b for b in code_blocks if key in b) for key in
                            ("load_state_dict", "op_partial_names", "ffn_config_list.append"))
    namespace = {"__name__": "__seed__", "torch": torch, "finetuned_model": model, "finetuned_model_state_path": path,
                 "layers_num": 2, "ffn_config_list": [], "layer_remained_idxs": [], "sparsity_per_iter": 0.25}
    for code in (load, attention, ffn):
        run(code, namespace)
    _, masks = MovementPruner(model, namespace["config_list"], evaluator, training_epochs=1, warm_up_step=0,
                              cool_down_beginning_step=2).compress()
    parts = ("self.query", "self.key", "self.value", "output.dense")
    assert {k.rpartition(".")[0] for k in masks} == {f"bert.encoder.layer.{i}.attention.{p}" for i in range(2)
                                                    for p in parts}
    with pytest.raises(NoMatchError, match=r"bert\.encoder\.layer\.0\.intermediate\.dense"):
        TaylorWeightPruner(model, namespace["ffn_config_list"], evaluator)
    fixed = [{**entry, "op_names": [n.replace("layer0", "layer.0") for n in entry["op_names"]]}
             for entry in namespace["ffn_config_list"]]
    _, masks = TaylorWeightPruner(model, fixed, evaluator, training_batches=2).compress()
    assert int(masks["bert.encoder.layer.0.intermediate.dense.weight"].any(dim=1).sum()) == 48
