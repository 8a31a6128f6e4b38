"""Offline English text: markup cleaning, document splits, sentence splitting, the shipped corpora."""

from __future__ import annotations

import pytest

from slimtorch.data.text import (
    REGISTERS,
    Document,
    news_stories,
    register_splits,
    sentence_splits,
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


def test_the_register_task_tests_on_the_held_out_text_and_never_trains_on_it():
    pytest.importorskip("gensim")
    task, held = register_splits(), sentence_splits().heldout
    key = lambda s: " ".join(s.lower().split())  # noqa: E731  (how the splits deduplicate)
    assert task.test.texts[: len(held)] == held  # the held-out sentences, in order, then the held-out reviews
    assert {key(s) for s in task.train.texts}.isdisjoint({key(s) for s in task.test.texts})
    for part in (task.train, task.test):
        assert len(part.texts) == len(part.labels) == len({key(s) for s in part.texts})
        assert set(part.labels) == set(range(len(REGISTERS)))
    assert set(task.test.labels[: len(held)]) == {0, 1}  # held-out text: encyclopaedia and news
    assert task.train.labels.count(1) > 1000 and task.test.labels.count(2) > 20
