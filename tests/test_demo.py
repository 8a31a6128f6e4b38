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
    assert kinds == ["initial", "train", "prune", "compact", "distill"]
    dense, final = summary["stages"][1], summary["stages"][-1]
    # really smaller: half the channels of every conv but the stem go, so about a quarter of the weights stay
    assert final["state"] == "compacted" and final["params"] == final["nonzero_params"] < 0.35 * dense["params"]
    assert final["flops"] < 0.35 * dense["flops"] and final["size_bytes"] < 0.35 * dense["size_bytes"]
    for name in ("demo.png", "layers.png", "stages.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    text = (tmp_path / "report.md").read_text()
    assert "| 1 train | dense |" in text and "| 3 compact | compacted |" in text
    assert f"| parameters | {dense['params']:,} | {final['params']:,} |" in text
    assert "wrote" in capsys.readouterr().out
