"""Writes are all-or-nothing (one file, or a folder of outputs renamed into place) and respect the umask;
loading a file that does not fit changes nothing."""

import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from adversarial import fails_cleanly, files_state
from nets import Residual
from slimtorch import compact_, compute_masks
from slimtorch.cli.main import main
from slimtorch.errors import CheckpointError
from slimtorch.io import load_compacted_, save_compacted, save_masks

IMAGE = torch.randn(2, 3, 8, 8)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_new_files_follow_the_umask(tmp_path, umask_027):
    save_masks({"w": torch.ones(2, dtype=torch.bool)}, tmp_path / "m.safetensors")
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o640
    assert main(["prune", "MnistNet", "--sparsity", "0.5", "--out", str(tmp_path / "p"), "--runs", "0"]) == 0
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o750
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "p").iterdir()} == dict.fromkeys(
        ["masks.safetensors", "model.safetensors", "report.md", "report.json", "layers.png"], 0o640)


def test_a_rewritten_file_keeps_its_mode(tmp_path):
    path = tmp_path / "m.safetensors"
    save_masks({"w": torch.ones(2, dtype=torch.bool)}, path)
    os.chmod(path, 0o604)
    save_masks({"w": torch.zeros(2, dtype=torch.bool)}, path)
    assert path.stat().st_mode & 0o777 == 0o604


def _cli(*argv) -> None:
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            code = exit_.code
    if code:
        text = err.getvalue()
        assert code == 2 and len(text.strip().splitlines()) == 1, text
        raise SystemExit(text)


def test_prune_into_a_folder_with_an_output_that_cannot_be_replaced(tmp_path):
    out = tmp_path / "p"
    _cli("prune", "MnistNet", "--sparsity", "0.3", "--out", out, "--runs", "0")
    (out / "report.md").unlink()
    (out / "report.md").mkdir()  # one output cannot be replaced: nothing may change
    fails_cleanly(lambda: _cli("prune", "MnistNet", "--sparsity", "0.6", "--out", out, "--runs", "0"), SystemExit,
                  "is a folder where an output file goes", paths=[tmp_path])


def test_prune_replaces_every_output_at_once_and_keeps_other_files(tmp_path):
    out = tmp_path / "p"
    _cli("prune", "MnistNet", "--sparsity", "0.3", "--out", out, "--runs", "0")
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    first = json.loads((out / "report.json").read_text())
    _cli("prune", "MnistNet", "--sparsity", "0.6", "--out", out, "--runs", "0")
    assert json.loads((out / "report.json").read_text()) != first
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "data.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary folder left


def test_negative_runs_is_a_one_line_error(tmp_path):
    fails_cleanly(lambda: _cli("prune", "MnistNet", "--sparsity", "0.5", "--out", tmp_path / "o", "--runs", "-1"),
                  SystemExit, "expected a number >= 0, got -1", paths=[tmp_path])


def test_an_edited_description_copies_nothing_into_the_model(tmp_path):
    model = Residual().eval()
    masks = compute_masks(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}, {"op_names": ["fc"],
                                                                                  "exclude": True}],
                          example_inputs=IMAGE)
    compact_(model, masks, example_inputs=IMAGE)
    save_compacted(model, tmp_path)
    description = json.loads((tmp_path / "compaction.json").read_text())
    modules = description["steps"][0]["modules"]
    last = sorted(modules)[-1]
    del modules[last]  # one layer is left at full size: its weights no longer fit
    (tmp_path / "compaction.json").write_text(json.dumps(description))
    fresh = Residual().eval()
    fails_cleanly(lambda: load_compacted_(fresh, tmp_path), CheckpointError, "do not fit", models=[fresh],
                  paths=[tmp_path])


def test_file_by_file_replacement_puts_back_what_it_replaced(tmp_path, monkeypatch):
    import slimtorch.atomic as atomic

    out = tmp_path / "o"
    with atomic.atomic_folder(out) as staging:
        for name in ("a.txt", "b.txt", "c.txt"):
            (staging / name).write_text(f"old {name}")
    monkeypatch.setattr(atomic, "_holds_cwd", lambda directory: True)  # as for the working directory
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "c.txt" and Path(dst).parent == out:
            raise OSError(5, "disk went away")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)

    def write_all():
        with atomic.atomic_folder(out) as staging:
            for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
                (staging / name).write_text(f"new {name}")

    before = files_state([tmp_path])
    with pytest.raises(OSError, match="disk went away"):
        write_all()
    assert files_state([tmp_path]) == before
