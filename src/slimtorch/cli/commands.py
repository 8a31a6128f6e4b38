"""``slimtorch prune``, ``compact`` and ``report``: one model in, files and a table out."""

from __future__ import annotations

import argparse
import copy
import json
import math

import torch

from slimtorch.atomic import atomic_folder, check_output_folder
from slimtorch.cli.common import (
    MODEL_HELP,
    add_data_args,
    add_threads_arg,
    apply_threads,
    non_negative_int,
    parse_shape,
    positive_int,
    resolve_model,
    write_json,
    write_text,
)
from slimtorch.cli.observe import OBSERVE_OUTPUTS, Observation, add_observe_args, dataset_batches, observe
from slimtorch.compact import compact_
from slimtorch.config import load_config_list, parse_config_list
from slimtorch.data.datasets import TensorSplit
from slimtorch.errors import CompactionError, ConfigError
from slimtorch.io import save_masks
from slimtorch.masks import get_masks, merge_masks
from slimtorch.models.modelfile import LoadedModel, save_model
from slimtorch.models.registry import MAX_SAMPLE_VALUES
from slimtorch.prune import apply_masks_, compute_masks
from slimtorch.prune.criteria import CRITERIA
from slimtorch.recipes.plots import plot_layers
from slimtorch.report import compare_markdown, report, sparsity_table

__all__ = ["add_commands"]


def _example(model: torch.nn.Module, shape: tuple[int, ...], batch: int) -> torch.Tensor:
    """A random batch of ``shape`` samples, checked to run through ``model``."""
    values = batch * math.prod(shape)
    if values > MAX_SAMPLE_VALUES:
        raise ConfigError(f"--batch-size {batch} of samples of shape {tuple(shape)} holds {values:,} values; at most "
                          f"{MAX_SAMPLE_VALUES:,} are accepted (the batch is made in memory): use a smaller "
                          "--batch-size")
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as err:  # the model may raise anything (TypeError for several inputs, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"the model cannot run on inputs of shape {tuple(x.shape)} ({first}); "
                          "give one sample's shape with --input-shape, e.g. 3,32,32 (the command line feeds the "
                          "model one tensor)") from None
    return x


def _check_dataset_fits(model: torch.nn.Module, split: TensorSplit, name: str) -> None:
    """The model must take the dataset's samples and score at least as many classes as it has labels."""
    sample = tuple(split.x_test.shape[1:])
    try:
        with torch.no_grad():
            out = model.eval()(split.x_test[:2])
    except Exception as err:  # the model may raise anything
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"the model cannot run on {name} samples of shape {sample} ({first}); pick a dataset "
                          "of the shape the model takes, or a model built for this dataset") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(f"accuracy needs a classifier returning (batch, classes) scores; on {name} the model "
                          f"returns {type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
    if out.shape[1] < len(split.classes):
        raise ConfigError(f"the model scores {out.shape[1]} classes but {name} has {len(split.classes)}; use a model "
                          f"built with num_classes={len(split.classes)}")


def _config_list(args: argparse.Namespace) -> list[dict] | tuple:
    if args.config is not None:
        if args.sparsity is not None or args.op_types or args.exclude:
            raise ConfigError("give either --config or --sparsity/--op-types/--exclude, not both")
        return load_config_list(args.config)
    if args.sparsity is None:
        raise ConfigError("say how much to prune: --sparsity 0.5 (with --op-types), or --config config.yaml")
    entries: list[dict] = [{"op_types": args.op_types or ["Conv2d"], "sparse_ratio": args.sparsity}]
    if args.exclude:
        entries.append({"op_names": args.exclude, "exclude": True})
    parse_config_list(entries)
    return entries


PRUNE_OUTPUTS = ("masks.safetensors", "model.safetensors", "report.md", "report.json", "layers.png", *OBSERVE_OUTPUTS)
COMPACT_OUTPUTS = ("model.safetensors", "report.md", "report.json")
REPORT_OUTPUTS = ("report.md", "report.json", "layers.png", *OBSERVE_OUTPUTS)
RANDOM_BATCH = 64  # random samples activation sparsity is measured on when no dataset is given


def _random_observation(model: torch.nn.Module, before: torch.nn.Module | None, shape: tuple[int, ...],
                        args: argparse.Namespace, title: str) -> Observation:
    x = _example(model, shape, RANDOM_BATCH)
    label = f"{RANDOM_BATCH} random inputs; give --dataset for real data"
    return observe(model, [x], before=before, data_label=label, bins=args.bins, title=title)


def _prune(args: argparse.Namespace) -> int:
    apply_threads(args)
    check_output_folder(args.out, PRUNE_OUTPUTS)  # before any work: a folder that cannot take them fails now
    loaded = resolve_model(args.model, input_shape=args.input_shape)
    config_list = _config_list(args)
    x = _example(loaded.model, loaded.spec.input_shape or (), args.batch_size)
    before = report(loaded.model, x, runs=args.runs)
    unpruned = copy.deepcopy(loaded.model) if args.observe else None
    # with the example batch, coupled layers (residual adds, BN, the next layer's inputs) get consistent masks
    new = compute_masks(loaded.model, config_list, example_inputs=x, criterion=args.criterion)
    masks = merge_masks(get_masks(loaded.model), new)  # a pruned or compacted model keeps its masks' zeros
    apply_masks_(loaded.model, masks)
    after = report(loaded.model, x, runs=args.runs)
    rows = sparsity_table(loaded.model, masks)
    table = compare_markdown({"before": before, "pruned (masked)": after})
    seen = (_random_observation(loaded.model, unpruned, loaded.spec.input_shape or (), args, args.model)
            if unpruned is not None else None)
    text = table + (f"\n\n{seen.text}" if seen is not None else "")
    with atomic_folder(args.out) as out:
        save_masks(masks, out / "masks.safetensors")
        save_model(out / "model.safetensors", loaded.model, loaded.spec, sparse="auto")
        write_text(out / "report.md", f"# slimtorch prune {args.model}\n\n{text}\n")
        write_json(out / "report.json", {"before": before.to_dict(), "after": after.to_dict(), "layers": rows,
                                         **({"observation": seen.data} if seen is not None else {})})
        plot_layers(rows, out / "layers.png", title=f"{args.model}: kept per layer")
        if seen is not None:
            seen.write_figures(out)
    figures = ", weights.png, activations.png" if seen is not None else ""
    print(f"{text}\n\nwrote {args.out}/masks.safetensors, model.safetensors, report.md, report.json, layers.png"
          f"{figures}")
    return 0


def _compact(args: argparse.Namespace) -> int:
    apply_threads(args)
    check_output_folder(args.out, COMPACT_OUTPUTS)
    loaded = resolve_model(args.model, masks=args.masks)
    if not loaded.masks or loaded.state == "dense":
        raise ConfigError(f"{args.model!r} has no masks to compact: give a pruned model file or --masks FILE")
    x = _example(loaded.model, loaded.spec.input_shape or (), args.batch_size)
    masked = report(loaded.model, x, runs=args.runs)
    with torch.no_grad():
        expected = loaded.model.eval()(x)
    compact_(loaded.model, loaded.masks, example_inputs=x)  # raises (model untouched) if it cannot verify
    with torch.no_grad():
        diff = float((loaded.model.eval()(x) - expected).abs().max())
    if diff > 1e-3 * max(1.0, float(expected.abs().max())):
        raise CompactionError(f"the compacted model computes differently from the masked one (max diff {diff:.3g})")
    compacted = report(loaded.model, x, runs=args.runs)
    table = compare_markdown({"masked": masked, "compacted": compacted})
    text = f"# slimtorch compact {args.model}\n\n{table}\n\nmax |output difference|: {diff:.3g}\n"
    with atomic_folder(args.out) as out:
        # with the masks it keeps, if any, stored sparse
        save_model(out / "model.safetensors", loaded.model, loaded.spec, sparse="auto")
        write_text(out / "report.md", text)
        write_json(out / "report.json", {"masked": masked.to_dict(), "compacted": compacted.to_dict(),
                                         "max_diff": diff})
    print(f"{table}\n\nmax |output difference| {diff:.3g}; wrote {args.out}/model.safetensors, report.md, report.json")
    return 0


def _report(args: argparse.Namespace) -> int:
    from slimtorch.data.sources import load_dataset
    from slimtorch.recover.trainer import evaluate_accuracy

    apply_threads(args)
    if args.out is not None:
        check_output_folder(args.out, REPORT_OUTPUTS)
    if args.before is not None and not args.observe:
        raise ConfigError("--before is the model the observation compares with: give --observe too")
    loaded = resolve_model(args.model, input_shape=args.input_shape, masks=args.masks)
    x = _example(loaded.model, loaded.spec.input_shape or (), args.batch_size)
    rep = report(loaded.model, x, runs=args.runs)
    data: dict = {"model": args.model, **rep.to_dict()}
    split = None
    if args.dataset is not None:
        split = load_dataset(args.dataset, data_dir=args.data_dir, limit=args.limit)
        _check_dataset_fits(loaded.model, split, args.dataset)
        data["accuracy"] = evaluate_accuracy(loaded.model, torch.utils.data.TensorDataset(split.x_test, split.y_test))
    text = rep.to_markdown(args.model) + (f"\n\ntest accuracy ({args.dataset}): {data['accuracy']:.2%}"
                                           if "accuracy" in data else "")
    seen = _report_observation(loaded, split, args) if args.observe else None
    if seen is not None:
        text += f"\n\n{seen.text}"
        data["observation"] = seen.data
    if args.out is not None:
        with atomic_folder(args.out) as out:
            write_text(out / "report.md", f"# slimtorch report {args.model}\n\n{text}\n")
            write_json(out / "report.json", data)
            if loaded.masks:
                plot_layers(sparsity_table(loaded.model, loaded.masks), out / "layers.png", title=args.model)
            if seen is not None:
                seen.write_figures(out)
    print(json.dumps(data, indent=2) if args.format == "json" else text)
    return 0


def _report_observation(loaded: LoadedModel, split: TensorSplit | None, args: argparse.Namespace) -> Observation:
    """Observe the model on the dataset's test images (random inputs without one), beside ``--before``, or
    beside itself without ``--masks`` when those are given."""
    before = None
    if args.before is not None:
        before = resolve_model(args.before, input_shape=args.input_shape).model
    elif args.masks is not None:
        before = resolve_model(args.model, input_shape=args.input_shape).model  # the same model, masks not applied
    if split is None:
        return _random_observation(loaded.model, before, loaded.spec.input_shape or (), args, args.model)
    batches = dataset_batches(split.x_test)
    label = f"{sum(len(b) for b in batches)} {args.dataset} test images"
    return observe(loaded.model, batches, before=before, data_label=label, bins=args.bins, title=args.model)


def _measure_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=positive_int, default=1, help="batch size of the measured input")
    parser.add_argument("--runs", type=non_negative_int, default=20, help="timed forward calls (0: skip latency)")
    add_threads_arg(parser)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add prune, compact and report to the ``slimtorch`` parser."""
    p = sub.add_parser("prune", help="compute and apply masks; writes masks, the masked model and a report")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of units to prune in each layer")
    p.add_argument("--op-types", nargs="+", default=None, help="layer types to prune (default Conv2d)")
    p.add_argument("--exclude", nargs="+", default=None, help="layer names to leave alone")
    p.add_argument("--config", default=None, help="a YAML config list (NNI keys) instead of the flags above")
    p.add_argument("--criterion", choices=sorted(CRITERIA), default="l1")
    p.add_argument("--input-shape", type=parse_shape, default=None, help="one sample's shape, e.g. 3,32,32")
    add_observe_args(p)
    _measure_args(p)
    p.set_defaults(func=_prune)

    c = sub.add_parser("compact", help="turn a pruned (masked) model into a really smaller one")
    c.add_argument("model", help="a pruned model file from `slimtorch prune`, or a model with --masks")
    c.add_argument("--masks", default=None, help="a masks file (.safetensors) to apply first")
    c.add_argument("--out", required=True, help="output folder")
    _measure_args(c)
    c.set_defaults(func=_compact)

    r = sub.add_parser("report", help="parameters, non-zeros, MACs, size, latency (and accuracy with --dataset)")
    r.add_argument("model", help=MODEL_HELP)
    r.add_argument("--masks", default=None, help="a masks file (.safetensors) to apply first")
    r.add_argument("--input-shape", type=parse_shape, default=None, help="one sample's shape, e.g. 3,32,32")
    r.add_argument("--format", choices=("md", "json"), default="md", help="what to print")
    r.add_argument("--out", default=None, help="folder for report.md, report.json (and layers.png if pruned)")
    r.add_argument("--before", default=None, help="with --observe: the model before pruning (a name or file) to "
                                                  "compare with (default with --masks: the model without them)")
    add_observe_args(r)
    add_data_args(r)
    _measure_args(r)
    r.set_defaults(func=_report)
