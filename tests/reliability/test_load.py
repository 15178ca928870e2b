"""Load: many concurrent clients, several rounds, real servers; no wrong answers and no lost answers.

Every client sends its own distinct texts (prompts) and must get back exactly its own scores (completions), equal to
those computed one at a time. Every request ends as a 200 with the right answer, or as a 429 with `Retry-After`,
which the client retries until it is served (counted). Any other status or a transport error counts as lost.
A variant with a tiny queue makes the 429s happen.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.generator.app import create_app as create_generator_app
from services.reward.app import create_app as create_reward_app
from services.reward.scorer import Scorer
from shared.schemas import ModelSpec
from shared.tiny.corpus import read_jsonl
from tests.reliability.conftest import generator_settings, reward_settings

pytestmark = pytest.mark.slow

REWARD_CLIENTS, REWARD_ROUNDS = 64, 4
GENERATOR_CLIENTS, GENERATOR_ROUNDS = 16, 4
MAX_NEW_TOKENS = 8
TOLERANCE = 1e-5
RETRY_SLEEP_S = (0.02, 0.1)  # the servers say Retry-After: 1; the clients back off less to keep the test short


@dataclass
class Tally:
    requests: int = 0  # HTTP requests sent, retries included
    ok: int = 0
    overloaded: int = 0  # 429 with Retry-After
    wrong: int = 0
    lost: int = 0  # any other status, a 429 without Retry-After, a transport error
    served: int = 0  # logical requests that got their right answer
    max_diff: float = 0.0  # largest |served score - one-at-a-time score|
    problems: list[str] = field(default_factory=list)

    def line(self, what: str, seconds: float) -> str:
        return (f"{what}: {self.requests} requests, {self.ok} x 200, {self.overloaded} x 429 (retried), "
                f"{self.wrong} wrong, {self.lost} lost; {self.served} served in {seconds:.1f} s")


async def _post_until_served(client: httpx.AsyncClient, path: str, body: dict, tally: Tally, rng: random.Random,
                             deadline: float) -> httpx.Response | None:
    """POST, retrying 429s (which must carry Retry-After) until a final answer; None when it was lost."""
    while True:
        tally.requests += 1
        try:
            r = await client.post(path, json=body)
        except httpx.HTTPError as exc:
            tally.lost += 1
            tally.problems.append(f"{path}: {type(exc).__name__}: {exc}")
            return None
        if r.status_code == 429:
            retry_after = r.headers.get("retry-after", "")
            if not retry_after.isdigit() or r.json().get("error", {}).get("type") != "overloaded":
                tally.lost += 1
                tally.problems.append(f"429 without Retry-After or envelope: {r.headers} {r.text[:200]}")
                return None
            tally.overloaded += 1
            if time.monotonic() > deadline:
                tally.lost += 1
                tally.problems.append(f"still 429 at the deadline: {body}")
                return None
            await asyncio.sleep(rng.uniform(*RETRY_SLEEP_S))
            continue
        if r.status_code != 200:
            tally.lost += 1
            tally.problems.append(f"{path}: HTTP {r.status_code}: {r.text[:300]}")
            return None
        tally.ok += 1
        return r


def batches(url: str, histogram: str) -> tuple[int, float]:
    """(batches run, mean items per batch) from the service's own Prometheus histogram."""
    count = total = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if family.name == histogram:
            for sample in family.samples:
                if sample.name == histogram + "_count":
                    count += sample.value
                elif sample.name == histogram + "_sum":
                    total += sample.value
    return int(count), total / count if count else 0.0


# -- reward -----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reviews(tiny_kit) -> list[str]:
    return [r.text for r in read_jsonl(tiny_kit / "corpus" / "heldout.jsonl")]


def reward_texts(reviews: list[str], client: int, round_: int) -> list[str]:
    """1 to 3 texts of varied length, distinct for every (client, round)."""
    count = 1 + (client + round_) % 3
    out = []
    for i in range(count):
        review = reviews[(client * 7 + round_ * 3 + i) % len(reviews)]
        words = review.split()
        cut = 3 + (client * 5 + i) % max(1, len(words) - 2)
        out.append(f"Viewer {client}-{round_}-{i}: " + " ".join(words[:cut]))
    return out


@pytest.fixture(scope="module")
def reward_oracle(tiny_kit, reviews) -> dict[str, float]:
    """Every text's score computed one text per forward pass, in-process, by the scorer the service uses."""
    scorer = Scorer(ModelSpec(source=str(tiny_kit / "tiny-sentiment"), label="POSITIVE"))
    expected = {}
    for client in range(REWARD_CLIENTS):
        for round_ in range(REWARD_ROUNDS):
            for text in reward_texts(reviews, client, round_):
                expected[text] = scorer.scores(scorer.forward(scorer.tokenize([text], True)))[0]
    assert len(expected) == sum(len(reward_texts(reviews, c, r)) for c in range(REWARD_CLIENTS)
                                for r in range(REWARD_ROUNDS)), "texts must be distinct"
    return expected


async def _reward_client(url: str, client: int, reviews, oracle, tally: Tally, deadline: float) -> None:
    rng = random.Random(client)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for round_ in range(REWARD_ROUNDS):
            texts = reward_texts(reviews, client, round_)
            r = await _post_until_served(http, "/v1/score", {"texts": texts}, tally, rng, deadline)
            if r is None:
                continue
            scores = r.json().get("scores")
            want = [oracle[t] for t in texts]
            if isinstance(scores, list) and len(scores) == len(want):
                tally.max_diff = max(tally.max_diff, *(abs(a - b) for a, b in zip(scores, want)))
            if (not isinstance(scores, list) or len(scores) != len(want)
                    or any(abs(a - b) > TOLERANCE for a, b in zip(scores, want))):
                tally.wrong += 1
                tally.problems.append(f"client {client} round {round_}: got {scores}, want {want}")
            else:
                tally.served += 1


@pytest.mark.parametrize("variant", ["default-queue", "small-queue"])
def test_reward_64_clients_get_their_own_scores(tiny_kit, serve, reviews, reward_oracle, variant):
    batching = {"max_queue_size": 6, "max_batch_size": 4} if variant == "small-queue" else {}
    server = serve(create_reward_app(reward_settings(tiny_kit, batching=batching)))
    tally, seconds = drive(_reward_client, REWARD_CLIENTS, server.url, reviews, reward_oracle)
    count, mean = batches(server.url, "reward_batch_size")
    print("\n" + tally.line(f"reward {variant}, {REWARD_CLIENTS} clients x {REWARD_ROUNDS} rounds", seconds)
          + f"; {count} batches, {mean:.1f} texts per batch; max |score - one-at-a-time| {tally.max_diff:.1e}")
    assert_all_served(tally, REWARD_CLIENTS * REWARD_ROUNDS, variant)
    assert mean > 1, "no two requests ever shared a batch: the test proved nothing about cross-talk"


def drive(client_fn, clients: int, url: str, *args) -> tuple[Tally, float]:
    """Run `clients` concurrent clients to the end (45 s at most); their tally and the seconds it took."""
    tally = Tally()

    async def main():
        deadline = time.monotonic() + 45
        await asyncio.gather(*(client_fn(url, c, *args, tally, deadline) for c in range(clients)))

    started = time.monotonic()
    asyncio.run(main())
    return tally, time.monotonic() - started


def assert_all_served(tally: Tally, expected: int, variant: str) -> None:
    """Nothing wrong, nothing lost, every 429 retried until served; the small queue really pushed back."""
    assert tally.wrong == 0 and tally.lost == 0, "\n".join(tally.problems[:20])
    assert tally.served == expected
    assert tally.ok == tally.served and tally.requests == tally.ok + tally.overloaded
    if variant == "small-queue":
        assert tally.overloaded > 0, "the small queue never pushed back: the 429 path went untested"


# -- generator --------------------------------------------------------------------------------------------------------

def generator_prompts(reviews: list[str], client: int, round_: int) -> list[str]:
    """1 or 2 prompts (the first 2 to 6 words of a review), distinct for every (client, round)."""
    out = []
    for i in range(1 + (client + round_) % 2):
        words = reviews[(client * 11 + round_ * 5 + i) % len(reviews)].split()
        out.append(f"Review {client}.{round_}.{i}: " + " ".join(words[: 2 + (client + i) % 5]))
    return out


def _greedy_body(prompts: list[str]) -> dict:
    return {"prompts": prompts, "checkpoint": "base", "do_sample": False, "max_new_tokens": MAX_NEW_TOKENS}


async def _generator_client(url: str, client: int, reviews, oracle, tally: Tally, deadline: float) -> None:
    rng = random.Random(client)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for round_ in range(GENERATOR_ROUNDS):
            prompts = generator_prompts(reviews, client, round_)
            r = await _post_until_served(http, "/v1/generate", _greedy_body(prompts), tally, rng, deadline)
            if r is None:
                continue
            got = [(c["prompt"], c["completion"]) for c in r.json().get("completions", [])]
            want = [(p, oracle[p]) for p in prompts]
            if got != want:
                tally.wrong += 1
                tally.problems.append(f"client {client} round {round_}: got {got}, want {want}")
            else:
                tally.served += 1


@pytest.mark.parametrize("variant", ["default-queue", "small-queue"])
def test_generator_16_greedy_clients_get_their_own_completions(tiny_kit, serve, reviews, variant):
    batching = {"max_queue_size": 3, "max_batch_size": 4} if variant == "small-queue" else {}
    server = serve(create_generator_app(generator_settings(tiny_kit, None, batching=batching)))
    prompts = [p for c in range(GENERATOR_CLIENTS) for r in range(GENERATOR_ROUNDS)
               for p in generator_prompts(reviews, c, r)]
    assert len(set(prompts)) == len(prompts), "prompts must be distinct"
    oracle = {}
    for prompt in prompts:  # one prompt per request, one request at a time: nothing to batch with
        r = httpx.post(server.url + "/v1/generate", json=_greedy_body([prompt]), timeout=60)
        assert r.status_code == 200, r.text
        oracle[prompt] = r.json()["completions"][0]["completion"]
    alone_count, alone_mean = batches(server.url, "generator_batch_size")
    tally, seconds = drive(_generator_client, GENERATOR_CLIENTS, server.url, reviews, oracle)
    count, mean = batches(server.url, "generator_batch_size")
    # A batch is a decode step (continuous batching) or a generate call (static): under load, more than one
    # sequence per batch on average means requests shared them.
    shared = (count * mean - alone_count * alone_mean) / max(count - alone_count, 1)
    print("\n" + tally.line(f"generator {variant}, {GENERATOR_CLIENTS} clients x {GENERATOR_ROUNDS} rounds", seconds)
          + f"; {count - alone_count} batches under load, {shared:.2f} sequences per batch")
    assert_all_served(tally, GENERATOR_CLIENTS * GENERATOR_ROUNDS, variant)
    assert shared > 1.0, "no two requests ever shared a batch: nothing about cross-talk was shown"
