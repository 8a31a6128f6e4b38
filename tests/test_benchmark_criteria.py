"""benchmarks/criteria.py runs end to end (on scikit-learn digits, tiny settings) and prints its tables."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "criteria.py"


def _rows(text: str, title: str) -> list[dict[str, str]]:
    table = text.split(title, 1)[1].split("\n\n")[1]  # the Markdown table after the heading
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    return [dict(zip(lines[0], cells, strict=True)) for cells in lines[2:]]


@pytest.mark.slow
def test_criteria_benchmark_runs_and_compacts_channel_rows(capsys):
    spec = importlib.util.spec_from_file_location("criteria_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--seeds", "0", "--epochs", "1", "--finetune-epochs", "1", "--finetune-steps", "2",
                 "--latency-runs", "1"])
    out = capsys.readouterr().out
    criteria = _rows(out, "## Criteria")
    methods = _rows(out, "## Methods")
    assert len(criteria) == 16 and len(methods) == 11
    dense = int(methods[0]["params"].replace(",", ""))
    for row in criteria + methods[1:]:
        params, nonzero = int(row["params"].replace(",", "")), int(row["non-zero params"].replace(",", ""))
        if "channels" in row["pruned"]:  # channel-pruned models are really smaller
            assert row["model"] == "compacted" and params == nonzero < dense, row
        else:  # 90% of the weights of every layer but the first conv are zero, the model keeps its size
            assert row["model"] == "masked" and params == dense and nonzero < 0.2 * dense, row
