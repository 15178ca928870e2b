"""The `rlhf` commands and RewardClient against real reward servers, including one that restarts."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from services.reward.app import create_app
from shared.clients import RetryPolicy, RewardClient, make_reward_fn
from shared.readiness import wait_until_ready
from tests.api.test_reward_api import make_settings
from tests.conftest import ServerThread, free_port

pytestmark = pytest.mark.slow

RLHF = [sys.executable, "-m", "services.cli"]
TEXTS = ["The acting was superb. Highly recommended.", "A waste of two hours. Avoid it."]


def run_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*RLHF, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_score_command_prints_one_score_per_text(tiny_kit, serve):
    s = serve(create_app(make_settings(tiny_kit)))
    expected = RewardClient(s.url).score(TEXTS)
    out = run_cli("score", *TEXTS, "--url", s.url)
    assert out.returncode == 0, out.stderr
    printed = [float(x) for x in out.stdout.split()]
    assert printed == pytest.approx(expected, abs=1e-6)
    assert printed[0] > 0.9 > 0.1 > printed[1]


def test_score_command_reports_errors_with_a_nonzero_exit(tiny_kit, serve):
    s = serve(create_app(make_settings(tiny_kit)))
    out = run_cli("score", "x", "--url", s.url, "--model", "missing")
    assert out.returncode == 1 and "unknown model 'missing'" in out.stderr
    dead = run_cli("score", "x", "--url", f"http://127.0.0.1:{free_port()}")
    assert dead.returncode == 1 and "failed after" in dead.stderr


def test_serve_command_with_a_yaml_config_serves_several_models(tiny_kit, tmp_path):
    port = free_port()
    config = tmp_path / "reward.yaml"
    config.write_text(
        f"models:\n"
        f"  - {{name: imdb, source: {tiny_kit / 'tiny-sentiment'}, label: POSITIVE}}\n"
        f"  - {{name: finbert-like, source: {tiny_kit / 'tiny-sentiment-3'}, label: negative, score: logit}}\n"
        f"batching: {{max_batch_size: 8}}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*RLHF, "reward", "serve", "--config", str(config), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, 60, max_delay=0.2)
        models = {m["name"]: m for m in httpx.get(url + "/v1/models").json()["models"]}
        assert models["imdb"]["default"] and models["finbert-like"]["score_kind"] == "logit"
        neg = httpx.post(url + "/v1/score", json={"texts": TEXTS, "model": "finbert-like"}).json()
        assert neg["label"] == "negative" and neg["scores"][1] > neg["scores"][0]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("args, message", [
    ([], "no reward model configured"),
    (["--model", "x", "--score", "banana"], "score"),
    (["--config", "/no/such.yaml"], "does not exist"),
])
def test_serve_command_rejects_bad_settings_at_start(args, message):
    out = run_cli("reward", "serve", *args, timeout=60)
    assert out.returncode == 2
    assert message in out.stderr


def test_client_rides_out_a_reward_service_restart(tiny_kit):
    port = free_port()
    first = ServerThread(create_app(make_settings(tiny_kit)), port=port).start()
    client = RewardClient(first.url, retry=RetryPolicy(max_retries=30, backoff_base=0.05, backoff_max=0.5))
    before = client.score(TEXTS)
    first.stop()
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(scores=client.score(TEXTS)))
    worker.start()  # calls while the service is down
    time.sleep(1.0)
    assert worker.is_alive()  # still retrying, not failed
    second = ServerThread(create_app(make_settings(tiny_kit)), port=port).start()
    worker.join(timeout=60)
    second.stop()
    assert result["scores"] == pytest.approx(before, abs=1e-6)


def test_reward_fn_against_the_live_service(tiny_kit, serve):
    s = serve(create_app(make_settings(tiny_kit)))
    reward_fn = make_reward_fn(s.url, chunk_size=3)
    samples = [f"{t} ({i})" for i, t in enumerate(TEXTS * 4)]
    rewards = reward_fn(samples=samples, prompts=["x"] * 8, outputs=["y"] * 8)
    assert len(rewards) == 8 and all(0 <= r <= 1 for r in rewards)
    assert rewards == pytest.approx(RewardClient(s.url).score(samples), abs=1e-6)
