"""A reward service restarted mid-training whose model takes longer to load than the client's first retries: the
trainer rides out the connection errors and the 503s of the warm-up, and no step is lost or repeated."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from services.reward import registry as registry_module
from services.reward.scorer import Scorer
from services.trainer.run import train
from tests.conftest import ServerThread, free_port
from tests.e2e.test_train_tiny import reward_app, rollout_steps, tiny_config

pytestmark = pytest.mark.slow

SLOW_LOAD_S = 20.0  # longer than the first several retries' backoff put together (0.25 + 0.5 + ... + 4 s)


def test_restart_with_a_slow_model_load_loses_and_repeats_no_step(tiny_kit, tmp_path, monkeypatch, caplog):
    port = free_port()
    servers = [ServerThread(reward_app(tiny_kit), port=port).start()]
    config = tiny_config(tiny_kit, tmp_path, servers[0].url, "train.total_steps=5", "train.eval_interval=100")
    load_started: list[float] = []

    class SlowScorer(Scorer):
        def __init__(self, *args, **kw):
            load_started.append(time.monotonic())
            time.sleep(SLOW_LOAD_S)
            super().__init__(*args, **kw)

    def restart() -> None:
        monkeypatch.setattr(registry_module, "Scorer", SlowScorer)
        servers.append(ServerThread(reward_app(tiny_kit), port=port).start(ready_path="/healthz"))

    def on_step(record: dict) -> None:
        if record["step"] == 2:  # kill the reward service; a new one comes up 1 s later and loads for 20 s
            servers[0].stop()
            threading.Timer(1.0, restart).start()

    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="shared.clients"):
            status = train(config, on_step=on_step)
    finally:
        for s in servers:
            s.stop()
    assert len(servers) == 2 and load_started  # it really was restarted, with the slow load
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert any("503" in m and "loading" in m for m in retries), retries  # it met the warm-up window
    assert not any("404" in m for m in retries)
    assert time.monotonic() - started > SLOW_LOAD_S  # the run really waited the load out
    assert status.state == "finished" and rollout_steps(config.run_dir) == [1, 2, 3, 4, 5]
