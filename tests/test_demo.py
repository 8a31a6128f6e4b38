import json

from slimtorch.cli.main import main


def test_demo_writes_report_and_figures(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "3", "--finetune-epochs", "2"]) == 0
    summary = json.loads((tmp_path / "report.json").read_text())
    acc = summary["accuracy"]
    assert acc["dense"] > 0.8 and acc["recovered"] > 0.8
    # distillation must win back what pruning lost
    assert acc["recovered"] > acc["pruned"]
    kinds = [s["stage"].split(" ")[-1] for s in summary["stages"]]
    assert kinds[:3] == ["initial", "train", "prune"] and kinds[-1] == "distill"
    final = summary["stages"][-1]
    assert final["nonzero_params"] < 0.75 * summary["stages"][1]["nonzero_params"]
    for name in ("demo.png", "layers.png", "stages.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert "| 1 train | dense |" in (tmp_path / "report.md").read_text()
    assert "wrote" in capsys.readouterr().out
