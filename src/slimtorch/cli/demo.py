"""The offline demo: train a small CNN on scikit-learn's digits, prune it, fine-tune, and show before/after.

Runs in about a minute on two CPU cores and writes ``report.md``, ``report.json`` and ``demo.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimtorch.data import load_digits
from slimtorch.models import DigitsCNN
from slimtorch.prune import apply_masks_, compute_masks
from slimtorch.recover.finetune import evaluate, train
from slimtorch.report import compare_markdown, report, sparsity_table

__all__ = ["run_demo"]

CONFIG_LIST = [
    {"op_types": ["Conv2d"], "sparse_ratio": 0.5},
    {"op_names": ["stem.0"], "exclude": True},
]


def _plot(path: Path, rows: list[dict], accuracy: dict[str, float], params: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["param"].removesuffix(".weight") for r in rows if r["param"].endswith("weight")]
    kept = [r["units_kept"] / r["units"] for r in rows if r["param"].endswith("weight")]
    axes[0].bar(names, kept, color="tab:blue")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("output channels kept per layer")
    axes[0].tick_params(axis="x", rotation=30)
    stages = list(accuracy)
    axes[1].bar(stages, [accuracy[s] * 100 for s in stages], color=["tab:gray", "tab:red", "tab:green"])
    for i, s in enumerate(stages):
        axes[1].text(i, accuracy[s] * 100 + 1, f"{accuracy[s]:.1%}\n{params[s]:,} nz params", ha="center")
    axes[1].set_ylim(0, 115)
    axes[1].set_ylabel("test accuracy (%)")
    axes[1].set_title("digits: before and after pruning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir: str | Path = "runs/demo", *, epochs: int = 8, finetune_epochs: int = 3, seed: int = 0) -> dict:
    """Train, prune (50% of conv channels by L1 norm), fine-tune; write a report and a figure."""
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits(seed=seed)
    train_loader = data.loader("train", 64, shuffle=True, seed=seed)
    test_loader = data.loader("test", 256)
    model = DigitsCNN()
    print(f"[1/4] training DigitsCNN on {len(data.y_train)} digits for {epochs} epochs")
    train(model, train_loader, epochs=epochs, lr=3e-3)
    sample = data.x_test[:64]
    accuracy = {"dense": evaluate(model, test_loader)}
    reports = {"dense": report(model, sample)}
    print(f"[2/4] pruning 50% of conv channels (L1 norm); dense accuracy {accuracy['dense']:.1%}")
    masks = compute_masks(model, CONFIG_LIST, criterion="l1")
    apply_masks_(model, masks)
    accuracy["pruned"] = evaluate(model, test_loader)
    print(f"[3/4] fine-tuning {finetune_epochs} epochs; pruned accuracy {accuracy['pruned']:.1%}")
    train(model, train_loader, epochs=finetune_epochs, lr=1e-3)
    accuracy["fine-tuned"] = evaluate(model, test_loader)
    reports["masked + fine-tuned"] = report(model, sample)
    rows = sparsity_table(model, masks)
    params = {"dense": reports["dense"].nonzero_params, "pruned": reports["masked + fine-tuned"].nonzero_params,
              "fine-tuned": reports["masked + fine-tuned"].nonzero_params}
    table = compare_markdown(reports)
    acc_lines = "\n".join(f"| {k} | {v:.2%} |" for k, v in accuracy.items())
    (out / "report.md").write_text(
        f"# slimtorch demo: digits CNN\n\n{table}\n\n| stage | test accuracy |\n|---|---:|\n{acc_lines}\n"
    )
    summary = {"accuracy": accuracy, "reports": {k: r.to_dict() for k, r in reports.items()}, "layers": rows}
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    _plot(out / "demo.png", rows, accuracy, params)
    print(f"[4/4] fine-tuned accuracy {accuracy['fine-tuned']:.1%}\n\n{table}\n\nwrote {out}/report.md, "
          f"report.json, demo.png")
    return summary
