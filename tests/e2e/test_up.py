"""`rlhf up --preset tiny`: the three services as local processes, a report at the end, nothing left behind."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from services.launcher import TrainingProgress
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def launch(tiny_kit: Path, tmp_path: Path, *sets: str, extra: Sequence[str] = (),
           **env_vars: str) -> tuple[subprocess.Popen, Path, list[int]]:
    """`rlhf up --preset tiny` on free ports with `--set` for each of `sets`, then the `extra` arguments."""
    ports = [free_port() for _ in range(3)]
    cmd = [sys.executable, "-m", "services.cli", "up", "--preset", "tiny", "--runs", str(tmp_path / "runs"),
           "--logs", str(tmp_path / "logs"), "--reward-port", str(ports[0]), "--generator-port", str(ports[1]),
           "--trainer-port", str(ports[2]), "--set", "train.tensorboard=false",
           *[a for s in sets for a in ("--set", s)], *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RLHF_TINY_DIR": str(tiny_kit), **env_vars}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, tmp_path / "logs", ports


class OutputReader:
    """Collects a process's stdout lines in a thread; `wait_for(text)` until a line holds it (or the output ends)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<EOF>")
            self._changed.notify_all()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        with self._changed:
            self._changed.wait_for(lambda: any(text in line or line == "<EOF>" for line in self.lines), timeout)
            assert text in self.text, f"no {text!r} in:\n{self.text}"


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
    for progress in ("reward: ready in", "generator: ready in", "trainer: ready in", "training: iteration 8/8",
                     "rollout reward", "KL", "eval reward", "training finished; report: "):
        assert progress in out, out
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


def test_a_rerun_of_a_finished_run_says_so_and_with_keep_serving_serves_its_checkpoints(tiny_kit, tmp_path):
    proc, logs, _ = launch(tiny_kit, tmp_path, "train.total_steps=2", "train.eval_interval=1")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]

    proc, logs, _ = launch(tiny_kit, tmp_path, "train.total_steps=2")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "run 'tiny' already finished" in out and "--fresh" in out and "--run-name" in out
    assert "loading" not in out  # nothing started

    proc, logs, ports = launch(tiny_kit, tmp_path, "train.total_steps=2", extra=["--keep-serving"])
    output = OutputReader(proc.stdout)
    try:
        output.wait_for("Ctrl-C stops", timeout=300)
        assert "serving the finished run's checkpoints" in output.text
        assert f"rlhf generate --url http://127.0.0.1:{ports[1]} --checkpoint tiny/step-2" in output.text
        body = httpx.post(f"http://127.0.0.1:{ports[1]}/v1/generate", json={
            "prompts": ["This movie was"], "checkpoint": "tiny/step-2", "max_new_tokens": 5}, timeout=60).json()
        assert body["checkpoint"] == "tiny/step-2"
        pids = json.loads((logs / "pids.json").read_text())
        assert set(pids) == {"reward", "generator"}  # no trainer: there is nothing to train
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopping the services on SIGTERM" in output.text
    assert not [name for name, pid in pids.items() if alive(pid)]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def status(step: int, eval_reward: float | None = None, state: str = "running") -> dict:
    return {"state": state, "step": step, "total": 4, "reward_mean": 0.5 + step / 10, "kl": 0.1,
            "eval_reward_mean": eval_reward, "eta_seconds": 10.0 * (4 - step) if state == "running" else None,
            "message": None}


def test_training_progress_is_one_line_rewritten_in_place_on_a_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    terminal = Terminal()
    progress = TrainingProgress(terminal)
    for s in (status(1), status(2, 0.7)):
        progress.show(s)
    progress.close()
    text = terminal.getvalue()
    assert text.count("\r") == 2 and text.count("\n") == 1 and text.endswith("\n")
    assert text.split("\r")[-1].startswith(
        "training: iteration 2/4 | rollout reward 0.700 | KL 0.100 | eval reward 0.700 | ETA 20 s")

    monkeypatch.setenv("COLUMNS", "30")  # a narrow terminal: a wrapped line could not be rewritten in place
    narrow = Terminal()
    TrainingProgress(narrow).show(status(3))
    assert narrow.getvalue() == "\r" + "training: iteration 3/4 | rollout reward"[:29] + "\x1b[K"


def test_training_progress_elsewhere_is_a_plain_line_at_each_eval_and_at_the_end():
    log = io.StringIO()
    progress = TrainingProgress(log, every=3600)
    for s in (status(1), status(2), status(3, 0.8), status(4, 0.8), status(4, 0.9, state="finished")):
        progress.show(s)
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(" | ")[0] for line in lines] == ["training: iteration 1/4", "training: iteration 3/4",
                                                        "training: iteration 4/4", "training: iteration 4/4"]
    assert lines[-1].endswith("eval reward 0.900 | finished")
