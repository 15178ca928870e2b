"""The reward service off the happy path: warm-up, a dying batch worker, a broken model, and secure defaults."""

from __future__ import annotations

import logging
import threading
import time

import httpx
import pytest
from pydantic import ValidationError

from services.reward import registry as registry_module
from services.reward.app import create_app
from services.reward.scorer import Scorer
from tests.reliability.conftest import ADMIN_KEY, reward_settings, watch_readyz

pytestmark = pytest.mark.slow

TEXTS = ["The acting was superb.", "A waste of two hours."]


def score(url, **body):
    return httpx.post(url + "/v1/score", json={"texts": TEXTS, **body}, timeout=30)


def test_while_models_load_every_scoring_request_gets_503_with_retry_after(tiny_kit, serve, monkeypatch):
    gate = threading.Event()

    class SlowScorer(Scorer):
        def __init__(self, *args, **kw):
            gate.wait(30)
            super().__init__(*args, **kw)

    monkeypatch.setattr(registry_module, "Scorer", SlowScorer)
    s = serve(create_app(reward_settings(tiny_kit)), ready_path="/healthz")
    for r in (score(s.url), score(s.url, model="sentiment"), score(s.url, model="other"),
              httpx.post(s.url + "/v1/classify", json={"texts": TEXTS})):
        assert r.status_code == 503, r.text  # never 404: a client must retry, not give up
        assert int(r.headers["retry-after"]) >= 1 and "loading" in r.json()["error"]["message"]
    assert httpx.get(s.url + "/readyz").status_code == 503
    gate.set()
    deadline = time.monotonic() + 30
    while httpx.get(s.url + "/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert score(s.url).status_code == 200
    assert score(s.url, model="other").status_code == 404  # loaded now: an unknown name is an error


def test_a_dead_batch_worker_turns_readyz_503_restarts_and_loses_no_request(tiny_kit, serve):
    app = create_app(reward_settings(tiny_kit))
    s = serve(app)
    expected = score(s.url).json()["scores"]
    batcher = app.state.models.get("sentiment").batcher
    real_take = batcher._take_batch
    calls = []

    def dies_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected worker fault")
        return real_take()

    batcher._take_batch = dies_once
    result: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: result.append(score(s.url)))
    sender.start()
    seen = watch_readyz(s.url)
    sender.join(30)
    down = [r for r in seen if r.status_code == 503]
    assert down and seen[-1].status_code == 200  # unready while dead, ready again once restarted
    assert all("batch worker died" in r.json()["error"]["message"] for r in down)
    assert batcher.worker_restarts == 1
    assert result[0].status_code == 200 and result[0].json()["scores"] == pytest.approx(expected, abs=1e-6)
    assert score(s.url).status_code == 200


def test_non_finite_model_output_is_a_500_that_names_the_request(tiny_kit, serve, caplog):
    app = create_app(reward_settings(tiny_kit))
    s = serve(app)
    model = app.state.models.get("sentiment").scorer.model
    real_forward = model.forward

    def broken_forward(**kw):  # weights gone bad: the forward pass runs, its numbers are NaN
        out = real_forward(**kw)
        out.logits = out.logits * float("nan")
        return out

    model.forward = broken_forward
    with caplog.at_level(logging.ERROR, logger="shared.server"):
        for path in ("/v1/score", "/v1/classify"):
            r = httpx.post(s.url + path, json={"texts": TEXTS}, headers={"x-request-id": "trace-42"})
            assert r.status_code == 500
            error = r.json()["error"]
            assert error["type"] == "non_finite_output" and "non-finite" in error["message"]
            assert error["request_id"] == r.headers["x-request-id"] == "trace-42"
    assert "trace-42" in caplog.text  # the operator finds the fault by the id the client reports


def test_model_control_is_off_unless_an_admin_key_is_set(tiny_kit, serve):
    s = serve(create_app(reward_settings(tiny_kit, api_key="user-key")))
    user = {"Authorization": "Bearer user-key"}
    for r in (httpx.put(s.url + "/v1/models/x", json={"source": str(tiny_kit / "tiny-sentiment")}, headers=user),
              httpx.delete(s.url + "/v1/models/sentiment", headers=user),
              httpx.put(s.url + "/v1/models/x", json={"source": "/etc"})):
        assert r.status_code == 403, r.text
        assert "REWARD_ADMIN_API_KEY" in r.json()["error"]["message"]
    assert score(s.url).status_code == 401 and httpx.post(s.url + "/v1/score", json={"texts": TEXTS},
                                                          headers=user).status_code == 200


def test_a_scoring_key_never_grants_admin(tiny_kit, serve):
    with pytest.raises(ValidationError, match="must differ"):
        reward_settings(tiny_kit, api_key="same", admin_api_key="same")
    s = serve(create_app(reward_settings(tiny_kit, api_key="user-key", admin_api_key=ADMIN_KEY)))
    spec = {"source": str(tiny_kit / "tiny-sentiment-3"), "label": "positive"}
    r = httpx.put(s.url + "/v1/models/x", json=spec, headers={"Authorization": "Bearer user-key"})
    assert r.status_code == 401
    assert httpx.put(s.url + "/v1/models/x", json=spec,
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 201


def test_loaded_models_are_capped(tiny_kit, serve):
    s = serve(create_app(reward_settings(tiny_kit, admin_api_key=ADMIN_KEY, max_models=2)))
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    spec = {"source": str(tiny_kit / "tiny-sentiment-3"), "label": "positive"}
    assert httpx.put(s.url + "/v1/models/second", json=spec, headers=admin, timeout=60).status_code == 201
    r = httpx.put(s.url + "/v1/models/third", json=spec, headers=admin, timeout=60)
    assert r.status_code == 409 and "max_models" in r.json()["error"]["message"]
    assert httpx.put(s.url + "/v1/models/second", json=spec, headers=admin, timeout=60).status_code == 200
    assert len(httpx.get(s.url + "/v1/models").json()["models"]) == 2


def test_hub_ids_load_only_when_hub_access_is_enabled(tiny_kit, serve):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    off = serve(create_app(reward_settings(tiny_kit, admin_api_key=ADMIN_KEY)))
    r = httpx.put(off.url + "/v1/models/x", json={"source": "org/model"}, headers=admin)
    assert r.status_code == 403
    on = serve(create_app(reward_settings(tiny_kit, admin_api_key=ADMIN_KEY, allow_hub_models=True)))
    r = httpx.put(on.url + "/v1/models/x", json={"source": "org/model"}, headers=admin, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["type"] == "model_load_failed"  # allowed, offline here


def test_every_service_binds_loopback_by_default():
    import inspect

    from services.generator.settings import GeneratorSettings
    from services.reward.settings import RewardSettings
    from services.trainer.cli import serve as trainer_serve

    assert RewardSettings(model="m").host == "127.0.0.1"
    assert GeneratorSettings(model="m").host == "127.0.0.1"
    assert inspect.signature(trainer_serve).parameters["host"].default == "127.0.0.1"


def test_the_cli_clients_take_each_services_key_from_the_environment(tiny_kit, serve):
    import os
    import subprocess
    import sys

    s = serve(create_app(reward_settings(tiny_kit, api_key="user-key")))
    env = {k: v for k, v in os.environ.items() if k not in ("REWARD_API_KEY", "RLHF_API_KEY")}
    command = [sys.executable, "-m", "services.cli", "score", "--url", s.url, "A fine film."]
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "401" in refused.stderr
    served = subprocess.run(command, env={**env, "REWARD_API_KEY": "user-key"}, capture_output=True, text=True,
                            timeout=60)
    assert served.returncode == 0 and 0 <= float(served.stdout) <= 1
