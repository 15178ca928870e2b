"""The offline tiny kit: real HF-format models that load through from_pretrained and are good enough to train on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from shared.tiny.build import build_tiny
from shared.tiny.corpus import make_corpus
from shared.tiny.training import train_classifier, train_policy
from shared.tiny.vocab import train_bpe_tokenizer, train_wordpiece_tokenizer

pytestmark = pytest.mark.slow


def test_report_meets_the_kit_targets(tiny_kit):
    report = json.loads((tiny_kit / "report.json").read_text())
    assert report["sentiment_heldout_accuracy"] >= 0.97
    assert report["sentiment_3_heldout_accuracy"] >= 0.95
    # Room for reinforcement learning to move: neither already positive nor hopelessly negative.
    assert 0.2 <= report["policy_positive_fraction"] <= 0.8
    # Bare prompts are neutral, so stopping at once earns nothing.
    assert 0.35 <= report["prompt_mean_positive_score"] <= 0.65


def test_models_load_through_from_pretrained(tiny_kit):
    policy = AutoModelForCausalLM.from_pretrained(tiny_kit / "tiny-gpt2")
    policy_tok = AutoTokenizer.from_pretrained(tiny_kit / "tiny-gpt2")
    assert policy.config.model_type == "gpt2" and policy_tok.model_max_length == 256
    assert policy_tok.eos_token_id == policy.config.eos_token_id

    for name, labels in [("tiny-sentiment", {0: "NEGATIVE", 1: "POSITIVE"}),
                         ("tiny-sentiment-3", {0: "positive", 1: "negative", 2: "neutral"})]:
        model = AutoModelForSequenceClassification.from_pretrained(tiny_kit / name)
        tok = AutoTokenizer.from_pretrained(tiny_kit / name)
        assert model.config.model_type == "distilbert" and model.config.id2label == labels
        assert tok.model_max_length == 256 and (tiny_kit / name / "model.safetensors").exists()
        enc = tok(["I saw it. The acting was superb. Highly recommended.", "I saw it. The acting was awful. Avoid it."],
                  padding=True, return_tensors="pt")
        probs = model(**enc).logits.softmax(-1)
        pos = model.config.label2id["POSITIVE" if len(labels) == 2 else "positive"]
        assert probs[0, pos] > 0.8 > 0.2 > probs[1, pos]


def test_a_second_build_reuses_every_artefact(tiny_kit):
    files = sorted(p for p in tiny_kit.rglob("*") if p.is_file() and p.name != "report.json")
    before = {p: p.stat().st_mtime_ns for p in files}
    build_tiny(tiny_kit, threads=1)
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert not list(tiny_kit.glob(".*.tmp"))


def test_build_command_prints_the_report(tiny_kit):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "services.cli", "models", "build-tiny", "--out", str(tiny_kit),
                          "--threads", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["paths"]["tiny-sentiment"].endswith("tiny-sentiment")


def test_training_is_deterministic():
    reviews = make_corpus(96, 5)
    texts = [r.text for r in reviews]
    bpe = train_bpe_tokenizer(texts, 300, 128)
    wp = train_wordpiece_tokenizer(texts, 300, 128)
    assert bpe.get_vocab() == train_bpe_tokenizer(texts, 300, 128).get_vocab()
    pol = [train_policy(reviews, bpe, epochs=1, seed=3, n_embd=32).state_dict() for _ in range(2)]
    targets = {"negative": [1.0, 0.0], "neutral": [0.5, 0.5], "positive": [0.0, 1.0]}
    clf = [train_classifier(reviews, wp, id2label={0: "NEGATIVE", 1: "POSITIVE"}, targets=targets, epochs=1,
                            seed=3, dim=32).state_dict() for _ in range(2)]
    for a, b in (pol, clf):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizers_are_identical_across_processes(tmp_path):
    """Hash ordering differs per process (PYTHONHASHSEED, Rust's hash maps): the kit must not depend on it."""
    script = ("import sys; from shared.tiny.corpus import make_corpus; "
              "from shared.tiny.vocab import train_bpe_tokenizer, train_wordpiece_tokenizer; "
              "texts = [r.text for r in make_corpus(300, 9)]; "
              "train_wordpiece_tokenizer(texts, 400, 128).save_pretrained(sys.argv[1] + '/wp'); "
              "train_bpe_tokenizer(texts, 400, 128).save_pretrained(sys.argv[1] + '/bpe')")
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / seed)], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    for name in ("wp", "bpe"):
        assert (tmp_path / "1" / name / "tokenizer.json").read_text() == \
            (tmp_path / "2" / name / "tokenizer.json").read_text()
