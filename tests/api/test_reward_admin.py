"""Run-time model management, API keys, overload and failures of the reward service, over real HTTP."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from services.reward.app import create_app
from tests.api.test_reward_api import make_settings, score

pytestmark = pytest.mark.slow

TEXTS = ["The acting was superb. Highly recommended.", "A waste of two hours. Avoid it.", "I watched The Last River."]
ADMIN = {"Authorization": "Bearer admin-secret"}
USER = {"Authorization": "Bearer user-secret"}


def put(url, name, spec, headers=ADMIN):
    return httpx.put(f"{url}/v1/models/{name}", json=spec, headers=headers, timeout=60)


def test_add_replace_and_remove_models_at_run_time(tiny_kit, serve):
    s = serve(create_app(make_settings(tiny_kit, admin_api_key="admin-secret")))
    before = score(s.url, TEXTS).json()["scores"]

    r = put(s.url, "extra", {"source": str(tiny_kit / "tiny-sentiment-3"), "label": "negative"})
    assert r.status_code == 201, r.text
    assert r.json()["reward_label"] == "negative"
    negative = score(s.url, TEXTS, model="extra").json()
    assert negative["label"] == "negative" and negative["scores"][1] > 0.9

    r = put(s.url, "extra", {"source": str(tiny_kit / "tiny-sentiment"), "score": "logit"})
    assert r.status_code == 200 and r.json()["score_kind"] == "logit"
    logits = score(s.url, TEXTS, model="extra").json()["scores"]
    assert logits[0] > 0 > logits[1]  # logits, not probabilities

    r = put(s.url, "extra", {"source": str(tiny_kit / "tiny-sentiment"), "default": True})
    assert r.status_code == 200 and r.json()["default"]
    assert score(s.url, TEXTS).json()["model"] == "extra"

    assert httpx.delete(f"{s.url}/v1/models/extra", headers=ADMIN).status_code == 409  # it is the default
    put(s.url, "sentiment", {"source": str(tiny_kit / "tiny-sentiment"), "default": True})
    assert httpx.delete(f"{s.url}/v1/models/extra", headers=ADMIN).status_code == 204
    assert score(s.url, TEXTS, model="extra").status_code == 404
    assert httpx.delete(f"{s.url}/v1/models/extra", headers=ADMIN).status_code == 404
    assert score(s.url, TEXTS).json()["scores"] == pytest.approx(before, abs=1e-6)


@pytest.mark.parametrize("spec", [
    {"source": "TINY/no-such-folder"},
    {"source": "TINY/tiny-gpt2"},  # not a classifier
    {"source": "TINY/tiny-sentiment", "label": "JOY"},
    {"source": "TINY/tiny-sentiment", "max_length": 100000},
])
def test_a_failed_load_leaves_the_old_model_serving(tiny_kit, serve, spec):
    s = serve(create_app(make_settings(tiny_kit, admin_api_key="admin-secret", model_dirs=[tiny_kit])))
    before = score(s.url, TEXTS).json()["scores"]
    spec = {k: v.replace("TINY", str(tiny_kit)) if isinstance(v, str) else v for k, v in spec.items()}
    r = put(s.url, "sentiment", spec)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "model_load_failed" and r.json()["error"]["message"]
    after = score(s.url, TEXTS)
    assert after.status_code == 200 and after.json()["scores"] == pytest.approx(before, abs=1e-6)


def test_requests_in_flight_finish_on_the_model_they_started_with(tiny_kit, serve):
    s = serve(create_app(make_settings(tiny_kit, admin_api_key="admin-secret")))
    two = score(s.url, TEXTS, model="sentiment").json()["scores"]
    three = score(s.url, TEXTS, model="three").json()["scores"]

    async def main():
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            requests = [c.post("/v1/score", json={"texts": TEXTS, "model": "sentiment"}) for _ in range(40)]
            swap = c.put("/v1/models/sentiment", headers=ADMIN,
                         json={"source": str(tiny_kit / "tiny-sentiment-3"), "label": "positive"})
            return await asyncio.gather(*requests[:20], swap, *requests[20:])

    responses = asyncio.run(main())
    labels = set()
    for r in responses:
        assert r.status_code in (200, 201), r.text
        body = r.json()
        if "scores" not in body:
            continue
        labels.add(body["label"])
        expected = two if body["label"] == "POSITIVE" else three
        assert body["scores"] == pytest.approx(expected, abs=1e-5)
    assert "POSITIVE" in labels
    assert score(s.url, TEXTS).json()["label"] == "positive"


def test_api_keys_guard_v1_but_not_health_or_metrics(tiny_kit, serve):
    s = serve(create_app(make_settings(tiny_kit, api_key="user-secret", admin_api_key="admin-secret")))
    assert score(s.url, TEXTS).status_code == 401
    r = httpx.post(s.url + "/v1/score", json={"texts": TEXTS}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    assert httpx.post(s.url + "/v1/score", json={"texts": TEXTS}, headers=USER).status_code == 200
    assert httpx.get(s.url + "/v1/models", headers=USER).status_code == 200
    assert put(s.url, "x", {"source": str(tiny_kit / "tiny-sentiment")}, headers=USER).status_code == 401
    assert put(s.url, "x", {"source": str(tiny_kit / "tiny-sentiment")}).status_code == 201
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(s.url + path).status_code == 200


def test_full_queue_answers_429_with_retry_after_and_loses_nothing(tiny_kit, serve):
    s = serve(create_app(make_settings(tiny_kit, batching={"max_batch_size": 1, "max_queue_size": 2})))
    reference = score(s.url, TEXTS[:2]).json()["scores"]

    async def main():
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/score", json={"texts": TEXTS[:2]}) for _ in range(30)))

    responses = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "overloaded"
        else:
            assert r.json()["scores"] == pytest.approx(reference, abs=1e-5)
    big = score(s.url, TEXTS)  # more texts than the queue can ever hold: retrying cannot help
    assert big.status_code == 413


def test_request_timeout_answers_503_with_retry_after(tiny_kit, serve):
    s = serve(create_app(make_settings(tiny_kit, batching={"request_timeout_s": 0.0001})))
    r = score(s.url, TEXTS)
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["type"] == "timeout"


def test_a_failing_forward_pass_fails_its_request_only(tiny_kit, serve):
    app = create_app(make_settings(tiny_kit))
    s = serve(app)
    model = app.state.models.get("sentiment").scorer.model
    real_forward = model.forward

    def fragile_forward(input_ids=None, **kw):
        if input_ids.shape[1] > 40:
            raise RuntimeError("simulated device fault")
        return real_forward(input_ids=input_ids, **kw)

    model.forward = fragile_forward
    long = score(s.url, [" ".join(TEXTS * 4)])
    assert long.status_code == 500 and long.json()["error"]["type"] == "inference_error"
    assert score(s.url, ["Great film."]).status_code == 200
    assert "reward_batch_failures_total" in httpx.get(s.url + "/metrics").text


def test_unready_until_models_load_then_ready(tiny_kit, serve):
    app = create_app(make_settings(tiny_kit, models=[{"name": "bad", "source": "/no/such/model"}],
                                   exit_on_load_failure=False))  # stays up (for the admin API), unready
    s = serve(app, ready_path="/healthz")
    r = httpx.get(s.url + "/readyz")
    assert r.status_code == 503 and "/no/such/model" in r.json()["error"]["message"]
    r = score(s.url, TEXTS)  # nothing to serve: retry later, never "not found"
    assert r.status_code == 503 and r.headers["retry-after"] and "no model is loaded" in r.json()["error"]["message"]


def test_corrupt_weights_are_a_load_failure_not_a_crash(tiny_kit, serve, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_kit / "tiny-sentiment", broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    s = serve(create_app(make_settings(tiny_kit, admin_api_key="admin-secret", model_dirs=[tmp_path])))
    r = put(s.url, "sentiment", {"source": str(broken)})
    assert r.status_code == 422 and "broken" in r.json()["error"]["message"]
    assert score(s.url, TEXTS).status_code == 200
