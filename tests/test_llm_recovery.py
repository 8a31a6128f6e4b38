"""Recovery of a structurally pruned causal LM: distillation from the unpruned model (the loss, checked by hand,
and through ``fit``), and LoRA and distillation under DDP and FSDP with two processes on CPU (gloo), which end
with the weights one process gets on the same global batch."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.utils.data import TensorDataset
from transformers import LlamaForCausalLM

from slimtorch.errors import ConfigError
from slimtorch.integrations.hf.llm_structured import stream_structured_prune
from slimtorch.models.tiny_lm import TinyLMConfig, build_model
from slimtorch.recover import CausalLMDistiller, DistillConfig, TrainConfig, fit
from slimtorch.recover.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import llm_ddp_worker as worker  # noqa: E402

CFG = TinyLMConfig(vocab_size=worker.VOCAB, hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64,
                   seq_len=worker.SEQ)
JOIN_TIMEOUT = 240  # seconds: a hung process group fails the test instead of hanging it


def _folders(root: Path) -> tuple[Path, Path]:
    """The dense tiny LLaMA and its compaction (half the heads and FFN neurons), both save_pretrained folders."""
    dense, pruned = root / "dense", root / "pruned"
    model = build_model(CFG)
    with torch.no_grad():  # weights 10x LLaMA's initial 0.02 spread: peaked next-token distributions to learn
        for p in model.parameters():
            p.mul_(10.0 if p.dim() > 1 else 1.0)
    model.save_pretrained(dense)
    calibration = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len), generator=torch.Generator().manual_seed(1))
    stream_structured_prune(dense, pruned, calibration, heads=0.5, neurons=0.5, batch_size=2)
    return dense, pruned


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


class _Fixed(torch.nn.Module):
    """A "language model" that returns given logits, to check the loss by hand."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids: torch.Tensor):
        return type("Out", (), {"logits": self.logits.expand(len(input_ids), -1, -1)})()


def test_causal_lm_distillation_is_the_per_position_kl_plus_next_token_ce():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [0.3, 0.1, -0.2]]  # (T=3 positions, vocab 3)
    teacher = [[2.0, 1.0, 0.0], [1.0, 0.0, 2.0], [0.0, 0.5, 0.5]]
    ids = torch.tensor([[2, 1, 0]])
    t, alpha = 2.0, 0.6
    kl = sum(sum(p * math.log(p / q) for p, q in zip(_softmax([v / t for v in tr]), _softmax([v / t for v in sr]),
                                                      strict=True))
             for sr, tr in zip(student, teacher, strict=True)) / 3  # mean over every position
    ce = -(math.log(_softmax(student[0])[1]) + math.log(_softmax(student[1])[0])) / 2  # the last has no next token
    loss = CausalLMDistiller(_Fixed(torch.tensor([teacher])), DistillConfig(temperature=t, alpha=alpha))
    got = loss(_Fixed(torch.tensor([student])), ids, ids)
    assert float(got.detach()) == pytest.approx(alpha * t * t * kl + (1 - alpha) * ce, rel=1e-6)


def test_distillation_through_fit_brings_the_pruned_lm_towards_the_unpruned_one(tmp_path):
    dense, pruned = _folders(tmp_path)
    teacher, student = LlamaForCausalLM.from_pretrained(dense), LlamaForCausalLM.from_pretrained(pruned)
    kl_only = CausalLMDistiller(teacher, DistillConfig(temperature=1.0, alpha=1.0))
    data = worker.windows()
    before = float(kl_only(student, data, data).detach())
    result = fit(student, TensorDataset(data, data), TrainConfig(epochs=3, batch_size=8, lr=3e-3, optimizer="adamw"),
                 loss_fn=CausalLMDistiller(teacher, DistillConfig(temperature=2.0, alpha=1.0)))
    assert result.epochs[-1].loss < result.epochs[0].loss
    assert float(kl_only(student, data, data).detach()) < 0.5 * before
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())  # never trained


def test_causal_lm_distiller_refuses_what_it_cannot_do():
    lm = build_model(CFG)
    with pytest.raises(ConfigError, match="features"):
        CausalLMDistiller(lm, DistillConfig(features=(("a", "a"),)))
    with pytest.raises(ConfigError, match=r"\(batch, tokens\) tensor of token ids"):
        CausalLMDistiller(lm)(build_model(CFG), torch.randn(2, 4), None)
    with pytest.raises(ConfigError, match="same model object"):
        CausalLMDistiller(lm)(lm, torch.zeros(1, 4, dtype=torch.long), None)


def test_fsdp_is_refused_where_it_cannot_run(tmp_path):
    data = worker.windows()
    with pytest.raises(ConfigError, match="torchrun"):  # no process group: nothing to shard over
        fit(build_model(CFG), TensorDataset(data, data), TrainConfig(epochs=1, batch_size=8, fsdp=True),
            loss_fn=lambda m, x, y: m(input_ids=x, labels=x).loss)
    with pytest.raises(ConfigError, match="resume"):
        fit(build_model(CFG), TensorDataset(data, data), TrainConfig(epochs=1, fsdp=True),
            checkpoint=tmp_path / "c.safetensors", resume=True)
    with pytest.raises(ConfigError, match="grad_topk"):
        TrainConfig(epochs=1, fsdp=True, grad_topk=0.1)
    with pytest.raises(ConfigError, match="fsdp must be True or False"):
        TrainConfig(epochs=1, fsdp="yes")


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    """Two processes under torchrun; the whole process group is killed if it outlives JOIN_TIMEOUT."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=JOIN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {JOIN_TIMEOUT} s: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo needed")
def test_two_processes_recover_a_compacted_llama_as_one_does(tmp_path):
    dense, pruned = _folders(tmp_path)
    run = _torchrun([str(REPO / "tests" / "llm_ddp_worker.py"), str(tmp_path), str(dense), str(pruned)])
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2
    for kind in worker.KINDS:
        # one process on the whole batch: what DDP (gradients averaged over equal halves) and FSDP (the same,
        # reduced shard by shard) compute too
        single, expected = worker.recover(kind, dense, pruned)
        reference = single.state_dict()
        for mode in ("ddp", "fsdp"):
            ranks = [load_file(str(tmp_path / f"{mode}-{kind}.rank{r}.safetensors")) for r in (0, 1)]
            assert sorted(ranks[0]) == sorted(ranks[1]) == sorted(reference)
            for name, value in reference.items():
                torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)  # the ranks agree
                torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=2e-5, msg=f"{mode} {kind} {name}")
            record = results[f"{mode}-{kind}"]
            assert record["sharded"] == (record["parameters"] if mode == "fsdp" else 0)  # FSDP kept shards only
            epochs = record["epochs"]
            assert epochs[-1]["loss"] < epochs[0]["loss"]
            assert epochs[-1]["loss"] == pytest.approx(expected.epochs[-1].loss, rel=1e-4)
        # FSDP's checkpoint holds the whole model and optimizer state, gathered from the shards
        tensors, meta = read_checkpoint(tmp_path / f"fsdp-{kind}.ckpt.safetensors")
        saved = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("model::")}
        for name, value in reference.items():
            torch.testing.assert_close(saved[name], value, rtol=1e-4, atol=2e-5)
        trained = sum(p.requires_grad for p in single.parameters())
        assert len({k.split(".")[1] for k in tensors if k.startswith("optim.")}) == trained
        assert meta["extra"]["progress"]["global_step"] == expected.steps == 8
