"""Offline English text: markup cleaning, document splits, sentence splitting, the shipped corpora."""

from __future__ import annotations

import pytest

from slimtorch.data.text import (
    Document,
    news_stories,
    split_documents,
    split_sentences,
    text_splits,
    wikipedia_articles,
)


def test_split_documents_is_disjoint_and_complete():
    docs = [Document(str(i), f"text {i}", "t") for i in range(37)]
    splits = split_documents(docs, every=10)
    titles = [d.title for part in (splits.train, splits.val, splits.test) for d in part]
    assert sorted(titles, key=int) == [str(i) for i in range(37)]
    assert len(set(titles)) == 37
    assert [d.title for d in splits.test] == ["9", "19", "29"]
    with pytest.raises(ValueError, match="every"):
        split_documents(docs, every=2)


def test_split_sentences_keeps_abbreviations_and_filters_lengths():
    text = "Mr. Brown went to Washington on Monday. He met Dr. Jones there.\nOk. A new line starts a new sentence here."
    assert split_sentences(text, min_words=3) == [
        "Mr. Brown went to Washington on Monday.",
        "He met Dr. Jones there.",
        "A new line starts a new sentence here.",
    ]
    assert split_sentences(text, min_words=3, max_words=5) == ["He met Dr. Jones there."]


def test_shipped_corpora_are_real_clean_prose():
    pytest.importorskip("gensim")
    articles = wikipedia_articles()
    assert len(articles) > 100
    text = "\n".join(a.text for a in articles)
    assert len(text) > 2_000_000
    for markup in ("[[", "]]", "{{", "'''", "<ref", "== "):
        assert markup not in text, markup
    assert any(a.title == "Albert Einstein" for a in articles)
    splits = text_splits()
    assert {a.title for a in splits.test}.isdisjoint({a.title for a in splits.train})
    news = news_stories()
    assert len(news) == 350
    assert all(d.source == "news" for d in news)
    sentences = [s for d in news[:20] for s in split_sentences(d.text)]
    assert len(sentences) > 100
