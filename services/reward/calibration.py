"""`backend: auto`: time each backend this machine can run on a few realistic batches and keep the fastest whose
outputs agree with float32 torch within its tolerance (backends.TOLERANCES). Also the agreement measures
themselves, which the tests use on the held-out corpus."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.reward.backends import TOLERANCES, Backend, Batch, Tolerance

log = logging.getLogger(__name__)

# (texts, words per text) of each calibration batch: a full batch of short reviews, a smaller one of long ones.
CALIBRATION_SHAPES = ((32, 40), (8, 120))
TIMED_PASSES = 2


def synthetic_texts(vocabulary: list[str], shapes: tuple[tuple[int, int], ...] = CALIBRATION_SHAPES,
                    seed: int = 0) -> list[list[str]]:
    """Texts of random words from the tokenizer's own vocabulary, one list per batch shape (deterministic)."""
    rng = random.Random(seed)
    return [[" ".join(rng.choices(vocabulary, k=rng.randint(words // 2, words))) for _ in range(n)]
            for n, words in shapes]


def rank_agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Fraction of the text pairs the reference orders (unequal probabilities) that `other` orders the same way:
    Kendall's concordance, 1.0 for the same ranking."""
    ref = torch.sign(reference[:, None] - reference[None, :])
    got = torch.sign(other[:, None] - other[None, :])
    pairs = ref != 0
    return float(((ref == got) & pairs).sum() / pairs.sum()) if pairs.any() else 1.0


@dataclass
class Agreement:
    max_abs_prob: float
    rank_agreement: float

    def within(self, tolerance: Tolerance) -> bool:
        if not self.max_abs_prob <= tolerance.max_abs_prob:  # NaN fails too
            return False
        return tolerance.min_rank_agreement is None or self.rank_agreement >= tolerance.min_rank_agreement


def agreement(reference: torch.Tensor, other: torch.Tensor, column: int) -> Agreement:
    """How far `other`'s probabilities (N, labels) are from the reference's, and how well they rank the texts by
    the reward label's (`column`) probability."""
    return Agreement((other - reference).abs().max().item(), rank_agreement(reference[:, column], other[:, column]))


@dataclass
class Candidate:
    kind: str
    dtype: str
    make: Callable[[], Backend]  # may raise ModelLoadError (a model that cannot be exported): the candidate is skipped


def choose(candidates: list[Candidate], batches: list[Batch], probabilities: Callable[[torch.Tensor], torch.Tensor],
           column: int, source: str) -> Backend:
    """The fastest candidate within its tolerance of the first one (float32 torch, the reference); logged at INFO."""
    from shared.modeling import ModelLoadError

    rows, best, reference = [], None, None
    for cand in candidates:
        try:
            backend = cand.make()
        except ModelLoadError as exc:
            log.info("%s: auto skips %s %s: %s", source, cand.kind, cand.dtype, exc)
            continue
        backend.run(*batches[-1])  # warm up: first runs allocate and pick kernels
        seconds = float("inf")
        for _ in range(TIMED_PASSES):  # the best pass: other processes on the machine only ever slow one down
            started = time.perf_counter()
            probs = torch.cat([probabilities(backend.run(*b)) for b in batches])
            seconds = min(seconds, time.perf_counter() - started)
        reference = probs if reference is None else reference
        agree = agreement(reference, probs, column)
        ok = agree.within(TOLERANCES[cand.kind, cand.dtype])
        texts = sum(len(b.ids) for b in batches)
        rows.append((cand, texts / seconds, agree, ok))
        if ok and (best is None or seconds < best[1]):
            best = (backend, seconds)
    table = "\n".join(f"  {c.kind:5} {c.dtype:8} {speed:9.1f} texts/s  max|dp| {a.max_abs_prob:.2e}  rank "
                      f"{a.rank_agreement:.4f}  {'ok' if ok else 'outside tolerance'}" for c, speed, a, ok in rows)
    log.info("%s: backend calibration on %d texts:\n%s\n  chosen: %s %s", source, sum(len(b.ids) for b in batches),
             table, best[0].kind, best[0].dtype)
    return best[0]
