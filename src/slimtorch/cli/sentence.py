"""``slimtorch prune-sentence``: a sentence-transformers folder in, a pruned and distilled one out."""

from __future__ import annotations

import argparse
import json

from slimtorch.cli.common import add_threads_arg, apply_threads, non_negative_int, positive_int

__all__ = ["add_sentence_command"]


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a share in [0, 1), got {text}")
    return value


def _run(args: argparse.Namespace) -> int:
    from slimtorch.recipes.minilm import WorkflowConfig
    from slimtorch.recipes.sentence_folder import prune_sentence_folder

    apply_threads(args)
    cfg = WorkflowConfig(head_sparsity=args.heads, ffn_sparsity=args.ffn, drop_layers=args.drop_layers,
                         steps=args.steps, batch_size=args.batch_size, prune_every=args.prune_every, lr=args.lr,
                         head_criterion=args.head_criterion, ffn_criterion=args.ffn_criterion, seed=args.seed,
                         hidden_weight=args.hidden_weight, attention_weight=args.attention_weight)
    result = prune_sentence_folder(args.source, args.out, cfg, work=args.work, resume=args.resume)
    print(json.dumps(result.to_dict()))
    loader = ("SentenceTransformer(folder)" if result.plain_loader else
              "slimtorch.integrations.hf.sentence.load_sentence_folder(folder) (its layers keep different head "
              "counts, which a BERT config cannot describe)")
    print(f"wrote {args.out}: {result.params_before:,} -> {result.params_after:,} parameters; open it with {loader}")
    return 0


def add_sentence_command(sub: argparse._SubParsersAction) -> None:
    from slimtorch.integrations.hf.importance import UNIT_CRITERIA

    p = sub.add_parser("prune-sentence", help="prune and distil a sentence-transformers model folder (layers, "
                                              "attention heads, FFN neurons) into a new folder, offline")
    p.add_argument("source", help="the sentence-transformers folder (read only)")
    p.add_argument("out", help="the folder to write the pruned model to")
    p.add_argument("--heads", type=_fraction, default=0.5, help="share of the attention heads to remove")
    p.add_argument("--ffn", type=_fraction, default=0.5, help="share of the FFN neurons to remove")
    p.add_argument("--drop-layers", type=non_negative_int, default=0, help="whole layers to remove first")
    p.add_argument("--steps", type=positive_int, default=400, help="distillation steps in all")
    p.add_argument("--batch-size", type=positive_int, default=32, help="sentences per step")
    p.add_argument("--prune-every", type=positive_int, default=10, help="steps between sparsity increases")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--head-criterion", choices=UNIT_CRITERIA, default="movement")
    p.add_argument("--ffn-criterion", choices=UNIT_CRITERIA, default="taylor")
    p.add_argument("--hidden-weight", type=float, default=1.0, help="weight of the hidden-state loss")
    p.add_argument("--attention-weight", type=float, default=0.0, help="weight of the attention-map loss (0: "
                   "off; otherwise attention runs unfused while distilling, slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="folder for the pruned model and checkpoints (makes it resumable)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from --work")
    add_threads_arg(p)
    p.set_defaults(func=_run)
