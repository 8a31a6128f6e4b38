"""sentence-transformers folders of pruned models: written with the original's tokenizer, pooling and
normalisation, opened without running code from the folder.

:func:`save_sentence_folder` puts a pruned (compacted) transformer in place of a ``SentenceTransformer``'s own and
saves the whole pipeline (:func:`~slimtorch.integrations.hf.folders.save_hf_folder`: safetensors and JSON, all
files at once). When every layer keeps one head count, the config alone describes the model (dropped layers,
a uniform FFN width) and ``SentenceTransformer(folder)`` opens it as it is; BERT derives the head width from the
head count, so a model that lost heads needs :func:`load_sentence_folder`, which lets sentence-transformers build
its pipeline from the folder and then puts in the transformer that
:func:`~slimtorch.integrations.hf.folders.load_hf_folder` rebuilds from the recorded sizes.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from slimtorch.checks import check_path
from slimtorch.errors import CheckpointError
from slimtorch.integrations.hf.folders import load_hf_folder, save_hf_folder

__all__ = ["load_sentence_folder", "needs_our_loader", "offline", "save_sentence_folder", "set_transformer"]


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The Hugging Face hub offline for the duration: local folders only, never the network."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def set_transformer(first: Any, model: nn.Module) -> None:
    """Put ``model`` in a sentence-transformers ``Transformer`` module (``auto_model`` is a read-only alias of
    ``model`` in recent releases, the attribute itself in older ones)."""
    if isinstance(getattr(type(first), "auto_model", None), property) or not hasattr(first, "auto_model"):
        first.model = model
    else:
        first.auto_model = model


def needs_our_loader(model: nn.Module) -> bool:
    """Whether a saved ``model`` needs :func:`load_sentence_folder` (some layer lost heads), or plain
    ``SentenceTransformer(folder)`` rebuilds it from its config."""
    blocks = getattr(getattr(model, "config", None), "slimtorch_blocks", None) or {}
    heads = getattr(model.config, "num_attention_heads", None)
    return any(isinstance(v, dict) and "units" in v and name.endswith("attention") and v["units"] != heads
               for name, v in blocks.items())


def save_sentence_folder(model: nn.Module, template: Any, path: str | Path) -> None:
    """Save ``model`` (a compacted Hugging Face encoder) as the transformer of a copy of the
    ``SentenceTransformer`` ``template`` (its tokenizer, pooling and normalisation) to ``path``."""
    st = copy.copy(template)  # (the modules are shared; only the first is swapped, on a shallow copy of it)
    first = copy.copy(template[0])
    first._modules = dict(first._modules)
    set_transformer(first, model)
    st._modules = dict(template._modules)
    st._modules[next(iter(st._modules))] = first
    save_hf_folder(st, path)


def load_sentence_folder(path: str | Path) -> Any:
    """A ``SentenceTransformer`` from a folder written by :func:`save_sentence_folder` (or any local
    sentence-transformers folder), offline, no code from the folder run. Its pipeline comes from the folder;
    its transformer from :func:`~slimtorch.integrations.hf.folders.load_hf_folder` (safetensors, recorded
    sizes checked), since the config alone cannot say how many heads each layer kept."""
    from sentence_transformers import SentenceTransformer

    path = check_path(path, "load_sentence_folder's folder")
    if not (path / "modules.json").is_file():
        raise CheckpointError(f"{str(path)!r} is no sentence-transformers folder (no modules.json); load a plain "
                              "Hugging Face folder with load_hf_folder")
    from transformers.utils import logging as hf_logging

    model = load_hf_folder(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its report of the weights whose shapes the config cannot describe
    try:
        with offline(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (those weights are replaced right below)
            st = SentenceTransformer(str(path), device="cpu", trust_remote_code=False,
                                     model_kwargs={"ignore_mismatched_sizes": True})
    finally:
        hf_logging.set_verbosity(verbosity)
    set_transformer(st[0], model)
    return st.eval()
