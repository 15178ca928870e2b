"""The trainer under faults, on the tiny preset against a real reward service on loopback: killed while saving, a
full disk, a torn metrics line, a corrupt or malicious newest checkpoint. Each must end with every PPO step in
metrics.jsonl exactly once: none lost, none repeated."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from services.reward.app import create_app as create_reward_app
from services.reward.settings import RewardSettings
from services.trainer.app import create_app as create_trainer_app
from services.trainer.checkpointing import TRAINER_STATE, load_trainer_state
from services.trainer.config import load_config
from services.trainer.run import train
from shared.checkpoints import CheckpointWriteError, read_checkpoint
from tests.conftest import ROOT, ServerThread

FAST = ["train.tensorboard=false", "train.checkpoint_interval=2", "train.eval_interval=100", "data.eval_prompts=4",
        "method.num_rollouts=16", "method.chunk_size=16", "method.ppo_epochs=2"]


def tiny_config(kit: Path, runs: Path, url: str, steps: int):
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.model_path={kit / 'tiny-gpt2'}", f"train.checkpoint_dir={runs}", f"reward.url={url}",
        f"train.total_steps={steps}", *FAST])


def lost_and_repeated(run_dir: Path, total: int) -> tuple[int, int]:
    """PPO steps missing from metrics.jsonl, and lines beyond one per step."""
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "rollout/reward_mean" in json.loads(line)]
    return len(set(range(1, total + 1)) - set(steps)), len(steps) - len(set(steps))


def hidden(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.iterdir() if p.name.startswith(".step-")]


@pytest.fixture(scope="module")
def reward_url(tiny_kit):
    server = ServerThread(create_reward_app(RewardSettings(model=str(tiny_kit / "tiny-sentiment"), device="cpu",
                                                           port=0))).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def four_steps(tiny_kit, reward_url, tmp_path_factory) -> Path:
    """A run of 4 steps: step-2 and step-4 committed, metrics of steps 0 (eval) to 4."""
    runs = tmp_path_factory.mktemp("base")
    status = train(tiny_config(tiny_kit, runs, reward_url, 4))
    assert status.state == "finished"
    return runs


@pytest.fixture
def copy_of_four_steps(four_steps, tmp_path) -> Path:
    shutil.copytree(four_steps, tmp_path / "runs")
    return tmp_path / "runs"


HANG_IN_SAVE = """
import os, sys, time
import services.trainer.checkpointing as checkpointing
real = checkpointing.write_checkpoint
def write_checkpoint(root, run, step, save, **kw):
    def save_and_hang(tmp):
        save(tmp)
        if step == int(os.environ["HANG_AT_STEP"]):
            open(os.environ["HANG_MARKER"], "w").write(str(tmp))
            time.sleep(600)  # killed here: the files are in the hidden folder, nothing is committed
    return real(root, run, step, save_and_hang, **kw)
checkpointing.write_checkpoint = write_checkpoint
from services.cli import app
app(sys.argv[1:])
"""


def test_sigkill_during_a_save_loses_and_repeats_no_step(tiny_kit, reward_url, tmp_path):
    runs, marker = tmp_path / "runs", tmp_path / "hanging"
    config = tiny_config(tiny_kit, runs, reward_url, 6)
    argv = ["train", "--config", str(ROOT / "configs" / "tiny.yaml")]
    for item in (f"model.model_path={tiny_kit / 'tiny-gpt2'}", f"train.checkpoint_dir={runs}",
                 f"reward.url={reward_url}", "train.total_steps=6", *FAST):
        argv += ["--set", item]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HANG_AT_STEP": "4", "HANG_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", HANG_IN_SAVE, *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.stderr.read()[-2000:] if proc.poll() is not None else "no save at step 4"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    tmp = Path(marker.read_text())
    assert tmp.is_dir() and tmp.name == f".step-4.tmp-{proc.pid}" and (tmp / TRAINER_STATE).exists()
    assert not (config.run_dir / "step-4").exists()

    status = train(config)
    assert status.state == "finished" and status.start_step == 2  # the last committed step
    assert lost_and_repeated(config.run_dir, 6) == (0, 0)
    assert hidden(config.run_dir) == []  # the dead writer's folder is gone
    assert read_checkpoint(runs, "tiny", config.run_dir / "step-4").valid


def test_a_full_disk_while_saving_fails_clearly_and_loses_no_step(tiny_kit, reward_url, tmp_path, monkeypatch):
    config = tiny_config(tiny_kit, tmp_path / "runs", reward_url, 6)
    real_save, saves = torch.save, []

    def fills_the_disk(obj, path, *args, **kw):
        saves.append(path)
        if len(saves) == 2:  # the trainer state of step 4, after its weights
            Path(path).write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kw)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(CheckpointWriteError, match="tiny/step-4.*No space left on device") as failure:
        train(config)
    assert failure.value.errno == errno.ENOSPC
    assert sorted(p.name for p in config.run_dir.glob("step-*")) == ["step-2"] and hidden(config.run_dir) == []
    assert load_trainer_state(config.run_dir / "step-2")["shared"]["iteration"] == 2  # intact

    monkeypatch.setattr(torch, "save", real_save)  # space is back
    status = train(config)
    assert status.state == "finished" and status.start_step == 2
    assert lost_and_repeated(config.run_dir, 6) == (0, 0)


def test_a_torn_last_metrics_line_and_garbage_lines_are_dropped_on_resume(tiny_kit, reward_url, copy_of_four_steps,
                                                                          caplog):
    config = tiny_config(tiny_kit, copy_of_four_steps, reward_url, 6)
    log_file = config.run_dir / "metrics.jsonl"
    lines = log_file.read_text().splitlines()
    lines.insert(2, "\x00\x00 not json")  # garbage among good lines
    log_file.write_text("\n".join(lines) + '\n{"step": 5, "rollout/reward_mean": 0.4')  # killed mid-line
    with caplog.at_level(logging.WARNING, logger="services.trainer.tracking"):
        status = train(config)
    assert status.state == "finished" and status.start_step == 4
    assert lost_and_repeated(config.run_dir, 6) == (0, 0)
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "line 3 (not a JSON object" in warnings and "(a torn last line)" in warnings
    assert [json.loads(line)["step"] for line in log_file.read_text().splitlines()][0] == 0  # the step-0 eval kept


class MkdirOnLoad:
    """A pickle that runs code when loaded: it would create the `marker` folder."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def truncate_weights(step_dir: Path, marker: Path) -> None:
    weights = step_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def malicious_state(step_dir: Path, marker: Path) -> None:
    torch.save({"shared": MkdirOnLoad(marker), "ranks": [{}]}, step_dir / TRAINER_STATE)


def garbage_state(step_dir: Path, marker: Path) -> None:
    (step_dir / TRAINER_STATE).write_bytes(os.urandom(2048))


@pytest.mark.parametrize("corrupt", [truncate_weights, malicious_state, garbage_state])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(tiny_kit, reward_url,
                                                                                copy_of_four_steps, tmp_path, caplog,
                                                                                corrupt):
    config = tiny_config(tiny_kit, copy_of_four_steps, reward_url, 6)
    marker = tmp_path / "pwned"
    corrupt(config.run_dir / "step-4", marker)
    with caplog.at_level(logging.WARNING, logger="services.trainer.run"):
        status = train(config)
    assert not marker.exists()  # the pickle's code never ran
    assert status.state == "finished" and status.start_step == 2  # not 0: the older good checkpoint is used
    assert status.message.startswith("resumed from tiny/step-2 instead: tiny/step-4 is unusable")
    assert any("not resuming from tiny/step-4" in r.getMessage() for r in caplog.records)
    assert lost_and_repeated(config.run_dir, 6) == (0, 0)
    assert load_trainer_state(config.run_dir / "step-4")["shared"]["iteration"] == 4  # rewritten, sound again


def test_metrics_api_serves_history_from_before_a_resume_and_clients_take_keys_from_the_env(
        tiny_kit, copy_of_four_steps, serve, monkeypatch):
    reward = serve(create_reward_app(RewardSettings(model=str(tiny_kit / "tiny-sentiment"), device="cpu", port=0,
                                                    api_key="reward-secret")))
    monkeypatch.setenv("REWARD_API_KEY", "reward-secret")  # not in the config: compose sets it in the container
    monkeypatch.setenv("GENERATOR_API_KEY", "generator-secret")
    config = tiny_config(tiny_kit, copy_of_four_steps, reward.url, 6)
    assert config.reward.api_key == "reward-secret" and config.generator.api_key == "generator-secret"
    trainer = serve(create_trainer_app(config, api_key="trainer-secret"), ready_path="/healthz")
    auth = {"Authorization": "Bearer trainer-secret"}
    deadline = time.monotonic() + 120
    while httpx.get(trainer.url + "/v1/status", headers=auth).json()["state"] != "finished":
        assert time.monotonic() < deadline, httpx.get(trainer.url + "/v1/status", headers=auth).json()
        time.sleep(0.2)
    assert httpx.get(trainer.url + "/v1/metrics").status_code == 401
    history = httpx.get(trainer.url + "/v1/metrics", headers=auth).json()["history"]
    assert [h["step"] for h in history if "rollout/reward_mean" in h] == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in history if "eval/reward_mean" in h] == [0, 4, 6]  # evals of both processes
    assert [h["step"] for h in httpx.get(trainer.url + "/v1/metrics?since=5", headers=auth).json()["history"]] \
        == [5, 6, 6]
    manifest = (config.run_dir / "step-6" / "manifest.json").read_text()
    assert "secret" not in manifest and '"reward"' in manifest  # keys never reach the shared checkpoints volume


def test_with_no_usable_checkpoint_the_run_starts_over_and_says_why(tiny_kit, reward_url, copy_of_four_steps, caplog):
    config = tiny_config(tiny_kit, copy_of_four_steps, reward_url, 2)
    for step in (2, 4):
        garbage_state(config.run_dir / f"step-{step}", config.run_dir)
    with caplog.at_level(logging.ERROR, logger="services.trainer.run"):
        status = train(config)
    assert status.state == "finished" and status.start_step == 0
    assert status.message.startswith("starting from scratch, no checkpoint could be loaded: tiny/step-4 is unusable")
    assert "tiny/step-2 is unusable" in status.message and any("starting from scratch" in r.getMessage()
                                                               for r in caplog.records)
    assert lost_and_repeated(config.run_dir, 2) == (0, 0)
