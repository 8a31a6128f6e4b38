"""What a recipe run leaves behind: ``report.md``, ``report.json``, ``stages.png``, the final model and masks."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from slimtorch.io import atomic_write, save_masks
from slimtorch.models.modelfile import save_model
from slimtorch.recipes.plots import plot_stages
from slimtorch.recipes.runner import RecipeResult, StageResult

__all__ = ["stages_markdown", "write_outputs"]


def _size(value: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}{unit}"
    return f"{value:.4g}{unit}"


def stages_markdown(stages: Sequence[StageResult]) -> str:
    """A Markdown table with one row per stage."""
    lines = ["| stage | state | params | non-zero | FLOPs | size | latency | test accuracy | train time |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in stages:
        latency = f"{s.latency_s * 1e3:.2f} ms" if s.latency_s else "-"
        train = f"{s.train_seconds:.1f} s" if s.train_seconds else "-"
        lines.append(f"| {s.stage} | {s.state} | {s.params:,} | {s.nonzero_params:,} | {_size(s.flops)} | "
                     f"{_size(s.size_bytes, 'B')} | {latency} | {s.accuracy:.2%} | {train} |")
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_outputs(
    result: RecipeResult, out_dir: str | Path, *, title: str = "recipe", extra: Mapping[str, Any] | None = None,
    summary: str = "",
) -> list[Path]:
    """Write the report (Markdown and JSON), the figure, the final model and its masks; returns the paths.
    ``summary`` (Markdown) goes above the per-stage table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = stages_markdown(result.stages)
    paths = [out / "report.md", out / "report.json", out / "stages.png", out / "model.safetensors"]
    sections = [f"# {title}", summary, "Every stage:" if summary else "", table]
    _write_text(paths[0], "\n\n".join(part for part in sections if part) + "\n")
    _write_text(paths[1], json.dumps({**result.to_dict(), **(extra or {})}, indent=2))
    plot_stages([asdict(s) for s in result.stages], paths[2], title=title)
    save_model(paths[3], result.model, result.spec, masks=result.masks)
    if result.masks:
        paths.append(out / "masks.safetensors")
        save_masks(result.masks, paths[-1])
    return paths
