"""RewardClient and reward_fn: retries, backoff, chunking and the contract check, against httpx's mock transport."""

from __future__ import annotations

import json
import math
import time

import httpx
import pytest

from shared.clients import (
    AsyncRewardClient,
    RemoteRewardFn,
    RetryPolicy,
    RewardClient,
    ServiceError,
)

FAST = RetryPolicy(max_retries=3, backoff_base=0.001, backoff_max=0.01)


class FakeReward:
    """A scripted reward service: the first responses come from `script`, then it scores len(text)."""

    def __init__(self, *script):
        self.script = list(script)
        self.calls: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.calls.append({"path": request.url.path, "body": body, "auth": request.headers.get("authorization")})
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                raise step
            return step
        return httpx.Response(200, json={"scores": [float(len(t)) for t in body["texts"]]})


def client(fake, **kw) -> RewardClient:
    return RewardClient("http://reward", retry=kw.pop("retry", FAST), transport=httpx.MockTransport(fake), **kw)


def test_scores_come_back_in_order_across_chunks():
    fake = FakeReward()
    texts = ["a" * n for n in range(1, 12)]
    assert client(fake, chunk_size=4).score(texts) == [float(n) for n in range(1, 12)]
    assert [len(c["body"]["texts"]) for c in fake.calls] == [4, 4, 3]


@pytest.mark.parametrize("failure", [
    httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {"type": "unavailable", "message": "x"}}),
    httpx.Response(429, json={"error": {"type": "overloaded", "message": "x"}}),
    httpx.Response(502, text="bad gateway"),
    httpx.Response(504, text="gateway timeout"),
    httpx.ConnectError("connection refused"),
    httpx.ReadTimeout("slow"),
])
def test_transient_failures_are_retried(failure):
    fake = FakeReward(failure, failure)
    assert client(fake).score(["ab"]) == [2.0]
    assert len(fake.calls) == 3


def test_client_errors_are_not_retried_and_carry_the_servers_message():
    fake = FakeReward(httpx.Response(422, json={"error": {"type": "invalid_request", "message": "texts[0] is empty"}}))
    with pytest.raises(ServiceError, match="texts\\[0\\] is empty") as info:
        client(fake).score([""])
    assert info.value.status == 422 and info.value.type == "invalid_request"
    assert len(fake.calls) == 1


def test_a_500_is_retried_once_and_a_repeated_500_fails_fast_with_the_servers_message():
    error = httpx.Response(500, json={"error": {"type": "inference_error", "message": "worker died"}})
    fake = FakeReward(error)
    assert client(fake).score(["ab"]) == [2.0]
    assert len(fake.calls) == 2
    fake = FakeReward(error, error, error)
    with pytest.raises(ServiceError, match="worker died") as info:
        client(fake).score(["ab"])
    assert info.value.status == 500 and len(fake.calls) == 2


def test_every_retry_shares_one_deadline():
    fake = FakeReward(*[httpx.Response(503, headers={"Retry-After": "0.2"})] * 100)
    policy = RetryPolicy(deadline_s=1.0, backoff_base=0.01)
    started = time.monotonic()
    with pytest.raises(ServiceError, match="503") as info:
        client(fake, retry=policy).score(["a"])
    elapsed = time.monotonic() - started
    assert 0.6 <= elapsed <= 1.0  # Retry-After honoured, and no attempt starts past the deadline
    assert 3 <= len(fake.calls) <= 6 and info.value.status == 503


def test_retry_after_is_honoured_up_to_a_cap():
    policy = RetryPolicy(backoff_base=0.01, retry_after_max=2.0)
    assert policy.delay(0, retry_after=1.5) == 1.5
    assert policy.delay(0, retry_after=3600) == 2.0


def test_gives_up_after_max_retries():
    fake = FakeReward(*[httpx.ConnectError("down")] * 10)
    with pytest.raises(ServiceError, match="after 4 attempts"):
        client(fake).score(["a"])
    assert len(fake.calls) == 4


def test_backoff_grows_exponentially_with_jitter_and_honours_retry_after():
    policy = RetryPolicy(backoff_base=1.0, backoff_max=5.0, jitter=0.5)
    for attempt, full in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 5.0), (8, 5.0)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(full * 0.5 <= d <= full for d in delays)
        assert max(delays) - min(delays) > 0.1 * full  # jittered, so clients do not retry in lockstep
    assert policy.delay(0, retry_after=3.0) == 3.0


@pytest.mark.parametrize("body", [
    {"scores": [0.5]},  # one score for two texts
    {"scores": [0.5, 0.5, 0.5]},
    {"scores": [0.5, math.nan]},
    {"scores": [0.5, "high"]},
    {"nothing": []},
])
def test_answers_that_break_the_contract_are_errors(body):
    payload = json.dumps(body, allow_nan=True)
    fake = FakeReward(httpx.Response(200, content=payload, headers={"content-type": "application/json"}))
    with pytest.raises(ServiceError, match="scores|non-finite"):
        client(fake).score(["a", "b"])


def test_api_key_and_model_are_sent():
    fake = FakeReward()
    client(fake, api_key="k", model="three").score(["a"])
    assert fake.calls[0]["auth"] == "Bearer k" and fake.calls[0]["body"]["model"] == "three"


def test_reward_fn_scores_samples_trlx_style():
    fake = FakeReward()
    reward_fn = RemoteRewardFn(client(fake))
    out = reward_fn(samples=["prompt one", "p2"], prompts=["prompt", "p"], outputs=[" one", "2"], tokenizer=None)
    assert out == [10.0, 2.0]


async def test_async_client_chunks_concurrently_and_retries():
    fake = FakeReward(httpx.Response(503, headers={"Retry-After": "0"}))
    c = AsyncRewardClient("http://reward", retry=FAST, chunk_size=2, transport=httpx.MockTransport(fake))
    texts = ["a" * n for n in range(1, 8)]
    assert await c.score(texts) == [float(n) for n in range(1, 8)]
    assert len(fake.calls) == 5  # four chunks plus one retry
    await c.aclose()


async def test_async_client_rejects_wrong_counts():
    fake = FakeReward(httpx.Response(200, json={"scores": []}))
    async with AsyncRewardClient("http://reward", retry=FAST, transport=httpx.MockTransport(fake)) as c:
        with pytest.raises(ServiceError, match="0 scores for 1 texts"):
            await c.score(["a"])
