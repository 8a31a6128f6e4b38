"""Every script in benchmarks/ runs in its smoke mode (tiny sizes, no data files, nothing written) and prints
the tables it promises; benchmarks import only public names (a name in its module's ``__all__``)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import runpy
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py"))

Table = tuple[list[str], list[list[str]]]  # header cells, rows of cells


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # a backslash-escaped pipe is text


def tables(text: str) -> list[Table]:
    """The Markdown tables of ``text`` in order (a run of lines starting with ``|``: header, separator, rows)."""
    found, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            assert len(block) > 1 and set(block[1]) <= set("|-: "), block  # the delimiter row under the header
            found.append((_cells(block[0]), [_cells(row) for row in block[2:]]))
            block = []
    return found


def smoke(name: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``benchmarks/<name> --smoke`` run in this process (the imports are shared: seconds, not tens of them),
    from an empty folder that must stay empty (no data files found there, no cache written); its stdout."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(BENCHMARKS / name), run_name=f"benchmark_{name[:-3]}")["main"](["--smoke"])
    finally:
        torch.set_num_threads(threads)
    assert list(tmp_path.iterdir()) == []
    return capsys.readouterr().out


def check_tables(out: str, expected: list[tuple[list[str], int]]) -> list[Table]:
    """``out`` holds exactly the ``expected`` tables (header cells, number of rows), every row as wide as its
    header."""
    found = tables(out)
    assert [(header, len(rows)) for header, rows in found] == expected, out
    for header, rows in found:
        assert all(len(row) == len(header) for row in rows), out
    return found


QUANT = (["backend / method", "kernels", "size", "latency", "speed-up vs fp32", "quality"], 15)
PIPELINE = ["stage", "state", "params", "size", "latency median (best)", "speed-up median (best)"]
EXPECTED: dict[str, list[tuple[list[str], int]]] = {
    "adversarial_counts.py": [(["table", "category", "cases", "must fail cleanly", "must succeed"], 33),
                              (["rule family", "property tests", "exact", "keeps the channels", "either"], 14)],
    "commhook.py": [(["method", "bytes sent / process", "compression", "test accuracy", "vs all-reduce",
                      "train time"], 6)],
    "compaction.py": [(["model", "library", "graph build (s)", "prune + compact (s)", "x Torch-Pruning's",
                        "fastest run (s)", "x Torch-Pruning's fastest", "params", "MACs removed",
                        "latency b1 1 thread (ms)", "latency removed", "realised / MACs"], 3)],
    "criteria.py": [(["criterion", "pruned", "after pruning", "after fine-tune", "model", "params", "non-zero params",
                      "s"], 20),
                    (["method", "pruned", "training epochs", "accuracy", "model", "params", "non-zero params",
                      "latency ms", "s"], 11)],
    "llm_recover.py": [(["recovery", "parameters", "held by process 0", "loss, first epoch", "loss, last epoch",
                         "steps", "CPU s", "peak RSS MiB"], 2)],
    "llm_scale.py": [(["model", "params", "point", "wall (s)", "CPU (s)", "CPU s / B params", "CPU s / B layer params",
                       "peak RSS (GiB)",
                       "above imports (GiB)", "÷ fp32 weights", "÷ fp16 weights", "one layer fp32 (GiB)",
                       "weights fp32 (GiB)"], 7 + bool(importlib.util.find_spec("torch_pruning")))],
    "llm_structured.py": [(["pruned", "method", "params", "params removed", "perplexity", "x dense",
                            "after LoRA recovery", "x dense", "after LoRA distillation", "x dense", "prune s",
                            "recovery s"], 12)],
    "pipeline.py": [([*PIPELINE, "top-1", "what ran"], 7), ([*PIPELINE, "cosine", "what ran"], 7)],
    "quantize.py": [(["kernel", "latency", "speed-up vs fp32"], 5), QUANT, QUANT],
    "quantizers.py": [(["quantizer", "method", "bits (weights / inputs)", "kernels", "accuracy", "vs fp32",
                        "latency ms", "x fp32", "s"], 8)],
    "sentence_task.py": [(["model", "distillation", "params", "MACs", "latency 1", "latency 8", "speed-up",
                           "accuracy", "vs dense", "training"], 7)],
    "sensitivity.py": [(["layer", "weights", "10%", "20%", "30%", "40%", "50%", "60%", "70%", "80%", "90%", "95%",
                         "98%"], 5)],
    "sparse_kernels.py": [(["model", "masks", "dense file (B)", "masked, dense + bool masks (B)", "bitmask (B)",
                            "CSR (B)", "smaller per tensor (B)", "stored / dense", "report's stored size (B)"], 7),
                           (["layer", "batch", "dense (ms)", "50%", "70%", "80%", "90%", "95%", "98%", "99%",
                             "break-even"], 2)],
    "stages.py": [(["stage", "fastest (ms)", "median (ms)"], 25)],
    "table61_steps.py": [(["sparsity per layer", "params (compacted)", "forward FLOPs/image", "masked step",
                           "compacted step", "compacted / dense", "book's time / dense"], 9)],
    "transformer_pruning.py": [(["sparsity", "method", "perplexity", "x dense", "prune time", "paper (LLaMA-2-7B)",
                                 "paper x dense"], 7),
                               (["model", "params", "MACs", "latency 1", "latency 8", "speed-up", "cosine mean",
                                 "cosine min", "top-1 NN", "top-10 NN", "distillation"], 9)],
    "zoo_counts.py": [(["family", "model", "input", "slimtorch", "Torch-Pruning"], 2),
                      (["library", "models", "compacted", "exact"], 2)],
}


def _records(table: Table) -> list[dict[str, str]]:
    header, rows = table
    return [dict(zip(header, row, strict=True)) for row in rows]


def _count(cell: str) -> int:
    return int(cell.replace(",", ""))


def check_criteria(out: str, found: list[Table]) -> None:
    criteria, methods = (_records(t) for t in found)
    dense = _count(methods[0]["params"])
    for row in criteria + methods[1:]:
        params, nonzero = _count(row["params"]), _count(row["non-zero params"])
        if "channels" in row["pruned"]:  # channel-pruned models are really smaller
            assert row["model"] == "compacted" and params == nonzero < dense, row
        else:  # 90% of the weights of every layer but the first conv are zero, the model keeps its size
            assert row["model"] == "masked" and params == dense and nonzero < 0.2 * dense, row


def check_quantize(out: str, found: list[Table]) -> None:
    for table in found[1:]:  # slimtorch's methods and ONNX Runtime all run (a peer may fail: that is a result)
        ours = [r for r in _records(table) if not r["backend / method"].startswith("torchao")]
        assert len(ours) == 12 and all(r["kernels"] != "-" for r in ours), ours


def check_quantizers(out: str, found: list[Table]) -> None:
    kernels = {r["quantizer"]: r["kernels"].split(" ")[0] for r in _records(found[0])}
    assert kernels == {"fp32": "real", "QATQuantizer": "simulated", "PtqQuantizer": "simulated",
                       "LsqQuantizer": "simulated", "DoReFaQuantizer": "simulated", "BNNQuantizer": "simulated",
                       "static_int8": "real", "qat_int8, converted": "real"}, kernels


def check_sensitivity(out: str, found: list[Table]) -> None:
    assert "top-1 accuracy on 128 test images" in out  # --eval-limit holds (it counted whole batches of 500)


def check_pipeline(out: str, found: list[Table]) -> None:
    stages = ["dense", "prune", "compact", "recover", "quantize", "export", "quantize (ONNX Runtime)"]
    assert all([r["stage"] for r in _records(t)] == stages for t in found), out


def check_compaction(out: str, found: list[Table]) -> None:
    rows = _records(found[0])
    assert [r["library"] for r in rows] == ["slimtorch", "slimtorch, verify=False", "torch-pruning"]
    assert all(r["params"] == rows[0]["params"] for r in rows), rows  # no library failed, all removed the same


def check_sparse_kernels(out: str, found: list[Table]) -> None:
    storage = _records(found[0])
    for row in storage[1:]:  # every masked model is stored smaller than dense, and report gives that size
        stored, dense = _count(row["smaller per tensor (B)"]), _count(row["dense file (B)"])
        assert stored < dense < _count(row["masked, dense + bool masks (B)"]), row
        assert abs(_count(row["report's stored size (B)"]) - stored) < 4096, row  # (the file adds its header)


def check_stages(out: str, found: list[Table]) -> None:
    times = {r["stage"]: float(r["fastest (ms)"]) for r in _records(found[0])}
    assert times["compute_masks, in all"] > 0 and times["compact_, in all"] > 0, times


def check_llm_scale(out: str, found: list[Table]) -> None:
    rows = _records(found[0])
    expected = ["stream:magnitude", "stream:sparsegpt:2:4", "memory:magnitude", "memory:sparsegpt:2:4",
                "structured:flap", "structured:flap:ffn", "layers:block"]
    if importlib.util.find_spec("torch_pruning"):  # Torch-Pruning's compaction beside ours where installed
        expected.append("torch-pruning:ffn")
    assert [r["point"] for r in rows] == expected, rows
    assert all(float(r["peak RSS (GiB)"]) > 0 for r in rows), rows  # every point ran in its own process


def check_sentence_task(out: str, found: list[Table]) -> None:
    rows = _records(found[0])
    assert [(r["model"], r["distillation"]) for r in rows] == [("dense (fine-tuned)", "-")] + [
        (s, d) for s in ("heads25-ffn25", "heads50-ffn50", "layers3")
        for d in ("logits + hidden states", "none (labels)")], rows
    dense = float(rows[0]["params"].rstrip("M"))
    assert all(float(r["params"].rstrip("M")) < dense for r in rows[1:]), rows  # every pruned model is smaller


def check_zoo_counts(out: str, found: list[Table]) -> None:
    per_model, counts = (_records(t) for t in found)
    assert all(r["slimtorch"].startswith("exact: ") for r in per_model), per_model
    assert counts[0] == {"library": "slimtorch", "models": "2", "compacted": "2", "exact": "2"}, counts


CHECKS = {"criteria.py": check_criteria, "quantize.py": check_quantize, "quantizers.py": check_quantizers,
          "sensitivity.py": check_sensitivity, "pipeline.py": check_pipeline, "compaction.py": check_compaction,
          "stages.py": check_stages, "llm_scale.py": check_llm_scale, "sparse_kernels.py": check_sparse_kernels,
          "zoo_counts.py": check_zoo_counts, "sentence_task.py": check_sentence_task}


def test_every_benchmark_has_a_smoke_test() -> None:
    assert sorted(EXPECTED) == SCRIPTS


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_smoke_mode_prints_its_tables(name, capsys, tmp_path, monkeypatch) -> None:
    out = smoke(name, capsys, tmp_path, monkeypatch)
    found = check_tables(out, EXPECTED[name])
    if name in CHECKS:
        CHECKS[name](out, found)


def non_public_imports(source: str) -> list[str]:
    """Every slimtorch import of ``source`` (inside functions too) that is not public: a private module or
    name, a name missing from its module's ``__all__``, a module without ``__all__``, a star import, or an
    ``import slimtorch.<module>`` whose attributes could be anything."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("slimtorch.")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "slimtorch":
            public = _public_names(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names if a.name not in public or a.name[0] == "_"]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slimtorch":
            found += [] if node.attr in _public_names("slimtorch") else [f"slimtorch.{node.attr}"]
    return found


def _public_names(module: str) -> set[str]:
    if any(part.startswith("_") for part in module.split(".")):
        return set()
    return set(getattr(importlib.import_module(module), "__all__", ()))


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports_only_public_names(name) -> None:
    assert non_public_imports((BENCHMARKS / name).read_text()) == []


def test_the_import_check_finds_private_and_unlisted_names() -> None:
    source = """
from slimtorch import compact_, compute_masks
from slimtorch.report import _call, saved_size
import slimtorch.graph.trace
def f():
    from slimtorch.compact import plan as plan_module
    from slimtorch.graph._private import thing
    from slimtorch.quant import *
    return slimtorch.report, slimtorch.secret
"""
    assert non_public_imports(source) == [
        "slimtorch.report._call", "slimtorch.graph.trace", "slimtorch.compact.plan", "slimtorch.graph._private.thing",
        "slimtorch.quant.*", "slimtorch.secret"]


def test_stages_switches_find_what_they_replace_and_put_it_back() -> None:
    """``stages.py --measured --cut-every-layer`` replace two internal functions (the smoke run uses neither)."""
    stages = runpy.run_path(str(BENCHMARKS / "stages.py"), run_name="benchmark_stages")
    for path, attr in [(stages["PLAN"], "known_structure"), (stages["BLOCKS"], "_pays")]:
        owner = importlib.import_module(path)
        original = getattr(owner, attr)
        with stages["replaced"](path, attr, lambda _: "switched"):
            assert getattr(owner, attr) == "switched"
        assert getattr(owner, attr) is original


@pytest.mark.slow
def test_transformer_folders_mode_measures_saved_settings_beside_the_original(capsys, tmp_path, monkeypatch) -> None:
    """``transformer_pruning.py folders DIR`` loads every saved setting of DIR and measures it with the original
    in one table: the original agrees with itself exactly; a model with layers dropped has fewer MACs and
    agrees less."""
    from slimtorch.integrations.hf.importance import drop_layers_
    from slimtorch.integrations.hf.sentence import save_sentence_folder
    from slimtorch.models.minilm import load_minilm, sentence_transformer

    model, _ = load_minilm()
    drop_layers_(model, [1, 2, 3])
    save_sentence_folder(model, sentence_transformer(), tmp_path / "run" / "layers3")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(BENCHMARKS / "transformer_pruning.py"), run_name="benchmark_tp")["main"](
            ["folders", str(tmp_path / "run"), "--smoke"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    header = ["model", "params", "MACs", "latency 1", "latency 8", "speed-up", "cosine mean", "cosine min",
              "top-1 NN", "top-10 NN"]
    (_, rows), = check_tables(out, [(header, 2)])
    original, pruned = (dict(zip(header, row, strict=True)) for row in rows)
    assert (original["model"], pruned["model"]) == ("original", "run/layers3")
    assert original["cosine mean"] == "1.0000" and original["speed-up"] == "1.00x"
    assert float(pruned["MACs"][:-1]) < float(original["MACs"][:-1])
    assert float(pruned["cosine mean"]) < 0.99
