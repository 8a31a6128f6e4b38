"""Real English text that works offline: Wikipedia articles and news stories from the gensim wheel.

Nothing is downloaded at run time. The gensim package (``pip install 'slimtorch[text]'``) ships, as test
data inside its wheel, an excerpt of an English Wikipedia dump (106 full articles once redirects are
dropped: Anarchism, Autism, Abraham Lincoln, Albert Einstein, Algorithm, ...; about 3 MB of prose) and
the Lee corpus (350 Australian Broadcasting Corporation news stories). Wikipedia articles are what
WikiText-2 is made of, the data set of the one-shot pruning papers' perplexity tables, so a language
model trained and evaluated here is measured on the same kind of text; the news stories are a second,
different register used for held-out sentence-embedding checks.

    >>> from slimtorch.data.text import split_sentences
    >>> split_sentences("The cat sat on the mat. It was a warm day in May, said Dr. Smith! Short.", min_words=3)
    ['The cat sat on the mat.', 'It was a warm day in May, said Dr. Smith!']
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "REGISTERS",
    "Document",
    "LabelledSentences",
    "RegisterSplits",
    "SentenceSplits",
    "TextSplits",
    "clean_wikitext",
    "news_stories",
    "register_splits",
    "review_sentences",
    "sentence_splits",
    "split_documents",
    "split_sentences",
    "text_splits",
    "wikipedia_articles",
]

_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_FILES = ("lee_background.cor", "lee.cor")
_REVIEW_FILE = "pang_lee_polarity.cor"  # one labelled movie-review sentence a line: "__label__neg text ."
# Sections that hold lists of references and links rather than prose.
_TAIL_SECTIONS = re.compile(
    r"^=+\s*(references|notes|external links|bibliography|see also|further reading|sources|footnotes)\s*=+\s*$",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True)
class Document:
    """One article or story: its title (or ``"news-N"``), its plain text and where it comes from."""

    title: str
    text: str
    source: str


@dataclass(frozen=True)
class TextSplits:
    """Documents split three ways, whole documents per split (no article is in two splits)."""

    train: tuple[Document, ...]
    val: tuple[Document, ...]
    test: tuple[Document, ...]


def _gensim_data(name: str) -> Path:
    # find_spec locates the installed package without importing it (importing gensim pulls in scipy).
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the offline English text ships inside the gensim wheel; install it with "
            "pip install 'slimtorch[text]' (or pip install gensim)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / name
    if not path.is_file():
        raise ImportError(f"this gensim installation has no {name!r} in its test data; reinstall gensim from its wheel")
    return path


def clean_wikitext(markup: str) -> str:
    """Plain text of one article's wiki markup: gensim's ``filter_wiki`` strips links, templates,
    tables and tags; then reference sections, bold/italic quotes, list bullets and heading marks go.

    >>> clean_wikitext("'''Albedo''' is a [[measure]] of {{tmpl|x}} reflection.<ref>x</ref>\\n== See also ==\\n* A")
    'Albedo is a measure of reflection.'
    """
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    tail = _TAIL_SECTIONS.search(text)
    if tail is not None:
        text = text[: tail.start()]
    text = re.sub(r"'{2,}", "", text)  # ''italic'' and '''bold''' marks
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.MULTILINE)  # list bullets and indents
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.MULTILINE)  # == Heading == -> Heading
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" ([,.;:)])", r"\1", text)  # spaces left where a link or template was removed
    lines = [line.strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line)


@functools.lru_cache(maxsize=1)
def wikipedia_articles() -> tuple[Document, ...]:
    """The Wikipedia articles of gensim's dump excerpt, cleaned, in dump order (redirects and near-empty
    pages dropped)."""
    from gensim.corpora.wikicorpus import extract_pages

    docs = []
    with bz2.open(_gensim_data(_WIKI_FILE)) as raw:
        for title, markup, _page_id in extract_pages(raw):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = clean_wikitext(markup)
            if len(text) >= 500:
                docs.append(Document(title, text, "wikipedia"))
    return tuple(docs)


@functools.lru_cache(maxsize=1)
def news_stories() -> tuple[Document, ...]:
    """The 350 news stories of the Lee corpus (one story per line in gensim's files)."""
    docs = []
    for name in _NEWS_FILES:
        lines = _gensim_data(name).read_text(encoding="utf-8", errors="replace").splitlines()
        docs.extend(Document(f"news-{len(docs) + i}", line.strip(), "news") for i, line in enumerate(lines))
    return tuple(d for d in docs if d.text)


def split_documents(docs: tuple[Document, ...] | list[Document], *, every: int = 10) -> TextSplits:
    """Deterministic split by position: document ``i`` goes to test when ``i % every == every - 1``, to
    validation when ``i % every == every // 2 - 1``, else to training.

    >>> docs = [Document(str(i), "x", "t") for i in range(20)]
    >>> s = split_documents(docs)
    >>> [d.title for d in s.val], [d.title for d in s.test], len(s.train)
    (['4', '14'], ['9', '19'], 16)
    """
    if every < 3:
        raise ValueError(f"every must be at least 3 (one train, one val, one test slot), got {every}")
    test = tuple(d for i, d in enumerate(docs) if i % every == every - 1)
    val = tuple(d for i, d in enumerate(docs) if i % every == every // 2 - 1)
    train = tuple(d for i, d in enumerate(docs) if i % every not in (every - 1, every // 2 - 1))
    return TextSplits(train, val, test)


def text_splits() -> TextSplits:
    """The Wikipedia articles split into train / val / test (about 80 / 10 / 10 %, whole articles)."""
    return split_documents(wikipedia_articles())


_ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "Prof", "St", "Jr", "Sr", "vs", "e.g", "i.e", "etc", "No", "U.S", "Gen")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str, *, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Sentences of ``text`` with ``min_words``..``max_words`` words (a regular-expression splitter: a
    full tokenizer such as NLTK's punkt needs a model download, and this is only used to pick held-out
    sentences)."""
    pieces: list[str] = []
    for line in text.splitlines():
        line_pieces: list[str] = []
        for part in _SENTENCE_END.split(line):
            part = part.strip()
            if line_pieces and line_pieces[-1].split()[-1].rstrip(".") in _ABBREVIATIONS:
                line_pieces[-1] = f"{line_pieces[-1]} {part}"  # "Dr." ended no sentence: glue the piece back
            elif part:
                line_pieces.append(part)
        pieces.extend(line_pieces)
    return [p for p in pieces if min_words <= len(p.split()) <= max_words]


@functools.lru_cache(maxsize=1)
def review_sentences() -> tuple[str, ...]:
    """The short movie-review sentences of gensim's polarity sample (lower-cased and tokenised as shipped:
    a third register, informal, beside encyclopaedia and news)."""
    lines = _gensim_data(_REVIEW_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    return tuple(line.split(" ", 1)[1].strip() for line in lines if line.startswith("__label__") and " " in line)


@dataclass(frozen=True)
class SentenceSplits:
    """Deduplicated sentences for distillation (``train``) and for measuring (``heldout``): no sentence
    and no document is in both."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]


def heldout_story(index: int) -> bool:
    """Whether news story ``index`` is held out (every fifth story: 70 of the 350)."""
    return index % 5 == 4


def _key(sentence: str) -> str:
    return " ".join(sentence.lower().split())  # whitespace and case do not make a sentence new


def _dedup(sentences: list[str], exclude: frozenset[str] = frozenset()) -> tuple[str, ...]:
    seen = set(exclude)
    out = []
    for s in sentences:
        key = _key(s)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return tuple(out)


@functools.lru_cache(maxsize=4)
def sentence_splits(*, min_words: int = 6, max_words: int = 40) -> SentenceSplits:
    """All the offline English text as sentences: Wikipedia's training and validation articles, the news
    stories that are not held out (:func:`heldout_story`) and the movie-review sentences for training;
    the held-out news stories and Wikipedia's test articles for measuring. Sentence-split, deduplicated
    (a training sentence that also occurs in held-out text is dropped from training)."""
    wiki = text_splits()
    stories = news_stories()

    def sentences(docs) -> list[str]:
        return [s for d in docs for s in split_sentences(d.text, min_words=min_words, max_words=max_words)]

    heldout = _dedup(sentences(d for i, d in enumerate(stories) if heldout_story(i)) + sentences(wiki.test))
    reviews = [s for s in review_sentences() if min_words <= len(s.split()) <= max_words]
    train = (sentences(wiki.train) + sentences(wiki.val) + sentences(d for i, d in enumerate(stories)
                                                                      if not heldout_story(i)) + reviews)
    held_keys = frozenset(_key(s) for s in heldout)
    return SentenceSplits(_dedup(train, held_keys), heldout)


#: the classes of :func:`register_splits`, by label
REGISTERS = ("encyclopaedia", "news", "review")


@dataclass(frozen=True)
class LabelledSentences:
    """Sentences and the index of the class of each (into :data:`REGISTERS`)."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class RegisterSplits:
    """A three-way text classification task: in which register a sentence is written (``classes``)."""

    train: LabelledSentences
    test: LabelledSentences
    classes: tuple[str, ...] = REGISTERS


def _labelled(groups: list[tuple[int, list[str]]], exclude: frozenset[str] = frozenset()) -> LabelledSentences:
    """Sentences of every ``(label, sentences)`` group in turn, deduplicated as :func:`sentence_splits` does
    (the first occurrence keeps its label; sentences in ``exclude``, by key, are dropped)."""
    seen, texts, labels = set(exclude), [], []
    for label, sentences in groups:
        for s in sentences:
            if _key(s) not in seen:
                seen.add(_key(s))
                texts.append(s)
                labels.append(label)
    return LabelledSentences(tuple(texts), tuple(labels))


@functools.lru_cache(maxsize=4)
def register_splits(*, min_words: int = 6, max_words: int = 40) -> RegisterSplits:
    """Which register a sentence is written in: encyclopaedia (Wikipedia), news (the Lee corpus) or movie review
    (gensim's polarity sample). The test sentences are exactly :func:`sentence_splits`' held-out ones (held-out
    news stories, Wikipedia's test articles), labelled, plus every fifth review; training takes the rest of the
    sentences of the other documents and reviews (none that also occurs in test text). Classes are unbalanced,
    as the text is (far more encyclopaedia than news, a few hundred reviews)."""
    wiki, stories = text_splits(), news_stories()
    reviews = review_sentences()

    def sentences(docs) -> list[str]:
        return [s for d in docs for s in split_sentences(d.text, min_words=min_words, max_words=max_words)]

    def review_part(held: bool) -> list[str]:
        return [s for i, s in enumerate(reviews) if (i % 5 == 4) == held and min_words <= len(s.split()) <= max_words]

    test = _labelled([(1, sentences(d for i, d in enumerate(stories) if heldout_story(i))), (0, sentences(wiki.test)),
                      (2, review_part(True))])
    train = _labelled([(0, sentences(wiki.train) + sentences(wiki.val)),
                       (1, sentences(d for i, d in enumerate(stories) if not heldout_story(i))),
                       (2, review_part(False))], frozenset(_key(s) for s in test.texts))
    return RegisterSplits(train, test)
