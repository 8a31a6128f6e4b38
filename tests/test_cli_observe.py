"""``--observe`` of ``slimtorch prune`` and ``report``: weight histograms before/after and activation sparsity."""

from __future__ import annotations

import json

import pytest

from slimtorch.cli.main import main


def run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("observe") / "pruned"
    code = main(["prune", "DigitsCNN", "--sparsity", "0.5", "--op-types", "Conv2d", "--out", str(out), "--runs", "0",
                 "--observe", "--bins", "21"])
    assert code == 0
    return out


def test_prune_observes_the_model_before_and_after(pruned):
    data = json.loads((pruned / "report.json").read_text())["observation"]
    before, after = data["before"], data["after"]
    assert before["weights"]["block.0.weight"]["zero_share"] == 0.0
    assert after["weights"]["stem.0.weight"]["zero_share"] == 0.5  # half of the filters, every weight of them
    assert after["weights"]["block.0.weight"]["zero_share"] == 0.75  # and half of the next layer's inputs
    assert len(after["weights"]["block.0.weight"]["counts"]) == 21
    ops = {r["op"]: r for r in after["activations"]}
    assert ops["stem.2"]["dead_units"] == 16 and ops["stem.2"]["units"] == 32  # pruned channels: zero on any input
    assert {r["op"] for r in before["activations"]} == set(ops) and "random inputs" in after["activation_data"]
    text = (pruned / "report.md").read_text()
    assert "## Weights, before and after" in text and "## Activation sparsity (64 random inputs" in text
    assert all((pruned / f).stat().st_size > 1000 for f in ("weights.png", "activations.png"))


def test_report_observes_on_a_dataset_beside_the_model_without_its_masks(pruned, tmp_path, capsys):
    code, printed, err = run(["report", "DigitsCNN", "--masks", pruned / "masks.safetensors", "--observe",
                              "--dataset", "digits", "--limit", "100", "--runs", "0", "--out", tmp_path], capsys)
    assert code == 0, err
    assert "## Activation sparsity (100 digits test images), before and after" in printed
    data = json.loads((tmp_path / "report.json").read_text())["observation"]
    assert data["before"]["weights"]["stem.0.weight"]["zeros"] == 0
    assert data["after"]["weights"]["stem.0.weight"]["zero_share"] == 0.5
    assert (tmp_path / "weights.png").is_file() and (tmp_path / "activations.png").is_file()


def test_report_observes_one_model_and_compares_with_before(pruned, tmp_path, capsys):
    code, printed, err = run(["report", pruned / "model.safetensors", "--observe", "--runs", "0"], capsys)
    assert code == 0, err
    assert "## Weights, of this model" in printed and "zeros after" not in printed
    code, printed, err = run(["report", pruned / "model.safetensors", "--before", "DigitsCNN", "--observe",
                              "--runs", "0", "--format", "json"], capsys)
    assert code == 0, err
    assert set(json.loads(printed)["observation"]) == {"before", "after"}


@pytest.mark.parametrize(("argv", "message"), [
    (["report", "DigitsCNN", "--before", "DigitsCNN"], "give --observe too"),
    (["report", "DigitsCNN", "--observe", "--bins", "0"], "expected a number >= 1"),
])
def test_bad_observe_arguments_exit_2_with_one_line(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
