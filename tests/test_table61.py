import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from slimtorch.cli.main import main
from slimtorch.errors import ConfigError
from slimtorch.recipes.table61 import Table61Config
from slimtorch.recipes.table61_report import table61_markdown
from slimtorch.recover.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _fake_cifar(folder, n=48):
    """A cifar10_jpeg.npz with the real layout (JPEG bytes + offsets) and random 32x32 images."""
    rng = np.random.default_rng(0)

    def encode(count):
        blobs = []
        for _ in range(count):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
            blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
        return np.concatenate(blobs), offsets

    train_bytes, train_offsets = encode(n)
    test_bytes, test_offsets = encode(n)
    np.savez(folder / "cifar10_jpeg.npz", train_bytes=train_bytes, train_offsets=train_offsets,
             train_y=rng.integers(0, 10, n).astype(np.uint8), test_bytes=test_bytes, test_offsets=test_offsets,
             test_y=rng.integers(0, 10, n).astype(np.uint8), classes=np.array([f"c{i}" for i in range(10)]))


def _smoke(data_dir, out, capsys):
    argv = ["table61", "--data-dir", str(data_dir), "--out", str(out), "--limit", "48", "--epochs", "1",
            "--sparsities", "0.5", "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "table61.json").read_text())
    rows = {(r["recipe"], r["sparsity"]): r for r in result["rows"]}
    assert set(rows) == {("book", 0.0), ("book", 0.5), ("ours", 0.0), ("ours", 0.5)}
    assert rows[("book", 0.0)]["params"] == 2_122_186
    half = rows[("book", 0.5)]
    assert half["state"] == "compacted" and half["params"] == half["nonzero_params"] == 1_059_306  # the book's
    assert all(len(r["history"]) == r["epochs"] == 1 and r["seconds"] > 0 and r["cpu_seconds"] > 0
               for r in rows.values())
    # our pruned row distils from the teacher table, and its time includes the table's
    assert rows[("ours", 0.5)]["teacher_cpu_seconds"] > 0 and rows[("book", 0.5)]["teacher_cpu_seconds"] == 0
    assert rows[("ours", 0.5)]["cpu_seconds"] > rows[("ours", 0.5)]["teacher_cpu_seconds"]
    table = (out / "table61.md").read_text()
    assert "| 50% |" in table and "89 s | 42.71%" in table and "Machine:" in table and "teacher table" in table
    assert (out / "table61.png").stat().st_size > 10_000
    assert "book sparsity 50%" in printed
    return result


def test_table61_smoke_run_on_a_tiny_cifar_file(tmp_path, capsys):
    _fake_cifar(tmp_path)
    first = _smoke(tmp_path, tmp_path / "run", capsys)
    # resuming a finished sweep reloads every row from its checkpoint: same numbers, no training
    assert main(["table61", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), "--limit", "48",
                 "--epochs", "1", "--sparsities", "0.5", "--resume", "--threads", "1"]) == 0
    again = json.loads((tmp_path / "run" / "table61.json").read_text())
    assert [(r["accuracy"], r["seconds"], r["cpu_seconds"]) for r in again["rows"]] == [
        (r["accuracy"], r["seconds"], r["cpu_seconds"]) for r in first["rows"]]


def test_table61_smoke_run_on_real_cifar(data_dir, tmp_path, capsys):
    if not (data_dir / "cifar10_jpeg.npz").is_file():
        pytest.skip("cifar10_jpeg.npz not in the local data folder")
    _smoke(data_dir, tmp_path, capsys)


def test_table61_config_and_markdown():
    with pytest.raises(ConfigError, match="unknown recipe"):
        Table61Config(data_dir=".", recipes=("fancy",))
    rows = [{"recipe": "book", "sparsity": 0.8, "state": "compacted", "params": 100, "nonzero_params": 100,
             "epochs": 10, "seconds": 20.2, "cpu_seconds": 12.4, "accuracy": 0.5}]
    line = table61_markdown(rows, {}).splitlines()[-1]
    assert line == "| 80% | 100 | 10 | 12.4 s | 20.2 s | 50.00% | 76 s | 38.87% |"
    ours = {**rows[0], "recipe": "ours", "epochs": 3, "cpu_seconds": 9.3, "accuracy": 0.6}
    line = table61_markdown([*rows, ours], {}).splitlines()[-1]
    assert line == "| 80% | 100 | 10 | 12.4 s | 20.2 s | 50.00% | 3 | 9.3 s | 20.2 s | 60.00% | 0.75 | 76 s | 38.87% |"


@pytest.mark.slow
def test_a_killed_sweep_resumes_to_the_result_of_an_uninterrupted_one(tmp_path):
    _fake_cifar(tmp_path, n=160)  # 3 steps an epoch; the kill lands between epochs of the book's dense row
    args = ["table61", "--data-dir", str(tmp_path), "--limit", "160", "--epochs", "2", "--sparsities", "0.5",
            "--threads", "1"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "slimtorch", *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dense = killed / "checkpoints" / "book-dense.safetensors"  # written after the dense row's first epoch
    deadline = time.monotonic() + 120
    while not dense.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    _, meta = read_checkpoint(dense)
    before = meta["extra"]["progress"]["history"]
    assert meta["extra"]["progress"]["epoch"] < 2 and not (killed / "checkpoints" / "ours-dense.safetensors").exists()

    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    resumed = json.loads((killed / "table61.json").read_text())["rows"]
    straight = json.loads((tmp_path / "straight" / "table61.json").read_text())["rows"]
    assert [(r["recipe"], r["sparsity"], r["accuracy"], [e["loss"] for e in r["history"]]) for r in resumed] == [
        (r["recipe"], r["sparsity"], r["accuracy"], [e["loss"] for e in r["history"]]) for r in straight]
    # the epochs finished before the kill keep the time measured then, CPU and wall-clock
    assert resumed[0]["history"][: len(before)] == before and all(r["cpu_seconds"] > 0 for r in resumed)
    for path in sorted((tmp_path / "straight" / "checkpoints").glob("*-s0.50.safetensors")):
        a, b = load_file(str(path)), load_file(str(killed / "checkpoints" / path.name))
        weights = [k for k in a if k.startswith("model::")]
        assert weights and all(torch.equal(a[k], b[k]) for k in weights), path.name
