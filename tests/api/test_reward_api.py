"""The reward service over real HTTP (uvicorn on loopback) with the tiny kit's classifiers."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from services.reward.app import create_app
from services.reward.settings import RewardSettings
from shared.tiny.corpus import read_jsonl
from tests.conftest import ServerThread

pytestmark = pytest.mark.slow


def make_settings(kit, **kw) -> RewardSettings:
    models = kw.pop("models", None) or [
        {"name": "sentiment", "source": str(kit / "tiny-sentiment"), "label": "POSITIVE"},
        {"name": "three", "source": str(kit / "tiny-sentiment-3"), "label": "positive"},
    ]
    return RewardSettings(models=models, port=0, device="cpu", **kw)


@pytest.fixture(scope="module")
def server(tiny_kit):
    s = ServerThread(create_app(make_settings(tiny_kit))).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reviews(tiny_kit) -> list[str]:
    return [r.text for r in read_jsonl(tiny_kit / "corpus" / "heldout.jsonl")]


def score(url: str, texts, **body) -> httpx.Response:
    return httpx.post(url + "/v1/score", json={"texts": texts, **body}, timeout=30)


def varied_lengths(reviews: list[str]) -> list[str]:
    """From two words to far past the 256-token limit."""
    long = " ".join(reviews[:40])
    return ["Great film.", "Awful.", reviews[0], reviews[1] + " " + reviews[2], long, reviews[3][:30], long[:900]]


def test_scores_one_per_text_in_order_for_the_named_label(server):
    r = score(server.url, ["The acting was superb. Highly recommended.", "A waste of two hours. Avoid it."])
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "sentiment" and body["label"] == "POSITIVE" and body["score_kind"] == "prob"
    assert len(body["scores"]) == 2
    assert body["scores"][0] > 0.9 and body["scores"][1] < 0.1
    for header in ("x-total-time", "x-queue-time", "x-inference-time", "x-tokenization-time"):
        assert float(r.headers[header]) >= 0


def test_label_is_chosen_by_name_not_index(server):
    """tiny-sentiment-3 orders its labels positive, negative, neutral: index 1 is `negative`."""
    texts = ["The acting was superb. Highly recommended.", "A waste of two hours. Avoid it."]
    scores = score(server.url, texts, model="three").json()
    probs = httpx.post(server.url + "/v1/classify", json={"texts": texts, "model": "three"}).json()
    assert scores["label"] == "positive"
    assert probs["labels"] == ["positive", "negative", "neutral"]
    for s, p in zip(scores["scores"], probs["probabilities"]):
        assert s == pytest.approx(p["positive"], abs=1e-6)
        assert sum(p.values()) == pytest.approx(1, abs=1e-5)
    assert scores["scores"][0] > 0.9 > 0.1 > scores["scores"][1]


def test_batched_scores_equal_one_at_a_time(server, reviews):
    texts = varied_lengths(reviews)
    alone = [score(server.url, [t]).json()["scores"][0] for t in texts]
    together = score(server.url, texts).json()["scores"]

    async def concurrently():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            rs = await asyncio.gather(*(c.post("/v1/score", json={"texts": [t]}) for t in texts))
        return [r.json()["scores"][0] for r in rs]

    concurrent = asyncio.run(concurrently())
    assert max(abs(a - b) for a, b in zip(alone, together)) <= 1e-5
    assert max(abs(a - b) for a, b in zip(alone, concurrent)) <= 1e-5


def test_long_texts_are_truncated_unless_the_request_forbids_it(server, reviews):
    long = " ".join(reviews[:40])
    assert score(server.url, [long]).status_code == 200
    r = score(server.url, [long], truncate=False)
    assert r.status_code == 413 and "max_length" in r.json()["error"]["message"]


BAD_REQUESTS = {
    "empty list": ({"texts": []}, 422),
    "empty string": ({"texts": ["fine", ""]}, 422),
    "non-string": ({"texts": ["fine", 3]}, 422),
    "null texts": ({"texts": None}, 422),
    "missing texts": ({}, 422),
    "texts not a list": ({"texts": "a string"}, 422),
    "unknown field": ({"texts": ["a"], "temperature": 1}, 422),
    "10,000 texts": ({"texts": ["a short review"] * 10_000}, 413),
    "1 MB text": ({"texts": ["x" * 1_000_000]}, 413),
    "unknown model": ({"texts": ["a"], "model": "nope"}, 404),
    "model not a string": ({"texts": ["a"], "model": 5}, 422),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_envelope_and_the_service_keeps_serving(server, case):
    body, status = BAD_REQUESTS[case]
    r = httpx.post(server.url + "/v1/score", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] and error["message"]
    assert score(server.url, ["still fine"]).status_code == 200


@pytest.mark.parametrize(("content", "ctype", "status"), [
    (b'{"texts": ["a"', "application/json", 400),
    (b"not json at all", "application/json", 400),
    (json.dumps({"texts": ["a"]}).encode(), "text/plain", 415),
    (b"texts=a", "application/x-www-form-urlencoded", 415),
    (b"x" * (5 * 1024 * 1024), "application/json", 413),
])
def test_malformed_bodies(server, content, ctype, status):
    r = httpx.post(server.url + "/v1/score", content=content, headers={"content-type": ctype}, timeout=30)
    assert r.status_code == status, r.text
    assert {"type", "message", "request_id"} == set(r.json()["error"])
    assert score(server.url, ["still fine"]).status_code == 200


def test_64_concurrent_clients_each_get_exactly_their_scores(server, reviews):
    texts = reviews[:96]
    reference = dict(zip(texts, score(server.url, texts).json()["scores"]))
    requests = [[texts[(3 * c + k) % len(texts)] for k in range(c % 3 + 1)] for c in range(64)]

    async def client(c: httpx.AsyncClient, mine: list[str]) -> list[list[float]]:
        out = []
        for _ in range(3):
            r = await c.post("/v1/score", json={"texts": mine})
            assert r.status_code == 200, r.text
            out.append(r.json()["scores"])
        return out

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*(client(c, mine) for mine in requests))

    results = asyncio.run(main())
    for mine, rounds in zip(requests, results):
        for got in rounds:
            assert len(got) == len(mine)
            assert max(abs(g - reference[t]) for g, t in zip(got, mine)) <= 1e-5
    metrics = httpx.get(server.url + "/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith('reward_batch_size_sum{model="sentiment"}')]
    counts = [line for line in metrics.splitlines() if line.startswith('reward_batch_size_count{model="sentiment"}')]
    assert float(sizes[0].split()[-1]) / float(counts[0].split()[-1]) > 1  # requests were really batched


def test_models_listing(server):
    models = {m["name"]: m for m in httpx.get(server.url + "/v1/models").json()["models"]}
    assert models["sentiment"]["default"] and not models["three"]["default"]
    assert models["sentiment"]["labels"] == {"0": "NEGATIVE", "1": "POSITIVE"}
    assert models["three"]["reward_label"] == "positive"
    assert models["sentiment"]["max_length"] == 256


def test_operational_routes(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").status_code == 200
    score(server.url, ["a", "bb"])
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("reward_requests_total", "reward_request_latency_seconds_bucket", "reward_queue_depth",
                 "reward_batch_size_bucket", "reward_batch_tokens_bucket", "reward_batch_padding_fraction_bucket"):
        assert name in metrics
    assert 'route="/v1/score",status="200"' in metrics
    assert "/v1/score" in httpx.get(server.url + "/openapi.json").json()["paths"]
    assert httpx.get(server.url + "/docs").status_code == 200


def test_a_request_may_score_another_label_by_name(server):
    texts = ["The acting was superb. Highly recommended.", "A waste of two hours. Avoid it."]
    positive = score(server.url, texts).json()["scores"]
    negative = score(server.url, texts, label="NEGATIVE").json()
    assert negative["label"] == "NEGATIVE"
    assert negative["scores"] == pytest.approx([1 - p for p in positive], abs=1e-5)
    neutral = score(server.url, texts, model="three", label="NEUTRAL").json()  # case-insensitive match
    assert neutral["label"] == "neutral" and len(neutral["scores"]) == 2
    bad = score(server.url, texts, label="JOY")
    assert bad.status_code == 422 and "JOY" in bad.json()["error"]["message"]
