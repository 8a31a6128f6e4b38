import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from slimtorch.cli.main import main
from slimtorch.models.modelfile import load_model


def run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_then_report_a_reference_model(tmp_path, capsys):
    out = tmp_path / "pruned"
    code, printed, _ = run(["prune", "MnistNet", "--sparsity", "0.5", "--op-types", "Conv2d", "--out", out,
                            "--runs", "0"], capsys)
    assert code == 0 and "pruned (masked)" in printed
    for name in ("masks.safetensors", "model.safetensors", "report.md", "report.json", "layers.png"):
        assert (out / name).is_file()
    masks = load_file(str(out / "masks.safetensors"))
    assert int(masks["conv2.weight"].any(dim=(1, 2, 3)).sum()) == 25  # half of 50 filters kept
    code, printed, _ = run(["report", out / "model.safetensors", "--format", "json", "--runs", "0"], capsys)
    data = json.loads(printed)
    assert code == 0 and data["state"] == "masked" and data["nonzero_params"] < data["params"]


def test_report_scores_accuracy_on_a_dataset(tmp_path, capsys):
    code, printed, _ = run(["report", "DigitsCNN", "--dataset", "digits", "--limit", "64", "--runs", "0",
                            "--format", "json", "--out", tmp_path], capsys)
    assert code == 0 and 0.0 <= json.loads(printed)["accuracy"] <= 1.0
    assert json.loads((tmp_path / "report.json").read_text())["params"] > 0


def test_compact_subcommand(tmp_path, capsys):
    run(["prune", "BookCNN", "--sparsity", "0.5", "--out", tmp_path / "p", "--runs", "0"], capsys)
    code, printed, err = run(["compact", tmp_path / "p" / "model.safetensors", "--out", tmp_path / "c",
                              "--runs", "0"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["compacted"]["params"] == 1_059_306  # the book's figure for 50% of both convs
    assert report["compacted"]["state"] == "compacted" and report["max_diff"] < 1e-4
    assert report["compacted"]["flops"] < 0.6 * report["masked"]["flops"]
    code, printed, _ = run(["report", tmp_path / "c" / "model.safetensors", "--format", "json", "--runs", "0"], capsys)
    assert code == 0 and json.loads(printed)["params"] == 1_059_306
    # the saved compacted model really is smaller and computes what the saved masked one does
    masked, compacted = (load_model(tmp_path / d / "model.safetensors").model.eval() for d in ("p", "c"))
    assert compacted.layer1[0].out_channels == 16 and tuple(compacted.fc1.weight.shape) == (512, 32 * 8 * 8)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(compacted(x), masked(x), atol=1e-5)


def _image_tree(root, size=10):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("circle", "square"):
            (root / split / label).mkdir(parents=True)
            for i in range(6):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")


RECIPE = """
model: {model}
model_kwargs: {{width: 4, in_channels: {channels}}}
data: {{dataset: {dataset}}}
steps:
  - train: {{epochs: 1, batch_size: 16}}
  - prune: {{config_list: [{{op_names: [down.0], sparse_ratio: 0.5}}]}}
  - distill: {{epochs: 1, batch_size: 16, features: [[down.0, down.0]]}}
"""


def test_recipe_on_an_image_folder(tmp_path, capsys):
    _image_tree(tmp_path / "images")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model="DigitsCNN", dataset="imagefolder", channels=3))
    code, printed, err = run(["recipe", recipe, "--data-dir", tmp_path / "images", "--out", tmp_path / "run",
                              "--threads", "1"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["initial", "1 train", "2 prune", "3 distill"]
    assert report["model"]["kwargs"]["num_classes"] == 2 and report["model"]["input_shape"] == [3, 10, 10]
    assert report["stages"][2]["nonzero_params"] < report["stages"][1]["nonzero_params"]
    assert (tmp_path / "run" / "stages.png").stat().st_size > 10_000
    assert "| 3 distill | masked |" in printed


def test_recipe_model_that_does_not_fit_the_data_is_a_clear_error(tmp_path, capsys):
    _image_tree(tmp_path / "images")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model="DigitsCNN", dataset="imagefolder", channels=1))
    code, _, err = run(["recipe", recipe, "--data-dir", tmp_path / "images", "--out", tmp_path / "run"], capsys)
    assert code == 2 and "cannot run on imagefolder samples of shape (3, 10, 10)" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def _write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 40)
    (tmp_path / "empty").mkdir()
    return {
        "tmp": tmp_path,
        "garbage": garbage,
        "bad_yaml": _write(tmp_path / "bad.yaml", "model: [unclosed\n"),
        "bad_step": _write(tmp_path / "step.yaml", "model: DigitsCNN\nsteps:\n  - trian: {epochs: 1}\n"),
        "bad_key": _write(tmp_path / "key.yaml", "model: DigitsCNN\nsteps:\n  - train: {epochs: 1, lrate: 1}\n"),
        "a_file": _write(tmp_path / "a_file", "x"),
    }


ERRORS = [
    (["prune", "Resnet99", "--sparsity", "0.5", "--out", "{tmp}/o"], "unknown model 'Resnet99'"),
    (["prune", "{tmp}/model.pt", "--sparsity", "0.5", "--out", "{tmp}/o"], "never loads pickles"),
    (["prune", "MnistNet", "--out", "{tmp}/o"], "say how much to prune"),
    (["prune", "MnistNet", "--sparsity", "1.5", "--out", "{tmp}/o"], "1.5"),
    (["prune", "MnistNet", "--sparsity", "0.5", "--op-types", "Conv3d", "--out", "{tmp}/o"], "Conv3d"),
    (["prune", "MnistNet", "--sparsity", "0.5", "--input-shape", "3,x", "--out", "{tmp}/o"], "bad shape"),
    (["prune", "MnistNet", "--sparsity", "0.5", "--input-shape", "3,32,32", "--out", "{tmp}/o"],
     "cannot run on inputs of shape"),
    (["prune", "MnistNet", "--sparsity", "0.5", "--out", "{a_file}", "--runs", "0"], "exists and is not a folder"),
    (["report", "{garbage}"], "not a readable safetensors model file"),
    (["report", "MnistNet", "--masks", "{tmp}/missing.safetensors"], "does not exist"),
    (["report", "DigitsCNN", "--dataset", "mnist"], "pass --data-dir"),
    (["report", "MnistNet", "--threads", "0"], "expected a number >= 1"),
    (["recipe", "{tmp}/missing.yaml"], "does not exist"),
    (["recipe", "{bad_yaml}"], "not valid YAML"),
    (["recipe", "{bad_step}"], "unknown step 'trian'"),
    (["recipe", "{bad_key}"], "['lrate']"),
    (["table61", "--data-dir", "{tmp}/empty", "--limit", "8"], "cifar10_jpeg.npz' not found"),
    (["table61", "--data-dir", "{tmp}/empty", "--sparsities", "1.2"], "sparsities must be fractions"),
    (["compact", "MnistNet", "--out", "{tmp}/o"], "no masks to compact"),
    (["demo", "--epochs", "0"], "expected a number >= 1"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize(("argv", "message"), ERRORS, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in
                                                           enumerate(ERRORS)])
def test_bad_arguments_exit_2_with_one_line(argv, message, files, capsys):
    argv = [a.format(**files) for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
    assert not (files["tmp"] / "o").exists()  # nothing half-written


def test_a_save_compacted_folder_is_a_model(tmp_path, capsys):
    from slimtorch import compact_, compute_masks
    from slimtorch.io import save_compacted
    from slimtorch.models import BookCNN

    net, x = BookCNN().eval(), torch.randn(2, 3, 32, 32)
    compact_(net, compute_masks(net, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]), example_inputs=x)
    save_compacted(net, tmp_path / "book")
    code, printed, _ = run(["report", tmp_path / "book", "--format", "json", "--runs", "0"], capsys)
    assert code == 0 and json.loads(printed)["params"] == 1_059_306 and json.loads(printed)["state"] == "compacted"
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "book").model.eval()(x), net(x))
    save_compacted(torch.nn.Linear(2, 2), tmp_path / "linear")
    code, _, err = run(["report", tmp_path / "linear", "--runs", "0"], capsys)
    assert code == 2 and "reference models" in err and "load_compacted_" in err
