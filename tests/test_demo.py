import json

from slimtorch.cli.main import main


def test_demo_writes_report_and_figure(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "3"]) == 0
    summary = json.loads((tmp_path / "report.json").read_text())
    acc = summary["accuracy"]
    assert acc["dense"] > 0.8 and acc["fine-tuned"] > 0.8
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "| dense | dense |" in (tmp_path / "report.md").read_text()
    assert "fine-tuned accuracy" in capsys.readouterr().out
