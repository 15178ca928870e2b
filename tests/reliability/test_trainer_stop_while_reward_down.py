"""A stop that comes while the reward service is down (a dead service under `rlhf up`, or `docker compose stop`
during a reward outage) ends the run at once and still saves every step done since the last checkpoint."""

from __future__ import annotations

import threading
import time

import pytest

from services.trainer.run import train
from services.trainer.tracking import TrainingStatus
from tests.conftest import ServerThread, free_port
from tests.e2e.test_train_tiny import reward_app, rollout_steps, tiny_config

pytestmark = pytest.mark.slow


def test_a_stop_during_a_reward_outage_saves_the_steps_done_and_resume_repeats_none(tiny_kit, tmp_path):
    port = free_port()
    reward = ServerThread(reward_app(tiny_kit), port=port).start()
    overrides = ("train.eval_interval=100", "train.checkpoint_interval=100")  # no checkpoint before the stop
    config = tiny_config(tiny_kit, tmp_path, reward.url, "train.total_steps=50", *overrides)
    status = TrainingStatus(total=50)
    stopped_at: list[float] = []

    def on_step(record: dict) -> None:
        if record["step"] == 3:  # the reward service goes away; a stop arrives while the trainer retries
            reward.stop()
            threading.Timer(1.0, lambda: (stopped_at.append(time.monotonic()), status.stop_requested.set())).start()

    train(config, status=status, on_step=on_step)
    waited = time.monotonic() - stopped_at[0]
    assert status.state == "stopped" and waited < 15  # not held for the retry deadline (600 s)
    assert (config.run_dir / "step-3" / "manifest.json").is_file() and not (config.run_dir / "step-4").exists()
    assert status.last_checkpoint == "tiny/step-3"

    again = ServerThread(reward_app(tiny_kit), port=port).start()
    try:
        resumed = train(tiny_config(tiny_kit, tmp_path, again.url, "train.total_steps=6", *overrides))
    finally:
        again.stop()
    assert resumed.state == "finished" and rollout_steps(config.run_dir) == [1, 2, 3, 4, 5, 6]
