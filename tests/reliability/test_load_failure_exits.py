"""A service whose startup model cannot load exits non-zero with its own one-line error, instead of staying up
unready; `--no-exit-on-load-failure` (or the setting in the environment) keeps it up, saying why on /readyz."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.reward.app import create_app
from shared.readiness import LoadFailed, wait_until_ready
from tests.conftest import ServerThread, free_port
from tests.reliability.conftest import reward_settings

RLHF = [sys.executable, "-m", "services.cli"]


def serve_command(*args: str) -> list[str]:
    return [*RLHF, *args, "--port", str(free_port()), "--log-level", "warning"]


def run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_reward_serve_with_a_missing_model_folder_exits_1_with_the_reason():
    done = run(serve_command("reward", "serve", "--model", "/nonexistent"))
    assert done.returncode == 1, done.stderr
    assert last_line(done.stderr) == "error: reward model failed to load: model folder '/nonexistent' does not exist"


def test_generator_serve_with_an_unknown_hub_id_exits_1_with_the_reason():
    done = run(serve_command("generator", "serve", "--model", "no-such/model-id"))
    assert done.returncode == 1, done.stderr
    line = last_line(done.stderr)
    assert line.startswith("error: generator base model failed to load: cannot load 'no-such/model-id'"), line


@pytest.mark.parametrize("flag, env", [("--no-exit-on-load-failure", {}),
                                       (None, {"REWARD_EXIT_ON_LOAD_FAILURE": "false"})])
def test_reward_service_told_to_stay_up_stays_up_and_says_why(flag, env):
    port = free_port()
    args = [*RLHF, "reward", "serve", "--model", "/nonexistent", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(args + ([flag] if flag else []), env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def alive() -> None:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}: {proc.stderr.read()}")

    try:
        with pytest.raises(LoadFailed, match="reward model failed to load: model folder '/nonexistent'"):
            wait_until_ready(f"http://127.0.0.1:{port}", 120, alive=alive)
        alive()  # still serving: the admin API may load a model later
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_in_process_server_stops_too_and_says_why(tiny_kit):
    app = create_app(reward_settings(tiny_kit, models=[{"name": "bad", "source": "/nonexistent"}]))
    server = ServerThread(app)
    with pytest.raises(Exception, match="model folder '/nonexistent' does not exist"):
        server.start()
    server.thread.join(timeout=30)
    assert not server.thread.is_alive()
    assert app.state.loading.failure == "reward model failed to load: model folder '/nonexistent' does not exist"
