"""The examples of docs/pruning.md run as written, in order, in one namespace."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "pruning.md"


def test_pruning_guide_examples_run(monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 15
    monkeypatch.chdir(DOC.parent)
    namespace: dict = {"__name__": "pruning_guide"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)
        except Exception as err:  # name the block that failed
            pytest.fail(f"docs/pruning.md block {i + 1} failed: {type(err).__name__}: {err}\n{code}")
