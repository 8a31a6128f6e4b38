"""The Python examples in the README and in docs/ run as written.

Each Markdown file's ```python blocks run in order in one namespace (a later block may use what an earlier
one defined), in a scratch directory. A block that cannot run here (it needs a dataset folder or minutes
of training) is preceded by an HTML comment `<!-- not run: reason -->`, which keeps the reason visible to
anyone editing the page.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
# A fenced block with its info string, and the line right before it (for the opt-out comment).
FENCE = re.compile(r"(?P<before>[^\n]*)\n```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)\n```", re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block not marked `<!-- not run: ... -->`."""
    blocks = []
    for match in FENCE.finditer("\n" + text):
        if match["lang"] != "python" or match["before"].strip().startswith("<!-- not run"):
            continue
        line = text.count("\n", 0, match.start("body")) + 1
        blocks.append((line, match["body"]))
    return blocks


def test_fence_parser_sees_blocks_and_opt_outs():
    page = "intro\n```python\nx = 1\n```\n<!-- not run: needs data -->\n```python\nboom()\n```\n```bash\nls\n```\n"
    assert python_blocks(page) == [(3, "x = 1")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for line, code in python_blocks(page.read_text()):
        try:
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        except Exception as err:  # report which block of which page broke
            pytest.fail(f"{page.relative_to(ROOT)} block at line {line} failed: {type(err).__name__}: {err}")


def test_readme_quick_start_measures_each_phase(tmp_path, monkeypatch):
    """The quick start reports the dense, masked and compacted models, each in its own state, and checks
    the compacted model against a separate masked one on inputs compaction never saw."""
    monkeypatch.chdir(tmp_path)
    line, code = python_blocks((ROOT / "README.md").read_text())[0]
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    states = {name: namespace[name].state for name in ("dense", "masked", "compacted")}
    assert states == {"dense": "dense", "masked": "masked", "compacted": "compacted"}
    assert namespace["masked"].params == namespace["dense"].params > namespace["compacted"].params
    assert namespace["masked_model"] is not namespace["model"] and "fresh" in namespace
