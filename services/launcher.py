"""`rlhf up`: the whole system as local processes (reward, generator, trainer) on loopback, no Docker needed.

Each service runs in its own session with its own log; the launcher waits for each to be ready, watches all of
them, writes the run report when training ends, and stops every process it started on the way out: on success, on
Ctrl-C, and when any service dies (then with a clear message and a non-zero exit).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.checkpoints import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
TRAINER_EXIT_MARGIN_S = 15.0  # after its save: the trainer's server shutdown and interpreter exit


class LaunchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Preset:
    reward_model: str
    reward_label: str
    policy: str
    config: Path
    needs_tiny_kit: bool


def presets(tiny_dir: Path) -> dict[str, Preset]:
    return {
        "tiny": Preset(str(tiny_dir / "tiny-sentiment"), "POSITIVE", str(tiny_dir / "tiny-gpt2"),
                       ROOT / "configs" / "tiny.yaml", needs_tiny_kit=True),
        "imdb": Preset("lvwerra/distilbert-imdb", "POSITIVE", "lvwerra/gpt2-imdb",
                       ROOT / "configs" / "ppo_sentiments.yaml", needs_tiny_kit=False),
    }


@dataclass
class Service:
    name: str
    argv: list[str]
    port: int
    ready_path: str
    log: Path
    stop_grace: float = 20.0  # seconds between SIGTERM and SIGKILL
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Supervisor:
    """Starts, watches and stops the services; every child leads its own process group."""

    log_dir: Path
    services: list[Service] = field(default_factory=list)

    def start(self, service: Service) -> Service:
        service.log.parent.mkdir(parents=True, exist_ok=True)
        with service.log.open("ab") as log:
            service.process = subprocess.Popen(service.argv, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.services.append(service)
        # atomically: whoever watches the file (a test, an operator's script) never reads it half-written
        atomic_write_text(self.log_dir / "pids.json", json.dumps({s.name: s.process.pid for s in self.services}))
        return service

    def check_alive(self, allow_exit: str | None = None) -> None:
        for s in self.services:
            code = s.process.poll()
            if code is not None and s.name != allow_exit:
                raise LaunchError(f"the {s.name} service exited unexpectedly (code {code}); see {s.log}\n"
                                  f"{_tail(s.log)}")

    def wait_ready(self, service: Service, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(service.url + service.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise LaunchError(f"the {service.name} service was not ready after {timeout:.0f} s; see {service.log}")

    def stop_all(self) -> None:
        """Stop the services one at a time, newest first: the trainer finishes its iteration and saves while the
        reward service still answers. Each gets SIGTERM, then SIGKILL (its whole group) after its `stop_grace`."""
        for s in reversed(self.services):
            _signal_group(s.process, signal.SIGTERM)
            try:
                s.process.wait(timeout=s.stop_grace)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(s.process, signal.SIGKILL)  # the group too: no grandchild outlives the launcher
            s.process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _rlhf(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


def up(preset_name: str, runs: Path, log_dir: Path, ports: tuple[int, int, int], overrides: list[str],
       ready_timeout: float = 600.0, echo=print, stop_grace: float | None = None) -> int:
    """Run the preset end to end; returns the process exit code (0: trained and reported). `stop_grace`: seconds a
    stop lets the trainer finish its iteration and save (default: RLHF_STOP_GRACE, else DEFAULT_STOP_GRACE_S)."""
    from services.trainer.config import load_config, stop_grace_s
    from services.trainer.data import tiny_kit_dir

    preset = presets(tiny_kit_dir())[preset_name]
    if preset.needs_tiny_kit and not (tiny_kit_dir() / "report.json").exists():
        from shared.tiny.build import build_tiny

        echo(f"building the tiny kit in {tiny_kit_dir()} (about 2 minutes, once)")
        build_tiny(tiny_kit_dir())
    reward_port, generator_port, trainer_port = ports
    sets = [f"reward.url=http://127.0.0.1:{reward_port}", f"generator.url=http://127.0.0.1:{generator_port}",
            f"train.checkpoint_dir={runs}", *overrides]
    config = load_config(preset.config, sets)  # fails here, before anything starts, if the config is wrong
    try:
        grace = stop_grace_s(stop_grace)
    except ValueError as exc:
        echo(f"error: {exc}")
        return 2
    log_dir.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(log_dir)
    stop_reason: list[str] = []

    def on_signal(signum, _frame) -> None:
        stop_reason.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        reward = supervisor.start(Service(
            "reward", _rlhf("reward", "serve", "--model", preset.reward_model, "--label", preset.reward_label,
                            "--port", str(reward_port), "--log-level", "warning"), reward_port, "/readyz",
            log_dir / "reward.log"))
        generator = supervisor.start(Service(
            "generator", _rlhf("generator", "serve", "--model", preset.policy, "--checkpoints", str(runs),
                               "--port", str(generator_port), "--log-level", "warning"), generator_port, "/readyz",
            log_dir / "generator.log"))
        for service in (reward, generator):
            supervisor.wait_ready(service, ready_timeout)
            echo(f"{service.name} ready at {service.url} (log: {service.log})")
        trainer = supervisor.start(Service(
            "trainer", _rlhf("trainer", "serve", "--config", str(preset.config), "--port", str(trainer_port),
                             "--exit-when-done", "--stop-grace", str(grace), *[a for s in sets for a in ("--set", s)]),
            trainer_port, "/healthz", log_dir / "trainer.log", stop_grace=grace + TRAINER_EXIT_MARGIN_S))
        supervisor.wait_ready(trainer, ready_timeout)
        echo(f"trainer running at {trainer.url}/v1/status (log: {trainer.log})")
        while trainer.process.poll() is None:
            supervisor.check_alive(allow_exit="trainer")
            time.sleep(0.5)
        supervisor.check_alive(allow_exit="trainer")
        if trainer.process.returncode != 0:
            raise LaunchError(f"training failed (exit code {trainer.process.returncode}); see {trainer.log}\n"
                              f"{_tail(trainer.log)}")
        report = config.run_dir / "report.md"
        if not report.exists():
            raise LaunchError(f"training finished but wrote no report; see {trainer.log}\n{_tail(trainer.log)}")
        echo(f"training finished; report: {report} and {report.with_suffix('.png')}")
        return 0
    except LaunchError as exc:
        echo(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        echo(f"stopping on {stop_reason[0] if stop_reason else 'interrupt'}: the trainer saves a checkpoint first")
        return 130
    finally:
        for sig in previous:  # a second Ctrl-C must not cut the trainer's save short
            signal.signal(sig, lambda *_: echo(f"already stopping: the trainer may take up to {grace:.0f} s to save"))
        supervisor.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
