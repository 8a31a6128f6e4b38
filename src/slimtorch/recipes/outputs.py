"""What a recipe run leaves behind: ``report.md``, ``report.json``, ``stages.png``, the final model and masks."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from slimtorch.atomic import atomic_folder, atomic_write, check_output_folder
from slimtorch.io import save_masks
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


OUTPUTS = ("report.md", "report.json", "stages.png", "model.safetensors", "masks.safetensors")


def write_outputs(
    result: RecipeResult, out_dir: str | Path, *, title: str = "recipe", extra: Mapping[str, Any] | None = None,
    summary: str = "", more: Mapping[str, Callable[[Path], None]] | None = None,
) -> list[Path]:
    """Write the report (Markdown and JSON), the figure, the final model (with the masks it carries) and the
    last pruning round's masks, all at once (:func:`slimtorch.atomic.atomic_folder`); returns the paths.
    ``summary`` (Markdown) goes above the per-stage table; ``more`` maps further file names to the
    functions that write them (given the path), written with the rest."""
    out = Path(out_dir)
    names = list(OUTPUTS if result.masks else OUTPUTS[:-1]) + list(more or {})
    check_output_folder(out, names)
    table = stages_markdown(result.stages)
    sections = [f"# {title}", summary, "Every stage:" if summary else "", table]
    with atomic_folder(out) as staging:
        _write_text(staging / names[0], "\n\n".join(part for part in sections if part) + "\n")
        _write_text(staging / names[1], json.dumps({**result.to_dict(), **(extra or {})}, indent=2))
        plot_stages([asdict(s) for s in result.stages], staging / names[2], title=title)
        save_model(staging / names[3], result.model, result.spec)
        if result.masks:
            save_masks(result.masks, staging / OUTPUTS[4])
        for name, write in (more or {}).items():
            write(staging / name)
    return [out / name for name in names]
