import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.recover import fit
from slimtorch.recover.commhook import TopKState, register_topk_hook_

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import ddp_worker  # noqa: E402


@pytest.fixture
def single_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_topk_hook_error_feedback_loses_nothing(single_process_group):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4))
    reference = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4))
    reference.load_state_dict(model.state_dict())
    ddp = nn.parallel.DistributedDataParallel(model)
    state = register_topk_hook_(ddp, ratio=0.05)
    sent = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    true = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    numel = sum(p.numel() for p in model.parameters())
    for _ in range(6):
        x, y = torch.randn(8, 10), torch.randint(0, 4, (8,))
        ddp.zero_grad()
        reference.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        nn.functional.cross_entropy(reference(x), y).backward()
        nonzero = sum(int(p.grad.count_nonzero()) for p in model.parameters())
        assert 0 < nonzero <= -(-numel * 5 // 100)  # at most k entries travel per step
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            sent[name] += p.grad
            true[name] += q.grad
    for name in sent:  # what was sent plus what is still owed is exactly what was computed
        torch.testing.assert_close(sent[name] + state.residuals[name].view_as(sent[name]), true[name])
    stats = state.stats()
    assert stats["dense_bytes"] == 6 * numel * 4
    assert stats["compression"] == pytest.approx(numel * 4 / (-(-numel * 5 // 100) * 8))


def test_topk_ratio_is_validated():
    with pytest.raises(ConfigError, match="ratio"):
        TopKState(0.0)


@pytest.mark.slow
def test_torchrun_two_processes_match_one_and_topk_converges(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_worker.py"), str(tmp_path), "0.01"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2

    # DDP averages the two halves' gradients: the same as one process on the whole batch
    train, test = ddp_worker.digits()
    single = ddp_worker.mlp()
    expected = fit(single, train, ddp_worker.config(0.0), eval_data=test)
    ddp_weights = load_file(str(tmp_path / "dense.safetensors"))
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp_weights[name], value, atol=2e-5, rtol=1e-4)
    assert results["dense"]["accuracy"] == pytest.approx(expected.accuracy, abs=0.01)

    # top-1% gradients with error feedback: ~49x fewer bytes, accuracy within 3 points of dense
    topk = results["topk"]
    numel = sum(p.numel() for p in single.parameters())
    steps = topk["steps"]
    assert topk["comm"]["dense_bytes"] == steps * numel * 4
    assert topk["comm"]["sent_bytes"] == steps * -(-numel // 100) * 8
    assert topk["comm"]["compression"] > 45
    assert topk["accuracy"] >= results["dense"]["accuracy"] - 0.03
