"""Both services answer a closed batcher (a model being removed, the service shutting down) by shared.errors' table:
503 `unavailable` with a message and Retry-After, never a 500. Real servers on loopback, tiny models."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from services.generator.app import create_app as create_generator
from services.reward.app import create_app as create_reward
from tests.reliability.conftest import generator_settings, reward_settings

pytestmark = pytest.mark.slow


def close_on_server(server, close) -> None:
    """Run `close()` (a coroutine function) on the server's own event loop, as its shutdown would."""
    asyncio.run_coroutine_threadsafe(close(), server.server.servers[0].get_loop()).result(10)


def assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    error = r.json()["error"]
    assert error["type"] == "unavailable" and "no longer accepting requests; retry" in error["message"], error
    assert error["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_a_generator_request_that_meets_a_closed_batcher_gets_503(tiny_kit, serve, mode):
    app = create_generator(generator_settings(tiny_kit, None, batching={"mode": mode}))
    s = serve(app)
    close_on_server(s, app.state.batcher.close)  # the stream admission stays open: only the batcher refuses
    requests = [("/v1/generate", {"prompts": ["a"], "checkpoint": "base", "max_new_tokens": 2}),
                ("/v1/completions", {"model": "base", "prompt": "a", "max_tokens": 2})]
    if mode == "continuous":  # streams decode in the scheduler's batch too: its refusal comes before the stream
        requests.append(("/v1/completions", {"model": "base", "prompt": "a", "max_tokens": 2, "stream": True}))
    for path, body in requests:
        assert_unavailable(httpx.post(s.url + path, json=body, timeout=30))


def test_a_reward_request_that_meets_a_closed_batcher_gets_503(tiny_kit, serve):
    app = create_reward(reward_settings(tiny_kit))
    s = serve(app)
    close_on_server(s, app.state.models.get("sentiment").batcher.close)
    for path, body in (("/v1/score", {"texts": ["fine"]}), ("/v1/classify", {"texts": ["fine"]}),
                       ("/get_reward", {"query": ["fine"]})):
        assert_unavailable(httpx.post(s.url + path, json=body, timeout=30))
