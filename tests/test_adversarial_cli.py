"""Adversarial table for the command line: every bad argument, file or output folder ends the command with
exit code 2 and one line naming what is wrong, and leaves the files on disk byte-identical
(:func:`adversarial.fails_cleanly`); the unusual uses that must work are checked after the failures.

Rows are ``(id, setup, error, fragment)`` as in ``test_adversarial_files.py``; shared pieces are in
``adversarial_env.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from adversarial_env import Env, cli, garble, make_originals, read_only, read_only_folder, run_row, truncate
from slimtorch.io import save_masks
from slimtorch.models.modelfile import load_model


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("originals")
    make_originals(root)
    return root


# -- the command line: exit code 2 and one line, nothing half-written ------------------------------------------


def _cli_case(*argv: Any, prepare: Callable[[Env], None] | None = None):
    def setup(env: Env):
        if prepare is not None:
            prepare(env)
        args = [str(a).format(tmp=env.tmp, orig=env.originals) for a in argv]
        return (lambda: cli(*args)), [], [env.tmp]
    return setup


def _pruned_out(env: Env, change: Callable[[Path], Any]) -> None:
    cli("prune", "MnistNet", "--sparsity", "0.3", "--out", env.tmp / "o", "--runs", "0")
    change(env.tmp / "o")


def _wrong_shape_masks(env: Env) -> None:
    save_masks({"down.0.weight": torch.ones(3, 3, dtype=torch.bool)}, env.tmp / "bad.safetensors")


RECIPE = """model: DigitsCNN
model_kwargs: {{width: 4}}
data: {{dataset: digits, limit: 64}}
steps:
  - prune: {{config_list: [{{op_names: [down.0], sparse_ratio: 0.5}}], criterion: {criterion}}}
  - finetune: {{epochs: 1, batch_size: 32}}
"""


def _recipe_ran_then_changed(env: Env) -> None:
    (env.tmp / "r.yaml").write_text(RECIPE.format(criterion="l1"))
    cli("recipe", env.tmp / "r.yaml", "--out", env.tmp / "run", "--threads", "1")
    (env.tmp / "r.yaml").write_text(RECIPE.format(criterion="l2"))


COMMANDS = [
    ("cli: prune --runs -1", _cli_case("prune", "MnistNet", "--sparsity", "0.5", "--out", "{tmp}/o", "--runs", "-1"),
     SystemExit, "expected a number >= 0, got -1"),
    ("cli: compact --runs -1", _cli_case("compact", "{orig}/masked.safetensors", "--out", "{tmp}/o", "--runs", "-1"),
     SystemExit, "expected a number >= 0, got -1"),
    ("cli: report --runs -5", _cli_case("report", "MnistNet", "--runs", "-5"), SystemExit,
     "expected a number >= 0, got -5"),
    ("cli: prune --batch-size 0", _cli_case("prune", "MnistNet", "--sparsity", "0.5", "--out", "{tmp}/o",
                                            "--batch-size", "0"), SystemExit, "expected a number >= 1, got 0"),
    ("cli: prune --out a read-only folder", _cli_case(
        "prune", "MnistNet", "--sparsity", "0.5", "--out", "{tmp}/ro", "--runs", "0",
        prepare=lambda e: read_only_folder(e)), SystemExit,
     "is read-only"),
    ("cli: prune --out a file", _cli_case("prune", "MnistNet", "--sparsity", "0.5", "--out", "{tmp}/f", "--runs",
                                          "0", prepare=lambda e: e.write("f", "x")), SystemExit,
     "exists and is not a folder"),
    ("cli: prune --out with a folder where report.md goes", _cli_case(
        "prune", "MnistNet", "--sparsity", "0.6", "--out", "{tmp}/o", "--runs", "0",
        prepare=lambda e: _pruned_out(e, lambda o: (o / "report.md").unlink() or (o / "report.md").mkdir())),
     SystemExit, "is a folder where an output file goes"),
    ("cli: prune --out with a read-only model file", _cli_case(
        "prune", "MnistNet", "--sparsity", "0.6", "--out", "{tmp}/o", "--runs", "0",
        prepare=lambda e: _pruned_out(e, lambda o: read_only(o / "model.safetensors"))), SystemExit, "is read-only"),
    ("cli: prune --out with a link where masks go", _cli_case(
        "prune", "MnistNet", "--sparsity", "0.6", "--out", "{tmp}/o", "--runs", "0",
        prepare=lambda e: _pruned_out(e, lambda o: (o / "masks.safetensors").unlink() or os.symlink(
            e.tmp / "x", o / "masks.safetensors"))), SystemExit, "is a symbolic link"),
    ("cli: prune a pickled .bin", _cli_case("prune", "{tmp}/m.bin", "--sparsity", "0.5", "--out", "{tmp}/o",
                                            prepare=lambda e: e.copy("pickled.pt", "m.bin")), SystemExit,
     "never loads pickles"),
    ("cli: prune a truncated model file", _cli_case(
        "prune", "{tmp}/masked.safetensors", "--sparsity", "0.5", "--out", "{tmp}/o", "--runs", "0",
        prepare=lambda e: truncate(e.copy("masked.safetensors"))), SystemExit, "not a readable safetensors"),
    ("cli: prune a dangling link", _cli_case(
        "prune", "{tmp}/link.safetensors", "--sparsity", "0.5", "--out", "{tmp}/o", "--runs", "0",
        prepare=lambda e: os.symlink(e.tmp / "gone.safetensors", e.tmp / "link.safetensors")), SystemExit,
     "does not exist"),
    ("cli: compact a dense model file", _cli_case("compact", "{orig}/dense.safetensors", "--out", "{tmp}/o",
                                                  "--runs", "0"), SystemExit, "has no masks to compact"),
    ("cli: compact a compacted file without masks", _cli_case(
        "compact", "{orig}/compacted.safetensors", "--out", "{tmp}/o", "--runs", "0"), SystemExit,
     "has no masks to compact"),
    ("cli: compact with garbage masks", _cli_case(
        "compact", "DigitsCNN", "--masks", "{tmp}/g.safetensors", "--out", "{tmp}/o", "--runs", "0",
        prepare=lambda e: garble(e.copy("masks.safetensors", "g.safetensors"))), SystemExit,
     "not a readable safetensors mask file"),
    ("cli: compact with masks of the wrong shape", _cli_case(
        "compact", "DigitsCNN", "--masks", "{tmp}/bad.safetensors", "--out", "{tmp}/o", "--runs", "0",
        prepare=_wrong_shape_masks), SystemExit, "has shape (3, 3)"),
    ("cli: compact with a model file as masks", _cli_case(
        "compact", "DigitsCNN", "--masks", "{orig}/dense.safetensors", "--out", "{tmp}/o", "--runs", "0"),
     SystemExit, "non-bool tensors"),
    ("cli: compact --out a read-only model file", _cli_case(
        "compact", "{orig}/masked.safetensors", "--out", "{tmp}/c", "--runs", "0",
        prepare=lambda e: read_only(e.copy("residual", "c") / "model.safetensors")), SystemExit, "is read-only"),
    ("cli: report a masks file", _cli_case("report", "{orig}/masks.safetensors", "--runs", "0"), SystemExit,
     "is not a slimtorch model file"),
    ("cli: report with masks of another model", _cli_case("report", "MnistNet", "--masks", "{orig}/masks.safetensors",
                                                           "--runs", "0"), SystemExit, "names no parameter"),
    ("cli: report --out a file", _cli_case("report", "MnistNet", "--runs", "0", "--out", "{tmp}/f",
                                           prepare=lambda e: e.write("f", "x")), SystemExit,
     "exists and is not a folder"),
    ("cli: recipe --out a file", _cli_case("recipe", "{tmp}/r.yaml", "--out", "{tmp}/f", prepare=lambda e: (
        e.write("f", "x"), e.write("r.yaml", RECIPE.format(criterion="l1")))), SystemExit,
     "exists and is not a folder"),
    ("cli: recipe with a pickled model", _cli_case("recipe", "{tmp}/r.yaml", "--out", "{tmp}/o", prepare=lambda e: (
        e.copy("pickled.pt", "m.pt"), e.write("r.yaml", RECIPE.format(criterion="l1").replace(
            "model: DigitsCNN", f"model: {e.tmp / 'm.pt'}")))), SystemExit, "not a readable safetensors model file"),
    ("cli: recipe --resume after changing the criterion", _cli_case(
        "recipe", "{tmp}/r.yaml", "--out", "{tmp}/run", "--resume", "--threads", "1",
        prepare=_recipe_ran_then_changed), SystemExit,
     "recipe.steps[0].prune.criterion ('l1' in the checkpoint, 'l2' now)"),
]


GOOD = RECIPE.format(criterion="l1")


def _recipe(text: str, *more: Any):
    """``slimtorch recipe`` on ``text`` written to r.yaml; it must fail before writing anything."""
    return _cli_case("recipe", "{tmp}/r.yaml", "--out", "{tmp}/run", "--threads", "1", *more,
                     prepare=lambda e: e.write("r.yaml", text))


def _edit(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


RECIPES = [
    ("recipe: seed as a word", _recipe(GOOD + "seed: abc\n"), SystemExit, "seed must be an integer"),
    ("recipe: a fractional seed", _recipe(GOOD + "seed: 1.7\n"), SystemExit, "got 1.7"),
    ("recipe: a seed beyond 32 bits", _recipe(GOOD + "seed: 100000000000000000000\n"), SystemExit,
     "seed must be an integer in [0, 2147483647]"),
    ("recipe: model_kwargs a list", _recipe(_edit("{width: 4}", "[4]")), SystemExit,
     "model_kwargs must be a mapping"),
    ("recipe: no model", _recipe(_edit("model: DigitsCNN", "model: null")), SystemExit, "a recipe needs a model"),
    ("recipe: a negative data limit", _recipe(_edit("limit: 64", "limit: -5")), SystemExit,
     "data.limit (samples per split) must be an integer >= 1"),
    ("recipe: normalize as a word", _recipe(_edit("limit: 64", "limit: 64, normalize: sometimes")), SystemExit,
     "data.normalize must be true or false"),
    ("recipe: image size 0", _recipe(_edit("limit: 64", "limit: 64, image_size: 0")), SystemExit,
     "data.image_size (pixels)"),
    ("recipe: step settings as a list", _recipe(_edit("finetune: {epochs: 1, batch_size: 32}", "finetune: [1]")),
     SystemExit, "the finetune step's settings must be a mapping"),
    ("recipe: an unknown criterion, after a training step", _recipe(
        "model: DigitsCNN\nmodel_kwargs: {width: 4}\ndata: {dataset: digits, limit: 64}\nsteps:\n"
        "  - train: {epochs: 1}\n  - prune: {config_list: [{op_names: [down.0], sparse_ratio: 0.5}], "
        "criterion: l7}\n"), SystemExit, "unknown criterion 'l7'"),
    ("recipe: a criterion given as a number", _recipe(RECIPE.format(criterion=3)), SystemExit,
     "criterion must be a name"),
    ("recipe: a config list of numbers", _recipe(_edit("config_list: [{op_names: [down.0], sparse_ratio: 0.5}]",
                                                       "config_list: [5]")), SystemExit,
     "config_list entry 0 must be a mapping"),
    ("recipe: a missing teacher file, after a training step", _recipe(
        GOOD + "  - distill: {epochs: 1, teacher: /nonexistent/teacher.safetensors}\n"), SystemExit,
     "'/nonexistent/teacher.safetensors' is neither"),
    ("recipe: a key given twice", _recipe(GOOD.replace("steps:", "seed: 1\nseed: 2\nsteps:")), SystemExit,
     "the key 'seed' appears twice"),
    ("recipe: an infinite learning rate", _recipe(_edit("epochs: 1,", "epochs: 1, lr: .inf,")), SystemExit,
     "lr must be a finite number"),
    ("recipe: not UTF-8", _cli_case("recipe", "{tmp}/r.yaml", "--out", "{tmp}/run",
                                    prepare=lambda e: e.write("r.yaml", b"\xff\xfe\x00 model")), SystemExit,
     "is not UTF-8 text"),
    ("recipe: a Python tag", _recipe(GOOD + "extra: !!python/object/apply:os.system [touch pwned]\n"), SystemExit,
     "not valid YAML"),
]

PRUNE = [
    ("cli: prune --exclude every selected layer", _cli_case(
        "prune", "MnistNet", "--sparsity", "0.5", "--exclude", "conv1", "conv2", "--out", "{tmp}/o", "--runs", "0"),
     SystemExit, "selects no layer"),
    ("cli: prune --config not UTF-8", _cli_case(
        "prune", "MnistNet", "--config", "{tmp}/c.yaml", "--out", "{tmp}/o",
        prepare=lambda e: e.write("c.yaml", b"\xff\xfe\x00")), SystemExit, "is not UTF-8 text"),
    ("cli: prune --config with a key twice", _cli_case(
        "prune", "MnistNet", "--config", "{tmp}/c.yaml", "--out", "{tmp}/o",
        prepare=lambda e: e.write("c.yaml", "- {op_types: [Conv2d], sparse_ratio: 0.5, sparse_ratio: 0.9}\n")),
     SystemExit, "the key 'sparse_ratio' appears twice"),
    ("cli: prune --config a folder", _cli_case(
        "prune", "MnistNet", "--config", "{tmp}/cfg", "--out", "{tmp}/o", prepare=lambda e: (e.tmp / "cfg").mkdir()),
     SystemExit, "(it is a folder)"),
    ("cli: prune --batch-size beyond memory", _cli_case(
        "prune", "MnistNet", "--sparsity", "0.5", "--batch-size", "100000000", "--out", "{tmp}/o", "--runs", "0"),
     SystemExit, "--batch-size 100000000 of samples of shape (1, 28, 28)"),
    ("cli: compact --batch-size beyond memory", _cli_case(
        "compact", "{orig}/masked.safetensors", "--batch-size", "100000000", "--out", "{tmp}/o", "--runs", "0"),
     SystemExit, "use a smaller --batch-size"),
]

COMMANDS += RECIPES + PRUNE


@pytest.mark.parametrize(("setup", "error", "fragment"), [row[1:] for row in COMMANDS],
                         ids=[row[0] for row in COMMANDS])
def test_fails_cleanly(setup, error, fragment, originals, tmp_path):
    run_row(setup, error, fragment, Env(tmp_path / "case", originals))


# -- what must work --------------------------------------------------------------------------------------------


def _replaces_every_output_and_keeps_other_files(env: Env) -> None:
    _pruned_out(env, lambda o: (o / "notes.txt").write_text("mine"))
    before = json.loads((env.tmp / "o" / "report.json").read_text())
    cli("prune", "MnistNet", "--sparsity", "0.6", "--out", env.tmp / "o", "--runs", "0")
    assert json.loads((env.tmp / "o" / "report.json").read_text()) != before
    assert (env.tmp / "o" / "notes.txt").read_text() == "mine" and sorted(p.name for p in env.tmp.iterdir()) == ["o"]


def _prunes_and_compacts_twice(env: Env) -> None:
    cli("prune", "{}".format(env.originals / "compacted.safetensors"), "--sparsity", "0.5", "--out", env.tmp / "p",
        "--runs", "0")
    cli("compact", env.tmp / "p" / "model.safetensors", "--out", env.tmp / "c", "--runs", "0")
    first = load_model(env.originals / "compacted.safetensors")
    again = load_model(env.tmp / "c" / "model.safetensors")
    assert again.model.down[0].out_channels < first.model.down[0].out_channels
    assert len(again.model.slimtorch_compaction["steps"]) == 2


def _report_into_an_existing_folder(env: Env) -> None:
    (env.tmp / "r").mkdir()
    (env.tmp / "r" / "keep.txt").write_text("x")
    cli("report", env.originals / "masked.safetensors", "--runs", "0", "--out", env.tmp / "r")
    assert sorted(p.name for p in (env.tmp / "r").iterdir()) == ["keep.txt", "layers.png", "report.json", "report.md"]


def _prunes_into_the_working_directory(env: Env) -> None:
    _pruned_out(env, lambda o: (o / "notes.txt").write_text("mine"))
    before = json.loads((env.tmp / "o" / "report.json").read_text())
    cwd = os.getcwd()
    os.chdir(env.tmp / "o")
    try:
        cli("prune", "MnistNet", "--sparsity", "0.6", "--out", ".", "--runs", "0")
        assert Path.cwd() == (env.tmp / "o").resolve() and Path("notes.txt").read_text() == "mine"
    finally:
        os.chdir(cwd)
    assert json.loads((env.tmp / "o" / "report.json").read_text()) != before
    assert sorted(p.name for p in (env.tmp / "o").iterdir()) == ["layers.png", "masks.safetensors",
                                                                  "model.safetensors", "notes.txt", "report.json",
                                                                  "report.md"]


SUCCESSES = [
    ("cli prune --out . (the working directory)", _prunes_into_the_working_directory),
    ("cli prune replaces every output at once and keeps other files", _replaces_every_output_and_keeps_other_files),
    ("cli prune and compact a compacted file", _prunes_and_compacts_twice),
    ("cli report into an existing folder", _report_into_an_existing_folder),
]


@pytest.mark.parametrize("check", [row[1] for row in SUCCESSES], ids=[row[0] for row in SUCCESSES])
def test_works(check, originals, tmp_path):
    env = Env(tmp_path / "case", originals)
    env.tmp.mkdir()
    check(env)
