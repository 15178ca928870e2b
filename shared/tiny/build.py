"""`rlhf models build-tiny`: the offline kit of corpus, tokenizers, policy, classifiers and reward models.

Each artefact is written under a temporary name and renamed when complete, so a killed build never leaves a
half-written model, and a second run with the same folder reuses every finished artefact.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from shared.tiny.corpus import make_corpus, read_jsonl, write_jsonl
from shared.tiny.reward_models import write_chat, write_gpt2, write_pair, write_scalar
from shared.tiny.training import predict_proba, train_classifier, train_policy
from shared.tiny.vocab import train_bpe_tokenizer, train_wordpiece_tokenizer

log = logging.getLogger(__name__)

SEED = 1234
TRAIN_SIZE, HELDOUT_SIZE = 6000, 900
MAX_LENGTH = 256
POLICY, SENTIMENT, SENTIMENT_3 = "tiny-gpt2", "tiny-sentiment", "tiny-sentiment-3"
# Reward models of each kind the reward service serves (shared/tiny/reward_models.py); seconds to build.
REWARD_SCALAR, REWARD_PAIR, REWARD_GPT2, REWARD_CHAT = (
    "tiny-reward-scalar", "tiny-reward-pair", "tiny-reward-gpt2", "tiny-reward-chat")
# DistilBERT-IMDB's label order. The 3-label model follows FinBERT: lower case and a different order, so anything
# that picks the reward label by index instead of by name scores the wrong label.
SENTIMENT_LABELS = {0: "NEGATIVE", 1: "POSITIVE"}
SENTIMENT_TARGETS = {"negative": [1.0, 0.0], "neutral": [0.5, 0.5], "positive": [0.0, 1.0]}
SENTIMENT_3_LABELS = {0: "positive", 1: "negative", 2: "neutral"}
SENTIMENT_3_TARGETS = {"positive": [1.0, 0.0, 0.0], "negative": [0.0, 1.0, 0.0], "neutral": [0.0, 0.0, 1.0]}


Progress = Callable[[str], None]


def print_progress(line: str) -> None:
    print(line, flush=True)  # flushed: the build takes minutes and its reader may be a pipe


@contextmanager
def _stage(progress: Progress, what: str) -> Iterator[None]:
    """One line as `what` starts and one as it ends, with its seconds: a two-minute build never looks stuck."""
    progress(f"[kit] {what} ...")
    started = time.perf_counter()
    yield
    progress(f"[kit] {what} done in {time.perf_counter() - started:.1f} s")


@contextmanager
def _no_loading_bars() -> Iterator[None]:
    """transformers' per-model load and save bars, and its load reports (a reward head built on the tiny policy is
    new by design), would bury the stage lines among dozens of their own."""
    was_on, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_on:
            hf_logging.enable_progress_bar()


def _atomic_dir(out: Path, name: str, write: Callable[[Path], None], progress: Progress | None = None,
                what: str = "") -> Path:
    """Run `write(tmp)` unless `out/name` exists; then rename tmp -> out/name (the rename is the commit).
    `progress` (silent when None) hears the start and end of `write`, or that the folder was already built."""
    final = out / name
    label = f"{name} {what}".strip()
    progress = progress or (lambda _line: None)
    if final.exists():
        log.info("reusing %s", final)
        progress(f"[kit] {label}: already built")
        return final
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _stage(progress, label):
        write(tmp)
    tmp.rename(final)
    return final


def neutral_prompts(texts: list[str], n: int, seed: int) -> list[str]:
    """The first 3-5 words of reviews, as the trainer's prompts are."""
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(3, 6, (n,), generator=gen).tolist()
    return [" ".join(text.split()[:k]) for text, k in zip(texts, words)]


@torch.no_grad()
def sample_policy(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    """Pure sampling (top_k 0, top_p 1), as PPO rollouts do; returns prompt + completion."""
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def build_tiny(out: Path, threads: int = 2, progress: Progress = print_progress) -> dict:
    """Build (or reuse) the whole kit under `out` and return the report, also written to `out/report.json`.
    `progress` hears a line as each stage starts and ends."""
    with _no_loading_bars():
        return _build(out, threads, progress)


def _build(out: Path, threads: int, progress: Progress) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)

    def write_corpus(tmp: Path) -> None:
        write_jsonl(make_corpus(TRAIN_SIZE, SEED), tmp / "train.jsonl")
        write_jsonl(make_corpus(HELDOUT_SIZE, SEED + 1), tmp / "heldout.jsonl")

    corpus = _atomic_dir(out, "corpus", write_corpus, progress)
    train, heldout = read_jsonl(corpus / "train.jsonl"), read_jsonl(corpus / "heldout.jsonl")
    texts = [r.text for r in train]

    def write_policy(tmp: Path) -> None:
        with _stage(progress, f"{POLICY} tokenizer"):
            tokenizer = train_bpe_tokenizer(texts, vocab_size=1024, max_length=MAX_LENGTH)
        train_policy(train, tokenizer, epochs=4, seed=SEED).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    def classifier_writer(name: str, id2label: dict[int, str],
                          targets: dict[str, list[float]]) -> Callable[[Path], None]:
        def write(tmp: Path) -> None:
            with _stage(progress, f"{name} tokenizer"):
                tokenizer = train_wordpiece_tokenizer(texts, vocab_size=1024, max_length=MAX_LENGTH)
            model = train_classifier(train, tokenizer, id2label=id2label, targets=targets, epochs=6, seed=SEED)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return write

    paths = {
        POLICY: _atomic_dir(out, POLICY, write_policy, progress, "policy"),
        SENTIMENT: _atomic_dir(out, SENTIMENT, classifier_writer(SENTIMENT, SENTIMENT_LABELS, SENTIMENT_TARGETS),
                               progress, "classifier"),
        SENTIMENT_3: _atomic_dir(out, SENTIMENT_3,
                                 classifier_writer(SENTIMENT_3, SENTIMENT_3_LABELS, SENTIMENT_3_TARGETS),
                                 progress, "classifier"),
    }
    paths |= build_reward_models(out, heldout_texts=[r.text for r in heldout], progress=progress)
    with _stage(progress, "evaluation of the kit"):
        report = evaluate_kit(out, heldout=heldout)
    report["build_seconds"] = round(time.perf_counter() - started, 1)
    report["paths"] = {k: str(v.resolve()) for k, v in paths.items()}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_reward_models(out: Path, heldout_texts: list[str] | None = None,
                        progress: Progress = print_progress) -> dict[str, Path]:
    """Build (or reuse) the reward-model kinds under `out`; needs the corpus, tiny-gpt2 and tiny-sentiment there."""
    if heldout_texts is None:
        heldout_texts = [r.text for r in read_jsonl(out / "corpus" / "heldout.jsonl")]
    policy, sentiment = out / POLICY, out / SENTIMENT
    writers = {
        REWARD_SCALAR: lambda tmp: write_scalar(tmp, sentiment, heldout_texts),
        REWARD_PAIR: lambda tmp: write_pair(tmp, sentiment, SEED),
        REWARD_GPT2: lambda tmp: write_gpt2(tmp, policy, SEED),
        REWARD_CHAT: lambda tmp: write_chat(tmp, policy, SEED),
    }
    return {name: _atomic_dir(out, name, write, progress, "reward model") for name, write in writers.items()}


def evaluate_kit(out: Path, heldout, n_samples: int = 256, max_new_tokens: int = 20) -> dict:
    """Held-out accuracy of both classifiers, and how often sampled policy text is already called POSITIVE."""
    report: dict = {}
    sentiment, sentiment_tok = (AutoModelForSequenceClassification.from_pretrained(out / SENTIMENT),
                                AutoTokenizer.from_pretrained(out / SENTIMENT))
    polar = [r for r in heldout if r.label != "neutral"]
    positive_id = sentiment.config.label2id["POSITIVE"]
    proba = predict_proba(sentiment, sentiment_tok, [r.text for r in polar])
    truth = torch.tensor([r.label == "positive" for r in polar])
    report["sentiment_heldout_accuracy"] = round(((proba[:, positive_id] > 0.5) == truth).float().mean().item(), 4)

    three, three_tok = (AutoModelForSequenceClassification.from_pretrained(out / SENTIMENT_3),
                        AutoTokenizer.from_pretrained(out / SENTIMENT_3))
    predicted = predict_proba(three, three_tok, [r.text for r in heldout]).argmax(-1).tolist()
    hits = [three.config.id2label[i] == r.label for i, r in zip(predicted, heldout)]
    report["sentiment_3_heldout_accuracy"] = round(sum(hits) / len(hits), 4)

    policy = AutoModelForCausalLM.from_pretrained(out / POLICY)
    policy_tok = AutoTokenizer.from_pretrained(out / POLICY)
    prompts = neutral_prompts([r.text for r in heldout], n_samples, SEED)
    samples = sample_policy(policy, policy_tok, prompts, max_new_tokens, SEED)
    positive = predict_proba(sentiment, sentiment_tok, samples)[:, positive_id]
    report["policy_samples"] = n_samples
    report["policy_positive_fraction"] = round((positive > 0.5).float().mean().item(), 4)
    report["policy_mean_positive_score"] = round(positive.mean().item(), 4)
    report["prompt_mean_positive_score"] = round(
        predict_proba(sentiment, sentiment_tok, prompts)[:, positive_id].mean().item(), 4)
    report["examples"] = samples[:5]
    return report
