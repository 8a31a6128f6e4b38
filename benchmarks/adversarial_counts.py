"""Count the adversarial suite's cases per category, and the property tests per graph rule family, from the
tables themselves (``tests/test_adversarial_*.py``, ``tests/test_rule_exactness.py``): the figures of
docs/reliability.md.

    PYTHONPATH=src python benchmarks/adversarial_counts.py

Nothing is run but the imports of the tables (seconds); ``--smoke`` prints the same tables.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1] / "tests"


def _tables() -> dict[str, Any]:
    sys.path.insert(0, str(TESTS))
    import test_adversarial_cli as cli
    import test_adversarial_compact as compact
    import test_adversarial_files as files
    import test_adversarial_inputs as inputs
    import test_adversarial_prune as prune
    import test_adversarial_resume as resume
    import test_adversarial_train as train
    import test_rule_exactness as rules

    return {"cli": cli, "compact": compact, "files": files, "inputs": inputs, "prune": prune, "resume": resume,
            "train": train, "rules": rules}


def _cases(rows: Sequence[Any]) -> tuple[int, int]:
    """(must fail cleanly, must succeed) of rows that are Case objects (``error`` None: a success)."""
    fail = sum(getattr(r, "error", None) is not None for r in rows)
    return fail, len(rows) - fail


def categories(t: dict[str, Any]) -> list[tuple[str, str, int, int]]:
    """(table, category, must fail cleanly, must succeed) for every category of every table."""
    out = []
    prefixes = Counter(name.split("/")[0] for name in t["compact"].CASES)
    for prefix in sorted(prefixes):
        rows = [c for n, c in t["compact"].CASES.items() if n.split("/")[0] == prefix]
        out.append(("compaction", {"mask": "masks", "inputs": "example inputs", "model": "odd models",
                                   "args": "arguments"}[prefix], *_cases(rows)))
    m = t["inputs"]
    for name, rows in [("quantization", m.QUANTIZE), ("quantizing pruned models, LoRA on them", m.AFTER_PRUNING),
                       ("export, ONNX Runtime", m.EXPORT), ("low-rank", m.LOWRANK), ("LoRA", m.LORA),
                       ("reports", m.REPORT), ("distillation settings", m.DISTILL), ("sensitivity", m.SENSITIVITY),
                       ("Hugging Face folders", m.HF + m.HF_MORE), ("report/demo/table61 commands", m.CLI)]:
        out.append(("inputs", name, *_cases(rows)))
    m = t["prune"]
    for name, rows in [("compute_masks, config lists", m.COMPUTE), ("masks", m.MASKS),
                       ("pruning during training", m.DURING_TRAINING), ("statistics, sensitivity", m.STATS),
                       ("NNI names", m.NNI)]:
        out.append(("pruning", name, *_cases(rows)))
    m = t["train"]
    for name, rows in [("fit", m.FIT), ("training settings", m.SETTINGS), ("distillation", m.DISTILL)]:
        out.append(("training", name, *_cases(rows)))
    m = t["files"]
    out += [("files", "corrupt, edited, pickled, wrong files", len(m.LOADERS), 0),
            ("files", "outputs that cannot be replaced", len(m.OUTPUTS), 0),
            ("files", "bad masks, paths and models", len(m.ARGUMENTS), 0),
            ("files", "writes interrupted half-way", len(m.INTERRUPTED), 0),
            ("files", "unusual uses that must work", 0, len(m.SUCCESSES))]
    m = t["resume"]
    out += [("resume", "other runs, broken checkpoints", len(m.RESUMES), 0),
            ("resume", "resuming the same run", 0, len(m.SUCCESSES))]
    m = t["cli"]
    others = [r for r in m.COMMANDS if r not in m.RECIPES and r not in m.PRUNE]
    out += [("command line", "prune/compact/report files and arguments", len(others) + len(m.PRUNE), 0),
            ("command line", "recipe files", len(m.RECIPES), 0),
            ("command line", "unusual uses that must work", 0, len(m.SUCCESSES))]
    return out


def rule_families(rules: Any) -> list[tuple[str, int, int, int, int]]:
    """(family, property tests, exact, keeps the channels, either) of the graph's rule property tests."""
    counts: dict[str, Counter] = {}
    for name, (_, _, expected) in rules.CASES.items():
        counts.setdefault(name.split("/")[0], Counter())[expected] += 1
    return [(family, sum(c.values()), c["exact"], c["blocked"], c["either"]) for family, c in sorted(counts.items())]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the same tables (they take seconds anyway)")
    parser.parse_args(argv)
    t = _tables()
    rows = categories(t)
    print("| table | category | cases | must fail cleanly | must succeed |\n|---|---|---:|---:|---:|")
    for table, name, fail, ok in rows:
        print(f"| {table} | {name} | {fail + ok} | {fail} | {ok} |")
    fail, ok = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"| all | {len(rows)} categories | {fail + ok} | {fail} | {ok} |\n")
    families = rule_families(t["rules"])
    print("| rule family | property tests | exact | keeps the channels | either |\n|---|---:|---:|---:|---:|")
    for family, total, exact, blocked, either in families:
        print(f"| {family} | {total} | {exact} | {blocked} | {either} |")
    print(f"| all | {sum(f[1] for f in families)} | {sum(f[2] for f in families)} | {sum(f[3] for f in families)} "
          f"| {sum(f[4] for f in families)} |")


if __name__ == "__main__":
    main()
