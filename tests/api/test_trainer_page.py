"""The trainer's live page and its API over real HTTP: a tiny run with real reward and generator services on loopback;
the bearer guard, bad input, unknown checkpoints and services that are down."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from services.generator.app import create_app as create_generator_app
from services.generator.settings import GeneratorSettings
from services.trainer.app import create_app as create_trainer_app
from services.trainer.page import MAX_NEW_TOKENS, MAX_PROMPT_CHARS
from shared.clients import RewardClient
from tests.conftest import ServerThread, free_port
from tests.e2e.test_train_tiny import read_metrics, reward_app, tiny_config

pytestmark = pytest.mark.slow

KEY = "page-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def generator_app(kit: Path, runs: Path, **settings):
    """The generator as compose runs it: serving the folder the trainer writes its checkpoints to."""
    runs.mkdir(parents=True, exist_ok=True)
    return create_generator_app(GeneratorSettings(model=str(kit / "tiny-gpt2"), checkpoints=runs, port=0,
                                                  device="cpu", **settings))


def wait_for_state(url: str, states: set[str], timeout: float = 300, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(url + "/v1/status", headers=headers, timeout=10).json()
        if status["state"] in states:
            return status
        time.sleep(0.2)
    raise AssertionError(f"the trainer never reached {states}: {status}")


@pytest.fixture(scope="module")
def stack(tiny_kit, tmp_path_factory):
    """Reward, generator and a trainer (with an API key) whose one-step run has finished: an eval at steps 0 and 1,
    checkpoint tiny/step-1."""
    runs = tmp_path_factory.mktemp("runs")
    servers: list[ServerThread] = []
    try:
        reward = ServerThread(reward_app(tiny_kit)).start()
        servers.append(reward)
        generator = ServerThread(generator_app(tiny_kit, runs)).start()
        servers.append(generator)
        config = tiny_config(tiny_kit, runs, reward.url, f"generator.url={generator.url}", "train.total_steps=1")
        trainer = ServerThread(create_trainer_app(config, api_key=KEY)).start(ready_path="/healthz")
        servers.append(trainer)
        assert wait_for_state(trainer.url, {"finished", "failed"}, headers=AUTH)["state"] == "finished"
        yield SimpleNamespace(reward=reward, generator=generator, trainer=trainer, config=config)
    finally:
        for server in reversed(servers):
            server.stop()


def complete(url: str, body, headers: dict | None = AUTH) -> httpx.Response:
    return httpx.post(url + "/v1/complete", json=body, headers=headers, timeout=60)


def test_the_page_is_public_html_with_a_strict_policy_and_no_secret(stack):
    r = httpx.get(stack.trainer.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="reward-chart"' in r.text and 'id="kl-chart"' in r.text and KEY not in r.text
    assert "http://" not in r.text.replace("http://www.w3.org/2000/svg", "")  # nothing fetched from elsewhere
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "unsafe-inline" not in policy
    script = re.search(r"<script>(.*?)</script>", r.text, flags=re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy  # the page's own script runs, nothing else does
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/samples", None), ("GET", "/v1/checkpoints", None), ("GET", "/v1/status", None),
    ("GET", "/v1/metrics", None), ("POST", "/v1/complete", {"checkpoint": "base", "prompt": "This movie was"}),
])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_the_api_behind_the_page_keeps_the_bearer_guard(stack, method, path, body, headers):
    r = httpx.request(method, stack.trainer.url + path, json=body, headers=headers, timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "unauthorized"
    assert httpx.request(method, stack.trainer.url + path, json=body, headers=AUTH, timeout=60).status_code == 200


def test_samples_are_the_latest_eval_with_their_scores(stack):
    samples = httpx.get(stack.trainer.url + "/v1/samples", headers=AUTH).json()["samples"]
    t, d = stack.config.train, stack.config.data
    assert len(samples) == d.eval_prompts * t.eval_samples_per_prompt
    assert {s["step"] for s in samples} == {1}  # the eval after step 1, not the one at step 0
    eval_prompts = set(json.loads((stack.config.run_dir / "eval_prompts.json").read_text()))
    assert all(s["prompt"] in eval_prompts and isinstance(s["completion"], str) for s in samples)
    assert all(0.0 <= s["score"] <= 1.0 for s in samples)
    logged = next(m for m in read_metrics(stack.config.run_dir) if m["step"] == 1 and "eval/reward_mean" in m)
    assert sum(s["score"] for s in samples) / len(samples) == pytest.approx(logged["eval/reward_mean"], abs=1e-5)


def test_checkpoints_are_the_generators(stack):
    listed = httpx.get(stack.trainer.url + "/v1/checkpoints", headers=AUTH).json()["checkpoints"]
    own = httpx.get(stack.generator.url + "/v1/checkpoints").json()["checkpoints"]
    assert [c["name"] for c in listed] == [c["name"] for c in own] == ["base", "tiny/step-1"]
    assert listed[1]["latest"] and listed[1]["step"] == 1 and "eval/reward_mean" in listed[1]["metrics"]


@pytest.mark.parametrize("checkpoint, step", [("tiny/step-1", 1), ("base", None)])
def test_a_completion_is_the_generators_text_scored_by_the_reward_service(stack, checkpoint, step):
    prompt = "This movie was"
    r = complete(stack.trainer.url, {"checkpoint": checkpoint, "prompt": prompt, "max_new_tokens": 8})
    assert r.status_code == 200, r.text
    c = r.json()
    assert c["checkpoint"] == checkpoint and c["step"] == step and c["prompt"] == prompt
    assert c["text"] == prompt + c["completion"] and 1 <= c["tokens"] <= 8
    with RewardClient(stack.reward.url) as reward:
        assert c["score"] == pytest.approx(reward.score([c["text"]])[0], abs=1e-6)


@pytest.mark.parametrize("body, field", [
    ({}, "checkpoint"),
    ({"checkpoint": "base"}, "prompt"),
    ({"checkpoint": "base", "prompt": ""}, "prompt"),
    ({"checkpoint": "base", "prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
    ({"checkpoint": "base", "prompt": 5}, "prompt"),
    ({"checkpoint": "base", "prompt": "Hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"checkpoint": "base", "prompt": "Hi", "max_new_tokens": MAX_NEW_TOKENS + 1}, "max_new_tokens"),
    ({"checkpoint": "base", "prompt": "Hi", "max_new_tokens": "8"}, "max_new_tokens"),
    ({"checkpoint": "x" * 300, "prompt": "Hi"}, "checkpoint"),
    ({"checkpoint": "", "prompt": "Hi"}, "checkpoint"),
    ({"checkpoint": "base", "prompt": "Hi", "temperature": 0.5}, "temperature"),
    (["base", "Hi"], "body"),
])
def test_bad_bodies_are_a_422_that_names_the_field(stack, body, field):
    r = complete(stack.trainer.url, body)
    assert r.status_code == 422 and field in r.json()["error"]["message"]


def test_a_body_that_is_not_json_is_a_400(stack):
    r = httpx.post(stack.trainer.url + "/v1/complete", content=b"{nope", headers={**AUTH, "content-type":
                                                                                  "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_an_unknown_checkpoint_is_a_404_with_the_generators_message(stack):
    body = {"checkpoint": "tiny/step-999", "prompt": "This movie was"}
    r = complete(stack.trainer.url, body)
    direct = httpx.post(stack.generator.url + "/v1/generate", json={"prompts": [body["prompt"]],
                                                                     "checkpoint": body["checkpoint"]})
    assert r.status_code == direct.status_code == 404
    assert r.json()["error"]["message"] == direct.json()["error"]["message"]
    assert "tiny/step-999" in r.json()["error"]["message"]


@pytest.mark.parametrize("words, status, says", [(300, 413, "the limit is 512"), (60, 422, "context")])
def test_a_prompt_the_generator_refuses_keeps_its_status_and_message(stack, words, status, says):
    r = complete(stack.trainer.url, {"checkpoint": "base", "prompt": "good " * words, "max_new_tokens": 40})
    assert r.status_code == status and says in r.json()["error"]["message"]


def _degraded_trainer(kit: Path, runs: Path, serve, reward_url: str, generator_url: str | None):
    """A trainer whose job waits for a reward service that is not there (cheap: it trains nothing)."""
    overrides = [f"generator.url={generator_url}"] if generator_url else []
    config = tiny_config(kit, runs, reward_url, *overrides)
    return serve(create_trainer_app(config, stop_grace_s=10), ready_path="/healthz")


def test_a_generator_that_is_down_is_a_503_that_says_so(tiny_kit, tmp_path, serve):
    dead = f"http://127.0.0.1:{free_port()}"
    trainer = _degraded_trainer(tiny_kit, tmp_path, serve, f"http://127.0.0.1:{free_port()}", dead)
    for r in (httpx.get(trainer.url + "/v1/checkpoints", timeout=60),
              complete(trainer.url, {"checkpoint": "base", "prompt": "This movie was"}, headers=None)):
        assert r.status_code == 503 and r.headers["retry-after"]
        message = r.json()["error"]["message"]
        assert "generator service" in message and dead in message and "unavailable" in message


def test_a_reward_service_that_is_down_is_a_503_that_says_so(stack, tiny_kit, tmp_path, serve):
    dead = f"http://127.0.0.1:{free_port()}"
    trainer = _degraded_trainer(tiny_kit, tmp_path, serve, dead, stack.generator.url)
    r = complete(trainer.url, {"checkpoint": "base", "prompt": "This movie was", "max_new_tokens": 4}, headers=None)
    assert r.status_code == 503
    message = r.json()["error"]["message"]
    assert "reward service" in message and dead in message


def test_a_generator_refusing_the_trainers_key_is_a_502_not_a_401(tiny_kit, tmp_path, serve):
    """A 401 would make the page ask the user for the trainer's key, which is not what is wrong."""
    generator = serve(generator_app(tiny_kit, tmp_path / "runs", api_key="the-generators-key"))
    trainer = _degraded_trainer(tiny_kit, tmp_path, serve, f"http://127.0.0.1:{free_port()}", generator.url)
    for r in (httpx.get(trainer.url + "/v1/checkpoints", timeout=60),
              complete(trainer.url, {"checkpoint": "base", "prompt": "This movie was"}, headers=None)):
        assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_unauthorized"
        assert "GENERATOR_API_KEY" in r.json()["error"]["message"]


def test_without_a_generator_the_page_api_says_none_is_configured(tiny_kit, tmp_path, serve):
    trainer = _degraded_trainer(tiny_kit, tmp_path, serve, f"http://127.0.0.1:{free_port()}", None)
    for r in (httpx.get(trainer.url + "/v1/checkpoints"),
              complete(trainer.url, {"checkpoint": "base", "prompt": "Hi"}, headers=None)):
        assert r.status_code == 404 and "no generator service is configured" in r.json()["error"]["message"]
