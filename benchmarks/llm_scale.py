"""Cost of pruning LLaMA-shaped models as they grow: time and peak memory of streamed one-shot pruning
(layer by layer from safetensors shards) against the in-memory path, from 50M to 7B parameters.

    PYTHONPATH=src python benchmarks/llm_scale.py --root /tmp/llm --sizes 50m,350m --methods magnitude,wanda
    PYTHONPATH=src python benchmarks/llm_scale.py --root /tmp/llm --sizes 7b --methods magnitude,wanda \\
        --results /tmp/llm/results.jsonl --delete-models 7b
    PYTHONPATH=src python benchmarks/llm_scale.py --results /tmp/llm/results.jsonl --plot docs/img/llm_scale.png
    PYTHONPATH=src python benchmarks/llm_scale.py --smoke     # a tiny shape, every kind of point, seconds

Models are written first with random weights (normal, std 0.02, cut from one pool of 16M draws at random
offsets; float16 on disk, in shards of about 2 GB that cut across decoder layers, as ``save_pretrained``
does), in the shapes of TinyLlama-1.1B and LLaMA-2-7B and two smaller ones. Each point runs in a fresh
Python process, which reports its wall time, CPU seconds (user + system, ``resource.getrusage``) and peak
resident memory (``VmHWM`` of ``/proc/self/status``, which counts the pages of memory-mapped files read;
not ``ru_maxrss``, which a child inherits from the process that forked it); the memory after
importing torch and transformers is reported apart. Calibration is random token ids (the weights are
random too: these points measure cost, not quality). With ``--results``, finished points are appended to
a JSON-lines file and skipped when the command is run again, so a long sweep can be resumed; ``--plot``
draws the curves from that file.

Points: ``stream:<method>`` (:func:`slimtorch.integrations.hf.streamed.stream_one_shot_prune`, the
output folder deleted after), ``memory:<method>`` (``from_pretrained`` in float32, then
:func:`slimtorch.prune.oneshot.one_shot_prune`; skipped where the float32 weights would not fit in RAM),
``structured:<importance>`` (:func:`slimtorch.integrations.hf.llm_structured.stream_structured_prune`, a
quarter of the heads and of the FFN neurons of every layer, compacted).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

#: LLaMA shapes: hidden, layers, heads, key/value heads, intermediate, vocabulary.
SHAPES = {
    "smoke": (64, 2, 4, 2, 128, 256),
    "50m": (512, 6, 8, 8, 1408, 32000),
    "350m": (1024, 22, 16, 16, 2816, 32000),
    "1.1b": (2048, 22, 32, 4, 5632, 32000),  # TinyLlama-1.1B
    "7b": (4096, 32, 32, 32, 11008, 32000),  # LLaMA-2-7B
}
SHARD_BYTES = 2 << 30
POOL = 1 << 24  # random values the weights are cut from
STRUCTURED = 0.25  # fraction of the heads and of the FFN neurons removed by the structured points
RAM_BYTES = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
#: The points of ``--smoke`` (and Torch-Pruning's FFN compaction where it is installed).
SMOKE = ["stream:magnitude", "stream:sparsegpt:2:4", "memory:magnitude", "memory:sparsegpt:2:4", "structured:flap",
         "structured:flap:ffn", "layers:block"]


@dataclass(frozen=True)
class Point:
    size: str
    kind: str  # "stream" or "memory"
    method: str
    pattern: str | None = None

    @property
    def key(self) -> str:
        return f"{self.size} {self.kind}:{self.method}{':' + self.pattern if self.pattern else ''}"


def llama_config(size: str) -> object:
    from transformers import LlamaConfig

    hidden, layers, heads, kv, inter, vocab = SHAPES[size]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float16"
    return config


def tensor_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the LLaMA checkpoint, in its order (``LlamaForCausalLM.state_dict()``'s names)."""
    hidden, layers, heads, kv, inter, vocab = SHAPES[size]
    head_dim = hidden // heads
    layer = [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (kv * head_dim, hidden)),
             ("self_attn.v_proj", (kv * head_dim, hidden)), ("self_attn.o_proj", (hidden, hidden)),
             ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)), ("mlp.down_proj", (hidden, inter)),
             ("input_layernorm", (hidden,)), ("post_attention_layernorm", (hidden,))]
    blocks = [(f"model.layers.{i}.{name}.weight", shape) for i in range(layers) for name, shape in layer]
    return [("model.embed_tokens.weight", (vocab, hidden)), *blocks, ("model.norm.weight", (hidden,)),
            ("lm_head.weight", (vocab, hidden))]


def parameters(size: str) -> int:
    return sum(torch.Size(shape).numel() for _, shape in tensor_shapes(size))


def random_weight(pool: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A weight of ``shape`` cut from ``pool`` at a random offset (wrapping around): normal values at the
    cost of a copy (these points measure cost, not quality)."""
    count = torch.Size(shape).numel()
    start = int(torch.randint(0, pool.numel(), (1,), generator=gen))
    reps = (start + count) // pool.numel() + 1
    flat = pool.repeat(reps)[start : start + count] if reps > 1 else pool[start : start + count]
    return flat.reshape(shape).clone()


def write_model(size: str, path: Path) -> None:
    """A random LLaMA of ``size`` as a sharded ``save_pretrained`` folder, one tensor in memory at a time
    besides the shard being filled."""
    from safetensors.torch import save_file

    from slimtorch.atomic import atomic_folder

    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(POOL, generator=gen) * 0.02).half()  # values every weight is cut from (cheap to write)
    names = tensor_shapes(size)
    groups, current, filled = [], [], 0
    for name, shape in names:  # shards of about SHARD_BYTES (2 bytes a value)
        if current and filled + 2 * torch.Size(shape).numel() > SHARD_BYTES:
            groups.append(current)
            current, filled = [], 0
        current.append((name, shape))
        filled += 2 * torch.Size(shape).numel()
    groups.append(current)
    with atomic_folder(path) as staging:
        llama_config(size).save_pretrained(staging)
        weight_map = {}
        for i, group in enumerate(groups):
            file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            shard = {name: torch.ones(shape).half() if len(shape) == 1 else random_weight(pool, shape, gen)
                     for name, shape in group}
            save_file(shard, str(staging / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            del shard
        index = {"metadata": {"total_size": 2 * parameters(size)}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def peak_rss(field: str = "VmHWM") -> int:
    """This process's peak resident memory in bytes since it was started (its own, unlike ``ru_maxrss``,
    which Linux carries over from the parent through fork and exec); ``field="VmRSS"``: the memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (no /proc: the inherited bound)


class RssTrace:
    """The resident memory sampled every ``every`` seconds by a thread, as (seconds, bytes) pairs: a
    streamed run's memory should rise and fall with each layer, never climb from layer to layer."""

    def __init__(self, every: float = 0.5) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append((round(time.perf_counter() - self._start, 1), peak_rss("VmRSS")))

    def stop(self) -> list[tuple[float, int]]:
        """The samples, at most 400 (evenly thinned)."""
        self._stop.set()
        self._thread.join()
        return self.samples[:: len(self.samples) // 400 + 1]


def _one_shot(point: Point, source: Path, out: Path, calib: torch.Tensor) -> dict:
    from transformers import LlamaForCausalLM

    from slimtorch.integrations.hf.streamed import stream_one_shot_prune
    from slimtorch.prune.oneshot import one_shot_prune

    if point.kind == "stream":
        run = stream_one_shot_prune(source, out, calib, method=point.method, pattern=point.pattern,
                                    batch_size=calib.shape[0])
        return {"layer_seconds": list(run.layer_seconds)}
    model = LlamaForCausalLM.from_pretrained(source, dtype=torch.float32)
    one_shot_prune(model, calib, method=point.method, pattern=point.pattern, batch_size=calib.shape[0])
    return {}


def _structured(point: Point, source: Path, out: Path, calib: torch.Tensor) -> dict:
    """Streamed heads + FFN neurons (``pattern="ffn"``: FFN neurons only), or whole layers dropped."""
    from slimtorch.integrations.hf.llm_structured import block_influence, stream_drop_layers, stream_structured_prune

    if point.kind == "layers":  # the quarter of the layers of least block influence
        influence = block_influence(source, calib, batch_size=calib.shape[0])
        drop = sorted(range(len(influence)), key=influence.__getitem__)[: max(1, len(influence) // 4)]
        stream_drop_layers(source, out, drop)
        return {"dropped": sorted(drop)}
    heads = 0.0 if point.pattern == "ffn" else STRUCTURED
    run = stream_structured_prune(source, out, calib, heads=heads, neurons=STRUCTURED, importance=point.method,
                                  batch_size=calib.shape[0])
    return {"layer_seconds": list(run.layer_seconds), "kept_heads": len(run.heads[0]),
            "kept_neurons": len(run.neurons[0])}


def _torch_pruning(point: Point, source: Path, out: Path, calib: torch.Tensor) -> dict:
    """Torch-Pruning's compaction as its LLM example calls it (``BasePruner``, group magnitude importance,
    ``round_to=4``, a few tokens to trace), on the whole float32 model in memory, then saved. ``ffn``: the
    FFN neurons alone (attention linears, embeddings and head ignored, so the width stays); ``heads``: query
    heads (``num_heads``, ``prune_num_heads``, head dimensions kept) and FFN neurons."""
    import torch_pruning as tp
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    config, ignored, num_heads = model.config, [model.lm_head, model.model.embed_tokens], {}
    for layer in model.model.layers:
        attn = layer.self_attn
        if point.method == "ffn":
            ignored += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        else:
            num_heads.update({attn.q_proj: config.num_attention_heads, attn.k_proj: config.num_key_value_heads,
                              attn.v_proj: config.num_key_value_heads})
    importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    pruner = tp.pruner.BasePruner(
        model, example_inputs=calib[:1, :8], importance=importance,
        global_pruning=False, output_transform=lambda x: x.logits, pruning_ratio=STRUCTURED, ignored_layers=ignored,
        num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False, head_pruning_ratio=STRUCTURED,
        round_to=4)
    for group in pruner.step(interactive=True):
        group.prune()
    mlp, attn = model.model.layers[0].mlp, model.model.layers[0].self_attn
    config.intermediate_size = mlp.gate_proj.out_features
    config.num_attention_heads = attn.q_proj.out_features // config.head_dim
    config.num_key_value_heads = attn.k_proj.out_features // config.head_dim
    model.save_pretrained(out)
    return {"kept_heads": config.num_attention_heads, "kept_neurons": config.intermediate_size}


RUNNERS = {"stream": _one_shot, "memory": _one_shot, "structured": _structured, "layers": _structured,
           "torch-pruning": _torch_pruning}


def run_point(point: Point, source: Path, calibration: tuple[int, int]) -> dict:
    """One point, in this process (the child): its costs."""
    from transformers import LlamaForCausalLM  # noqa: F401  (imported before the memory after imports is read)

    from slimtorch.integrations.hf.llm_structured import stream_structured_prune  # noqa: F401
    from slimtorch.integrations.hf.streamed import stream_one_shot_prune  # noqa: F401

    if point.kind == "torch-pruning":
        import torch_pruning  # noqa: F401
    imported_rss = peak_rss()
    trace = RssTrace()
    calib = torch.randint(0, SHAPES[point.size][5], calibration, generator=torch.Generator().manual_seed(0))
    start, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
        extra = RUNNERS[point.kind](point, source, Path(tmp) / "out", calib)
    extra["rss_trace"] = trace.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"key": point.key, "size": point.size, "kind": point.kind, "method": point.method,
            "pattern": point.pattern, "params": parameters(point.size), "wall_s": round(time.perf_counter() - start, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "prune_cpu_s": round(time.process_time() - cpu, 1),
            "peak_rss": peak_rss(), "import_rss": imported_rss, "threads": torch.get_num_threads(),
            "calibration": list(calibration), **extra}


def measure(point: Point, source: Path, calibration: tuple[int, int], timeout: float | None = None) -> dict:
    """``run_point`` in a fresh process (its own peak memory), with this copy of slimtorch; a point that
    has no result within ``timeout`` seconds is stopped and recorded as such."""
    package = Path(importlib.util.find_spec("slimtorch").origin).resolve().parents[1]  # src/ of this copy
    env = {**os.environ, "PYTHONPATH": str(package), "SLIMTORCH_PROGRESS": "0"}
    spec = json.dumps({"point": point.__dict__, "source": str(source), "calibration": list(calibration)})
    try:
        done = subprocess.run([sys.executable, __file__, "--child", spec], env=env, capture_output=True, text=True,
                              check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"key": point.key, "size": point.size, "params": parameters(point.size),
                "skipped": f"no result in {timeout:.0f} s (stopped)"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{point.key} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def layer_bytes(size: str) -> int:
    """One decoder layer's weights in float32."""
    return 4 * sum(torch.Size(s).numel() for n, s in tensor_shapes(size) if n.startswith("model.layers.0."))


def layer_parameters(size: str) -> int:
    """The parameters of the decoder layers: what is pruned (the embeddings and output head are copied)."""
    return sum(torch.Size(s).numel() for n, s in tensor_shapes(size) if n.startswith("model.layers."))


def topk_table() -> str:
    """CPU seconds of the magnitude criterion's ranking (``torch.topk`` of half of one whole matrix) and of a
    matmul on 512 tokens, per million weights, for the FFN matrix of each shape: a cost per weight that
    grows with the matrix (``n log n``) makes pruning time grow faster than the parameters."""
    lines = ["| shape | FFN matrix | topk, ms per M weights | matmul (512 tokens), ms per M weights |",
             "|---|---|---:|---:|"]
    for size in ("50m", "350m", "1.1b", "7b"):
        hidden, inter = SHAPES[size][0], SHAPES[size][4]
        w = torch.randn(hidden, inter, generator=torch.Generator().manual_seed(0))
        reps = max(1, 4_000_000 // w.numel())
        cpu = time.process_time()
        for _ in range(reps):
            torch.topk(w.abs().reshape(1, -1), w.numel() // 2, dim=1, largest=False)
        ranking = (time.process_time() - cpu) / reps
        x = torch.randn(512, inter)
        cpu = time.process_time()
        for _ in range(reps):
            x @ w.T
        matmul = (time.process_time() - cpu) / reps
        per_m = 1e9 / w.numel()  # seconds per weight -> ms per million weights
        lines.append(f"| {size} | {hidden} x {inter} | {ranking * per_m:.0f} | {matmul * per_m:.1f} |")
    return "\n".join(lines)


def point_name(row: dict) -> str:
    """A row's point (``stream:wanda``), or the label a results file gives it (a run of older code)."""
    return row.get("label", row["key"].split(" ", 1)[1])


def table(rows: list[dict]) -> str:
    """The points as a Markdown table; the ratios are the memory above the imports over the weights'
    bytes, in float32 and as stored (float16)."""
    lines = ["| model | params | point | wall (s) | CPU (s) | CPU s / B params | CPU s / B layer params "
             "| peak RSS (GiB) | above imports (GiB) | ÷ fp32 weights | ÷ fp16 weights | one layer fp32 (GiB) "
             "| weights fp32 (GiB) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # wall, CPU: the pruning alone
    for r in rows:
        size, params = r["size"], r["params"]
        fixed = f"| {size} | {params / 1e6:,.1f}M | {point_name(r)} |"
        if "skipped" in r:
            lines.append(f"{fixed} {r['skipped']} | - | - | - | - | - | - | - | {gib(layer_bytes(size))} | "
                         f"{gib(4 * params)} |")
            continue
        above, cpu = r["peak_rss"] - r["import_rss"], r["prune_cpu_s"]
        lines.append(f"{fixed} {r['wall_s']:.1f} | {cpu:.1f} | {cpu / params * 1e9:.1f} | "
                     f"{cpu / layer_parameters(size) * 1e9:.1f} | {gib(r['peak_rss'])} | {gib(above)} | "
                     f"{above / (4 * params):.2f} | {above / (2 * params):.2f} | {gib(layer_bytes(size))} | "
                     f"{gib(4 * params)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slimtorch.atomic import save_figure

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    kinds = sorted({point_name(r) for r in rows if "skipped" not in r})
    for kind in kinds:
        pts = sorted(((r["params"], r) for r in rows if point_name(r) == kind and "skipped" not in r),
                     key=lambda p: p[0])
        xs = [p / 1e9 for p, _ in pts]
        ax_t.plot(xs, [r["prune_cpu_s"] for _, r in pts], "o-", label=kind)
        ax_m.plot(xs, [r["peak_rss"] / 2**30 for _, r in pts], "o-", label=kind)
    sizes = sorted({r["params"] for r in rows})
    ax_m.plot([p / 1e9 for p in sizes], [2 * p / 2**30 for p in sizes], "k:", label="weights, float16")
    for ax, what in ((ax_t, "CPU seconds"), (ax_m, "peak RSS (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (billions)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.axhline(RAM_BYTES / 2**30, color="r", lw=0.8, label="this machine's RAM")
    ax_m.legend(fontsize=7)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def points(size: str, args: argparse.Namespace) -> list[Point]:
    """The points of ``size``: ``--points`` (``kind:method[:pattern]`` each) or every kind with every method."""
    specs = args.points or [f"{kind}:{method}" for kind in args.kinds for method in args.methods]
    out = []
    for spec in specs:
        kind, method, pattern = [*spec.split(":", 2), ""][:3]
        out.append(Point(size, kind, method, pattern or None))
    return out


def sweep(args: argparse.Namespace, root: Path) -> list[dict]:
    done = {}
    if args.results and Path(args.results).is_file():
        done = {r["key"]: r for r in map(json.loads, Path(args.results).read_text().splitlines())}
    rows = []
    for size in args.sizes:
        todo = [p for p in points(size, args) if p.key not in done]
        path = root / size
        if todo and not path.exists():
            start = time.perf_counter()
            write_model(size, path)
            print(f"<!-- wrote {size} ({parameters(size) / 1e9:.2f}B parameters) in "
                  f"{time.perf_counter() - start:.0f} s -->")
        for point in points(size, args):
            if point.key in done:
                rows.append(done[point.key])
                continue
            if point.kind in ("memory", "torch-pruning") and 4 * parameters(size) * 1.5 > RAM_BYTES:
                row = {"key": point.key, "size": size, "params": parameters(size),
                       "skipped": f"does not fit ({gib(4 * parameters(size))} GiB of float32 weights)"}
            else:
                row = measure(point, path, (args.calibration, args.seq_len), args.timeout)
            rows.append(row)
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if size in args.delete_models and path.exists():
            shutil.rmtree(path)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="where the random models are written (reused when there)")
    parser.add_argument("--sizes", default="50m,350m", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--methods", default="magnitude,wanda", help="one-shot methods, 'wanda:2:4' for N:M")
    parser.add_argument("--kinds", default="stream,memory", help="stream (layer by layer), memory; structured "
                        "(streamed heads + FFN, with --methods flap or wanda; 'flap:ffn' for FFN neurons alone); "
                        "layers (--methods block: a quarter of the layers dropped by block influence); "
                        "torch-pruning (--methods ffn or heads: Torch-Pruning's compaction in memory)")
    parser.add_argument("--points", default="", help="kind:method[:pattern], comma-separated, instead of every "
                        "--kinds with every --methods (e.g. structured:flap,layers:block,torch-pruning:ffn)")
    parser.add_argument("--timeout", type=float, help="seconds after which a point is stopped and recorded so")
    parser.add_argument("--calibration", type=int, default=4, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample")
    parser.add_argument("--results", help="JSON-lines file: finished points appended, skipped when run again")
    parser.add_argument("--delete-models", default="", help="sizes whose model folder is deleted after its points")
    parser.add_argument("--plot", help="draw the curves of --results into this image")
    parser.add_argument("--topk", action="store_true", help="CPU cost per weight of ranking and of a matmul, by "
                        "the shapes' FFN matrix (why time grows faster than the parameters)")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape, every kind of point (figures meaningless)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        row = run_point(Point(**spec["point"]), Path(spec["source"]), tuple(spec["calibration"]))
        print("RESULT " + json.dumps(row))
        return
    for name in ("sizes", "methods", "kinds", "points", "delete_models"):
        setattr(args, name, [v for v in getattr(args, name).split(",") if v])
    print(f"<!-- {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {date.today()}, RAM {gib(RAM_BYTES)} GiB -->")
    if args.topk:
        print(topk_table())
        return
    if args.smoke:
        args.sizes = ["smoke"]
        args.points = SMOKE + (["torch-pruning:ffn"] if importlib.util.find_spec("torch_pruning") else [])
        args.calibration, args.seq_len = 2, 16
        with tempfile.TemporaryDirectory() as tmp:
            rows = sweep(args, Path(tmp))
    elif args.root:
        rows = sweep(args, Path(args.root))
    else:
        rows = [json.loads(line) for line in Path(args.results).read_text().splitlines()] if args.results else []
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
