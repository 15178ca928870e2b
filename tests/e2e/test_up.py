"""`rlhf up --preset tiny`: the three services as local processes, a report at the end, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow


def launch(tiny_kit: Path, tmp_path: Path, *sets: str, **env_vars: str) -> tuple[subprocess.Popen, Path, list[int]]:
    ports = [free_port() for _ in range(3)]
    cmd = [sys.executable, "-m", "services.cli", "up", "--preset", "tiny", "--runs", str(tmp_path / "runs"),
           "--logs", str(tmp_path / "logs"), "--reward-port", str(ports[0]), "--generator-port", str(ports[1]),
           "--trainer-port", str(ports[2]), "--set", "train.tensorboard=false",
           *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RLHF_TINY_DIR": str(tiny_kit), **env_vars}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, tmp_path / "logs", ports


def service_pids(logs: Path, names=("reward", "generator", "trainer"), timeout: float = 120) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pids = json.loads((logs / "pids.json").read_text())
        except (OSError, ValueError):  # not written yet
            pids = {}
        if set(names) <= set(pids):
            return pids
        time.sleep(0.2)
    raise AssertionError("the launcher did not start every service")


def wait_for_step(trainer_port: int, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{trainer_port}/v1/status", timeout=2).json()["step"] >= step:
                return
        except (httpx.TransportError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"the trainer did not reach step {step}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_trains_reports_and_cleans_up(tiny_kit, tmp_path):
    proc, logs, _ = launch(tiny_kit, tmp_path, "train.total_steps=8", "train.eval_interval=4")
    pids = service_pids(logs)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "training finished" in out
    run = tmp_path / "runs" / "tiny"
    report = (run / "report.md").read_text()
    assert "tiny/step-8" in report  # the trained checkpoint, served by the generator for the table
    assert "| eval reward (mean) |" in report and "## Base vs trained" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and line.count("|") == 6]
    assert len(rows) >= 1 + 8  # header + one row per example prompt
    assert (run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("reward", "generator", "trainer"):
        assert (logs / f"{name}.log").exists()
    assert not [name for name, pid in pids.items() if alive(pid)]


@pytest.mark.parametrize("victim", ["reward", "generator", "trainer"])
def test_killing_any_service_stops_the_launcher_with_a_clear_message(tiny_kit, tmp_path, victim):
    proc, logs, ports = launch(tiny_kit, tmp_path, "train.total_steps=500")
    pids = service_pids(logs)
    wait_for_step(ports[2], 1)  # training is really under way
    os.kill(pids[victim], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    expected = "training failed" if victim == "trainer" else f"the {victim} service exited unexpectedly"
    assert expected in err
    assert not [name for name, pid in pids.items() if alive(pid)]


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in run_dir.glob("step-*/manifest.json"))


def trainer_step(trainer_port: int) -> int:
    return httpx.get(f"http://127.0.0.1:{trainer_port}/v1/status", timeout=5).json()["step"]


def test_ctrl_c_saves_a_new_checkpoint_that_the_next_run_resumes_from(tiny_kit, tmp_path):
    proc, logs, ports = launch(tiny_kit, tmp_path, "train.total_steps=500", "train.checkpoint_interval=2",
                               "train.eval_interval=1000", RLHF_STOP_GRACE="90")
    pids = service_pids(logs)
    assert "--stop-grace\x0090.0\x00" in Path(f"/proc/{pids['trainer']}/cmdline").read_text()  # its join matches
    wait_for_step(ports[2], 3)
    run = tmp_path / "runs" / "tiny"
    before, at_signal = committed_steps(run), trainer_step(ports[2])
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopping on SIGINT" in out
    assert not [name for name, pid in pids.items() if alive(pid)]
    saved = committed_steps(run)[-1]  # the trainer finished its iteration and saved it on the way out
    assert saved > max(before, default=0) and saved >= at_signal, (before, at_signal, saved)

    proc, logs, _ = launch(tiny_kit, tmp_path, f"train.total_steps={saved + 2}", "train.checkpoint_interval=2",
                           "train.eval_interval=1000")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"resumed from {run / f'step-{saved}'} at step {saved}" in (logs / "trainer.log").read_text()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "rollout/reward_mean" in line]
    assert steps == list(range(1, saved + 3))  # none lost, none repeated
