"""The stop grace: how long a shutdown lets the trainer finish its iteration and save (`rlhf up --stop-grace`,
RLHF_STOP_GRACE, the trainer's lifespan join)."""

from __future__ import annotations

import logging
import time

import pytest

from services.reward.app import create_app as create_reward_app
from services.reward.settings import RewardSettings
from services.trainer.app import create_app as create_trainer_app
from services.trainer.config import DEFAULT_STOP_GRACE_S, load_config, stop_grace_s
from shared.clients import RewardClient
from tests.conftest import ROOT


def test_the_grace_comes_from_the_argument_then_the_environment_then_the_default(monkeypatch):
    monkeypatch.delenv("RLHF_STOP_GRACE", raising=False)
    assert stop_grace_s() == DEFAULT_STOP_GRACE_S
    monkeypatch.setenv("RLHF_STOP_GRACE", "42.5")
    assert stop_grace_s() == 42.5 and stop_grace_s(7) == 7
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv("RLHF_STOP_GRACE", bad)
        with pytest.raises(ValueError, match="stop grace|RLHF_STOP_GRACE"):
            stop_grace_s()


def test_a_shutdown_waits_the_grace_for_the_save_then_gives_up_and_says_so(tiny_kit, tmp_path, serve, caplog):
    reward = serve(create_reward_app(RewardSettings(model=str(tiny_kit / "tiny-sentiment"), device="cpu", port=0)))
    client = RewardClient(reward.url)

    def slow_reward(samples, **_):  # the real service, behind a slow network: an iteration takes over 2 s
        time.sleep(2.0)
        return client.score(samples)

    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.model_path={tiny_kit / 'tiny-gpt2'}", f"train.checkpoint_dir={tmp_path}", f"reward.url={reward.url}",
        "train.total_steps=50", "train.tensorboard=false", "train.eval_interval=1000", "method.num_rollouts=16",
        "method.chunk_size=16"])
    app = create_trainer_app(config, reward_fn=slow_reward, stop_grace_s=0.5)
    server = serve(app, ready_path="/healthz")
    deadline = time.monotonic() + 60
    while app.state.status.state != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    with caplog.at_level(logging.ERROR, logger="services.trainer.app"):
        started = time.monotonic()
        server.stop()
        stopped_in = time.monotonic() - started
    assert stopped_in < 2.0  # the grace, not the iteration in flight, bounds the shutdown
    assert any("did not save within 0.5 s" in r.getMessage() for r in caplog.records)
    assert app.state.done.wait(60)  # the job still ends by itself after that iteration, and saves it
    assert app.state.status.state == "stopped" and list(config.run_dir.glob("step-*/manifest.json"))
    client.close()
