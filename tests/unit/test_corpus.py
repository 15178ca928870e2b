"""The synthetic corpus: deterministic, balanced, with neutral openings and negations."""

from collections import Counter

from shared.tiny.build import neutral_prompts
from shared.tiny.corpus import LABELS, make_corpus, read_jsonl, write_jsonl


def test_same_seed_same_corpus_other_seed_other_corpus():
    assert make_corpus(60, 7) == make_corpus(60, 7)
    assert make_corpus(60, 7) != make_corpus(60, 8)


def test_labels_are_balanced_and_texts_varied():
    corpus = make_corpus(900, 0)
    assert Counter(r.label for r in corpus) == {label: 300 for label in LABELS}
    assert len({r.text for r in corpus}) > 880
    sentences = [r.text.count(".") for r in corpus]
    assert min(sentences) >= 2 and max(sentences) >= 4  # multi-sentence reviews


def test_negations_carry_the_opposite_sentiment_word():
    corpus = make_corpus(3000, 1)
    negated_positive = [r for r in corpus if " not " in r.text and "at all" in r.text and r.label == "positive"]
    negated_negative = [r for r in corpus if " not " in r.text and "at all" in r.text and r.label == "negative"]
    assert negated_positive and negated_negative
    assert all(r.label != "neutral" for r in corpus if "at all." in r.text)


def test_first_words_are_neutral_openings():
    corpus = make_corpus(300, 2)
    prompts = neutral_prompts([r.text for r in corpus], 300, seed=0)
    assert all(3 <= len(p.split()) <= 5 for p in prompts)
    sentiment_words = {"superb", "awful", "loved", "hated", "best", "worst", "terrible", "wonderful"}
    assert not any(set(p.lower().split()) & sentiment_words for p in prompts)


def test_jsonl_round_trip(tmp_path):
    corpus = make_corpus(20, 3)
    write_jsonl(corpus, tmp_path / "c.jsonl")
    assert read_jsonl(tmp_path / "c.jsonl") == corpus
